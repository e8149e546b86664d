"""The wire formats of lshmoe_plugin.wire against hand-built references: e4m3, E2M1 and E2M3 rounding to the nearest
representable value (ties to even), float32 and power-of-two (e8m0) scales, the derived error bounds (and that they
are reached), exact encodings of hand-picked values, bytes, packing, and straight-through gradients that cross back in
their own format."""
import math

import pytest
import torch
from lsh_blocks import paper_block

from lshmoe_plugin import wire
from lshmoe_plugin.config import LSHMoEConfig

# Every finite float8_e4m3fn magnitude, codes 0 to 0x7e in order (0x7f is NaN), and every E2M1 one, codes 0 to 7.
E4M3_MAGNITUDES = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
# E2M3 (codes 0 to 31): the subnormals m / 8, then 2^(e - 1) (1 + m / 8) for e = 1, 2, 3, from the definition.
E2M3_MAGNITUDES = torch.tensor([m / 8 for m in range(8)] + [2.0**(e - 1) * (1 + m / 8) for e in (1, 2, 3)
                                                             for m in range(8)], dtype=torch.float64)
GRIDS = {"fp8_e4m3": E4M3_MAGNITUDES, "fp4_e2m1": E2M1_MAGNITUDES, "fp6_e2m3": E2M3_MAGNITUDES}
# Every (format, scale coding) pair, and the one that is not the format's default scale spelled out.
FORMATS = [("fp8_e4m3", "float32"), ("fp8_e4m3", "e8m0"), ("fp4_e2m1", "e8m0"), ("fp4_e2m1", "float32"),
           ("fp6_e2m3", "e8m0"), ("fp6_e2m3", "float32")]


def nearest(y: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """y (float32) rounded to the nearest of +-magnitudes (a value past the largest to the largest), a tie to the
    even code, by search over the grid (in float64, where the distances to the two neighbours are exact)."""
    magnitudes = magnitudes.to(y.device)
    distance = (y.double().abs().reshape(-1, 1) - magnitudes).abs()
    closest = distance == distance.min(1, keepdim=True).values
    even = closest & (torch.arange(len(magnitudes), device=y.device) % 2 == 0)
    index = torch.where(even.any(1), even.int().argmax(1), closest.int().argmax(1))
    return (magnitudes[index].view(y.shape) * torch.where(y < 0, -1.0, 1.0)).float()


def nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    return nearest(y, E4M3_MAGNITUDES)


def reference_scales(amax: torch.Tensor, fmt: str = "fp8_e4m3", scale: str = "float32") -> torch.Tensor:
    """float32: amax / largest (at least float32's smallest normal); e8m0: 2^ceil(log2(amax / largest)), the
    exponent clamped to [-127, 127] (a zero block's -inf to -127), computed in float64."""
    largest = GRIDS[fmt].max().item()
    if scale == "float32":
        # Divided by a tensor, not by the Python float: CUDA divides a tensor by a CPU scalar as a product with its
        # reciprocal, one ulp off for some blocks, where the plugin (and the CPU) divide correctly rounded.
        return (amax / amax.new_full((), largest)).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.pow(2.0, torch.ceil(torch.log2(amax.double() / largest)).clamp(-127, 127)).float()


def reference_round_trip(x: torch.Tensor, block, fmt: str = "fp8_e4m3", scale: str = "float32") -> torch.Tensor:
    """Per block of `block` elements (None: the row): its scale s, x / s rounded to the format's grid, times s."""
    d = x.shape[-1]
    size = d if block is None else block
    blocks = math.ceil(d / size)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * size - d)).unflatten(-1, (blocks, size))
    s = reference_scales(padded.abs().amax(-1, keepdim=True), fmt, scale)
    return (nearest(padded / s, GRIDS[fmt]) * s).flatten(-2)[..., :d]


def element_scales(x: torch.Tensor, block, fmt: str, scale: str) -> torch.Tensor:
    """The scale of each element's block, (..., d), as reference_scales."""
    d = x.shape[-1]
    size = d if block is None else block
    blocked = x.float().unflatten(-1, (-1, size))  # d a multiple of block here
    return reference_scales(blocked.abs().amax(-1, keepdim=True), fmt, scale).expand_as(blocked).flatten(-2)


