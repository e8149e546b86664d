"""Stochastic rounding's uniforms inside a Triton kernel: `lshmoe_plugin.rounding.hash32` and its uniform, bit for
bit, for the fused wire-format encodes that round stochastically (kernels/wire_fp4_triton.py).

The reference keeps every step in [0, 2^32) with int64 ops masked to 32 bits; here the same steps are uint32
arithmetic, where a product wraps mod 2^32 (compiled: `mul.lo.u32`; interpreted: numpy's uint32 multiply) and `>>`
on an unsigned type is a logical shift. A draw's offset and multiplier depend only on its counter, so a program works
them out once (`draw_keys`) and each element costs one fmix32 round (`uniform`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rounding import GOLDEN, SEED, UNIFORM_BITS

_SEED = tl.constexpr(SEED)
_GOLDEN = tl.constexpr(GOLDEN)
_DROP = tl.constexpr(32 - UNIFORM_BITS)  # the hash's low bits a float32 in [0, 1) has no room for
_UNIT = tl.constexpr(2.0**-UNIFORM_BITS)


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser of uint32 h (rounding.fmix32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def draw_keys(counter):
    """The draw's (offset, odd multiplier), uint32, from its counter (int64 >= 0), as rounding.hash32 keys it."""
    low, high = counter.to(tl.uint32), (counter >> 32).to(tl.uint32)
    offset = fmix32(fmix32(high ^ _SEED) ^ (low * _GOLDEN))
    multiplier = fmix32(offset ^ _GOLDEN) | 1
    return offset, multiplier


@triton.jit
def hash32(index, offset, multiplier):
    """rounding.hash32 of int64 indices >= 0 (uint32), for the draw whose keys `draw_keys` gave."""
    return fmix32((index.to(tl.uint32) * multiplier + offset) ^ (index >> 32).to(tl.uint32))


@triton.jit
def uniform(index, offset, multiplier):
    """float32 in [0, 1), a multiple of 2^-24, per int64 index: rounding.uniforms' value at that flat index (the
    hash's top 24 bits, exact in float32)."""
    return (hash32(index, offset, multiplier) >> _DROP).to(tl.float32) * _UNIT
