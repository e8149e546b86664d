"""The fused fp8_e4m3 kernels (lshmoe_plugin/kernels/wire_triton.py) against FP8E4M3's PyTorch reference: the same
bytes on the wire and the same rows back, for every model dtype, width and scale layout, with zeros, float32's
tiny and subnormal values, the largest finite values, NaN and inf; the hook that picks them; no host
synchronisation; CUDA-graph replay. Buffers are compared byte for byte and decoded rows bit for bit, except inside
NaN: a NaN's payload carries nothing, and the GPU's arithmetic makes canonical NaNs where the CPU's keeps or flips
the sign (inf / inf is 0x7f on the GPU, 0xff on the CPU), so poisoned rows are compared by what they decode to.

    python -m pytest -q tests/gpu/test_wire_triton.py                     # on a GPU
    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_wire_triton.py  # on a CPU, through Triton's interpreter
"""
import os

import numpy as np
import pytest
import torch
from test_wire import heavy_tailed  # noqa: E402

from lshmoe_plugin import wire

triton_language = pytest.importorskip("triton.language")
from lshmoe_plugin.kernels import wire_triton  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu only under TRITON_INTERPRET=1
on_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(autouse=True, scope="module")
def exact_interpreter_casts():
    """Under TRITON_INTERPRET=1, torch's casts between float32 and e4m3 or bf16 replace the
    interpreter's: it rounds to e4m3 half-up without a sticky bit, reads e4m3's NaN (0x7f) as 480, truncates to
    bf16 and widens bf16's subnormals to wrong values. On a GPU each is one instruction, exact or rounding to
    nearest even (cvt.rn), which these casts are; everything else the kernels do (scales, divisions, clamps,
    masks, layout) still runs as written."""
    if not INTERPRETED:
        yield
        return
    from triton.runtime import interpreter
    tl, builder = triton_language, interpreter.InterpreterBuilder
    exact = {(tl.float32, tl.float8e4nv): lambda t: t.to(torch.float8_e4m3fn).view(torch.uint8),
             (tl.float8e4nv, tl.float32): lambda t: t.view(torch.float8_e4m3fn).float(),
             (tl.float32, tl.bfloat16): lambda t: t.to(torch.bfloat16).view(torch.int16),
             (tl.bfloat16, tl.float32): lambda t: t.view(torch.bfloat16).float()}
    fp_to_fp, cast_impl = builder.create_fp_to_fp, builder.cast_impl

    def cast(src, dst_type, fallback):
        convert = exact.get((src.dtype.scalar, dst_type.scalar))
        if convert is None:
            return fallback()
        out = convert(torch.from_numpy(np.ascontiguousarray(src.data))).numpy()
        return interpreter.TensorHandle(out.view(interpreter._get_np_dtype(dst_type)), dst_type.scalar)

    builder.create_fp_to_fp = lambda self, src, dst, mode: cast(src, dst, lambda: fp_to_fp(self, src, dst, mode))
    builder.cast_impl = lambda self, src, dst: cast(src, dst, lambda: cast_impl(self, src, dst))
    yield
    builder.create_fp_to_fp, builder.cast_impl = fp_to_fp, cast_impl


