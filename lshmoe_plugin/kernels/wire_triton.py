"""Fused Triton kernels of the ``fp8_e4m3`` wire format (`lshmoe_plugin.wire.FP8E4M3`), with float32 or e8m0 scales:
rows to the packed buffer and back, one pass each (every input byte read once, every output byte written once).

The buffer is the reference's, byte for byte: (..., d + scale bytes * blocks) uint8, each row's e4m3 values and
then its scales (4 bytes little-endian, or one e8m0 byte, each). The bits are the reference's too, because every
step is the same IEEE operation:

- encode: x widened to float32 (exact); amax and the scale s as the reference computes them
  (kernels/wire_blocks_triton.py says why its bits match, in either coding); x / s correctly rounded
  (`divide_by_scale`: x times 1 / s for an e8m0 s, `div_rn` for a float32 one), clamped to ±448
  with NaN kept; cast to e4m3 rounding to nearest even (``cvt.rn.satfinite``, which the clamp makes exact).
- decode: e4m3 to float32 (exact), times s (one rounding; none for a power of two unless the product is
  subnormal), cast to the model's dtype rounding to nearest even.

A program holds a tile of (segment, element) where a segment is one block of one row (one row when the scale is
per row), so short blocks and narrow rows still give every program ~4K elements. Shape-static, no host
synchronisation: capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..wire import E4M3_MAX
from .launch_math import cdiv, next_power_of_2
from .wire_blocks_triton import (
    decode_buffers,
    divide_by_scale,
    e8m0_top,
    encode_buffers,
    encode_scale,
    launch,
    load_scale,
    max_keeping_nan,
    scale_bytes,
    segment_size,
    store_scale,
)

_MAX = tl.constexpr(E4M3_MAX)
_TOP_EXPONENT, _TOP_FRACTION = (tl.constexpr(v) for v in e8m0_top(E4M3_MAX))


@triton.jit
def _segments(n_segments, D: tl.constexpr, SIZE: tl.constexpr, BLOCKS: tl.constexpr, SEGS: tl.constexpr,
              WIDTH: tl.constexpr):
    """This program's segments (SEGS,): their rows (int64, for addresses), blocks, columns (SEGS, WIDTH) and
    masks. The widths are constants, so the divisions by BLOCKS compile to shifts or multiplies."""
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    row, block = (seg // BLOCKS).to(tl.int64), seg % BLOCKS
    j = tl.arange(0, WIDTH)
    col = block[:, None] * SIZE + j[None, :]
    live = seg < n_segments
    return row, block, col, live, live[:, None] & (j < SIZE)[None, :] & (col < D)


@triton.jit
def _encode_kernel(rows_ptr, out_ptr, n_segments, stride_rows, stride_out, D: tl.constexpr, SIZE: tl.constexpr,
                   BLOCKS: tl.constexpr, SEGS: tl.constexpr, WIDTH: tl.constexpr, E8M0: tl.constexpr,
                   SCALE_BYTES: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, D, SIZE, BLOCKS, SEGS, WIDTH)
    x = tl.load(rows_ptr + row[:, None] * stride_rows + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 1, max_keeping_nan)
    scale, code = encode_scale(amax, _MAX, E8M0, _TOP_EXPONENT, _TOP_FRACTION)
    y = divide_by_scale(x, scale[:, None], code[:, None], E8M0)
    y = tl.clamp(y, -_MAX, _MAX, propagate_nan=tl.PropagateNan.ALL)
    out_row = out_ptr + row * stride_out
    tl.store(out_row[:, None] + col, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    store_scale(out_row + D + SCALE_BYTES * block, code, live, E8M0)


@triton.jit
def _decode_kernel(buffer_ptr, out_ptr, n_segments, stride_buffer, stride_out, D: tl.constexpr,
                   SIZE: tl.constexpr, BLOCKS: tl.constexpr, SEGS: tl.constexpr, WIDTH: tl.constexpr,
                   E8M0: tl.constexpr, SCALE_BYTES: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, D, SIZE, BLOCKS, SEGS, WIDTH)
    buffer_row = buffer_ptr + row * stride_buffer
    scale = load_scale(buffer_row + D + SCALE_BYTES * block, live, E8M0)
    q = tl.load(buffer_row[:, None] + col, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    x = q * scale[:, None]
    tl.store(out_ptr + row[:, None] * stride_out + col, x.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _casts_e4m3(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def runs_on(device: torch.device, kernel: str) -> bool:
    """Whether the kernels run on CUDA `device`: Triton casts to e4m3 only where the GPU has the instruction
    (compute capability 8.9 and later: Ada, Hopper, Blackwell). Elsewhere `kernel` 'auto' leaves the codec to the
    reference and 'triton' is an error."""
    if _casts_e4m3(device):
        return True
    if kernel == "triton":
        raise RuntimeError(f"lsh_moe.kernel='triton': the fused fp8_e4m3 kernels need compute capability 8.9 or "
                           f"later, {device} has {torch.cuda.get_device_capability(device)}. Allowed here: 'auto' "
                           f"(the PyTorch reference encodes fp8_e4m3 on this GPU) or 'torch'")
    return False


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, d: int, block: Optional[int], scale: str) -> None:
    """kernel over the (row, block) segments of src (M, w_in) into out (M, w_out)."""
    size = segment_size(d, block)
    blocks, width = cdiv(d, size), next_power_of_2(size)
    launch(kernel, src, out, src.shape[0] * blocks, width, "fp8_e4m3", D=d, SIZE=size, BLOCKS=blocks, WIDTH=width,
           E8M0=scale == "e8m0", SCALE_BYTES=scale_bytes(scale))


def _width(d: int, block: Optional[int], scale: str) -> int:
    """Bytes of one row's buffer: its d e4m3 values and its scales."""
    return d + scale_bytes(scale) * (1 if block is None else cdiv(d, block))


def encode(rows: torch.Tensor, block: Optional[int], scale: str = "float32") -> torch.Tensor:
    """rows (..., d) in bf16/fp16/fp32 -> uint8 (..., d + scale bytes * blocks): what
    ``FP8E4M3(block, scale).encode`` returns."""
    d = rows.shape[-1]
    src, out = encode_buffers(rows, _width(d, block, scale), "fp8_e4m3")
    _launch(_encode_kernel, src, out.view(-1, out.shape[-1]), d, block, scale)
    return out


def decode(buffer: torch.Tensor, d: int, block: Optional[int], dtype: torch.dtype,
           scale: str = "float32") -> torch.Tensor:
    """uint8 (..., d + scale bytes * blocks) -> rows (..., d) in `dtype`: what ``FP8E4M3(block, scale).decode``
    returns."""
    src, out = decode_buffers(buffer, d, _width(d, block, scale), dtype, "fp8_e4m3")
    _launch(_decode_kernel, src, out.view(-1, d), d, block, scale)
    return out