def heavy_tailed(*shape, seed=0):
    """Rows of very different magnitudes and outliers, as activations have, so the scales matter."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    return rows * torch.where(torch.rand(*shape, generator=g) < 0.01, 30.0, 1.0)


def scaled_format(fmt: str, block, scale: str):
    return {"fp8_e4m3": wire.FP8E4M3, "fp4_e2m1": wire.FP4E2M1, "fp6_e2m3": wire.FP6E2M3}[fmt](block, scale)


def value_bytes(fmt: str, d: int) -> int:
    return {"fp8_e4m3": d, "fp4_e2m1": math.ceil(d / 2), "fp6_e2m3": 3 * math.ceil(d / 4)}[fmt]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [300, 301])
@pytest.mark.parametrize("block", [None, 128, 16, 7])
@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_round_trip_is_the_rounding_of_the_scaled_rows(fmt, scale, block, d, dtype):
    """d 300 and 301 are no multiple of 128, 16 or 7: the last block is shorter (and 301 leaves FP4 half a byte).
    bf16 rows under a power-of-two scale put many values exactly on a midpoint: the ties must go to the even code."""
    codec = scaled_format(fmt, block, scale)
    x = heavy_tailed(4, 6, d).to(dtype)
    buffer = codec.encode(x)
    blocks = codec.blocks(d)
    assert buffer.dtype == torch.uint8
    assert buffer.shape == (4, 6, value_bytes(fmt, d) + {"float32": 4, "e8m0": 1}[scale] * blocks)
    decoded = codec.decode(buffer, d, torch.float32)
    assert torch.equal(decoded, reference_round_trip(x, block, fmt, scale))


# (rows the magnitude scales, the model's dtype): an ordinary range, blocks whose scale clamps at its smallest value
# (float32 subnormals among the rows), and values near float32's largest.
RANGES = [(1.0, torch.float32), (1.0, torch.bfloat16), (1e-36, torch.float32), (1e30, torch.float32)]


@pytest.mark.parametrize("magnitude, dtype", RANGES, ids=["fp32", "bf16", "tiny", "huge"])
@pytest.mark.parametrize("block", [None, 128, 32])
@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_error_stays_within_the_derived_bound_and_reaches_it(fmt, scale, block, magnitude, dtype):
    """fp8_e4m3: |x_hat - x| <= max(2^-4 |x|, 2^-10 s), half a unit in the last place of 3 mantissa bits for normal
    values (|x| >= 2^-6 s), half the subnormal spacing 2^-9 below; fp4_e2m1: 2^-2 max(|x|, s), one mantissa bit,
    spacing 0.5 below 1; fp6_e2m3: 2^-4 max(|x|, s), 3 mantissa bits, spacing 1/8 below 1 (derivations in
    wire.FP8E4M3, wire.FP4E2M1 and wire.FP6E2M3). Either is at most 2^-4 (resp. 2^-2) of the
    block's largest magnitude where the scale is not clamped at its smallest value. float32 scales add float32's
    rounding of x / s and q * s (relative 2^-20 of slack, and 2^-149 where q * s is a float32 subnormal); e8m0
    scales add nothing, a power of two divides and multiplies exactly. A bf16 model adds the rounding of the result
    to bf16 (half a unit in the last place of its 8 significant bits: 2^-8 relative). The bound is reached: the
    worst relative error of normal values comes near its largest possible value, 2^-4 / (1 + 2^-4) (fp8, fp6) or
    2^-2 / (1 + 2^-2) = 1/5 (fp4), at a binade's first midpoint."""
    codec = scaled_format(fmt, block, scale)
    x = (heavy_tailed(64, 512, seed=1) * magnitude).to(dtype)
    decoded = codec.decode(codec.encode(x), 512, dtype)
    assert decoded.dtype == dtype
    xd, error = x.double(), (decoded.double() - x.double()).abs()
    s = element_scales(x, block, fmt, scale).double()
    fine, coarse, subnormal_below = {"fp8_e4m3": (2.0**-4, 2.0**-10, 2.0**-6), "fp4_e2m1": (2.0**-2, 2.0**-2, 1.0),
                                     "fp6_e2m3": (2.0**-4, 2.0**-4, 1.0)}[fmt]
    slack = (1 + 2.0**-20, 2.0**-149) if scale == "float32" else (1.0, 0.0)
    output_rounding = 0.0 if dtype == torch.float32 else 2.0**-8 * decoded.double().abs()
    bound = torch.maximum(fine * xd.abs(), coarse * s) * slack[0] + slack[1] + output_rounding
    assert (error <= bound).all(), (error - bound).max()
    largest = GRIDS[fmt].max().item()
    amax = s * largest if scale == "float32" else element_scales(x, block, fmt, "float32").double() * largest
    unclamped = s > reference_scales(torch.zeros(()), fmt, scale).double()
    assert (error <= fine * amax * slack[0] + slack[1] + output_rounding)[unclamped].all()
    normal = (xd.abs() >= subnormal_below * s) & (xd != 0)
    worst = (error[normal] / xd.abs()[normal]).max()
    bf16 = 0.0 if dtype == torch.float32 else 2.0**-8 * (1 + fine)  # |x_hat| <= (1 + fine) |x|
    assert 0.9 * fine / (1 + fine) < worst <= fine / (1 + fine) * slack[0] + bf16


