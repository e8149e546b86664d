"""The wire formats of lshmoe_plugin.wire against hand-built references: e4m3 rounding to the nearest representable
value, the derived error bound (and that it is reached), bytes, packing, and straight-through gradients that cross
back in their own format."""
import math

import pytest
import torch

from lshmoe_plugin import wire
from lshmoe_plugin.config import LSHMoEConfig

# Every finite float8_e4m3fn value, from its 256 bit patterns (0x7f and 0xff are NaN).
E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_GRID = E4M3_GRID[torch.isfinite(E4M3_GRID)].unique()


def nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """y (float32, |y| <= 448) rounded to the nearest e4m3 value by search over the grid (ties are of measure zero
    for the random inputs here)."""
    grid = E4M3_GRID.to(y.device)
    return grid[(y.reshape(-1, 1) - grid).abs().argmin(1)].view_as(y)


def reference_round_trip(x: torch.Tensor, block) -> torch.Tensor:
    """Per block of `block` elements (None: the row): scale s = amax / 448, round x / s to the grid, times s."""
    d = x.shape[-1]
    size = d if block is None else block
    blocks = math.ceil(d / size)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * size - d)).unflatten(-1, (blocks, size))
    scale = (padded.abs().amax(-1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (nearest_e4m3(padded / scale) * scale).flatten(-2)[..., :d]


def heavy_tailed(*shape, seed=0):
    """Rows of very different magnitudes and outliers, as activations have, so the scales matter."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    return rows * torch.where(torch.rand(*shape, generator=g) < 0.01, 30.0, 1.0)


@pytest.mark.parametrize("block", [None, 128, 16, 7])
def test_fp8_round_trip_is_e4m3_rounding_of_the_scaled_rows(block):
    fmt = wire.FP8E4M3(block)
    x = heavy_tailed(4, 6, 300)  # 300 is no multiple of 128, 16 or 7: the last block is shorter
    buffer = fmt.encode(x)
    assert buffer.dtype == torch.uint8 and buffer.shape == (4, 6, 300 + 4 * fmt.blocks(300))
    decoded = fmt.decode(buffer, 300, torch.float32)
    assert torch.equal(decoded, reference_round_trip(x, block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 128, 16])
def test_fp8_error_stays_within_the_derived_bound_and_reaches_it(block, dtype):
    """|x_hat - x| <= max(2^-4 |x|, 2^-10 s), s = amax / 448 of the element's block: half a unit in the last place
    of e4m3's 3 mantissa bits for normal values, half the subnormal spacing 2^-9 below 2^-6 (derivation in
    wire.FP8E4M3); a bf16 model adds the rounding of the result to bf16 (2^-9 relative). The bound is reached:
    a format with fewer mantissa bits (e5m2) would break it, one with more would not come near it."""
    fmt = wire.FP8E4M3(block)
    x = heavy_tailed(64, 512, seed=1).to(dtype)
    decoded = fmt.decode(fmt.encode(x), 512, dtype)
    assert decoded.dtype == dtype
    xf, error = x.float(), (decoded.float() - x.float()).abs()
    size = 512 if block is None else block
    scale = (xf.unflatten(-1, (-1, size)).abs().amax(-1, keepdim=True) / 448).expand(-1, -1, size).flatten(-2)
    output_rounding = 0.0 if dtype == torch.float32 else 2.0**-9 * decoded.float().abs()
    bound = torch.maximum(2.0**-4 * xf.abs(), 2.0**-10 * scale) * (1 + 2.0**-20) + output_rounding
    assert (error <= bound).all(), (error - bound).max()
    assert (error <= 2.0**-4 * scale * 448 * (1 + 2.0**-20) + output_rounding).all()  # 2^-4 of the block's max
    normal = xf.abs() >= 2.0**-6 * scale
    worst = (error[normal] / xf.abs()[normal]).max()
    assert worst > 0.9 * 2.0**-4, worst  # near 2^-4 / (1 + 2^-4), just below a midpoint at a binade's bottom


def test_zero_rows_stay_zero_and_nan_or_inf_poison_only_their_block():
    fmt = wire.FP8E4M3(4)
    x = torch.tensor([[0.0] * 8, [1.0, 2.0, 3.0, float("inf"), 1.0, 2.0, 3.0, 4.0],
                      [1.0, float("nan"), 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]])
    decoded = fmt.decode(fmt.encode(x), 8, torch.float32)
    assert torch.equal(decoded[0], torch.zeros(8))
    for row in (1, 2):  # a loss scaler must still see the overflow; the other block rounds as if alone
        assert not torch.isfinite(decoded[row, :4]).any()
        assert torch.equal(decoded[row, 4:], reference_round_trip(x[row, 4:], 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_count_values_and_scales(dtype):
    assert wire.MODEL.bytes(10, 300, dtype) == 10 * 300 * torch.empty(0, dtype=dtype).element_size()
    assert wire.FP8E4M3(None).bytes(10, 300, dtype) == 10 * (300 + 4)
    assert wire.FP8E4M3(128).bytes(10, 300, dtype) == 10 * (300 + 4 * 3)
    for block in (None, 128):
        fmt = wire.FP8E4M3(block)
        assert fmt.encode(torch.randn(10, 300).to(dtype)).numel() == fmt.bytes(10, 300, dtype)


def test_bytes_per_crossing_is_the_mean_of_the_four_crossings():
    rows, d = 12, 256
    bf16 = rows * d * 2
    fp8 = rows * (d + 4 * 2)  # blocks of 128
    cases = [({}, bf16),
             ({"dispatch_dtype": "fp8_e4m3"}, (2 * fp8 + 2 * bf16) / 4),
             ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}, fp8),
             ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model"}, (fp8 + 3 * bf16) / 4),
             ({"combine_grad_dtype": "fp8_e4m3"}, (fp8 + 3 * bf16) / 4)]
    for keys, expected in cases:
        assert wire.bytes_per_crossing(LSHMoEConfig(**keys), rows, d, torch.bfloat16) == expected, keys


def test_model_format_is_the_identity_and_needs_no_crossing_of_its_own():
    config = LSHMoEConfig(dispatch_dtype="fp8_e4m3")
    assert not wire.changes_crossing(config, "combine") and wire.changes_crossing(config, "dispatch")
    assert wire.changes_crossing(LSHMoEConfig(combine_grad_dtype="fp8_e4m3"), "combine")
    assert wire.formats(LSHMoEConfig(fp8_block_size="row", combine_dtype="fp8_e4m3"), "combine")[1].block is None
    x = torch.randn(3, 4, 8)
    assert wire.send(wire.MODEL, x, lambda b: b).data_ptr() == x.data_ptr()  # nothing copied


@pytest.mark.parametrize("forward, backward", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e4m3", "model"),
                                               ("model", "fp8_e4m3")])
def test_gradients_pass_straight_through_and_cross_back_in_their_own_format(forward, backward):
    """d(out)/d(rows) is the identity (straight-through); what reaches `rows` is the gradient as its own format
    sends it: rounded with scales of its own, or exactly."""
    f, b = wire.wire_format(forward, 16), wire.wire_format(backward, 16)
    rows = heavy_tailed(4, 5, 32, seed=2).requires_grad_()
    swap = lambda buffer: buffer.flip(0)  # noqa: E731  an exchange that moves rows between "ranks"
    out = wire.cross(rows, f, b, swap)
    assert torch.equal(out, wire.send(f, rows.detach(), swap))
    grad = heavy_tailed(4, 5, 32, seed=3) * 1e-3
    out.backward(grad)
    assert torch.equal(rows.grad, wire.send(b, grad, swap))
    assert torch.equal(rows.grad, grad.flip(0)) == (backward == "model")
