"""The fused fp8_e4m3 kernels (lshmoe_plugin/kernels/wire_triton.py) against FP8E4M3's PyTorch reference, with
float32 and e8m0 scales: the same bytes on the wire and the same rows back, for every model dtype, width and scale
layout, with zeros, float32's tiny and subnormal values, the largest finite values, NaN and inf; the hook in
lshmoe_plugin/wire.py that picks the fused kernels of every format; no host synchronisation; CUDA-graph replay.
Buffers are compared byte for byte and decoded rows bit for bit, except inside NaN (tests/gpu/wire_kernel_cases.py):
inf / inf is 0x7f on the GPU, 0xff on the CPU, so the bytes of a poisoned block are compared by what they decode to
(an e8m0 scale's NaN, 0xFF, is one byte everywhere and is compared as it is).

    python -m pytest -q tests/gpu/test_wire_triton.py                     # on a GPU
    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_wire_triton.py  # on a CPU, through Triton's interpreter
"""
import pytest
import torch
from test_wire import heavy_tailed  # noqa: E402
from wire_kernel_cases import (
    DEVICE,
    DTYPES,
    FINITE,
    assert_poisoned_blocks,
    assert_same_rows,
    edge_rows,
    exact_interpreter_casts,
    on_cuda,
)

from lshmoe_plugin import ops, wire

pytest.importorskip("triton.language")
from lshmoe_plugin.kernels import wire_fp4_triton, wire_triton  # noqa: E402

assert exact_interpreter_casts  # used by every test of this module (autouse)
SCALES = ["float32", "e8m0"]


def reference(block, scale: str = "float32", kernel: str = "torch") -> wire.FP8E4M3:
    return wire.wire_format("fp8_e4m3", "row" if block is None else block, scale, kernel=kernel)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 128, 129, 1024, 4096])
@pytest.mark.parametrize("block", [None, 128])
def test_fused_codec_gives_the_references_bytes_and_rows(block, d, dtype, scale):
    x = edge_rows(d, dtype)
    codec = reference(block, scale)
    expected = codec.encode(x)
    buffer = wire_triton.encode(x, block, scale)
    assert buffer.dtype == torch.uint8 and buffer.shape == expected.shape
    assert torch.equal(buffer[FINITE.to(DEVICE)], expected[FINITE.to(DEVICE)])
    assert torch.equal(buffer.cpu()[FINITE], codec.encode(x.cpu())[FINITE])  # and the CPU's bytes
    if scale == "e8m0":  # 0xFF for a poisoned block, on every device
        assert torch.equal(buffer[:, d:], expected[:, d:])
    assert_same_rows(codec.decode(buffer, d, dtype), codec.decode(expected, d, dtype))
    assert_same_rows(wire_triton.decode(expected, d, block, dtype, scale), codec.decode(expected, d, dtype))
    assert_poisoned_blocks(wire_triton.decode(buffer, d, block, dtype, scale), d, block)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("block", [None, 128, 100, 7, 1])
def test_leading_dims_strided_rows_and_other_block_sizes(block, scale):
    x = edge_rows(300, torch.bfloat16)[7:].reshape(3, 10, 300).transpose(0, 1)  # (10, 3, 300), not contiguous
    codec = reference(block, scale)
    expected = codec.encode(x)
    assert torch.equal(wire_triton.encode(x, block, scale), expected)
    assert_same_rows(wire_triton.decode(expected, 300, block, torch.bfloat16, scale),
                     codec.decode(expected, 300, torch.bfloat16))
    wider = torch.zeros(10, 3, expected.shape[-1] + 5, dtype=torch.uint8, device=DEVICE)
    wider[..., :-5] = expected  # rows of the buffer further apart than its width
    assert_same_rows(wire_triton.decode(wider[..., :-5], 300, block, torch.bfloat16, scale),
                     codec.decode(expected, 300, torch.bfloat16))