def test_e4m3_with_power_of_two_scales_encodes_hand_picked_blocks_exactly():
    """Blocks of 4; the scale byte is k + 127 for s = 2^k, k = ceil(log2(amax / 448))."""
    codec = wire.FP8E4M3(4, "e8m0")
    rows = torch.tensor([[448.0, 1, 2, 3],  # amax 448: s = 1, every value exact
                         [449.0, 1, 2, 3],  # just past 448: s = 2, 449 / 2 = 224.5 -> 224 (spacing 16 there)
                         [224.0, -1, 0, 1],  # exactly 448 / 2: s = 1/2, the max lands on 448
                         [232.0, 248, 1, 1],  # s = 1: midpoints 232 -> 224 (even mantissa), 248 -> 256
                         [0.0, 0, 0, 0],  # zero: log2 0 = -inf clamps to 2^-127, byte 0
                         [3e38, 0, 0, 0],  # near float32's largest: k = ceil(log2(3e38 / 448)) = 120
                         [1e-40, 0, 0, 0]]).reshape(1, -1)  # a float32 subnormal: k clamps at -127
    buffer = codec.encode(rows)
    assert buffer[0, 28:].tolist() == [127, 128, 126, 127, 0, 247, 0]
    decoded = codec.decode(buffer, 28, torch.float32).reshape(-1, 4)
    expected = [[448.0, 1, 2, 3], [448.0, 1, 2, 3], [224.0, -1, 0, 1], [224.0, 256, 1, 1], [0.0, 0, 0, 0]]
    assert torch.equal(decoded[:5], torch.tensor(expected))
    assert decoded[5, 0] == 2.0**120 * 224  # 3e38 / 2^120 = 225.7 -> 224
    assert decoded[6, 0] == 2.0**-127 * 9 * 2.0**-9  # 1e-40 / 2^-127 = 0.0170 -> 9 subnormal steps of 2^-9


def test_e2m1_encodes_hand_picked_values_exactly():
    """One block (the row, 13 values, so the last byte's high nibble is padding): amax 6 gives s = 1 in both scale
    codings. Each byte holds element 2i in its low nibble; a code is sign (8) | exponent (2 bits) | mantissa."""
    row = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, -6.0, 0.3, 0.7]])
    # codes: 6->7, 0.25->0 (tie, even), 0.75->2 (tie to 1.0), 1.25->2 (tie to 1.0), 1.75->4 (tie to 2),
    # 2.5->4 (tie to 2), 3.5->6 (tie to 4), 5->6 (tie to 4), -5->8|6, -0.25->8|0, -6->8|7, 0.3->1, 0.7->1
    values = [0x07, 0x22, 0x44, 0x66, 0x8E, 0x1F, 0x01]
    expected = torch.tensor([[6.0, 0, 1, 1, 2, 2, 4, 4, -4, -0.0, -6, 0.5, 0.5]])
    for scale, scale_bytes in (("e8m0", [127]), ("float32", list(torch.tensor([1.0]).view(torch.uint8).tolist()))):
        codec = wire.FP4E2M1(None, scale)
        buffer = codec.encode(row)
        assert buffer[0].tolist() == values + scale_bytes, scale
        assert torch.equal(codec.decode(buffer, 13, torch.float32), expected)
    codec = wire.FP4E2M1(None, "e8m0")
    for k in (-3, 20, -127 + 3):  # a power of two moves the scale byte only (k - 3 + 127 for amax 6 * 2^k... )
        buffer = codec.encode(row * 2.0**k)
        assert buffer[0].tolist() == values + [127 + k], k
        assert torch.equal(codec.decode(buffer, 13, torch.float32), expected * 2.0**k)


def test_e2m1_puts_the_largest_magnitude_on_six_times_the_scale_and_never_clips_with_e8m0():
    """float32 scales: amax / (amax / 6) rounds back to exactly 6, code 7, and decodes to 6 s. e8m0: amax = 6 * 2^k
    is code 7 exactly, and a hair above it takes the next power of two (3.0000002 -> 3, code 5): nothing is clipped,
    where OCP MX's rule (k = floor(log2 amax) - 2) would clip it to 6."""
    amax = torch.rand(1000, 1, generator=torch.Generator().manual_seed(9)) * 100 + 1e-3
    rows = torch.cat([amax, -amax, amax / 3], dim=1)
    codec = wire.FP4E2M1(None, "float32")
    buffer = codec.encode(rows)
    assert (buffer[:, 0] == 0xF7).all() and (buffer[:, 1] == 0x04).all()  # 6 and -6, then 2 (amax / 3) and pad 0
    decoded = codec.decode(buffer, 3, torch.float32)
    scales = buffer[:, 2:].contiguous().view(torch.float32)
    assert torch.equal(decoded[:, :1], 6 * scales) and torch.allclose(decoded[:, :1], amax, rtol=2**-22, atol=0)
    codec = wire.FP4E2M1(None, "e8m0")
    exact, above = torch.tensor([[6.0 * 2**5]]), torch.tensor([[torch.nextafter(torch.tensor(6.0 * 2**5),
                                                                                 torch.tensor(1e9)).item()]])
    assert codec.encode(exact).tolist() == [[0x07, 127 + 5]]
    assert codec.encode(above).tolist() == [[0x05, 127 + 6]]