def edge_rows(d: int, dtype: torch.dtype) -> torch.Tensor:
    """37 rows (not a multiple of any tile) of heavy-tailed values and, in rows of their own: zeros, float32's
    subnormals and values whose scale clamps to float32's smallest normal, the dtype's largest finite values,
    and one NaN, inf or -inf (which poison their block)."""
    info = torch.finfo(dtype)
    x = (heavy_tailed(37, d, seed=d) / 64).to(dtype)
    x[0] = 0
    x[1] = (torch.randn(d) * 1e-38 if dtype != torch.float16 else torch.randn(d) * 1e-6).to(dtype)
    x[2] = info.tiny if dtype != torch.float16 else info.tiny * 2**-10  # float16: its smallest subnormal
    x[2, ::2] *= -1
    x[3] = info.max * torch.sign(torch.randn(d)).to(dtype)
    x[4, d // 2] = float("nan")
    x[5, d - 1] = float("inf")
    x[6, 0] = -float("inf")
    return x.to(DEVICE)


FINITE = torch.ones(37, dtype=torch.bool)
FINITE[4:7] = False  # edge_rows' rows with NaN or inf


def reference(block, kernel: str = "torch") -> wire.FP8E4M3:
    return wire.wire_format("fp8_e4m3", "row" if block is None else block, kernel=kernel)


def assert_same_rows(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    view = INT_VIEW[out.dtype]
    assert torch.equal(out.view(view)[~nan], expected.view(view)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 128, 129, 1024, 4096])
@pytest.mark.parametrize("block", [None, 128])
def test_fused_codec_gives_the_references_bytes_and_rows(block, d, dtype):
    x = edge_rows(d, dtype)
    expected = reference(block).encode(x)
    buffer = wire_triton.encode(x, block)
    assert buffer.dtype == torch.uint8 and buffer.shape == expected.shape
    assert torch.equal(buffer[FINITE.to(DEVICE)], expected[FINITE.to(DEVICE)])
    assert torch.equal(buffer.cpu()[FINITE], reference(block).encode(x.cpu())[FINITE])  # and the CPU's bytes
    assert_same_rows(reference(block).decode(buffer, d, dtype), reference(block).decode(expected, d, dtype))
    assert_same_rows(wire_triton.decode(expected, d, block, dtype), reference(block).decode(expected, d, dtype))
    decoded, size = wire_triton.decode(buffer, d, block, dtype), d if block is None else block
    for row, col in ((4, d // 2), (5, d - 1), (6, 0)):  # NaN and inf poison their block: nothing comes back finite
        first = col // size * size
        assert not torch.isfinite(decoded[row, first:first + size]).any()


@pytest.mark.parametrize("block", [None, 128, 100])
def test_leading_dims_strided_rows_and_other_block_sizes(block):
    x = edge_rows(300, torch.bfloat16)[7:].reshape(3, 10, 300).transpose(0, 1)  # (10, 3, 300), not contiguous
    expected = reference(block).encode(x)
    assert torch.equal(wire_triton.encode(x, block), expected)
    assert_same_rows(wire_triton.decode(expected, 300, block, torch.bfloat16),
                     reference(block).decode(expected, 300, torch.bfloat16))


@on_cuda
@pytest.mark.parametrize("kernel, fused", [("auto", True), ("triton", True), ("torch", False)])
def test_the_format_runs_the_fused_kernels_unless_kernel_is_torch(kernel, fused, monkeypatch):
    calls = []
    for name in ("encode", "decode"):
        original = getattr(wire_triton, name)
        monkeypatch.setattr(wire_triton, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    fmt = wire.wire_format("fp8_e4m3", 128, kernel=kernel)
    x = edge_rows(256, torch.bfloat16)
    assert_same_rows(wire.send(fmt, x, lambda buffer: buffer), wire.send(reference(128), x, lambda buffer: buffer))
    assert calls == (["encode", "decode"] if fused else [])
    wire.send(fmt, x.double(), lambda buffer: buffer)  # float64 has no kernel: the reference, on every kernel
    wire.send(wire.wire_format("fp8_e4m3", 128, "e8m0", kernel=kernel), x, lambda buffer: buffer)  # nor e8m0
    assert calls == (["encode", "decode"] if fused else [])


@on_cuda
def test_fused_codec_never_synchronises_and_replays_from_a_cuda_graph():
    from test_wire_cuda import check_sync_free_and_replayable
    static = edge_rows(1024, torch.bfloat16)[8:]  # finite rows: NaN != NaN would fail the equalities
    fresh = (heavy_tailed(29, 1024, seed=9) / 64).to(torch.bfloat16).to(DEVICE)
    check_sync_free_and_replayable(wire.wire_format("fp8_e4m3", 128, kernel="triton"), static, fresh, reference(128))


def test_a_buffer_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match=r"uint8 \(\.\.\., 136\)"):
        wire_triton.decode(torch.zeros(2, 132, dtype=torch.uint8, device=DEVICE), 128, 64, torch.bfloat16)
