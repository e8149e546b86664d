"""Fused Triton kernels of the ``fp4_e2m1`` wire format (`lshmoe_plugin.wire.FP4E2M1`), with e8m0 or float32 scales:
rows to the packed buffer and back, one pass each.

The buffer is the reference's, byte for byte: (..., ceil(d / 2) + scale bytes * blocks) uint8, each row's codes two
to a byte (element 2i in the low nibble, an odd row's last high nibble 0), then its scales (one e8m0 byte, or 4
bytes little-endian, each). The bits are the reference's too, because every step is the same IEEE operation or an
exact integer one:

- encode: x widened to float32 (exact); amax and the scale s as the reference computes them
  (kernels/wire_blocks_triton.py says why its bits match, in either coding); y = x / s correctly rounded
  (`divide_by_scale`: x times 1 / s for an e8m0 s in the tile kernel, `div_rn` elsewhere). The code is the count of
  midpoints `wire.E2M1_MIDPOINTS` below |y| that the reference takes (> for the even midpoints, >= for the odd ones: a
  tie goes to the even code; NaN compares false: code 0), worked out as |y| in the grid's spacing rounded to the nearest
  integer, ties to even, with exact float32 steps (`_code` says why the two agree: its tests compare every tie and every
  code), and takes the sign bit from y < 0 (so -0.0 is code 0, a tiny negative value code 8, as there). Stochastically
  (`encode` given the format's draw counter), |y| goes to one of its two neighbours as
  `wire.FP4E2M1._round_stochastically` sends it, from the same uniform: `rounding.hash32` of the element's flat index in
  the rows (..., d) for the counter's draw (kernels/rounding_triton.py), then the counter advances by 1 on the stream,
  as the reference's draw advances it.
- decode: a code's magnitude in quarters, (2 + m) << e or 2 m, an exact integer; times ±0.25 (exact, and -0.25
  times 0 is the reference's -0.0: Triton's unary minus is 0 - x, which would give +0.0); times s (one
  rounding); cast to the model's dtype rounding to nearest even.

An encode's program holds a tile of the rows (`_encode_tile_kernel`, `BLOCK_TILE` elements) where the row has
several blocks of a power of two, and otherwise a tile of (segment, pair of elements, element of the pair), where a
segment is one block of one row (one row when the scale is per row), or two blocks when the block size is odd (a byte
then holds the last element of one block and the first of the next; two odd blocks fill whole bytes); each byte is
written once. A decode's program holds a tile of the output rows: where the row has several blocks of a power of two,
its bytes and scales read once each (`_decode_tile_kernel`, `BLOCK_TILE` elements), and otherwise one element a lane
(`_decode_kernel` says why). Shape-static, no host synchronisation: capturable in a CUDA graph. Nothing here needs
FP8 hardware: integer arithmetic, float32 and the model dtype's casts.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..wire import E2M1_MAX
from .launch_math import cdiv, next_power_of_2
from .rounding_triton import draw_keys, uniform
from .wire_blocks_triton import (
    TILE,
    decode_buffers,
    e8m0_top,
    encode_buffers,
    encode_scale,
    launch,
    launch_tiles,
    load_scale,
    max_keeping_nan,
    scale_bytes,
    scaled_tile,
    segment_size,
    store_scale,
    store_scaled_tile,
    tiles_rows,
)

# A (ROWS, COLS) tile of FP4 rows holds twice the shared TILE: 32 elements a thread. Timed beside TILE in one call
# on an idle H100 (docs/benchmarks.md wire_codec_tile_h100: the two tiles side by side), every FP4 kernel
# with a scale per 32 ran faster at d_model 1024-4096: the encode 3-5%, the stochastic encode 4-6% (it is bound by
# issue, and a thread's loop setup spreads over twice the elements), the decode 8-13%. FP6's decode and FP8's
# kernels ran slower there, and a row of one scale (the segment kernels) too, so they keep TILE.
BLOCK_TILE = 2 * TILE
STOCHASTIC_ENCODE = True  # encode rounds stochastically when given a draw counter (wire.BlockScaled._fused)
_MAX = tl.constexpr(E2M1_MAX)
_TOP_EXPONENT, _TOP_FRACTION = (tl.constexpr(v) for v in e8m0_top(E2M1_MAX))
_ROUNDER = tl.constexpr(2.0**23)  # added and taken away, it rounds a float32 in [0, 2^22) to an integer, ties to even


@triton.jit
def _segments(n_segments, D: tl.constexpr, SIZE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
              SEGS: tl.constexpr, PAIRS: tl.constexpr):
    """This program's segments (SEGS,): rows (int64), groups of GROUP blocks, and for each (segment, pair, half):
    the column, the mask and which block of the group; for each (segment, pair): the byte's column and mask."""
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    row, group = (seg // GROUPS).to(tl.int64), seg % GROUPS
    live = seg < n_segments
    pair = tl.arange(0, PAIRS)
    within = 2 * pair[:, None] + tl.arange(0, 2)[None, :]  # (PAIRS, 2): the element within the group
    col = group[:, None, None] * (GROUP * SIZE) + within[None, :, :]
    mask = live[:, None, None] & (within < GROUP * SIZE)[None, :, :] & (col < D)
    # A group's elements start at an even column (GROUP * SIZE is even unless the row is one group), so its bytes
    # start at byte GROUP * SIZE // 2 of the row; a byte is live where its low element is.
    byte_col = group[:, None] * (GROUP * SIZE // 2) + pair[None, :]
    byte_mask = live[:, None] & (2 * pair < GROUP * SIZE)[None, :] & (2 * byte_col < D)
    return row, group, col, mask, within // SIZE, live, byte_col, byte_mask


@triton.jit
def _code(y):
    """float32 y -> its E2M1 code (int32 in [0, 16)), rounding |y| to the nearest magnitude, ties to even: the count
    of midpoints below |y| that the reference takes, in fewer instructions. Counted in the grid's spacing (0.5 below
    2, 1 in [2, 4), 2 in [4, 6]) |y| lies `scaled` above 0, 2 or 4, whose codes are 0, 4 and 6; scaled < 4 is exact
    (a power-of-two product) and rounds to the nearest integer, ties to even, as (scaled + 2^23) - 2^23. A tie
    between two magnitudes is a half-integer there, so it goes to the even step, and the even step is the even code
    (2 steps per threshold passed): the reference's rule. |y| is clamped at 6 (code 7, as the reference counts every
    midpoint past it); NaN is code 0 (no comparison holds in the reference)."""
    m = tl.abs(y)
    m = tl.minimum(tl.where(m == m, m, 0.0), _MAX)
    past_2, past_4 = m >= 2.0, m >= 4.0
    scaled = m * tl.where(past_4, 0.5, tl.where(past_2, 1.0, 2.0))
    steps = (scaled + _ROUNDER) - _ROUNDER
    code = steps.to(tl.int32) + 2 * (past_2.to(tl.int32) + past_4.to(tl.int32))
    return code | ((y < 0).to(tl.int32) << 3)


@triton.jit
def _code_stochastically(y, u):
    """float32 y and its uniform u -> its E2M1 code (int32 in [0, 16)), |y| rounded to one of its two neighbours,
    up with probability its distance from the lower one over their spacing: wire.FP4E2M1._round_stochastically's
    steps, each exact (the spacing is 0.5, 1 or 2: |y| times its reciprocal, floor and the fraction lose nothing)."""
    m = tl.abs(y)
    m = tl.minimum(tl.where(m == m, m, 0.0), _MAX)  # NaN (a poisoned block's) to code 0, as nearest gives it
    past_2, past_4 = m >= 2.0, m >= 4.0
    scaled = m * tl.where(past_4, 0.5, tl.where(past_2, 1.0, 2.0))  # |y| / spacing, with no division to round
    steps = tl.floor(scaled)
    steps += (u < scaled - steps).to(tl.float32)
    code = steps.to(tl.int32) + 2 * (past_2.to(tl.int32) + past_4.to(tl.int32))
    return code | ((y < 0).to(tl.int32) << 3)


@triton.jit
def _value(code):
    """E2M1 codes (int32) -> float32 values: ±magnitude, -0.0 for code 8."""
    exponent, mantissa = (code >> 1) & 3, code & 1
    quarters = tl.where(exponent > 0, (2 + mantissa) << exponent, 2 * mantissa)
    return quarters.to(tl.float32) * tl.where(code >= 8, -0.25, 0.25)


@triton.jit
def _encode_kernel(rows_ptr, out_ptr, n_segments, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                   GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCKS: tl.constexpr, SEGS: tl.constexpr,
                   PAIRS: tl.constexpr, E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr, counter_ptr,
                   STOCHASTIC: tl.constexpr):
    row, group, col, mask, sub, live, byte_col, byte_mask = _segments(n_segments, D, SIZE, GROUP, GROUPS, SEGS,
                                                                      PAIRS)
    x = tl.load(rows_ptr + row[:, None, None] * stride_rows + col, mask=mask, other=0.0).to(tl.float32)
    out_row = out_ptr + row * stride_out
    scale = tl.full(x.shape, 1.0, tl.float32)  # elements past the row divide 0 by 1: code 0, the reference's pad
    for g in tl.static_range(GROUP):
        in_block = (sub == g)[None, :, :]
        magnitude = tl.where(in_block, tl.abs(x), 0.0)
        amax = tl.reduce(tl.reduce(magnitude, 2, max_keeping_nan), 1, max_keeping_nan)
        block_scale, code = encode_scale(amax, _MAX, E8M0, _TOP_EXPONENT, _TOP_FRACTION)
        scale = tl.where(in_block & mask, block_scale[:, None, None], scale)
        block = group * GROUP + g
        store_scale(out_row + (D + 1) // 2 + SCALE_BYTES * block, code, live & (block < BLOCKS), E8M0)
    y = tl.math.div_rn(x, scale)
    if STOCHASTIC:
        # the draw's keys once per program; each element's uniform from its flat index in the rows (..., d), as
        # the reference draws them (not its place in the padded blocks)
        offset, multiplier = draw_keys(tl.load(counter_ptr))
        codes = _code_stochastically(y, uniform(row[:, None, None] * D + col, offset, multiplier))
    else:
        codes = _code(y)
    packed = tl.sum(codes << (4 * tl.arange(0, 2))[None, None, :], 2)
    tl.store(out_row[:, None] + byte_col, packed.to(tl.uint8), mask=byte_mask)


@triton.jit
def _encode_tile_kernel(rows_ptr, out_ptr, n_rows, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                        BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr,
                        SCALE_BYTES: tl.constexpr, counter_ptr, STOCHASTIC: tl.constexpr):
    """A (ROWS, COLS) tile of the rows, for blocks of a power of two SIZE >= 2 that divides COLS: loaded as the rows
    lie (contiguous, vectorised), seen as (ROWS, COLS / SIZE, SIZE) for the blocks' amax and as (ROWS, COLS / 2, 2)
    for the bytes, which a tile then stores contiguously. The same steps as `_encode_kernel`, element for element.
    (Its tile of (segment, pair, half) loads one element per instruction: 2.6-3.6x the floor on an H100,
    docs/benchmarks.md wire_codec_fp4_decode_h100.)"""
    PAIRS: tl.constexpr = COLS // 2
    row, col, live, out_row, scaled = scaled_tile(
        rows_ptr, out_ptr, n_rows, stride_rows, stride_out, D, SIZE, BLOCKS, ROWS, COLS, _MAX, E8M0, _TOP_EXPONENT,
        _TOP_FRACTION, SCALE_BYTES, (D + 1) // 2)
    y = tl.reshape(scaled, (ROWS, COLS))
    if STOCHASTIC:
        offset, multiplier = draw_keys(tl.load(counter_ptr))  # as _encode_kernel: each element's flat index
        codes = _code_stochastically(y, uniform(row[:, None] * D + col[None, :], offset, multiplier))
    else:
        codes = _code(y)
    packed = tl.sum(tl.reshape(codes, (ROWS, PAIRS, 2)) << (4 * tl.arange(0, 2))[None, None, :], 2)
    pair = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
    tl.store(out_row[:, None] + pair[None, :], packed.to(tl.uint8), mask=live[:, None] & (pair < (D + 1) // 2)[None, :])


@triton.jit
def _decode_kernel(buffer_ptr, out_ptr, n_rows, stride_buffer, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                   ROWS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr):
    """A (ROWS, COLS) tile of the rows, one element a lane: its code from byte col // 2 (the low nibble for an even
    column), its scale from block col // SIZE. The codes of a row are packed two to a byte whatever the blocks, so
    a decode needs no segments: the tile is the output's own (contiguous stores), and the two reads of a byte and
    the SIZE reads of a scale hit the same cache lines. (A tile of (segment, pair, half), as the encode's, ran at 7x
    its floor with a scale per 32 elements on an H100: docs/benchmarks.md wire_codec_fp6_sr.)"""
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (row < n_rows)[:, None] & (col < D)[None, :]
    buffer_row = buffer_ptr + row * stride_buffer
    packed = tl.load(buffer_row[:, None] + (col // 2)[None, :], mask=mask, other=0).to(tl.int32)
    codes = (packed >> (4 * (col % 2))[None, :]) & 0xF
    scale = load_scale(buffer_row[:, None] + ((D + 1) // 2 + SCALE_BYTES * (col // SIZE))[None, :], mask, E8M0)
    x = _value(codes) * scale
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_tile_kernel(buffer_ptr, out_ptr, n_rows, stride_buffer, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                        BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr,
                        SCALE_BYTES: tl.constexpr):
    """A (ROWS, COLS) tile of the rows, for blocks of a power of two SIZE >= 2 that divides COLS: the tile's bytes
    read once each as they lie (COLS / 2 a row, contiguous), both nibbles of each joined into the row's elements, and
    its blocks' scales read once each, the tile seen as (ROWS, COLS / SIZE, SIZE) to apply them. The same values as
    `_decode_kernel`, which reads a byte per element and a scale per element (32 one-byte loads a thread with a
    scale per 32: scripts/kernel_sass.py)."""
    NB: tl.constexpr = COLS // SIZE
    PAIRS: tl.constexpr = COLS // 2
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = row < n_rows
    buffer_row = buffer_ptr + row * stride_buffer
    pair = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
    packed = tl.load(buffer_row[:, None] + pair[None, :], mask=live[:, None] & (pair < (D + 1) // 2)[None, :],
                     other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (ROWS, NB, SIZE))  # element 2i the low nibble of byte i
    store_scaled_tile(_value(codes), buffer_row, out_ptr, row, live, stride_out, D, SIZE, BLOCKS, COLS, E8M0,
                      SCALE_BYTES, (D + 1) // 2)


def runs_on(device: torch.device, kernel: str) -> bool:
    """Every CUDA device Triton runs on: FP4 packing needs no FP8 instruction (unlike kernels/wire_triton.py)."""
    return True


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, d: int, block: Optional[int], scale: str,
            **arguments) -> None:
    """kernel over the (row, group of blocks) segments of src (M, w_in) into out (M, w_out); `arguments` are the
    kernel's own (the encode's counter)."""
    size = segment_size(d, block)
    blocks = cdiv(d, size)
    group = 2 if size % 2 and blocks > 1 else 1  # odd blocks pair up into whole bytes
    groups = cdiv(blocks, group)
    pairs = next_power_of_2(cdiv(group * size, 2))
    launch(kernel, src, out, src.shape[0] * groups, 2 * pairs, "fp4_e2m1", D=d, SIZE=size, GROUP=group,
           GROUPS=groups, BLOCKS=blocks, PAIRS=pairs, E8M0=scale == "e8m0", SCALE_BYTES=scale_bytes(scale), **arguments)


def _width(d: int, block: Optional[int], scale: str) -> int:
    """Bytes of one row's buffer: its codes two to a byte and its scales."""
    return cdiv(d, 2) + scale_bytes(scale) * (1 if block is None else cdiv(d, block))


def encode(rows: torch.Tensor, block: Optional[int], scale: str = "e8m0",
           counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rows (..., d) in bf16/fp16/fp32 -> uint8 (..., ceil(d / 2) + scale bytes * blocks): what
    ``FP4E2M1(block, scale).encode`` returns; with a draw `counter` (int64, one element, on the rows' device),
    stochastically rounded as ``FP4E2M1(block, scale, "stochastic")`` whose counter it is, then advanced by 1."""
    d = rows.shape[-1]
    src, out = encode_buffers(rows, _width(d, block, scale), "fp4_e2m1")
    # Nearest passes no counter (None is a compile-time constant): its kernel is the one it always was.
    buffer, size = out.view(-1, out.shape[-1]), segment_size(d, block)
    if tiles_rows(d, size, 2):
        launch_tiles(_encode_tile_kernel, src, buffer, d, size, scale, "fp4_e2m1", BLOCK_TILE, counter_ptr=counter,
                     STOCHASTIC=counter is not None)
    else:
        _launch(_encode_kernel, src, buffer, d, block, scale, counter_ptr=counter, STOCHASTIC=counter is not None)
    if counter is not None:
        counter.add_(1)  # after the kernel on the same stream: no host sync, and a graph replay draws anew
    return out


def decode(buffer: torch.Tensor, d: int, block: Optional[int], dtype: torch.dtype, scale: str = "e8m0") -> torch.Tensor:
    """uint8 (..., ceil(d / 2) + scale bytes * blocks) -> rows (..., d) in `dtype`: what
    ``FP4E2M1(block, scale).decode`` returns."""
    src, out = decode_buffers(buffer, d, _width(d, block, scale), dtype, "fp4_e2m1")
    rows = out.view(-1, d)
    n_rows, size = rows.shape[0], segment_size(d, block)
    if tiles_rows(d, size, 2):
        launch_tiles(_decode_tile_kernel, src, rows, d, size, scale, "fp4_e2m1", BLOCK_TILE)
    elif n_rows and d:
        cols = min(next_power_of_2(d), TILE)
        tile_rows = max(1, TILE // cols)
        _decode_kernel[(cdiv(n_rows, tile_rows), cdiv(d, cols))](
            src, rows, n_rows, src.stride(0), rows.stride(0), D=d, SIZE=size, ROWS=tile_rows,
            COLS=cols, E8M0=scale == "e8m0", SCALE_BYTES=scale_bytes(scale), num_warps=8)
    return out