def test_e2m3_encodes_hand_picked_values_and_packs_four_codes_in_three_bytes():
    """One block (the row): amax 7.5 gives s = 1 in both scale codings. Every code's magnitude comes back exactly;
    midpoints go to the even code; codes pack little-endian, element 4i + j in bits 6j to 6j + 5 of bytes 3i to
    3i + 2, the last group padded with zero codes."""
    every = E2M3_MAGNITUDES.float()
    for scale in ("e8m0", "float32"):
        codec = wire.FP6E2M3(None, scale)
        row = torch.cat([every, -every]).unsqueeze(0)
        assert torch.equal(codec.decode(codec.encode(row), 64, torch.float32), row)
        codes, scales = codec.quantize(row)
        # -0 is coded as +0 (the sign bit marks values below zero)
        assert codes[0].tolist() == list(range(32)) + [0] + [32 | c for c in range(1, 32)] and scales.item() == 1.0
    codec = wire.FP6E2M3(None, "e8m0")
    # ties: 0.0625 (0 | 1/8) -> 0, 0.1875 -> 1/4, 1.0625 -> 1, 1.1875 -> 1.25, 2.125 -> 2, 2.375 -> 2.5,
    # 4.25 -> 4, 4.75 -> 5, 7.25 -> 7; 0.999 and 1.99 and 3.99 round up into the next binade
    ties = torch.tensor([[7.5, 0.0625, 0.1875, 1.0625, 1.1875, 2.125, 2.375, 4.25, 4.75, 7.25, 0.999, 1.99, 3.99]])
    expected = torch.tensor([[7.5, 0, 0.25, 1, 1.25, 2, 2.5, 4, 5, 7, 1, 2, 4]])
    assert torch.equal(codec.decode(codec.encode(ties), 13, torch.float32), expected)
    buffer = codec.encode(torch.tensor([[7.5, -0.125, 1.0, 2.0, 3.0]]))  # codes 31, 33, 8, 16 | 20, pad
    first = 31 | 33 << 6 | 8 << 12 | 16 << 18
    assert buffer[0].tolist() == [first & 0xFF, first >> 8 & 0xFF, first >> 16, 20, 0, 0, 127]
    assert codec.bytes(1, 5, torch.float32) == buffer.numel() == 3 * 2 + 1


@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_one_row_whose_scales_start_at_any_byte_decodes(fmt, scale):
    """A buffer of one row is contiguous, so its scales slice is too, but starts at byte d (or ceil(d / 2))."""
    codec = scaled_format(fmt, 8, scale)
    for d in (13, 14, 15, 16):
        x = heavy_tailed(1, d, seed=d)
        assert torch.equal(codec.decode(codec.encode(x), d, torch.float32), reference_round_trip(x, 8, fmt, scale))


