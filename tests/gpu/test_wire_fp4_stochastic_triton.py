"""The fused fp4_e2m1 encode rounding stochastically (kernels/wire_fp4_triton.py given a draw counter, its uniforms
from kernels/rounding_triton.py) against FP4E2M1(rounding="stochastic")'s PyTorch reference started at the same
counter: the same bytes, with e8m0 and float32 scales, for every model dtype, blocks per row, of 32, odd and not
dividing the width, odd and even widths, rows of edge values (tests/gpu/wire_kernel_cases.py), leading dimensions and
strided rows, every magnitude of the grid and its thresholds' neighbours, counters whose high word is set (rank 3's
start); the counter advancing by exactly 1 per encode; the hash helper alone against rounding.hash32, indices past
2^32 included. On CUDA only: the format takes the fused path, never synchronises with the host, and a captured
graph draws the reference's bits for counters k and k + 1 on consecutive replays.

    python -m pytest -q tests/gpu/test_wire_fp4_stochastic_triton.py                     # on a GPU
    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_wire_fp4_stochastic_triton.py  # on a CPU (interpreter)
"""
import math

import pytest
import torch
from test_wire import heavy_tailed  # noqa: E402
from wire_kernel_cases import DEVICE, DTYPES, FINITE, edge_rows, exact_interpreter_casts, on_cuda

from lshmoe_plugin import ops, rounding, wire

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from lshmoe_plugin.kernels import rounding_triton, wire_fp4_triton  # noqa: E402

assert exact_interpreter_casts  # used by every test of this module (autouse)
SCALES = ["e8m0", "float32"]
RANK_3 = (3 << 32) + 5  # a counter as rank 3 has it after 5 draws: the hash's high word is set
BOTH_WORDS = (0x7FFFFFFF << 32) | 0xDEADBEEF


def reference(block, scale: str, counter: int, device=DEVICE) -> wire.FP4E2M1:
    """The stochastic reference whose next draw on `device` is `counter`. Each device has its own counter: a
    reference set up for DEVICE and given CPU tensors draws from the CPU's, which starts at 0 (on a GPU that
    failed 85 cases of the CPU comparison below on 2026-12-06, every fused buffer equal to the CUDA reference's)."""
    codec = wire.FP4E2M1(block, scale, "stochastic")
    codec.kernel = "torch"
    codec.draws.counter(device).fill_(counter)
    return codec


def check_draw(x: torch.Tensor, block, scale: str, counter: int) -> torch.Tensor:
    """The fused stochastic buffer of x (..., d) for draw `counter` equals the reference's, the kernel's counter
    ends one past it; returns the buffer. A float32 scale that is NaN may differ in its payload: rows with NaN or
    inf are compared by their value bytes there."""
    codec, drawn = reference(block, scale, counter), torch.tensor(counter, dtype=torch.int64, device=DEVICE)
    expected, buffer = codec.encode(x), wire_fp4_triton.encode(x, block, scale, drawn)
    assert drawn.item() == counter + 1 == codec.draws.counter(DEVICE).item()
    assert buffer.dtype == torch.uint8 and buffer.shape == expected.shape
    values = math.ceil(x.shape[-1] / 2)
    assert torch.equal(buffer[..., :values], expected[..., :values])
    finite_scales = torch.isfinite(x).all(-1) if scale == "float32" else torch.ones_like(x[..., 0], dtype=torch.bool)
    assert torch.equal(buffer[finite_scales], expected[finite_scales])
    return buffer


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 64, 301])
@pytest.mark.parametrize("block", [None, 32, 7, 100])
def test_fused_stochastic_encode_gives_the_references_bytes(block, d, dtype, scale):
    """Edge rows (zeros, subnormals, the largest finite values, NaN, inf) at counter 0 and at rank 3's; the
    reference on the CPU draws the same bits."""
    x = edge_rows(d, dtype)
    for counter in (0, RANK_3):
        buffer = check_draw(x, block, scale, counter)
    assert torch.equal(buffer.cpu()[FINITE], reference(block, scale, RANK_3, "cpu").encode(x.cpu())[FINITE])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("block", [1, 3, 16, 4096])
def test_leading_dims_strided_rows_and_other_blocks(block, scale):
    """The uniforms follow the element's flat index in the rows' shape (10, 3, 301), not their memory layout: a
    transposed view draws as its contiguous copy does in the reference."""
    x = edge_rows(301, torch.bfloat16)[7:].reshape(3, 10, 301).transpose(0, 1)
    check_draw(x, block, scale, BOTH_WORDS)


