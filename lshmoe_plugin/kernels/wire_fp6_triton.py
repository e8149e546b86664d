"""Fused Triton kernels of the ``fp6_e2m3`` wire format (`lshmoe_plugin.wire.FP6E2M3`), with e8m0 or float32 scales:
rows to the packed buffer and back, one pass each.

The buffer is the reference's, byte for byte: (..., 3 * ceil(d / 4) + scale bytes * blocks) uint8, each row's codes
four to three bytes (element 4i + j in bits 6j to 6j + 5 of the little-endian 24 bits of bytes 3i to 3i + 2, the
last group padded with zero codes), then its scales (one e8m0 byte, or 4 bytes little-endian, each). The bits are
the reference's too, because every step is the same IEEE operation or an exact integer one:

- encode: x widened to float32 (exact); amax and the scale s as the reference computes them
  (kernels/wire_blocks_triton.py says why its bits match, in either coding); y = x / s correctly rounded
  (`divide_by_scale`: x times 1 / s for an e8m0 s in the tile kernel, `div_rn` elsewhere); |y| with NaN as 0 (the
  reference's `nan_to_num`: a poisoned block's codes are 0 in both), clamped at 7.5. The binade e in [1, 3] is the
  float32 exponent field minus 126, clamped (1 for zero and the subnormals, as the reference's frexp gives); q = |y|
  2^(4 - e) is exact (a power of two), and it rounds to the nearest integer, ties to even, as (q + 2^23) - 2^23 (q <
  2^4, so the sum's unit is 1 and float32's own rounding is the rule; an FMA of the product and the add rounds once as
  well, the product being exact). The code is q + 8 (e - 1) with the sign bit (32) from y < 0 (so -0.0 is code 0).
- decode: a code's magnitude in eighths, (8 + m) << (e - 1) or m, an exact integer; times ±0.125 (exact, and -0.125
  times 0 is the reference's -0.0); times s (one rounding); cast to the model's dtype rounding to nearest even.

An encode's program holds a tile of the rows (`_encode_tile_kernel`) where the row has several blocks of a power of
two (at least 4), and so does a decode's (`_decode_tile_kernel`) where the row is also whole groups of 16 elements
in a buffer that starts at a multiple of 4 bytes (`_words`). Otherwise a program holds a tile of (segment, group of
four elements, element of the group), where a segment is one block of one row (one row when the scale is per row),
or 2 or 4 blocks when the block size is no multiple of 4 (three bytes then hold elements of neighbouring blocks;
4 / gcd(block, 4) blocks fill whole groups). Each byte is written, or read, once. Shape-static, no host
synchronisation: capturable in a CUDA graph. Nothing here needs FP8 hardware.

The path ``lsh_moe.kernel: auto`` takes on CUDA since they passed tests/gpu/test_wire_fp6_triton.py on an H100
(2026-12-05: 191 passed with tests/gpu/test_wire_formats_cuda.py) as well as in Triton's interpreter.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..wire import E2M3_MAX
from .launch_math import cdiv, next_power_of_2
from .wire_blocks_triton import (
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

_MAX = tl.constexpr(E2M3_MAX)
_TOP_EXPONENT, _TOP_FRACTION = (tl.constexpr(v) for v in e8m0_top(E2M3_MAX))
_ROUNDER = tl.constexpr(2.0**23)  # added and taken away, it rounds a float32 in [0, 2^22) to an integer, ties to even


@triton.jit
def _segments(n_segments, D: tl.constexpr, SIZE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
              SEGS: tl.constexpr, QUADS: tl.constexpr):
    """This program's segments (SEGS,): rows (int64), groups of GROUP blocks, and for each (segment, quad, element):
    the column, the mask and which block of the group; for each (segment, quad): its first byte's column and mask."""
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    row, group = (seg // GROUPS).to(tl.int64), seg % GROUPS
    live = seg < n_segments
    quad = tl.arange(0, QUADS)
    within = 4 * quad[:, None] + tl.arange(0, 4)[None, :]  # (QUADS, 4): the element within the group
    col = group[:, None, None] * (GROUP * SIZE) + within[None, :, :]
    mask = live[:, None, None] & (within < GROUP * SIZE)[None, :, :] & (col < D)
    # A group's elements start at a multiple of 4 (GROUP * SIZE is, unless the row is one group), so its bytes start
    # at byte 3 GROUP * SIZE / 4 of the row; a quad's bytes are live where its first element is.
    byte_col = group[:, None] * (3 * (GROUP * SIZE // 4)) + 3 * quad[None, :]
    byte_mask = live[:, None] & (4 * quad < GROUP * SIZE)[None, :] & (4 * (group[:, None] * (GROUP * SIZE // 4)
                                                                        + quad[None, :]) < D)
    return row, group, col, mask, within // SIZE, live, byte_col, byte_mask


@triton.jit
def _code(y):
    """float32 y -> its E2M3 code (int32 in [0, 64)), rounding |y| to the nearest magnitude, ties to even."""
    magnitude = tl.abs(y)
    magnitude = tl.minimum(tl.where(magnitude == magnitude, magnitude, 0.0), _MAX)  # NaN: code 0
    field = ((magnitude.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    binade = tl.minimum(tl.maximum(field - 126, 1), 3)
    # 2^(4 - binade) from its bits: the exponent field 127 + 4 - binade, exact
    step_inverse = ((131 - binade).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    steps = (magnitude * step_inverse + _ROUNDER) - _ROUNDER
    code = steps.to(tl.int32) + 8 * (binade - 1)
    return code | ((y < 0).to(tl.int32) << 5)


@triton.jit
def _value(code):
    """E2M3 codes (int32) -> float32 values: ±magnitude, -0.0 for code 32."""
    exponent, mantissa = (code >> 3) & 3, code & 7
    eighths = tl.where(exponent > 0, (8 + mantissa) << tl.maximum(exponent - 1, 0), mantissa)
    return eighths.to(tl.float32) * tl.where(code >= 32, -0.125, 0.125)


@triton.jit
def _encode_kernel(rows_ptr, out_ptr, n_segments, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                   GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCKS: tl.constexpr, SEGS: tl.constexpr,
                   QUADS: tl.constexpr, E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr, VALUE_BYTES: tl.constexpr):
    row, group, col, mask, sub, live, byte_col, byte_mask = _segments(n_segments, D, SIZE, GROUP, GROUPS, SEGS,
                                                                      QUADS)
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
        store_scale(out_row + VALUE_BYTES + SCALE_BYTES * block, code, live & (block < BLOCKS), E8M0)
    codes = _code(tl.math.div_rn(x, scale))
    bits = tl.sum(codes << (6 * tl.arange(0, 4))[None, None, :], 2)  # (SEGS, QUADS): 24 bits per quad
    at = out_row[:, None] + byte_col
    for b in tl.static_range(3):
        tl.store(at + b, ((bits >> (8 * b)) & 0xFF).to(tl.uint8), mask=byte_mask)


@triton.jit
def _encode_tile_kernel(rows_ptr, out_ptr, n_rows, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                        BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr,
                        SCALE_BYTES: tl.constexpr, VALUE_BYTES: tl.constexpr, WORDS: tl.constexpr):
    """A (ROWS, COLS) tile of the rows, for blocks of a power of two SIZE >= 4 that divides COLS: loaded as the rows
    lie (contiguous, vectorised), seen as (ROWS, COLS / SIZE, SIZE) for the blocks' amax and as (ROWS, COLS / 4, 4)
    for the quads' bytes: with WORDS (rows of whole groups of 16 elements whose buffers start at multiples of 4 bytes)
    four quads go out as three uint32 words, else each quad as three bytes beside its neighbours'. The same steps as
    `_encode_kernel`, element for element. (Its tile of (segment, quad, element) ran at 6.2-6.9x the floor with a
    scale per 32 elements on an H100, docs/benchmarks.md wire_codec_fp4_decode_h100, where it is 1.5-2.7x per row.)"""
    QUADS: tl.constexpr = COLS // 4
    row, col, live, out_row, scaled = scaled_tile(
        rows_ptr, out_ptr, n_rows, stride_rows, stride_out, D, SIZE, BLOCKS, ROWS, COLS, _MAX, E8M0, _TOP_EXPONENT,
        _TOP_FRACTION, SCALE_BYTES, VALUE_BYTES)
    codes = tl.reshape(_code(scaled), (ROWS, QUADS, 4))
    bits = tl.sum(codes << (6 * tl.arange(0, 4))[None, None, :], 2)  # (ROWS, QUADS): 24 bits per quad
    if WORDS:
        # Four quads are three little-endian words: 3 word stores a lane where bytes took 12.
        even, odd = tl.split(tl.reshape(bits.to(tl.uint32), (ROWS, QUADS // 4, 2, 2)))
        q0, q2 = tl.split(even)
        q1, q3 = tl.split(odd)
        group = tl.program_id(1) * (QUADS // 4) + tl.arange(0, QUADS // 4)
        at = out_ptr.to(tl.pointer_type(tl.uint32)) + (row * (stride_out // 4))[:, None] + 3 * group[None, :]
        word_mask = live[:, None] & (group < D // 16)[None, :]
        tl.store(at, q0 | (q1 << 24), mask=word_mask)
        tl.store(at + 1, (q1 >> 8) | (q2 << 16), mask=word_mask)
        tl.store(at + 2, (q2 >> 16) | (q3 << 8), mask=word_mask)
    else:
        quad = tl.program_id(1) * QUADS + tl.arange(0, QUADS)
        at = out_row[:, None] + 3 * quad[None, :]
        byte_mask = live[:, None] & (quad < (D + 3) // 4)[None, :]
        for b in tl.static_range(3):
            tl.store(at + b, ((bits >> (8 * b)) & 0xFF).to(tl.uint8), mask=byte_mask)


@triton.jit
def _decode_kernel(buffer_ptr, out_ptr, n_segments, stride_buffer, stride_out, D: tl.constexpr,
                   SIZE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCKS: tl.constexpr,
                   SEGS: tl.constexpr, QUADS: tl.constexpr, E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr,
                   VALUE_BYTES: tl.constexpr):
    row, group, col, mask, sub, live, byte_col, byte_mask = _segments(n_segments, D, SIZE, GROUP, GROUPS, SEGS,
                                                                      QUADS)
    buffer_row = buffer_ptr + row * stride_buffer
    at = buffer_row[:, None] + byte_col
    bits = tl.load(at, mask=byte_mask, other=0).to(tl.int32)
    for b in tl.static_range(1, 3):
        bits |= tl.load(at + b, mask=byte_mask, other=0).to(tl.int32) << (8 * b)
    codes = (bits[:, :, None] >> (6 * tl.arange(0, 4))[None, None, :]) & 0x3F
    scale = tl.full(codes.shape, 1.0, tl.float32)
    for g in tl.static_range(GROUP):
        block = group * GROUP + g
        block_scale = load_scale(buffer_row + VALUE_BYTES + SCALE_BYTES * block, live & (block < BLOCKS), E8M0)
        scale = tl.where((sub == g)[None, :, :], block_scale[:, None, None], scale)
    x = _value(codes) * scale
    tl.store(out_ptr + row[:, None, None] * stride_out + col, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_tile_kernel(buffer_ptr, out_ptr, n_rows, stride_buffer, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                        BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, E8M0: tl.constexpr,
                        SCALE_BYTES: tl.constexpr, VALUE_BYTES: tl.constexpr):
    """A (ROWS, COLS) tile of the output rows, for blocks of a power of two SIZE >= 4 that divides COLS, in rows of
    whole groups of 16 elements whose buffers start at multiples of 4 bytes (`_words`): the tile's bytes read once
    each as `_encode_tile_kernel` stores them, three uint32 words for four quads, each quad's 24 bits split into its
    four codes, and its blocks' scales read once each, the tile seen as (ROWS, COLS / SIZE, SIZE) to apply them. The
    same values as `_decode_kernel`, whose tile of (segment, quad, element) makes 13 one-byte loads a thread with a
    scale per 32 (scripts/kernel_sass.py) and ran at 1.66-1.87x its floor on an H100 (docs/benchmarks.md
    wire_codec_tile4096_h100); rows that take no word loads keep it."""
    QUADS: tl.constexpr = COLS // 4
    NB: tl.constexpr = COLS // SIZE
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = row < n_rows
    # The inverse of the encode's word stores (q0 | q1 << 24, q1 >> 8 | q2 << 16, q2 >> 16 | q3 << 8).
    group = tl.program_id(1) * (QUADS // 4) + tl.arange(0, QUADS // 4)
    at = buffer_ptr.to(tl.pointer_type(tl.uint32)) + (row * (stride_buffer // 4))[:, None] + 3 * group[None, :]
    word_mask = live[:, None] & (group < D // 16)[None, :]
    w0 = tl.load(at, mask=word_mask, other=0)
    w1 = tl.load(at + 1, mask=word_mask, other=0)
    w2 = tl.load(at + 2, mask=word_mask, other=0)
    q0, q1 = w0 & 0xFFFFFF, (w0 >> 24) | ((w1 & 0xFFFF) << 8)
    q2, q3 = (w1 >> 16) | ((w2 & 0xFF) << 16), w2 >> 8
    # quad 4 g + 2 a + b: join(q0, q2) and join(q1, q3) hold a, their join b (the encode's splits, reversed)
    bits = tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), (ROWS, QUADS)).to(tl.int32)
    codes = tl.reshape((bits[:, :, None] >> (6 * tl.arange(0, 4))[None, None, :]) & 0x3F, (ROWS, NB, SIZE))
    store_scaled_tile(_value(codes), buffer_ptr + row * stride_buffer, out_ptr, row, live, stride_out, D, SIZE,
                      BLOCKS, COLS, E8M0, SCALE_BYTES, VALUE_BYTES)


def runs_on(device: torch.device, kernel: str) -> bool:
    """Every CUDA device Triton runs on: FP6 packing needs no FP8 instruction (unlike kernels/wire_triton.py)."""
    return True


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, d: int, block: Optional[int], scale: str) -> None:
    """kernel over the (row, group of blocks) segments of src (M, w_in) into out (M, w_out)."""
    size = segment_size(d, block)
    blocks = cdiv(d, size)
    group = 4 // math.gcd(size, 4) if blocks > 1 else 1  # blocks of no multiple of 4 group into whole quads
    groups = cdiv(blocks, group)
    quads = next_power_of_2(cdiv(group * size, 4))
    launch(kernel, src, out, src.shape[0] * groups, 4 * quads, "fp6_e2m3", D=d, SIZE=size, GROUP=group,
           GROUPS=groups, BLOCKS=blocks, QUADS=quads, E8M0=scale == "e8m0", SCALE_BYTES=scale_bytes(scale),
           VALUE_BYTES=3 * cdiv(d, 4))


def _words(d: int, buffer: torch.Tensor) -> bool:
    """Whether rows d wide take the tile kernels' word loads and stores: whole groups of 16 elements (12 bytes, three
    words) in buffer rows that start at multiples of 4 bytes."""
    return d % 16 == 0 and buffer.stride(0) % 4 == 0 and buffer.data_ptr() % 4 == 0


def _width(d: int, block: Optional[int], scale: str) -> int:
    """Bytes of one row's buffer: its codes four to three bytes and its scales."""
    return 3 * cdiv(d, 4) + scale_bytes(scale) * (1 if block is None else cdiv(d, block))


def encode(rows: torch.Tensor, block: Optional[int], scale: str = "e8m0") -> torch.Tensor:
    """rows (..., d) in bf16/fp16/fp32 -> uint8 (..., 3 * ceil(d / 4) + scale bytes * blocks): what
    ``FP6E2M3(block, scale).encode`` returns."""
    d = rows.shape[-1]
    src, out = encode_buffers(rows, _width(d, block, scale), "fp6_e2m3")
    buffer = out.view(-1, out.shape[-1])
    size = segment_size(d, block)
    if tiles_rows(d, size, 4):
        launch_tiles(_encode_tile_kernel, src, buffer, d, size, scale, "fp6_e2m3", VALUE_BYTES=3 * cdiv(d, 4),
                     WORDS=_words(d, buffer))
    else:
        _launch(_encode_kernel, src, buffer, d, block, scale)
    return out


def decode(buffer: torch.Tensor, d: int, block: Optional[int], dtype: torch.dtype, scale: str = "e8m0") -> torch.Tensor:
    """uint8 (..., 3 * ceil(d / 4) + scale bytes * blocks) -> rows (..., d) in `dtype`: what
    ``FP6E2M3(block, scale).decode`` returns."""
    src, out = decode_buffers(buffer, d, _width(d, block, scale), dtype, "fp6_e2m3")
    rows, size = out.view(-1, d), segment_size(d, block)
    if tiles_rows(d, size, 4) and _words(d, src):
        launch_tiles(_decode_tile_kernel, src, rows, d, size, scale, "fp6_e2m3", VALUE_BYTES=3 * cdiv(d, 4))
    else:
        _launch(_decode_kernel, src, rows, d, block, scale)
    return out