def test_e8m0_scales_have_the_references_bytes_at_every_binade_edge():
    """One element per block, so each scale byte is the e8m0 code of one |x|: 448 2^k and its float32 neighbours
    (where k changes), every power of two, float32's subnormals, its smallest normal, its largest, zero, -0.0, inf
    and NaN."""
    powers = 2.0 ** torch.arange(-149, 128, dtype=torch.float64)
    edges = (448 * 2.0 ** torch.arange(-140, 119, dtype=torch.float64)).float()
    values = torch.cat([powers.float(), edges, torch.nextafter(edges, torch.tensor(0.0)),
                        torch.nextafter(edges, torch.tensor(float("inf"))),
                        torch.tensor([0.0, -0.0, 1e-45, 3e-39, 1.1754942e-38, 1.1754944e-38, 3.4028235e38,
                                      -3.4028235e38, float("inf"), -float("inf"), float("nan")])])
    values = (values * torch.where(torch.rand(len(values), generator=torch.Generator().manual_seed(0)) < 0.5,
                                   -1.0, 1.0)).reshape(1, -1)
    d = values.shape[-1]
    codec = reference(1, "e8m0")
    buffer = wire_triton.encode(values.to(DEVICE), 1, "e8m0")
    expected = codec.encode(values)
    assert torch.equal(buffer.cpu()[:, d:], expected[:, d:])
    finite = torch.isfinite(values[0])
    assert torch.equal(buffer.cpu()[0, :d][finite], expected[0, :d][finite])
    assert_same_rows(wire_triton.decode(buffer, d, 1, torch.float32, "e8m0").cpu(),
                     codec.decode(expected, d, torch.float32))


FORMATS = [("fp8_e4m3", "float32", wire_triton), ("fp8_e4m3", "e8m0", wire_triton),
           ("fp4_e2m1", "e8m0", wire_fp4_triton), ("fp4_e2m1", "float32", wire_fp4_triton)]


@pytest.mark.parametrize("name, scale, kernels", FORMATS, ids=[f"{n}-{s}" for n, s, _ in FORMATS])
@pytest.mark.parametrize("kernel, fused", [("auto", True), ("triton", True), ("torch", False)])
def test_each_format_runs_its_fused_kernels_unless_kernel_is_torch(kernel, fused, name, scale, kernels, monkeypatch):
    """Off CUDA (under the interpreter) the CPU stands in for a GPU that casts to e4m3: what is checked is wire.py's
    choice for each format, scale, dtype and kernel key, and that the kernels it picks give the reference's rows."""
    if DEVICE.type != "cuda":
        runs_fused = ops.runs_fused
        monkeypatch.setattr(ops, "runs_fused", lambda key, device: runs_fused(key, torch.device("cuda")))
        monkeypatch.setattr(wire_triton, "_casts_e4m3", lambda device: True)
    calls = []
    for function in ("encode", "decode"):
        original = getattr(kernels, function)
        monkeypatch.setattr(kernels, function, lambda *a, _f=original, _n=function: calls.append(_n) or _f(*a))
    fmt = wire.wire_format(name, 32, scale, kernel=kernel)
    x = edge_rows(256, torch.bfloat16)
    expected = wire.send(wire.wire_format(name, 32, scale, kernel="torch"), x, lambda buffer: buffer)
    assert_same_rows(wire.send(fmt, x, lambda buffer: buffer), expected)
    assert calls == (["encode", "decode"] if fused else [])
    wire.send(fmt, x.double(), lambda buffer: buffer)  # float64 has no kernel: the reference, on every kernel
    wire.send(fmt, x[:0], lambda buffer: buffer)  # nor has an empty tensor
    assert calls == (["encode", "decode"] if fused else [])


@on_cuda
@pytest.mark.parametrize("scale", SCALES)
def test_fused_codec_never_synchronises_and_replays_from_a_cuda_graph(scale):
    from test_wire_cuda import check_sync_free_and_replayable
    static = edge_rows(1024, torch.bfloat16)[8:]  # finite rows: NaN != NaN would fail the equalities
    fresh = (heavy_tailed(29, 1024, seed=9) / 64).to(torch.bfloat16).to(DEVICE)
    check_sync_free_and_replayable(wire.wire_format("fp8_e4m3", 128, scale, kernel="triton"), static, fresh,
                                   reference(128, scale))


def test_a_buffer_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match=r"uint8 \(\.\.\., 136\)"):
        wire_triton.decode(torch.zeros(2, 132, dtype=torch.uint8, device=DEVICE), 128, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=r"uint8 \(\.\.\., 130\)"):
        wire_triton.decode(torch.zeros(2, 136, dtype=torch.uint8, device=DEVICE), 128, 64, torch.bfloat16, "e8m0")