@pytest.mark.parametrize("scale", SCALES)
def test_rows_wider_than_a_tile_draw_by_their_flat_index(scale):
    """A row of 4,193 elements spans two column tiles of the encode: the second tile's uniforms are those of the
    elements' flat indices too."""
    check_draw(edge_rows(4193, torch.bfloat16), 32, scale, RANK_3)


@pytest.mark.parametrize("scale", SCALES)
def test_every_magnitude_and_threshold_rounds_as_the_reference(scale):
    """Blocks of 8 whose amax 6 puts s = 2^k in either coding, holding every E2M1 magnitude (which never moves), the
    spacing's thresholds 2 and 4 and their float32 neighbours, midpoints and random values in each interval, and
    their negatives, over several draws."""
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
    edges = torch.tensor([2.0, 4.0, 6.0, 0.5])
    points = torch.cat([grid, torch.tensor(wire.E2M1_MIDPOINTS), torch.nextafter(edges, torch.tensor(0.0)),
                        torch.nextafter(edges[:3], torch.tensor(9.0)).clamp(max=6.0),
                        torch.rand(20, generator=torch.Generator().manual_seed(3)) * 6])
    rows = torch.cat([points, -points]).reshape(-1, 1)
    blocks = torch.cat([torch.full_like(rows, 6.0), rows.expand(-1, 7)], dim=1).reshape(1, -1)
    for dtype, s in ((torch.float32, 1.0), (torch.float32, 2.0**-20), (torch.bfloat16, 2.0**-3)):
        x = (blocks * s).to(dtype).to(DEVICE)
        for counter in (1, RANK_3, BOTH_WORDS):
            buffer = check_draw(x, 8, scale, counter)
        on_grid = wire.FP4E2M1(8, scale).encode(x)  # grid values must come back as nearest codes them
        codes = torch.stack([buffer[0, :x.shape[-1] // 2] & 0xF, buffer[0, :x.shape[-1] // 2] >> 4], -1).flatten()
        nearest = torch.stack([on_grid[0, :x.shape[-1] // 2] & 0xF, on_grid[0, :x.shape[-1] // 2] >> 4], -1).flatten()
        exact = torch.isin((x.float().abs() / s).flatten().cpu(), grid)
        assert torch.equal(codes.cpu()[exact], nearest.cpu()[exact])


def test_the_counter_advances_by_one_per_encode_and_each_draw_differs():
    x = (heavy_tailed(8, 64, seed=8) / 16).to(DEVICE)
    counter = torch.tensor(RANK_3, dtype=torch.int64, device=DEVICE)
    first = wire_fp4_triton.encode(x, 32, "e8m0", counter)
    second = wire_fp4_triton.encode(x, 32, "e8m0", counter)
    assert counter.item() == RANK_3 + 2 and not torch.equal(first, second)
    assert torch.equal(second, reference(32, "e8m0", RANK_3 + 1).encode(x))
    nearest = wire_fp4_triton.encode(x, 32, "e8m0")  # no counter: round to nearest, nothing advanced
    assert torch.equal(nearest, wire.FP4E2M1(32, "e8m0").encode(x)) and counter.item() == RANK_3 + 2


def test_the_format_hands_a_stochastic_fp4_encode_to_the_kernel_with_its_own_counter(monkeypatch):
    """wire's dispatch as on CUDA (forced here, where the interpreter runs the kernels on the CPU): a stochastic FP4
    encode runs the kernel, drawing from and advancing the format's counter; FP8 and FP6 keep the reference for a
    stochastic encode, while FP6's decode stays fused."""
    monkeypatch.setattr(ops, "runs_fused", lambda kernel, device: True)
    x = (heavy_tailed(8, 64, seed=8) / 16).to(DEVICE)
    codec = wire.FP4E2M1(32, "e8m0", "stochastic")
    assert codec._fused(x, x.dtype, encode=True) is wire_fp4_triton
    codec.draws.counter(DEVICE).fill_(RANK_3)
    assert torch.equal(codec.encode(x), reference(32, "e8m0", RANK_3).encode(x))
    assert codec.draws.counter(DEVICE).item() == RANK_3 + 1
    assert wire.FP8E4M3(32, "e8m0", "stochastic")._fused(x, x.dtype, encode=True) is None
    fp6 = wire.FP6E2M3(32, "e8m0", "stochastic")
    assert fp6._fused(x, x.dtype, encode=True) is None and fp6._fused(x, x.dtype) is not None


@triton.jit
def _hash_kernel(counter_ptr, index_ptr, hash_ptr, uniform_ptr, n, BLOCK: tl.constexpr):
    offset, multiplier = rounding_triton.draw_keys(tl.load(counter_ptr))
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = tl.load(index_ptr + at, mask=at < n, other=0)
    tl.store(hash_ptr + at, rounding_triton.hash32(index, offset, multiplier).to(tl.int64), mask=at < n)
    tl.store(uniform_ptr + at, rounding_triton.uniform(index, offset, multiplier), mask=at < n)


@pytest.mark.parametrize("counter", [0, 1, 0xFFFFFFFF, 2**32, RANK_3, BOTH_WORDS, 2**63 - 1])
def test_the_hash_helpers_give_rounding_hash32_and_its_uniforms(counter):
    """Indices past 2^32 (high word set, which no real tensor reaches here) and counters with bits in either word,
    both, and all 63."""
    index = torch.cat([torch.arange(2000), torch.arange(2**32 - 8, 2**32 + 8), torch.arange(2**31 - 4, 2**31 + 4),
                       torch.tensor([3 << 40, 2**62 + 12345, 2**63 - 1])]).to(DEVICE)
    drawn = torch.tensor(counter, dtype=torch.int64, device=DEVICE)
    hashed, uniforms = torch.empty_like(index), torch.empty(index.shape, dtype=torch.float32, device=DEVICE)
    _hash_kernel[(triton.cdiv(index.numel(), 512),)](drawn, index, hashed, uniforms, index.numel(), BLOCK=512)
    expected = rounding.hash32(index, drawn)
    assert torch.equal(hashed, expected)
    assert torch.equal(uniforms, (expected >> 8).float() * 2.0**-24)
    assert torch.equal(uniforms[:2000], rounding.uniforms(torch.Size([2000]), drawn))


def fused_stochastic(scale: str) -> wire.FP4E2M1:
    codec = wire.FP4E2M1(32, scale, "stochastic")  # not wire_format's cached instance: a counter of its own
    codec.kernel = "triton"
    return codec


@on_cuda
@pytest.mark.parametrize("scale", SCALES)
def test_the_format_encodes_fused_without_synchronising_and_replays_fresh_draws(scale):
    """FP4E2M1(rounding="stochastic") on CUDA runs the kernel (not the reference) with its own counter, no host
    synchronisation; a CUDA graph captured after a warm-up draws counter k on one replay and k + 1 on the next, as
    the reference does for those counters."""
    codec, static = fused_stochastic(scale), (heavy_tailed(29, 1023, seed=9) / 64).to(torch.bfloat16).to(DEVICE)
    assert codec._fused(static, static.dtype, encode=True) is wire_fp4_triton
    assert wire.FP8E4M3(32, scale, "stochastic")._fused(static, static.dtype, encode=True) is None
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        eager = codec.encode(static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(eager, reference(32, scale, 0).encode(static))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        codec.encode(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = codec.encode(static)
    counter = codec.draws.counter(DEVICE)
    assert counter.item() == 2  # the capture recorded the draw and the advance, ran neither
    graph.replay()
    first = captured.clone()
    graph.replay()
    assert counter.item() == 4 and not torch.equal(first, captured)
    assert torch.equal(first, reference(32, scale, 2).encode(static))
    assert torch.equal(captured, reference(32, scale, 3).encode(static))


@on_cuda
def test_cuda_and_cuda_0_name_one_counter():
    """The counter this module's tests set through DEVICE ("cuda") is the one an encode of a tensor on "cuda:0"
    advances (the first GPU run of these tests failed on exactly that: two counters for one GPU)."""
    codec = fused_stochastic("e8m0")
    assert codec.draws.counter(torch.device("cuda")) is codec.draws.counter(torch.ones(1, device=DEVICE).device)


@on_cuda
def test_a_counter_is_never_created_inside_a_capture():
    """The fused path keeps the reference's refusal: a counter created in a capture would be reset on each replay."""
    codec, static = fused_stochastic("e8m0"), torch.ones(4, 64, device=DEVICE)
    wire_fp4_triton.encode(static, 32, "e8m0", torch.zeros((), dtype=torch.int64, device=DEVICE))  # compiled
    stream = torch.cuda.Stream()
    with pytest.raises(RuntimeError, match="before a CUDA graph captures it"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            codec.encode(static)
