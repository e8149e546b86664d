"""Fused Triton kernels of the ``fp8_e4m3`` wire format (`lshmoe_plugin.wire.FP8E4M3`): rows to the packed buffer
and back, one pass each (every input byte read once, every output byte written once).

The buffer is the reference's, byte for byte: (..., d + 4 * blocks) uint8, each row's e4m3 values and then its
float32 scales, little-endian. The bits are the reference's too, because every step is the same IEEE operation:

- encode: x widened to float32 (exact); amax = max |x| over the block, NaN kept (`tl.max` would drop it, and a
  NaN must poison its block as in the reference); s = amax / 448 correctly rounded (`div_rn`: Triton's ``/`` is
  ``div.full.f32``, up to 2 ulp off), at least float32's smallest normal; x / s correctly rounded, clamped to
  ±448 with NaN kept; cast to e4m3 rounding to nearest even (``cvt.rn.satfinite``, which the clamp makes exact).
- decode: e4m3 to float32 (exact), times s (one rounding), cast to the model's dtype rounding to nearest even.

A program holds a tile of (segment, element) where a segment is one block of one row (one row when the scale is
per row), so short blocks and narrow rows still give every program ~4K elements. Shape-static, no host
synchronisation: capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..wire import E4M3_MAX, FUSED_DTYPES

_MAX = tl.constexpr(E4M3_MAX)
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # 2^-126: the scale of an all-zero block, as in the reference
_TILE = 4096  # elements per program: bytes enough in flight per SM, registers few enough per thread


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _segments(n_segments, d, size, blocks, SEGS: tl.constexpr, WIDTH: tl.constexpr):
    """This program's segments (SEGS,): their rows, blocks, columns (SEGS, WIDTH) and masks."""
    seg = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS)
    row, block = seg // blocks, seg % blocks
    j = tl.arange(0, WIDTH)
    col = block[:, None] * size + j[None, :]
    live = seg < n_segments
    return row, block, col, live, live[:, None] & (j < size)[None, :] & (col < d)


@triton.jit
def _encode_kernel(rows_ptr, out_ptr, n_segments, d, size, blocks, stride_rows, stride_out,
                   SEGS: tl.constexpr, WIDTH: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, d, size, blocks, SEGS, WIDTH)
    x = tl.load(rows_ptr + row[:, None] * stride_rows + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 1, _max_keeping_nan)
    scale = tl.maximum(tl.math.div_rn(amax, _MAX), _TINY, propagate_nan=tl.PropagateNan.ALL)
    y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -_MAX, _MAX, propagate_nan=tl.PropagateNan.ALL)
    out_row = out_ptr + row * stride_out
    tl.store(out_row[:, None] + col, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    bits = scale.to(tl.uint32, bitcast=True)
    scale_at = out_row + d + 4 * block
    for k in tl.static_range(4):
        tl.store(scale_at + k, ((bits >> (8 * k)) & 0xFF).to(tl.uint8), mask=live)


@triton.jit
def _decode_kernel(buffer_ptr, out_ptr, n_segments, d, size, blocks, stride_buffer, stride_out,
                   SEGS: tl.constexpr, WIDTH: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, d, size, blocks, SEGS, WIDTH)
    buffer_row = buffer_ptr + row * stride_buffer
    scale_at = buffer_row + d + 4 * block
    bits = tl.zeros([SEGS], dtype=tl.uint32)
    for k in tl.static_range(4):
        bits |= tl.load(scale_at + k, mask=live, other=0).to(tl.uint32) << (8 * k)
    scale = bits.to(tl.float32, bitcast=True)
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


def _launch_shape(d: int, block: Optional[int]) -> Tuple[int, int, int, int, int]:
    """(elements per scale, scales per row, padded block width, segments per program, warps)."""
    size = d if block is None else block
    blocks = triton.cdiv(d, size)
    width = triton.next_power_of_2(size)
    segs = max(1, _TILE // width)
    return size, blocks, width, segs, min(16, max(4, segs * width // 512))


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """t (..., w) as (M, w) with unit column stride (a view when the layout allows it)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def encode(rows: torch.Tensor, block: Optional[int]) -> torch.Tensor:
    """rows (..., d) in bf16/fp16/fp32 -> uint8 (..., d + 4 * blocks): what ``FP8E4M3(block).encode`` returns."""
    if rows.dtype not in FUSED_DTYPES:
        raise TypeError(f"fp8_e4m3 kernels read {list(FUSED_DTYPES)}, got {rows.dtype}")
    d = rows.shape[-1]
    size, blocks, width, segs, warps = _launch_shape(d, block)
    out = torch.empty(rows.shape[:-1] + (d + 4 * blocks,), dtype=torch.uint8, device=rows.device)
    flat = _rows_of(rows)
    n_segments = flat.shape[0] * blocks
    if n_segments:
        _encode_kernel[(triton.cdiv(n_segments, segs),)](
            flat, out, n_segments, d, size, blocks, flat.stride(0), out.shape[-1], SEGS=segs, WIDTH=width,
            num_warps=warps)
    return out


def decode(buffer: torch.Tensor, d: int, block: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """uint8 (..., d + 4 * blocks) -> rows (..., d) in `dtype`: what ``FP8E4M3(block).decode`` returns."""
    if dtype not in FUSED_DTYPES:
        raise TypeError(f"fp8_e4m3 kernels write {list(FUSED_DTYPES)}, got {dtype}")
    size, blocks, width, segs, warps = _launch_shape(d, block)
    if buffer.dtype != torch.uint8 or buffer.shape[-1] != d + 4 * blocks:
        raise ValueError(f"an fp8_e4m3 buffer of rows {d} wide is uint8 (..., {d + 4 * blocks}), "
                         f"got {buffer.dtype} {tuple(buffer.shape)}")
    out = torch.empty(buffer.shape[:-1] + (d,), dtype=dtype, device=buffer.device)
    flat = _rows_of(buffer)
    n_segments = flat.shape[0] * blocks
    if n_segments:
        _decode_kernel[(triton.cdiv(n_segments, segs),)](
            flat, out, n_segments, d, size, blocks, flat.stride(0), d, SEGS=segs, WIDTH=width, num_warps=warps)
    return out
