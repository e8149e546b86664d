"""What the fused wire-format kernels share (kernels/wire_triton.py for ``fp8_e4m3``, kernels/wire_fp4_triton.py for
``fp4_e2m1``, kernels/wire_fp6_triton.py for ``fp6_e2m3``): a block's scale from its largest magnitude in either
coding of `lshmoe_plugin.wire.SCALES`, written into a row's buffer and read back; the launch of a kernel over tiles
of (row, segment) pairs, or over (rows, columns) tiles of the rows with the blocks' scales (`scaled_tile`).

The scales have the reference's bits because every step is the same IEEE operation or an exact integer one:

- amax = max |x| over the block, NaN kept (`tl.max` would drop it; a NaN must poison its block).
- ``float32`` (`wire.Float32Scale`): s = amax / largest correctly rounded (`div_rn`: Triton's ``/`` is
  ``div.full.f32``, up to 2 ulp off), at least float32's smallest normal, NaN kept; stored as its 4 bytes,
  little-endian, one at a time (a row's scales start at any byte).
- ``e8m0`` (`wire.E8M0Scale`): the reference takes k = e - e_top + (m > m_top) from frexp, amax = m 2^e and
  largest = m_top 2^e_top with m, m_top in [0.5, 1). For a normal float32 amax with exponent field E and fraction
  bits f, frexp gives e = E - 126 and m = (1 + f 2^-23) / 2, so m > m_top exactly when f > (2 m_top - 1) 2^23, an
  integer F_top for any largest float32 holds (448: 0x600000, 6: 0x400000); the kernel reads E and f from amax's
  bits (`e8m0_top` works out e_top and F_top on the host). A zero or subnormal amax has E = 0, and its k from the
  bits, -126 - e_top + (0 or 1), is at most -127 as the reference's is (e <= -126 from frexp, or the -127 it sets
  for zero), so both clamp to the same -127. E = 255 (inf, NaN) is the reference's not-finite: byte 0xFF. The byte
  decodes as `wire.E8M0Scale.unpack` builds it, from bits: 2^(b - 127), 2^-127 the subnormal 1 << 22, 0xFF NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..wire import FUSED_DTYPES, SCALES
from .launch_math import cdiv, next_power_of_2

TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # 2^-126: the float32 scale of an all-zero block
TILE = 4096  # elements per program: bytes enough in flight per SM, registers few enough per thread


def e8m0_top(largest: float) -> Tuple[int, int]:
    """(e_top, F_top) of the format's largest value: its frexp exponent and the fraction bits that a block's amax
    must exceed to need one more power of two (the module docstring derives it)."""
    mantissa, exponent = math.frexp(largest)
    fraction = (2 * mantissa - 1) * 2**23
    if exponent < 0 or not fraction.is_integer():
        raise ValueError(f"{largest} is no float32 value >= 0.5: the e8m0 scale's bits would not be the reference's")
    return exponent, int(fraction)


@triton.jit
def max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def e8m0_value(code):
    """Biased exponents b in [0, 255] (any integer type) -> float32 2^(b - 127), as wire.E8M0Scale.unpack."""
    biased = code.to(tl.uint32)
    bits = tl.where(biased == 0, tl.full(biased.shape, 1 << 22, tl.uint32), biased << 23)
    bits = tl.where(biased == 0xFF, tl.full(biased.shape, 0x7FC00000, tl.uint32), bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e8m0_reciprocal(code):
    """Biased exponents b in [0, 255] (uint32) -> float32 1 / 2^(b - 127) = 2^(127 - b), exactly: 2^127 for b = 0, the
    subnormal 2^-127 (bits 1 << 22) for b = 254, NaN for 0xFF (a not-finite block's scale)."""
    bits = tl.where(code == 254, tl.full(code.shape, 1 << 22, tl.uint32), (254 - code) << 23)
    bits = tl.where(code == 0xFF, tl.full(code.shape, 0x7FC00000, tl.uint32), bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def divide_by_scale(x, scale, code, E8M0: tl.constexpr):
    """x / s correctly rounded, for s and its stored bits `code` as encode_scale returns them (each broadcast to x).
    An e8m0 s is a power of two whose reciprocal is a float32 too (`e8m0_reciprocal`), so x times it is the real
    number x / s, rounded once to the same bits (no fast-math: Triton's multiply keeps subnormals): one multiply where
    `div_rn` is a dozen instructions and a slow-path call (scripts/kernel_sass.py: FP4's tile encode 1,751 SASS lines
    and 47 registers with `div_rn`, 1,127 and 32 with the multiply). A float32 s, amax / largest rounded, has no
    exact reciprocal: it keeps `div_rn`."""
    if E8M0:
        return x * e8m0_reciprocal(code)
    else:
        return tl.math.div_rn(x, scale)


@triton.jit
def encode_scale(amax, LARGEST: tl.constexpr, E8M0: tl.constexpr, TOP_EXPONENT: tl.constexpr,
                 TOP_FRACTION: tl.constexpr):
    """amax (float32, >= 0 or NaN) -> (s, the bits stored for it: float32's, or the e8m0 byte, as uint32)."""
    if E8M0:
        bits = amax.to(tl.uint32, bitcast=True)
        field = ((bits >> 23) & 0xFF).to(tl.int32)
        k = field - 126 - TOP_EXPONENT + ((bits & 0x7FFFFF) > TOP_FRACTION).to(tl.int32)
        code = tl.where(field == 0xFF, 0xFF, tl.minimum(tl.maximum(k, -127), 127) + 127).to(tl.uint32)
        scale = e8m0_value(code)
    else:
        scale = tl.maximum(tl.math.div_rn(amax, LARGEST), TINY, propagate_nan=tl.PropagateNan.ALL)
        code = scale.to(tl.uint32, bitcast=True)
    return scale, code


@triton.jit
def store_scale(at, code, mask, E8M0: tl.constexpr):
    """The scale's bits (uint32) at byte address `at`: one byte (e8m0) or four, little-endian (float32)."""
    if E8M0:
        tl.store(at, code.to(tl.uint8), mask=mask)
    else:
        for k in tl.static_range(4):
            tl.store(at + k, ((code >> (8 * k)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def load_scale(at, mask, E8M0: tl.constexpr):
    """The float32 scale stored at byte address `at` (what store_scale wrote)."""
    if E8M0:
        scale = e8m0_value(tl.load(at, mask=mask, other=0))
    else:
        bits = tl.load(at, mask=mask, other=0).to(tl.uint32)
        for k in tl.static_range(1, 4):
            bits |= tl.load(at + k, mask=mask, other=0).to(tl.uint32) << (8 * k)
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def scaled_tile(rows_ptr, out_ptr, n_rows, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, LARGEST: tl.constexpr,
                E8M0: tl.constexpr, TOP_EXPONENT: tl.constexpr, TOP_FRACTION: tl.constexpr,
                SCALE_BYTES: tl.constexpr, SCALES_AT: tl.constexpr):
    """What a tile encode (`launch_tiles`) does before it codes: this program's (ROWS, COLS) tile of the rows, loaded
    as they lie and seen as (ROWS, COLS / SIZE, SIZE) blocks, each block's scale worked out and stored at byte
    SCALES_AT + SCALE_BYTES * block of its row's buffer. Returns (rows (int64), columns, live rows, the rows' buffer
    addresses, the blocks divided by their scales (float32 (ROWS, COLS / SIZE, SIZE), `divide_by_scale`)). Past the
    row x is 0 and its block's scale divides it: code 0 (NaN included), the reference's pad."""
    NB: tl.constexpr = COLS // SIZE
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    live = row < n_rows
    x = tl.load(rows_ptr + row[:, None] * stride_rows + col[None, :], mask=live[:, None] & (col < D)[None, :],
                other=0.0).to(tl.float32)
    blocked = tl.reshape(x, (ROWS, NB, SIZE))
    amax = tl.reduce(tl.abs(blocked), 2, max_keeping_nan)
    block_scale, code = encode_scale(amax, LARGEST, E8M0, TOP_EXPONENT, TOP_FRACTION)
    out_row = out_ptr + row * stride_out
    block = tl.program_id(1) * NB + tl.arange(0, NB)
    store_scale(out_row[:, None] + SCALES_AT + SCALE_BYTES * block[None, :], code,
                live[:, None] & (block < BLOCKS)[None, :], E8M0)
    return row, col, live, out_row, divide_by_scale(blocked, block_scale[:, :, None], code[:, :, None], E8M0)


@triton.jit
def store_scaled_tile(values, buffer_row, out_ptr, row, live, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                      BLOCKS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr,
                      SCALES_AT: tl.constexpr):
    """What a tile decode (`launch_tiles`) does after it has its codes' values: this program's blocks' scales read
    once each from byte SCALES_AT + SCALE_BYTES * block of the rows' buffers, the values (float32 (ROWS, COLS / SIZE,
    SIZE)) times them (one rounding), and the tile stored into the output rows in their dtype (rounding to nearest
    even), as they lie. The counterpart of `scaled_tile`."""
    NB: tl.constexpr = COLS // SIZE
    block = tl.program_id(1) * NB + tl.arange(0, NB)
    scale = load_scale(buffer_row[:, None] + SCALES_AT + SCALE_BYTES * block[None, :],
                       live[:, None] & (block < BLOCKS)[None, :], E8M0)
    x = tl.reshape(values * scale[:, :, None], (values.shape[0], COLS))
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], x.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (col < D)[None, :])


def scale_bytes(scale: str) -> int:
    return SCALES[scale].bytes


def segment_size(d: int, block: Optional[int]) -> int:
    """Elements under one scale: the row's d when one block covers it (per row, or a block of d or more)."""
    return d if block is None or block >= d else block


def check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in FUSED_DTYPES:
        raise TypeError(f"the fused {name} kernels read and write {list(FUSED_DTYPES)}, got {dtype}")


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """t (..., w) as (M, w) with unit column stride (a view when the layout allows it)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def encode_buffers(rows: torch.Tensor, width: int, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a `name` encode of rows (..., d) launches on: (its rows as (M, d), the buffer (..., width) uint8 it
    returns, as (M, width)), after checking the model dtype."""
    check_dtype(rows.dtype, name)
    out = torch.empty(rows.shape[:-1] + (width,), dtype=torch.uint8, device=rows.device)
    return rows_of(rows), out


def decode_buffers(buffer: torch.Tensor, d: int, width: int, dtype: torch.dtype,
                   name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a `name` decode of a buffer (..., width) into rows d wide launches on: (the buffer as (M, width), the
    rows (..., d) in `dtype` it returns), after checking the dtype and that the buffer is one of such rows."""
    check_dtype(dtype, name)
    if buffer.dtype != torch.uint8 or buffer.shape[-1] != width:
        raise ValueError(f"an {name} buffer of rows {d} wide is uint8 (..., {width}), "
                         f"got {buffer.dtype} {tuple(buffer.shape)}")
    return rows_of(buffer), torch.empty(buffer.shape[:-1] + (d,), dtype=dtype, device=buffer.device)


def launch(kernel, src: torch.Tensor, out: torch.Tensor, n_segments: int, segment_elements: int, name: str,
           **constants) -> None:
    """kernel over `n_segments` segments of src (M, w_in) into out (M, w_out), both with unit column stride, each
    segment a tile of `segment_elements` (a power of two) elements; a program holds ~TILE elements, several
    segments when they are short.

    Shapes are compile-time constants (one compilation per width and scale block, as a model has few).
    """
    if n_segments >= 2**31:
        raise ValueError(f"{name} kernels index (row, block) segments in int32: {n_segments} is too many; "
                         f"split the rows")
    segs = max(1, TILE // segment_elements)
    if n_segments:
        kernel[(cdiv(n_segments, segs),)](
            src, out, n_segments, src.stride(0), out.stride(0), SEGS=segs,
            num_warps=min(16, max(4, segs * segment_elements // 512)), **constants)


def tiles_rows(d: int, size: int, unit: int) -> bool:
    """Whether a codec of rows d wide with blocks of `size` takes (ROWS, COLS) tiles of the rows (`launch_tiles`):
    its blocks are a power of two of at least `unit` elements (the elements that share bytes: 2 for fp4_e2m1, 4 for
    fp6_e2m3), so a tile's columns split into whole blocks and a block into whole byte groups, and shorter than the
    row. With one scale per row the segment kernels were as fast or faster on an H100 (docs/benchmarks.md
    wire_codec_encode_tiles_h100 against wire_codec_fp4_decode_h100), so a row of one block keeps them."""
    return unit <= size < d and size <= TILE and size & (size - 1) == 0


def launch_tiles(kernel, src: torch.Tensor, out: torch.Tensor, d: int, size: int, scale: str, name: str,
                 tile: Optional[int] = None, **constants) -> None:
    """kernel over (ROWS, COLS) tiles of the rows (M of them, d wide) between src (M, w_in) and out (M, w_out): the
    rows themselves on one side, their buffers on the other; ~`tile` elements each (TILE unless the format holds
    another), COLS the row's width rounded up to a power of two (at least one block, at most the tile), ROWS the
    rows that fill the rest."""
    n_rows = src.shape[0]
    if n_rows >= 2**31:
        raise ValueError(f"{name} kernels index rows in int32: {n_rows} is too many; split the rows")
    if not (n_rows and d):
        return
    tile = tile or TILE
    cols = max(size, min(next_power_of_2(d), tile))
    rows = max(1, tile // cols)
    kernel[(cdiv(n_rows, rows), cdiv(d, cols))](
        src, out, n_rows, src.stride(0), out.stride(0), D=d, SIZE=size, BLOCKS=cdiv(d, size), ROWS=rows, COLS=cols,
        E8M0=scale == "e8m0", SCALE_BYTES=scale_bytes(scale), num_warps=8, **constants)