@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_zero_rows_stay_zero_and_nan_or_inf_poison_only_their_block(fmt, scale):
    """float32 scales become NaN or inf; e8m0 codes NaN as 0xFF. Either way no value of the block comes back finite
    (a loss scaler must still see the overflow), and the other block rounds as if alone."""
    codec = scaled_format(fmt, 4, scale)
    x = torch.tensor([[0.0] * 8, [1.0, 2.0, 3.0, float("inf"), 1.0, 2.0, 3.0, 4.0],
                      [1.0, float("nan"), 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
                      [-float("inf"), 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]])
    buffer = codec.encode(x)
    decoded = codec.decode(buffer, 8, torch.float32)
    assert torch.equal(decoded[0], torch.zeros(8))
    for row in (1, 2, 3):
        assert not torch.isfinite(decoded[row, :4]).any()
        assert torch.equal(decoded[row, 4:], reference_round_trip(x[row, 4:], 4, fmt, scale))
    if scale == "e8m0":
        assert buffer[1:, -2].tolist() == [0xFF] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_count_values_and_scales(dtype):
    assert wire.MODEL.bytes(10, 300, dtype) == 10 * 300 * torch.empty(0, dtype=dtype).element_size()
    assert wire.FP8E4M3(None).bytes(10, 300, dtype) == 10 * (300 + 4)
    assert wire.FP8E4M3(128).bytes(10, 300, dtype) == 10 * (300 + 4 * 3)
    assert wire.FP8E4M3(128, "e8m0").bytes(10, 300, dtype) == 10 * (300 + 3)
    assert wire.FP4E2M1(32).bytes(10, 301, dtype) == 10 * (151 + 10)  # e8m0 by default
    assert wire.FP4E2M1(None, "float32").bytes(10, 300, dtype) == 10 * (150 + 4)
    assert wire.FP6E2M3(32).bytes(10, 301, dtype) == 10 * (3 * 76 + 10)  # e8m0 by default; 301 pads to 304 codes
    assert wire.FP6E2M3(None, "float32").bytes(10, 512, dtype) == 10 * (384 + 4)
    for fmt, scale in FORMATS:
        for block in (None, 128, 32):
            codec = scaled_format(fmt, block, scale)
            for d in (300, 301):
                assert codec.encode(torch.randn(10, d).to(dtype)).numel() == codec.bytes(10, d, dtype)


def test_formats_are_built_from_their_own_keys():
    assert wire.wire_format("fp8_e4m3", 16).scale.name == "float32"  # today's format, as before
    assert wire.wire_format("fp4_e2m1", 32).scale.name == "e8m0"
    assert wire.wire_format("fp4_e2m1", "row", "float32").block is None
    assert (wire.wire_format("fp6_e2m3", 32).scale.name, wire.wire_format("fp6_e2m3", 32).name) == ("e8m0", "fp6_e2m3")
    assert wire.wire_format("fp8_e4m3", 16, "e8m0") is wire.wire_format("fp8_e4m3", 16, "e8m0")  # cached
    config = LSHMoEConfig(dispatch_dtype="fp8_e4m3", fp8_scale="e8m0", fp8_block_size=64,
                          dispatch_grad_dtype="fp4_e2m1", fp4_block_size=16)
    forward, backward = wire.formats(config, "dispatch")
    assert (forward.name, forward.block, forward.scale.name) == ("fp8_e4m3", 64, "e8m0")
    assert (backward.name, backward.block, backward.scale.name) == ("fp4_e2m1", 16, "e8m0")
    with pytest.raises(ValueError, match=r"scale coding 'e5m2': allowed \['float32', 'e8m0'\]"):
        wire.FP8E4M3(128, "e5m2")


def test_bytes_per_crossing_is_the_mean_of_the_four_crossings():
    rows, d = 12, 256
    bf16 = rows * d * 2
    fp8 = rows * (d + 4 * 2)  # blocks of 128
    cases = [({}, bf16),
             ({"dispatch_dtype": "fp8_e4m3"}, (2 * fp8 + 2 * bf16) / 4),
             ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}, fp8),
             ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model"}, (fp8 + 3 * bf16) / 4),
             ({"combine_grad_dtype": "fp8_e4m3"}, (fp8 + 3 * bf16) / 4),
             ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3", "fp8_scale": "e8m0"}, rows * (d + 2)),
             ({"dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1"}, rows * (d // 2 + 8)),  # e8m0 per 32
             ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3", "dispatch_grad_dtype": "fp4_e2m1",
               "combine_grad_dtype": "fp4_e2m1", "fp4_block_size": 16},
              (2 * fp8 + 2 * rows * (d // 2 + 16)) / 4)]
    for keys, expected in cases:
        assert wire.bytes_per_crossing(LSHMoEConfig(**paper_block(keys)), rows, d, torch.bfloat16) == expected, keys


def test_model_format_is_the_identity_and_needs_no_crossing_of_its_own():
    config = LSHMoEConfig(dispatch_dtype="fp8_e4m3")
    assert not wire.changes_crossing(config, "combine") and wire.changes_crossing(config, "dispatch")
    assert wire.changes_crossing(LSHMoEConfig(combine_grad_dtype="fp8_e4m3"), "combine")  # on the paper's stages
    assert wire.formats(LSHMoEConfig(fp8_block_size="row", combine_dtype="fp8_e4m3"), "combine")[1].block is None
    x = torch.randn(3, 4, 8)
    assert wire.send(wire.MODEL, x, lambda b: b).data_ptr() == x.data_ptr()  # nothing copied


@pytest.mark.parametrize("forward, backward", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e4m3", "model"),
                                               ("model", "fp8_e4m3"), ("fp4_e2m1", "fp4_e2m1"),
                                               ("fp8_e4m3/e8m0", "fp4_e2m1"), ("model", "fp4_e2m1/float32"),
                                               ("fp6_e2m3", "fp6_e2m3"), ("fp6_e2m3", "fp4_e2m1")])
def test_gradients_pass_straight_through_and_cross_back_in_their_own_format(forward, backward):
    """d(out)/d(rows) is the identity (straight-through); what reaches `rows` is the gradient as its own format
    sends it: rounded with scales of its own, or exactly."""
    f, b = (wire.wire_format(name.split("/")[0], 16, *name.split("/")[1:]) for name in (forward, backward))
    rows = heavy_tailed(4, 5, 32, seed=2).requires_grad_()
    swap = lambda buffer: buffer.flip(0)  # noqa: E731  an exchange that moves rows between "ranks"
    out = wire.cross(rows, f, b, swap)
    assert torch.equal(out, wire.send(f, rows.detach(), swap))
    grad = heavy_tailed(4, 5, 32, seed=3) * 1e-3
    out.backward(grad)
    assert torch.equal(rows.grad, wire.send(b, grad, swap))
    assert torch.equal(rows.grad, grad.flip(0)) == (backward == "model")


# -- stochastic rounding (lsh_moe.grad_rounding "stochastic"; lshmoe_plugin.rounding) --------------------------------
def grid_neighbours(x: torch.Tensor, block, fmt: str, scale: str):
    """(lo, hi, s) of each element of x (..., d), d a multiple of `block`: s its block's scale (reference_scales),
    lo <= |x / s| <= hi the format's two magnitudes around it (lo == hi on the grid), by search over the grid."""
    s = element_scales(x, block, fmt, scale)
    magnitude = (x.float() / s).abs().double().unsqueeze(-1)
    grid = GRIDS[fmt].to(x.device)  # the tables live on the CPU; a GPU test's rows do not
    lo = torch.where(grid <= magnitude, grid, -1.0).max(-1).values
    hi = torch.where(grid >= magnitude, grid, math.inf).min(-1).values
    return lo, hi, s


def round_trip(codec, x: torch.Tensor) -> torch.Tensor:
    return codec.decode(codec.encode(x), x.shape[-1], torch.float32)


def stochastic(fmt: str, block, scale: str):
    return {"fp8_e4m3": wire.FP8E4M3, "fp4_e2m1": wire.FP4E2M1, "fp6_e2m3": wire.FP6E2M3}[fmt](block, scale,
                                                                                            "stochastic")


def test_grad_rounding_nearest_keeps_the_formats_and_bits_of_nearest():
    """grad_rounding nearest (left out under a method or composition that rounds so): each backward format is the
    cached nearest format (the forward's own object where both are one format), and its bits are the reference's;
    stochastic changes the backward format only."""
    x = heavy_tailed(8, 64, seed=4)
    fp8 = {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}
    fp8_fp4 = {"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "fp4_e2m1", "fp4_block_size": 16}
    # (keys, the same stages rounded stochastically)
    # the default (FP8 forward, FP4 gradients rounded stochastically) beside grad_rounding nearest alone, which
    # adjusts it (fp8_fwd_fp4_grad); FP4 both ways by name
    for keys, stochastic_keys in (({"enabled": True, "grad_rounding": "nearest"}, {"enabled": True}),
                                  ({"enabled": True, "method": "fp4"}, {"enabled": True, "method": "fp4_sr"}),
                                  ({"enabled": True, "method": "fp8"}, {**fp8, "grad_rounding": "stochastic"}),
                                  (fp8_fp4, {**fp8_fp4, "grad_rounding": "stochastic"})):
        config = LSHMoEConfig(**keys)
        for crossing in wire.CROSSINGS:
            forward, backward = wire.formats(config, crossing)
            rounded = wire.formats(LSHMoEConfig(**stochastic_keys), crossing)
            forward_name, name = (config.wire_dtypes[i] for i in ((0, 1) if crossing == "dispatch" else (2, 3)))
            if name == "model":
                assert backward is rounded[1] is wire.MODEL
                continue
            block, scale = (getattr(config, key) for key in wire.FORMAT_KEYS[name])
            assert backward is wire.wire_format(name, block, scale, kernel=config.kernel), (keys, crossing)
            assert (backward is forward) == (name == forward_name)
            assert backward.rounding == "nearest" and backward.draws is None
            assert torch.equal(round_trip(backward, x), reference_round_trip(x, block, name, scale))
            assert rounded[0] is forward and rounded[1] is not backward and rounded[1].rounding == "stochastic"
    assert wire.wire_format("fp4_e2m1", 32, rounding="stochastic") is wire.wire_format("fp4_e2m1", 32,
                                                                                        rounding="stochastic")
    with pytest.raises(ValueError, match=r"rounding 'up': allowed \['nearest', 'stochastic'\]"):
        wire.FP4E2M1(32, "e8m0", "up")


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_stochastic_rounding_lands_on_a_grid_neighbour_with_nearests_scales(fmt, scale, block):
    """Every element decodes to lo * s or hi * s (its sign kept), both occur, and the scales are nearest's byte for
    byte (only the values round differently)."""
    x = heavy_tailed(16, 64, seed=5)
    codec, nearest_codec = stochastic(fmt, block, scale), scaled_format(fmt, block, scale)
    buffer, nearest_buffer = codec.encode(x), nearest_codec.encode(x)
    values = value_bytes(fmt, 64)
    assert torch.equal(buffer[..., values:], nearest_buffer[..., values:])
    decoded = codec.decode(buffer, 64, torch.float32)
    lo, hi, s = grid_neighbours(x, block, fmt, scale)
    sign = torch.where(x < 0, -1.0, 1.0)
    down, up = decoded == sign * lo.float() * s, decoded == sign * hi.float() * s
    assert (down | up).all()
    between = lo != hi
    assert (down & ~up)[between].float().mean() > 0.2 and (up & ~down)[between].float().mean() > 0.2


@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_values_on_the_grid_come_back_exactly(fmt, scale):
    """A row of every magnitude of the format, both signs, with amax the format's largest (s = 1 in either coding):
    nothing to round, so every draw returns the row."""
    grid = GRIDS[fmt].float()
    row = torch.cat([grid, -grid]).unsqueeze(0)
    codec = stochastic(fmt, None, scale)
    for _ in range(20):
        assert torch.equal(round_trip(codec, row), row)


@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_stochastic_rounding_keeps_zeros_and_lets_nan_or_inf_poison_their_block(fmt, scale):
    codec = stochastic(fmt, 4, scale)
    x = torch.tensor([[0.0] * 8, [1.0, 2.0, 3.0, float("inf"), 1.0, 2.0, 3.0, 4.0],
                      [1.0, float("nan"), 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]])
    decoded = round_trip(codec, x)
    assert torch.equal(decoded[0], torch.zeros(8)) and not torch.isfinite(decoded[1:, :4]).any()
    lo, hi, s = grid_neighbours(x[1:, 4:], 4, fmt, scale)  # the other block rounds as if alone
    assert ((decoded[1:, 4:] == lo.float() * s) | (decoded[1:, 4:] == hi.float() * s)).all()


@pytest.mark.parametrize("fmt, scale", [("fp4_e2m1", "e8m0"), ("fp4_e2m1", "float32"), ("fp8_e4m3", "float32"),
                                        ("fp6_e2m3", "e8m0")])
def test_stochastic_rounding_is_unbiased_where_nearest_is_not(fmt, scale):
    """2,000 encodes of one tensor: each element's mean decoded value lies within 5 standard errors of the element,
    the standard error from its rounding's variance p (1 - p) (hi - lo)^2 s^2 / N (p the chance of rounding up), plus
    the uniform's granularity 2^-24 (hi - lo) s (and float32's rounding of x / s and q * s with float32 scales, as in
    the bound test above). Elements placed at 0.3 of their interval show nearest's bias: it
    always returns lo, 0.3 (hi - lo) s away, far outside that bound."""
    draws = 2000
    g = torch.Generator().manual_seed(6)
    x = heavy_tailed(4, 32, seed=7)
    lo, hi, s = grid_neighbours(x, 32, fmt, scale)
    placed = torch.rand(4, 32, generator=g) < 0.25  # a quarter of the elements moved to 0.3 of their interval
    x = torch.where(placed & (lo != hi), torch.sign(x) * (lo + 0.3 * (hi - lo)).float() * s, x)
    lo, hi, s = grid_neighbours(x, 32, fmt, scale)  # the moves left every block's amax, so its scale, alone
    codec = stochastic(fmt, 32, scale)
    mean = torch.stack([round_trip(codec, x).double() for _ in range(draws)]).mean(0)
    spacing = (hi - lo) * s.double()
    p = torch.where(lo != hi, ((x.double() / s.double()).abs() - lo) / (hi - lo).clamp(min=1e-300), 0.0)
    float32_rounding = 2.0**-20 * x.double().abs() if scale == "float32" else 0.0  # of x / s and q * s
    bound = 5 * (p * (1 - p) * spacing**2 / draws).sqrt() + 2.0**-24 * spacing + float32_rounding
    assert ((mean - x.double()).abs() <= bound).all(), ((mean - x.double()).abs() - bound).max()
    nearest_error = (round_trip(scaled_format(fmt, 32, scale), x).double() - x.double()).abs()
    moved = placed & (lo != hi)
    assert moved.sum() > 10 and (nearest_error[moved] > 3 * bound[moved]).all()


def test_each_encode_draws_fresh_bits_and_the_same_counter_draws_the_same():
    """The draw counter advances once per encode, so two encodes of one tensor differ; a new format (its counter at
    0 again) repeats the first format's sequence bit for bit."""
    x = heavy_tailed(8, 64, seed=8)
    first, again = wire.FP4E2M1(32, "e8m0", "stochastic"), wire.FP4E2M1(32, "e8m0", "stochastic")
    sequence = [first.encode(x) for _ in range(3)]
    assert not torch.equal(sequence[0], sequence[1]) and not torch.equal(sequence[1], sequence[2])
    assert first.draws.counter(x.device).item() == 3
    assert all(torch.equal(a, again.encode(x)) for a in sequence)
    fp8 = [wire.FP8E4M3(16, "float32", "stochastic").encode(x) for _ in range(2)]
    assert torch.equal(fp8[0], fp8[1])


def test_a_device_has_one_draw_counter_whatever_it_is_called():
    """A counter set through torch.device("cpu", 0) (or, on a GPU, "cuda") is the one an encode of a tensor on that
    device reads and advances: the dictionary of counters is keyed by one name per device."""
    x = heavy_tailed(4, 64, seed=9)
    codec = wire.FP4E2M1(32, "e8m0", "stochastic")
    codec.draws.counter(torch.device("cpu", 0)).fill_(7)
    assert torch.equal(codec.encode(x), stochastic_from(7).encode(x))
    assert codec.draws.counter("cpu").item() == 8 and codec.draws.counter(x.device) is codec.draws.counter("cpu:0")


def stochastic_from(counter: int) -> wire.FP4E2M1:
    codec = wire.FP4E2M1(32, "e8m0", "stochastic")
    codec.draws.counter(torch.device("cpu")).fill_(counter)
    return codec


def test_stochastic_encode_leaves_torchs_generator_alone():
    state = torch.get_rng_state()
    for fmt, scale in FORMATS:
        stochastic(fmt, 16, scale).encode(heavy_tailed(4, 64, seed=9))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_hash_is_murmurs_finaliser_in_int64_and_its_uniforms_look_uniform():
    """fmix32 and hash32 against the same formulas in Python integers (as uint32 arithmetic in a kernel computes
    them), indices and counters past 2^32 included; then 10^5 uniforms of one draw over 64 bins (chi-square with 63
    degrees of freedom, mean 63, sd 11.2), each of the 32 bits set half the time, and two draws uncorrelated."""
    from lshmoe_plugin import rounding

    def fmix(h):
        h ^= h >> 16
        h = h * 0x85EBCA6B & 0xFFFFFFFF
        h ^= h >> 13
        h = h * 0xC2B2AE35 & 0xFFFFFFFF
        return h ^ (h >> 16)

    def reference(index, counter):
        offset = fmix(fmix((counter >> 32) ^ rounding.SEED) ^ (counter & 0xFFFFFFFF) * rounding.GOLDEN & 0xFFFFFFFF)
        multiplier = fmix(offset ^ rounding.GOLDEN) | 1
        return fmix(((index & 0xFFFFFFFF) * multiplier + offset & 0xFFFFFFFF) ^ (index >> 32))

    values = [0, 1, 2, 0xFFFFFFFF, 0x12345678, 0x9E3779B9, 2**32 + 5, 3 << 40]
    assert rounding.fmix32(torch.tensor(values[:6])).tolist() == [fmix(v) for v in values[:6]]
    for counter in (0, 1, 7, 2**32, 2**32 * 3 + 11):
        assert rounding.hash32(torch.tensor(values), torch.tensor(counter)).tolist() == \
            [reference(v, counter) for v in values]
    n, bins = 10**5, 64
    u = rounding.uniforms(torch.Size([n]), torch.tensor(0))
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    assert ((counts - n / bins) ** 2 / (n / bins)).sum() < 63 + 6 * 11.2
    bits = rounding.hash32(torch.arange(n), torch.tensor(1))
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).double().mean(1)
    assert ((ones - 0.5).abs() < 0.01).all()
    other = rounding.uniforms(torch.Size([n]), torch.tensor(1))
    assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1]) < 0.02
    # and over draws, at each position: 2,000 draws of 64 elements, each position's mean within 5.5 sd of 1/2
    by_draw = torch.stack([rounding.uniforms(torch.Size([64]), torch.tensor(k)) for k in range(2000)])
    assert ((by_draw.double().mean(0) - 0.5).abs() < 5.5 * (1 / 12 / 2000) ** 0.5).all()


