"""The fused encodes as a GPU would run them, compiled here for sm_90 (scripts/kernel_sass.py: Triton's own ptxas, no
GPU): a row of several blocks is loaded 16 bytes an instruction, and its codes leave in wide stores. The tile of
(segment, byte group, element) they replace loaded two bytes an instruction and stored one byte, and ran at 6.2-6.9x
(FP6) its floor on an H100 (docs/quality.md, 2026-12-06, fifth session).

Skipped without Triton (CI installs PyTorch's CPU wheel, which has none)."""
import os
import sys

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import kernel_sass  # noqa: E402


def compiled_counts(fmt: str, block, stochastic: bool = False, scale: str = "e8m0", d: int = 1024):
    launches = kernel_sass.capture_launches(fmt, "encode", d, block, scale, stochastic, 4096, torch.bfloat16)
    assert len(launches) == 1
    jit, args, kwargs = launches[0]
    return jit.fn.__name__, kernel_sass.describe(kernel_sass.compile_launch(jit, args, dict(kwargs), 90))[2]


@pytest.mark.parametrize("fmt, stochastic, loads", [("fp6_e2m3", False, 2), ("fp4_e2m1", False, 4),
                                                     ("fp4_e2m1", True, 4)])
def test_an_encode_of_several_blocks_a_row_loads_16_bytes_an_instruction(fmt, stochastic, loads):
    """A thread's bf16 elements in 16-byte loads: 16 of them (FP6, TILE) in two, 32 (FP4, BLOCK_TILE) in four."""
    name, counts = compiled_counts(fmt, 32, stochastic)
    assert name == "_encode_tile_kernel"
    assert counts.get("LDG.E.128", 0) == loads and not any(k.startswith("LDG.E.U16") for k in counts), counts


def test_fp6_packs_four_groups_into_three_words_and_fp4_a_threads_bytes_into_one_store():
    _, fp6 = compiled_counts("fp6_e2m3", 32, scale="float32")  # 3,072 + 128 bytes a row: word stores
    assert fp6.get("STG.E", 0) == 3, fp6
    _, fp4 = compiled_counts("fp4_e2m1", 32)  # a thread's 32 codes: 16 bytes, one store
    assert fp4.get("STG.E.128", 0) == 1 and "STG.E.64" not in fp4, fp4


def test_a_row_of_one_scale_keeps_the_segment_encode():
    name, _ = compiled_counts("fp6_e2m3", None)
    assert name == "_encode_kernel"


def test_fp4_decodes_a_row_of_several_blocks_from_a_wide_load_of_its_bytes():
    """One 16-byte load of a thread's 32 codes and a load per scale, where the decode of (rows, columns) one element a
    lane made 32 one-byte loads a thread (16 codes, 16 scales, at TILE)."""
    launches = kernel_sass.capture_launches("fp4_e2m1", "decode", 1024, 32, "e8m0", False, 4096, torch.bfloat16)
    (jit, args, kwargs), = launches
    counts = kernel_sass.describe(kernel_sass.compile_launch(jit, args, dict(kwargs), 90))[2]
    assert jit.fn.__name__ == "_decode_tile_kernel"
    assert counts.get("LDG.E.128", 0) == 1 and counts.get("LDG.E.U8", 0) <= 2, counts


@pytest.mark.parametrize("fmt, block, stochastic", [("fp6_e2m3", 32, False), ("fp4_e2m1", 32, False),
                                                    ("fp4_e2m1", 32, True), ("fp8_e4m3", 128, False)])
def test_an_e8m0_scale_divides_by_a_multiply_and_a_float32_one_by_div_rn(fmt, block, stochastic):
    """An e8m0 scale's reciprocal is exact, so x / s is one multiply (wire_blocks_triton.divide_by_scale); `div_rn`
    compiles to a dozen instructions and a call into its slow path (CALL.REL.NOINC), one per element a thread. A
    float32 scale has no exact reciprocal and keeps div_rn, which is what the count of calls tells apart."""
    _, e8m0 = compiled_counts(fmt, block, stochastic)
    assert "CALL.REL.NOINC" not in e8m0, e8m0
    _, float32 = compiled_counts(fmt, block, stochastic, scale="float32")
    assert float32.get("CALL.REL.NOINC", 0) >= 8, float32


def test_fp6_decodes_a_row_of_whole_groups_from_word_loads():
    """Three 4-byte loads of a thread's 12 bytes of codes (16 elements) and a load per scale, where the decode of
    (segment, quad, element) made 13 one-byte loads a thread."""
    (jit, args, kwargs), = kernel_sass.capture_launches("fp6_e2m3", "decode", 1024, 32, "e8m0", False, 4096,
                                                        torch.bfloat16)
    counts = kernel_sass.describe(kernel_sass.compile_launch(jit, args, dict(kwargs), 90))[2]
    assert jit.fn.__name__ == "_decode_tile_kernel"
    assert counts.get("LDG.E", 0) == 3 and counts.get("LDG.E.U8", 0) <= 2, counts


def launched_elements(fmt: str, step: str, block) -> int:
    (_, _, constants), = kernel_sass.capture_launches(fmt, step, 1024, block, "e8m0", False, 4096, torch.bfloat16)
    return constants["ROWS"] * constants["COLS"]


def test_fp4_tiles_hold_block_tile_and_the_others_tile():
    """FP4's (ROWS, COLS) tiles hold its BLOCK_TILE (8,192 elements: every FP4 kernel with a scale per 32 ran faster
    so on an H100); FP6's and FP4's segment decode of a row of one scale keep the shared TILE (4,096)."""
    from lshmoe_plugin.kernels import wire_blocks_triton, wire_fp4_triton
    assert wire_fp4_triton.BLOCK_TILE == 8192 and wire_blocks_triton.TILE == 4096
    assert launched_elements("fp4_e2m1", "encode", 32) == 8192
    assert launched_elements("fp4_e2m1", "decode", 32) == 8192
    assert launched_elements("fp6_e2m3", "encode", 32) == 4096
    assert launched_elements("fp4_e2m1", "decode", None) == 4096


def test_benchmark_wire_tile_reaches_every_launch():
    """`benchmark_wire.py --tile N` times the kernels as a program of N elements would run them: FP4's tile encode and
    decode (BLOCK_TILE), FP6's (TILE) and the segment decode (TILE, imported by two modules) all take it."""
    import benchmark_wire

    from lshmoe_plugin.kernels import wire_blocks_triton, wire_fp4_triton
    before = (wire_blocks_triton.TILE, wire_fp4_triton.TILE, wire_fp4_triton.BLOCK_TILE)
    try:
        for tile in (2048, 16384):
            benchmark_wire.set_tile(tile)
            assert launched_elements("fp4_e2m1", "encode", 32) == tile
            assert launched_elements("fp4_e2m1", "decode", 32) == tile
            assert launched_elements("fp6_e2m3", "encode", 32) == tile
            assert launched_elements("fp4_e2m1", "decode", None) == tile
    finally:
        wire_blocks_triton.TILE, wire_fp4_triton.TILE, wire_fp4_triton.BLOCK_TILE = before
    assert launched_elements("fp4_e2m1", "encode", 32) == 8192
