"""The wire format of one all-to-all crossing: what a tensor of rows (..., d) becomes on the network, and back.

- ``model``: the rows as they are, in the model's dtype. Nothing runs: the patches keep the framework's own
  all-to-all for a crossing whose both directions are ``model``.
- ``fp8_e4m3``: every row in float8 e4m3 (``torch.float8_e4m3fn``) with one scale per row or per block of
  `block` elements, packed into one uint8 buffer (E, ..., d + scale bytes * blocks) whose first dimension splits
  over the ranks as the rows would: one all-to-all moves values and scales together, and its bytes are what is
  counted.
- ``fp4_e2m1``: every row in OCP FP4 E2M1 (sign and the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), two values per
  byte, with one scale per block: (E, ..., ceil(d / 2) + scale bytes * blocks).
- ``fp6_e2m3``: every row in OCP FP6 E2M3 (sign, 2 exponent bits, 3 mantissa bits: e4m3's precision over a range
  of 0.125 to 7.5 per scale), four values in three bytes, with one scale per block:
  (E, ..., 3 * ceil(d / 4) + scale bytes * blocks). At the same bytes as FP8 forward with FP4 gradients (0.39 of
  bf16's with e8m0 scales per 32), every crossing keeps about FP8's error instead of FP4's four times larger one.

A scale is coded (`SCALES`) as ``float32`` (s = amax / largest value of the format, 4 bytes) or ``e8m0`` (a power of
two, one byte: OCP MX's biased exponent). Each format has its own block and scale keys (`FORMAT_KEYS`), as their
defaults differ: fp8_e4m3 float32 per 128 (DeepSeek-V3's tile), fp4_e2m1 and fp6_e2m3 e8m0 per 32 (OCP MXFP4, MXFP6).

Rounding error (derived in `FP8E4M3`, `FP4E2M1` and `FP6E2M3`, asserted in tests/test_wire.py): every element comes
back within max(2^-4 |x|, 2^-10 s) of itself for fp8_e4m3, max(2^-4 |x|, 2^-4 s) for fp6_e2m3, max(2^-2 |x|, 2^-2 s)
for fp4_e2m1, s the scale of its block (plus the rounding of the result to the model's dtype): at most 2^-4 (fp8,
fp6) or 2^-2 (fp4) of the block's largest magnitude, with either scale coding (unless amax is so small that the scale
clamps at its smallest value). NaN and inf poison their block (a loss scaler still sees the overflow).

Gradients (`cross`): straight-through for the rounding; the backward crossing carries the gradient in its own
format with scales of its own, rounded to nearest or, with ``lsh_moe.grad_rounding: "stochastic"``, stochastically
(`rounding`: unbiased, E[Q(g)] = g; every scaled format). The forward always rounds to nearest. Shape-static, no host
synchronisation (CUDA-graph capturable). On CUDA every scaled format, with either scale coding, encodes and decodes
with fused kernels (one pass each, the reference's bytes and rows): kernels/wire_triton.py for ``fp8_e4m3`` (on GPUs
that cast to e4m3, compute capability 8.9 and later), kernels/wire_fp4_triton.py for ``fp4_e2m1`` and
kernels/wire_fp6_triton.py for ``fp6_e2m3`` (any CUDA GPU), for bf16, fp16 and fp32 rows, unless ``lsh_moe.kernel``
is ``torch``; PyTorch's reference runs everything else. fp4_e2m1's encode kernel also rounds stochastically, with the
reference's uniforms (kernels/rounding_triton.py); a stochastic fp8_e4m3 or fp6_e2m3 encode runs the reference (their
kernels round to nearest; the buffer is the same, so decoding stays fused).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from . import ops
from .rounding import DrawCounters, steps_of

WIRE_DTYPES = ("model", "fp8_e4m3", "fp4_e2m1", "fp6_e2m3")
CROSSINGS = ("dispatch", "combine")
ROUNDINGS = ("nearest", "stochastic")  # how a scaled format rounds (lsh_moe.grad_rounding, for the gradients)
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
E2M1_MAX = 6.0  # the largest FP4 E2M1 value
E2M3_MAX = 7.5  # the largest FP6 E2M3 value
# The lsh_moe keys of each scaled format: (elements per scale, scale coding).
FORMAT_KEYS = {"fp8_e4m3": ("fp8_block_size", "fp8_scale"), "fp4_e2m1": ("fp4_block_size", "fp4_scale"),
               "fp6_e2m3": ("fp6_block_size", "fp6_scale")}
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the fused kernels (kernels/wire_*triton.py) read

Exchange = Callable[[torch.Tensor], torch.Tensor]  # a plain all-to-all of one buffer along dim 0 (no autograd)


class ModelDtype:
    """The rows as they are: what the frameworks send today."""

    name = "model"

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.contiguous()

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        return buffer

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * d * dtype.itemsize


class Float32Scale:
    """s = amax / largest, the block's largest magnitude on the format's largest value; 4 bytes."""

    name, bytes = "float32", 4

    def of(self, amax: torch.Tensor, largest: float) -> torch.Tensor:
        # A zero block gets the smallest normal scale instead of 0, so that 0 / s stays 0 without a branch. The
        # largest value as a tensor: CUDA turns a division by a Python number into a product with its float32
        # reciprocal, one ulp off for about half the blocks, and the scales must have the same bits on every device
        # and kernel.
        return (amax / amax.new_full((), largest)).clamp(min=torch.finfo(torch.float32).tiny)

    def pack(self, scales: torch.Tensor) -> torch.Tensor:
        """float32 (..., blocks) -> uint8 (..., 4 * blocks)."""
        return scales.view(torch.uint8)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        # A copy, not .contiguous(): a buffer of one row slices into scales that are contiguous already but start at
        # byte d (or ceil(d / 2)) of the storage, which float32 cannot view unless it is a multiple of 4.
        return packed.clone(memory_format=torch.contiguous_format).view(torch.float32)


class E8M0Scale:
    """s = 2^k, k = ceil(log2(amax / largest)): the smallest power of two that keeps amax / s <= largest, so amax / s
    lies in (largest / 2, largest]: nothing clips (OCP MX's own rule, floor(log2 amax) minus the element format's
    largest exponent, clips the top of some blocks instead). One byte, OCP MX's E8M0: the biased exponent k + 127,
    k in [-127, 127], 0xFF NaN.
    A zero block (log2 0 = -inf) gets 2^-127; NaN or inf in a block gives it 0xFF, and the whole block decodes to
    NaN. Dividing by and multiplying with 2^k is exact in float32, barring under- and overflow."""

    name, bytes = "e8m0", 1
    LOWEST, HIGHEST, BIAS, NAN = -127, 127, 127, 0xFF

    def of(self, amax: torch.Tensor, largest: float) -> torch.Tensor:
        # k from the exponents, exactly (a log2 in floating point can land on the wrong side of an integer):
        # amax = m 2^e and largest = m_top 2^e_top with m, m_top in [0.5, 1); amax <= largest 2^(e - e_top) iff
        # m <= m_top, else one more.
        mantissa, exponent = torch.frexp(amax)
        top_mantissa, top_exponent = math.frexp(largest)
        k = exponent - top_exponent + (mantissa > top_mantissa).int()
        k = torch.where(amax > 0, k, self.LOWEST).clamp(self.LOWEST, self.HIGHEST)
        return self.unpack(torch.where(torch.isfinite(amax), k + self.BIAS, self.NAN))

    def pack(self, scales: torch.Tensor) -> torch.Tensor:
        """float32 powers of two (..., blocks) -> their biased exponents, uint8 (..., blocks): float32's exponent
        field (2^-127, a float32 subnormal, has the field 0; NaN has 0xFF)."""
        return ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """biased exponents (..., blocks), any integer dtype -> float32 2^(b - 127), built from its bits."""
        biased = packed.int()
        bits = torch.where(biased == 0, 1 << 22, biased << 23)  # 2^-127 is the subnormal with mantissa 0.5
        return torch.where(biased == self.NAN, 0x7FC00000, bits).view(torch.float32)


SCALES = {"float32": Float32Scale(), "e8m0": E8M0Scale()}


class BlockScaled:
    """What the scaled formats share: one scale per block of `block` elements of a row (None: per row), coded as
    `scale` (a name in SCALES), values rounded to the grid as `rounding` says (ROUNDINGS): ``nearest``, or
    ``stochastic``: y = x / s goes to one of its two neighbours lo <= |y| <= hi, up with probability
    (|y| - lo) / (hi - lo) (lshmoe_plugin.rounding), so E[decoded] = x; the scales are nearest's. Its uniforms hash
    the element's index with a draw counter of the format per device, seeded by a constant of the formats
    (rounding.SEED) and the rank, advanced on every encode: nothing is drawn from torch's generator."""

    kernel = "auto"  # lsh_moe.kernel, set by wire_format: where encode and decode run the fused kernels (ops)
    KERNELS = ""  # the module of kernels/ with the format's fused encode and decode

    def __init__(self, block: Optional[int] = None, scale: str = "float32", rounding: str = "nearest") -> None:
        if scale not in SCALES:
            raise ValueError(f"scale coding {scale!r}: allowed {list(SCALES)}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding {rounding!r}: allowed {list(ROUNDINGS)}")
        self.block, self.scale, self.rounding = block, SCALES[scale], rounding
        self.draws = DrawCounters() if rounding == "stochastic" else None

    def _fused(self, tensor: torch.Tensor, dtype: torch.dtype, encode: bool = False):
        """The fused kernels' module if they encode (`encode`) or decode `tensor` (model dtype `dtype`), else None: on
        CUDA unless the kernel is 'torch', for the dtypes they read and write (the reference takes any other dtype and
        empty tensors), on GPUs the module runs on (its `runs_on`). A stochastic encode only where the module
        declares STOCHASTIC_ENCODE (its encode then takes the format's draw counter); else the reference runs it."""
        if not (ops.runs_fused(self.kernel, tensor.device) and tensor.numel() > 0 and dtype in FUSED_DTYPES):
            return None
        kernels = ops.fused_module(self.KERNELS, self.kernel)
        if encode and self.rounding == "stochastic" and not getattr(kernels, "STOCHASTIC_ENCODE", False):
            return None
        return kernels if kernels.runs_on(tensor.device, self.kernel) else None

    def blocks(self, d: int) -> int:
        return 1 if self.block is None else math.ceil(d / self.block)

    def _blocked(self, rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(..., d) -> (..., blocks, block), the last block zero-padded: padding changes no block's amax."""
        d = rows.shape[-1]
        size = d if self.block is None else self.block
        pad = self.blocks(d) * size - d
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        return rows.unflatten(-1, (self.blocks(d), size)), d

    def _uniforms(self, like: torch.Tensor) -> torch.Tensor:
        """A fresh uniform in [0, 1) per element of `like` (float32), from the format's draw counter."""
        return self.draws.draw(like.shape, like.device)


class FP8E4M3(BlockScaled):
    """float8 e4m3 values, one scale per block of `block` elements of a row (None: per row), float32 or e8m0.

    Scale s = amax / 448 per block (float32), so the block's largest magnitude lands on e4m3's largest finite value.
    Error bound: e4m3 keeps 3 mantissa bits, so round-to-nearest moves a normal value y = x / s (|y| >= 2^-6) by at
    most half a unit in the last place, 2^-4 |y|, and a subnormal one by at most half the subnormal spacing 2^-9;
    scaled back, |x_hat - x| <= max(2^-4 |x|, 2^-10 s) <= 2^-4 amax, up to float32's rounding of x / s and q * s.

    With ``e8m0`` scales, s = 2^ceil(log2(amax / 448)) and amax / s lies in (224, 448]. The same derivation holds
    with no float32 rounding at all (a power of two divides and multiplies exactly), so |x_hat - x| <=
    max(2^-4 |x|, 2^-10 s) <= 2^-4 amax as before; what the power of two costs is s itself, up to twice amax / 448:
    the subnormal term 2^-10 s is at most 2^-9 amax / 448 (twice float32's), i.e. up to one binade of e4m3's range
    goes unused at the bottom of each block. A block with amax < 448 * 2^-128 keeps the clamped scale 2^-127 and
    the bound in its absolute form.
    """

    name, KERNELS = "fp8_e4m3", "wire_triton"

    def quantize(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows (..., d) -> values float8_e4m3fn (..., d), scales float32 (..., blocks)."""
        blocked, d = self._blocked(rows.float())
        amax = blocked.abs().amax(-1)
        scales = self.scale.of(amax, E4M3_MAX)
        scaled = (blocked / scales.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).flatten(-2)[..., :d]
        if self.rounding == "stochastic":
            return self._round_stochastically(scaled), scales
        return scaled.to(torch.float8_e4m3fn), scales

    def _round_stochastically(self, scaled: torch.Tensor) -> torch.Tensor:
        """y (float32, |y| <= 448) -> float8_e4m3fn, |y| to a multiple of e4m3's spacing where it lies: 2^(e - 3) in
        the binade [2^e, 2^(e+1)) (3 mantissa bits), 2^-9 below 2^-6 (the subnormals); frexp's exponent is e + 1.
        448 = 14 * 2^5 is a multiple, so nothing rounds past it. The result is exact in float32 and in e4m3."""
        magnitude = scaled.abs()
        exponent = torch.frexp(magnitude).exponent.clamp(min=-5)
        spacing = ((exponent - 4 + 127) << 23).view(torch.float32)  # 2^(exponent - 4) from its bits: exact anywhere
        steps = steps_of(magnitude, spacing, self._uniforms(magnitude))
        return torch.copysign(steps * spacing, scaled).to(torch.float8_e4m3fn)

    def dequantize(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """values (..., d), scales (..., blocks) -> rows (..., d) in `dtype`."""
        blocked, d = self._blocked(values.float())
        return (blocked * scales.unsqueeze(-1)).flatten(-2)[..., :d].to(dtype)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        fused = self._fused(rows, rows.dtype, encode=True)
        if fused:
            return fused.encode(rows, self.block, self.scale.name)
        values, scales = self.quantize(rows)
        return torch.cat([values.view(torch.uint8), self.scale.pack(scales)], dim=-1)

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        fused = self._fused(buffer, dtype)
        if fused:
            return fused.decode(buffer, d, self.block, dtype, self.scale.name)
        values = buffer[..., :d].view(torch.float8_e4m3fn)
        scales = self.scale.unpack(buffer[..., d:])
        return self.dequantize(values, scales, dtype)

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * (d + self.scale.bytes * self.blocks(d))


# Midpoints between neighbouring E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0 to 7, in order).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class FP4E2M1(BlockScaled):
    """OCP FP4 E2M1 values, two per byte (element 2i in the low nibble; an odd row's last high nibble is 0), one
    scale per block of `block` elements of a row (None: per row), e8m0 (OCP MXFP4 with blocks of 32) or float32.

    A code is the sign (bit 3), 2 exponent bits and 1 mantissa bit; the magnitudes, codes 0 to 7 in order, are
    0, 0.5, 1, 1.5, 2, 3, 4, 6. Scale s = 2^ceil(log2(amax / 6)) (e8m0: amax / s in (3, 6]) or amax / 6 (float32);
    y = x / s rounds to the nearest magnitude, a tie to the even code (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4). Every
    y past 5 takes code 7, so the code saturates at 6 s; with the scale chosen from the block's amax, nothing lies
    past 6 s anyway (float32: amax / fl(amax / 6) rounds back to exactly 6, as 6 has two significant bits).

    Error bound: one mantissa bit, so in a binade [2^e, 2^(e+1)) (e = 0, 1, 2) the spacing is 2^(e-1) and a value
    moves by at most 2^(e-2) <= 2^-2 |y|; below 1 the spacing is 0.5 (0, then the subnormal 0.5), a move of at most
    2^-2. Scaled back, |x_hat - x| <= 2^-2 max(|x|, s) <= 2^-2 amax (s = amax / 6, or s < amax / 3 with e8m0), up to
    float32's rounding of x / s and q * s with float32 scales (none with e8m0). The relative bound is reached only
    at the midpoint of a binade's first interval: at most 2^-2 / (1 + 2^-2) = 1/5 of |x| for |y| >= 1.
    """

    name, KERNELS = "fp4_e2m1", "wire_fp4_triton"

    def __init__(self, block: Optional[int] = 32, scale: str = "e8m0", rounding: str = "nearest") -> None:
        super().__init__(block, scale, rounding)

    def quantize(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows (..., d) -> codes uint8 (..., d) in [0, 16), scales float32 (..., blocks)."""
        blocked, d = self._blocked(rows.float())
        scales = self.scale.of(blocked.abs().amax(-1), E2M1_MAX)
        scaled = (blocked / scales.unsqueeze(-1)).flatten(-2)[..., :d]
        magnitude = scaled.abs()
        if self.rounding == "stochastic":
            codes = self._round_stochastically(magnitude)
        else:
            codes = torch.zeros_like(magnitude, dtype=torch.uint8)
            for i, midpoint in enumerate(E2M1_MIDPOINTS):
                # the code is how many midpoints lie below; a tie goes to the even one of codes i and i + 1
                codes += (magnitude >= midpoint if i % 2 else magnitude > midpoint).to(torch.uint8)
        return codes | ((scaled < 0).to(torch.uint8) << 3), scales

    def _round_stochastically(self, magnitude: torch.Tensor) -> torch.Tensor:
        """|y| (float32, at most 6 but for float32's rounding of x / s) -> codes uint8 in [0, 8). The grid's spacing
        is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; counted in spacings, |y| lies `steps` above 0 (below 2), 2 (below
        4) or 4, whose codes are 0, 4 and 6 = 2 steps each: the code is steps + 2 per threshold (2, 4) passed. NaN
        (a NaN block, whose scale decodes it to NaN anyway) takes code 0, as nearest gives it."""
        magnitude = torch.nan_to_num(magnitude, nan=0.0).clamp(max=E2M1_MAX)
        past_2, past_4 = (magnitude >= 2).float(), (magnitude >= 4).float()
        spacing = 0.5 * (1 + past_2) * (1 + past_4)
        steps = steps_of(magnitude, spacing, self._uniforms(magnitude))
        return (steps + 2 * (past_2 + past_4)).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes (..., d), scales (..., blocks) -> rows (..., d) in `dtype`."""
        exponent, mantissa = (codes >> 1) & 3, codes & 1
        quarters = torch.where(exponent > 0, (2 + mantissa) << exponent, 2 * mantissa)  # 4 * magnitude
        values = torch.where(codes >= 8, -quarters.float(), quarters.float()) * 0.25
        blocked, d = self._blocked(values)
        return (blocked * scales.unsqueeze(-1)).flatten(-2)[..., :d].to(dtype)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        fused = self._fused(rows, rows.dtype, encode=True)
        if fused:
            counter = self.draws.counter(rows.device) if self.draws else None  # the kernel draws and advances it
            return fused.encode(rows, self.block, self.scale.name, counter)
        codes, scales = self.quantize(rows)
        if codes.shape[-1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        pairs = codes.unflatten(-1, (-1, 2))
        return torch.cat([pairs[..., 0] | (pairs[..., 1] << 4), self.scale.pack(scales)], dim=-1)

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        fused = self._fused(buffer, dtype)
        if fused:
            return fused.decode(buffer, d, self.block, dtype, self.scale.name)
        packed = buffer[..., :math.ceil(d / 2)]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :d]
        return self.dequantize(codes, self.scale.unpack(buffer[..., math.ceil(d / 2):]), dtype)

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * (math.ceil(d / 2) + self.scale.bytes * self.blocks(d))


class FP6E2M3(BlockScaled):
    """OCP FP6 E2M3 values (MXFP6's element format), four codes of 6 bits in three bytes, one scale per block of
    `block` elements of a row (None: per row), e8m0 (OCP MXFP6 with blocks of 32) or float32.

    A code is the sign (bit 5), 2 exponent bits e (bias 1) and 3 mantissa bits m: the magnitude is m / 8 for e = 0
    (subnormal) and 2^(e - 1) (1 + m / 8) otherwise, so codes 0 to 31 are 0, 0.125, ..., 0.875, 1, 1.125, ..., 7.5 in
    order, spaced 1/8 below 2, 1/4 in [2, 4) and 1/2 in [4, 7.5]. Scale s = 2^ceil(log2(amax / 7.5)) (e8m0: amax / s
    in (3.75, 7.5]) or amax / 7.5 (float32); y = x / s rounds to the nearest magnitude, a tie to the even code. The
    code is arithmetic: with step the spacing of y's binade, q = round_half_even(|y| / step) is the code up to the
    binade's offset 8 (e - 1), and q reaching the next binade's first value gives its code by the same sum; a
    mantissa's parity is the code's, so round-half-even on q is the tie-to-even rule. Codes pack little-endian:
    element 4i + j takes bits 6j to 6j + 5 of bytes 3i to 3i + 2; a row's last group is padded with zero codes.

    Error bound: 3 mantissa bits, as e4m3: a normal y (|y| >= 1) moves by at most half its binade's spacing, 2^-4 of
    the binade's first value <= 2^-4 |y|, and below 1 the spacing is 1/8, a move of at most 2^-4. Scaled back,
    |x_hat - x| <= 2^-4 max(|x|, s) <= 2^-4 amax, up to float32's rounding with float32 scales (none with e8m0).
    Against e4m3 it gives up the low end of the range (a block's values below s / 16 round to 0), which blocks of
    32 rarely use: on a trained proxy model's expert inputs its error of the expert outputs is 1.06-1.11x FP8's
    (docs/compressibility.md).
    """

    name, KERNELS = "fp6_e2m3", "wire_fp6_triton"

    def __init__(self, block: Optional[int] = 32, scale: str = "e8m0", rounding: str = "nearest") -> None:
        super().__init__(block, scale, rounding)

    def quantize(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows (..., d) -> codes uint8 (..., d) in [0, 64), scales float32 (..., blocks). Stochastically: q is
        |y| / step rounded down or up, up with probability its fraction (rounding.steps_of); 7.5 is a multiple of
        its binade's step, so nothing rounds past it."""
        blocked, d = self._blocked(rows.float())
        scales = self.scale.of(blocked.abs().amax(-1), E2M3_MAX)
        scaled = (blocked / scales.unsqueeze(-1)).flatten(-2)[..., :d]
        # NaN (a NaN block's, whose scale decodes it to NaN anyway) takes code 0, as the fused kernels give it
        magnitude = torch.nan_to_num(scaled.abs(), nan=0.0).clamp(max=E2M3_MAX)
        # the binade's exponent e in [1, 3] from float32's own (|y| = f 2^k, f in [0.5, 1): e = k for |y| >= 1),
        # 1 for the subnormals, whose spacing 1/8 is the first binade's
        binade = torch.frexp(magnitude).exponent.clamp(1, 3)
        step = torch.ldexp(torch.full_like(magnitude, 0.125), binade - 1)
        if self.rounding == "stochastic":
            steps = steps_of(magnitude, step, self._uniforms(magnitude))
        else:
            steps = torch.round(magnitude / step)
        codes = steps.to(torch.uint8) + 8 * (binade - 1).to(torch.uint8)
        return codes | ((scaled < 0).to(torch.uint8) << 5), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes (..., d), scales (..., blocks) -> rows (..., d) in `dtype`."""
        exponent, mantissa = ((codes >> 3) & 3).int(), (codes & 7).int()
        eighths = torch.where(exponent > 0, (8 + mantissa) << (exponent - 1).clamp(min=0), mantissa)  # 8 * magnitude
        values = torch.where(codes >= 32, -eighths.float(), eighths.float()) * 0.125
        blocked, d = self._blocked(values)
        return (blocked * scales.unsqueeze(-1)).flatten(-2)[..., :d].to(dtype)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        fused = self._fused(rows, rows.dtype, encode=True)
        if fused:
            return fused.encode(rows, self.block, self.scale.name)
        codes, scales = self.quantize(rows)
        pad = -codes.shape[-1] % 4
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        quads = codes.unflatten(-1, (-1, 4)).int()
        bits = quads[..., 0] | (quads[..., 1] << 6) | (quads[..., 2] << 12) | (quads[..., 3] << 18)
        packed = torch.stack([bits & 0xFF, (bits >> 8) & 0xFF, bits >> 16], dim=-1).flatten(-2).to(torch.uint8)
        return torch.cat([packed, self.scale.pack(scales)], dim=-1)

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        fused = self._fused(buffer, dtype)
        if fused:
            return fused.decode(buffer, d, self.block, dtype, self.scale.name)
        width = self.value_bytes(d)
        triples = buffer[..., :width].unflatten(-1, (-1, 3)).int()
        bits = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        codes = torch.stack([(bits >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=-1).flatten(-2)[..., :d]
        return self.dequantize(codes.to(torch.uint8), self.scale.unpack(buffer[..., width:]), dtype)

    @staticmethod
    def value_bytes(d: int) -> int:
        return 3 * math.ceil(d / 4)

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * (self.value_bytes(d) + self.scale.bytes * self.blocks(d))


WireFormat = Union[ModelDtype, FP8E4M3, FP4E2M1, FP6E2M3]
MODEL = ModelDtype()


def wire_format(name: str, block: Union[str, int] = "row", scale: Optional[str] = None,
                kernel: str = "auto", rounding: str = "nearest") -> WireFormat:
    """The format called `name` (one of WIRE_DTYPES); `block` and `scale` are its keys (FORMAT_KEYS: e.g.
    ``lsh_moe.fp8_block_size`` and ``fp8_scale``), scale None the format's own default; `kernel` is
    ``lsh_moe.kernel`` (``torch``: the PyTorch reference on every device); `rounding` one of ROUNDINGS (``model``
    does not round). One instance per set of values, however they are passed: a stochastic format's draw counters
    are shared by every crossing that sends it, so that no two of its encodes draw the same bits."""
    return _format(name, block, scale, kernel, rounding)


@functools.lru_cache(maxsize=None)
def _format(name: str, block: Union[str, int], scale: Optional[str], kernel: str, rounding: str) -> WireFormat:
    if name == "model":
        return MODEL
    size = None if block == "row" else block
    if name == "fp8_e4m3":
        fmt = FP8E4M3(size, scale or "float32", rounding)
    elif name == "fp4_e2m1":
        fmt = FP4E2M1(size, scale or "e8m0", rounding)
    elif name == "fp6_e2m3":
        fmt = FP6E2M3(size, scale or "e8m0", rounding)
    else:
        raise ValueError(f"wire dtype {name!r}: allowed {list(WIRE_DTYPES)}")
    fmt.kernel = kernel
    return fmt


def configured_format(config, name: str, rounding: str = "nearest") -> WireFormat:
    """The format called `name` with its block, scale and kernel keys as an LSHMoEConfig sets them, rounding as
    `rounding` says."""
    keys = (getattr(config, key) for key in FORMAT_KEYS.get(name, ()))
    return wire_format(name, *keys, kernel=config.kernel, rounding=rounding)


def formats(config, crossing: str) -> Tuple[WireFormat, WireFormat]:
    """(forward, backward) formats of `crossing` ("dispatch" or "combine") under an LSHMoEConfig: the backward
    follows the forward unless ``<crossing>_grad_dtype`` is set, and rounds as ``grad_rounding`` says; the forward
    always rounds to nearest."""
    forward = getattr(config, f"{crossing}_dtype")
    backward = getattr(config, f"{crossing}_grad_dtype") or forward
    return configured_format(config, forward), configured_format(config, backward, config.grad_rounding)


def stochastic_formats(config) -> Dict[str, "BlockScaled"]:
    """The formats of `config`'s crossings that round stochastically (its backward formats under ``grad_rounding:
    "stochastic"``), by name: one instance per name, since every format of a config takes that config's keys. Their
    draw counters are process-wide, shared by every layer and crossing that sends the format."""
    found = (fmt for crossing in CROSSINGS for fmt in formats(config, crossing))
    return {fmt.name: fmt for fmt in found if getattr(fmt, "draws", None) is not None}


def draws_state(config) -> Dict[str, Dict[str, int]]:
    """The draws each stochastic format of `config` made per device (`rounding.DrawCounters.state_dict`), by format
    name; empty where nothing rounds stochastically. Reads the counters back to the host: at a save only."""
    return {name: fmt.draws.state_dict() for name, fmt in sorted(stochastic_formats(config).items())}


def load_draws(config, state: Optional[Mapping[str, Mapping[str, int]]]) -> None:
    """Continue the draw counters of `config`'s stochastic formats from `draws_state`'s values; None (or a format
    missing from it): from the start, as a new process's. No host synchronisation; nothing where nothing rounds
    stochastically."""
    for name, fmt in stochastic_formats(config).items():
        fmt.draws.load_state_dict(None if state is None else state.get(name))


def changes_crossing(config, crossing: str) -> bool:
    """Whether `crossing` sends anything but the model's rows in either direction (else the framework's own
    all-to-all runs, unchanged)."""
    return any(f is not MODEL for f in formats(config, crossing))


def bytes_per_crossing(config, rows: int, d: int, dtype: torch.dtype) -> Union[int, float]:
    """Bytes of one buffer of `rows` rows (d wide, `dtype` in the model) per crossing, the mean of the four a
    training step makes (dispatch and combine, forward and backward): with one format everywhere, each one's."""
    total = sum(f.bytes(rows, d, dtype) for crossing in CROSSINGS for f in formats(config, crossing))
    return total // 4 if total % 4 == 0 else total / 4


def send(fmt: WireFormat, rows: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """rows (N, ..., d) encoded, exchanged and decoded (as many rows as the exchange brings); no autograd."""
    return fmt.decode(exchange(fmt.encode(rows)), rows.shape[-1], rows.dtype)


def split_exchanges(all_to_all_single, group, input_splits, output_splits) -> Tuple[Exchange, Exchange]:
    """A variable-size all-to-all (rows out per rank `input_splits`, in `output_splits`) through the framework's
    `all_to_all_single`, and its transpose (the splits swapped), which carries the gradient back."""
    def exchange(send_splits, receive_splits) -> Exchange:
        def run(buffer: torch.Tensor) -> torch.Tensor:
            rows = buffer.shape[0] if receive_splits is None else int(sum(receive_splits))  # None: equal splits
            received = buffer.new_empty((rows,) + tuple(buffer.shape[1:]))
            all_to_all_single(received, buffer.contiguous(), output_split_sizes=receive_splits,
                              input_split_sizes=send_splits, group=group)
            return received
        return run
    return exchange(input_splits, output_splits), exchange(output_splits, input_splits)


class _Crossing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, forward: WireFormat, backward: WireFormat, exchange: Exchange,
                exchange_back: Exchange):
        ctx.backward, ctx.exchange_back = backward, exchange_back
        return send(forward, rows, exchange)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Straight-through: the rounding's derivative is taken as the identity; the gradient is rounded in its
        # own format on its way back, through the all-to-all's transpose.
        return send(ctx.backward, grad, ctx.exchange_back), None, None, None, None


def cross(rows: torch.Tensor, forward: WireFormat, backward: WireFormat, exchange: Exchange,
          exchange_back: Optional[Exchange] = None) -> torch.Tensor:
    """rows (N, ..., d) through `exchange` in `forward`'s format; their gradient back in `backward`'s, through
    `exchange_back` (default `exchange`: an all-to-all of equal splits is its own transpose)."""
    return _Crossing.apply(rows, forward, backward, exchange, exchange_back or exchange)