def test_gradients_cross_back_stochastically_and_the_forward_stays_nearests():
    """Through `cross` under method fp4_sr (fp4's FP4 both ways, its gradients rounded stochastically): the
    forward is nearest's bit for bit; the gradient that comes back differs from nearest's and lies on the grid
    neighbours of the gradient the exchange brings back."""
    swap = lambda buffer: buffer.flip(0)  # noqa: E731  an exchange that moves rows between "ranks"
    rows, grad = heavy_tailed(4, 5, 64, seed=10), heavy_tailed(4, 5, 64, seed=11) * 1e-3
    results = {}
    for rounding in ("nearest", "stochastic"):
        leaf = rows.clone().requires_grad_()
        method = {"nearest": "fp4", "stochastic": "fp4_sr"}[rounding]
        out = wire.cross(leaf, *wire.formats(LSHMoEConfig(enabled=True, method=method), "dispatch"), swap)
        out.backward(grad)
        results[rounding] = out.detach(), leaf.grad
    assert torch.equal(results["nearest"][0], results["stochastic"][0])
    assert torch.equal(results["nearest"][1], reference_round_trip(grad.flip(0), 32, "fp4_e2m1", "e8m0"))
    assert not torch.equal(results["nearest"][1], results["stochastic"][1])
    lo, hi, s = grid_neighbours(grad.flip(0), 32, "fp4_e2m1", "e8m0")
    sign = torch.where(grad.flip(0) < 0, -1.0, 1.0)
    back = results["stochastic"][1]
    assert ((back == sign * lo.float() * s) | (back == sign * hi.float() * s)).all()
