"""Fused Triton kernels of the ``fp8_e4m3`` wire format with float32 scales (`lshmoe_plugin.wire.FP8E4M3`): rows to
the packed buffer and back, one pass each (every input byte read once, every output byte written once).

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
from typing import Optional

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
                   BLOCKS: tl.constexpr, SEGS: tl.constexpr, WIDTH: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, D, SIZE, BLOCKS, SEGS, WIDTH)
    x = tl.load(rows_ptr + row[:, None] * stride_rows + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 1, _max_keeping_nan)
    scale = tl.maximum(tl.math.div_rn(amax, _MAX), _TINY, propagate_nan=tl.PropagateNan.ALL)
    y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -_MAX, _MAX, propagate_nan=tl.PropagateNan.ALL)
    out_row = out_ptr + row * stride_out
    tl.store(out_row[:, None] + col, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    bits = scale.to(tl.uint32, bitcast=True)
    scale_at = out_row + D + 4 * block
    for k in tl.static_range(4):
        tl.store(scale_at + k, ((bits >> (8 * k)) & 0xFF).to(tl.uint8), mask=live)


@triton.jit
def _decode_kernel(buffer_ptr, out_ptr, n_segments, stride_buffer, stride_out, D: tl.constexpr,
                   SIZE: tl.constexpr, BLOCKS: tl.constexpr, SEGS: tl.constexpr, WIDTH: tl.constexpr):
    row, block, col, live, mask = _segments(n_segments, D, SIZE, BLOCKS, SEGS, WIDTH)
    buffer_row = buffer_ptr + row * stride_buffer
    scale_at = buffer_row + D + 4 * block
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


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, d: int, block: Optional[int]) -> None:
    """kernel over the (row, block) segments of src (M, w_in) into out (M, w_out), both with unit column stride.

    Shapes are compile-time constants (one compilation per width and scale block, as a model has few); a program
    holds ~_TILE elements: whole segments, several of them when they are short.
    """
    size = d if block is None else block
    blocks, width = triton.cdiv(d, size), triton.next_power_of_2(size)
    segs = max(1, _TILE // width)
    n_segments = src.shape[0] * blocks
    if n_segments >= 2**31:
        raise ValueError(f"fp8_e4m3 kernels index (row, block) segments in int32: {n_segments} is too many; "
                         f"split the rows")
    if n_segments:
        kernel[(triton.cdiv(n_segments, segs),)](
            src, out, n_segments, src.stride(0), out.stride(0), D=d, SIZE=size, BLOCKS=blocks, SEGS=segs,
            WIDTH=width, num_warps=min(16, max(4, segs * width // 512)))


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """t (..., w) as (M, w) with unit column stride (a view when the layout allows it)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _width(d: int, block: Optional[int]) -> int:
    """Bytes of one row's buffer: its d e4m3 values and 4 per float32 scale."""
    return d + 4 * (1 if block is None else triton.cdiv(d, block))


def encode(rows: torch.Tensor, block: Optional[int]) -> torch.Tensor:
    """rows (..., d) in bf16/fp16/fp32 -> uint8 (..., d + 4 * blocks): what ``FP8E4M3(block).encode`` returns."""
    if rows.dtype not in FUSED_DTYPES:
        raise TypeError(f"fp8_e4m3 kernels read {list(FUSED_DTYPES)}, got {rows.dtype}")
    d = rows.shape[-1]
    out = torch.empty(rows.shape[:-1] + (_width(d, block),), dtype=torch.uint8, device=rows.device)
    _launch(_encode_kernel, _rows_of(rows), out.view(-1, out.shape[-1]), d, block)
    return out


def decode(buffer: torch.Tensor, d: int, block: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """uint8 (..., d + 4 * blocks) -> rows (..., d) in `dtype`: what ``FP8E4M3(block).decode`` returns."""
    if dtype not in FUSED_DTYPES:
        raise TypeError(f"fp8_e4m3 kernels write {list(FUSED_DTYPES)}, got {dtype}")
    if buffer.dtype != torch.uint8 or buffer.shape[-1] != _width(d, block):
        raise ValueError(f"an fp8_e4m3 buffer of rows {d} wide is uint8 (..., {_width(d, block)}), "
                         f"got {buffer.dtype} {tuple(buffer.shape)}")
    out = torch.empty(buffer.shape[:-1] + (d,), dtype=dtype, device=buffer.device)
    _launch(_decode_kernel, _rows_of(buffer), out.view(-1, d), d, block)
    return out
