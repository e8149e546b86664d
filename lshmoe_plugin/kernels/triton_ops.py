"""Fused Triton kernels for the compressor's memory-bound stages, forward and backward.

Same four functions, signatures and semantics as the PyTorch reference (``hashing.lsh_codes``,
``clustering.assign_clusters``, ``clustering.centroids_by_slot``, ``clustering.expand_with_residual``):

- hash: the projection stays one cuBLAS matmul; group centring, per-hash argmax and the code packing run in two
  small kernels (group sums, then codes) instead of ~15 elementwise launches.
- assign: the reference (two cub radix sorts and scans); it moves O(N) integers, not O(N * d) activations.
- reduce to centroids and expand + residual: every token row is read once and every centroid row written once.
  Tokens are visited slot by slot through a CSR view of ``slot`` (one stable sort of N int32 keys), so each
  program accumulates one centroid in fp32 registers and writes it once: no atomics, no fp32 scratch buffer, no
  pass per expert, deterministic. The scratch segment (invalid tokens, up to a fifth of them at capacity factor
  1.25) is zeroed token-parallel instead: one program walking it alone would set the kernel's time. The backward
  passes use the same segments: the gradient of a centroid is
  broadcast to its tokens, and the gradient of an expert output is the segmented sum of its tokens' gradients.

Everything stays shape-static: no value is read back to the host.
"""
from __future__ import annotations

import collections
import weakref
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import clustering
from ..config import LSHMoEConfig
from ..hashing import projection_width
from .launch_math import cdiv, next_power_of_2


# -- segments: a CSR view of `slot` ---------------------------------------------------------------------------------
def segments_of(slot: torch.Tensor, num_slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`slot_segments` without the cache: one stable sort of `slot` (shape-static, capturable)."""
    keys = slot.to(torch.int32) if num_slots < 2**31 - 1 else slot
    sorted_keys, order = torch.sort(keys, stable=True)
    return order, torch.searchsorted(sorted_keys, torch.arange(num_slots + 2, device=slot.device, dtype=keys.dtype))


_SEGMENT_CACHE: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_SEGMENT_CACHE_SIZE = 256


def slot_segments(slot: torch.Tensor, num_slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order (N,), bounds (num_slots + 2,)): tokens of slot s are order[bounds[s]:bounds[s + 1]].

    Slot num_slots (the scratch row of invalid tokens) is the last segment. The compressor hands the same
    `slot` tensor to the reduce and the expand, so the sort is cached per tensor (checked by identity, version
    and size; a miss only costs the sort again).
    """
    key = id(slot)
    hit = _SEGMENT_CACHE.get(key)
    if hit is not None:
        ref, version, slots, order, bounds = hit
        if ref() is slot and version == slot._version and slots == num_slots:
            return order, bounds
    order, bounds = segments_of(slot, num_slots)
    _SEGMENT_CACHE[key] = (weakref.ref(slot), slot._version, num_slots, order, bounds)
    while len(_SEGMENT_CACHE) > _SEGMENT_CACHE_SIZE:
        _SEGMENT_CACHE.popitem(last=False)
    return order, bounds


def _launch_shape(d: int) -> Tuple[int, int, int]:
    """(rows per tile, columns per program, warps) of the segment kernels.

    A segment holds ~1/rate tokens (2-10), so a program's time is mostly its chain of dependent loads (bounds,
    then order, then rows). Wide column blocks make fewer, fatter programs: v1's 8 x 512 tiles left the centroid
    kernel latency-bound at rate 0.5 (2.2x its bandwidth time at d=4096).
    """
    block_d = min(2048, next_power_of_2(d))
    return 4, block_d, 8 if block_d >= 1024 else 4


# -- kernels ----------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_mean_kernel(src_ptr, order_ptr, bounds_ptr, out_ptr, counts_ptr, d, stride_src, stride_out,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    i = start
    while i < end:
        r = i + tl.arange(0, ROWS)
        rmask = r < end
        row = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
        acc += tl.load(src_ptr + row[:, None] * stride_src + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
        i += ROWS
    count = (end - start).to(tl.float32)
    mean = tl.sum(acc, axis=0) / tl.maximum(count, 1.0)
    tl.store(out_ptr + s.to(tl.int64) * stride_out + cols, mean.to(out_ptr.dtype.element_ty), mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(counts_ptr + s, count)


@triton.jit
def _zero_scratch_rows_kernel(out_ptr, order_ptr, bounds_ptr, n, d, num_slots, stride_out,
                              ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero the rows of the scratch segment (invalid tokens), which is the tail of the sorted order.

    Token-parallel, counted from the end: the segment can hold a fifth of all tokens (empty capacity slots), and
    one program per segment would walk it alone while the rest of the GPU idles.
    """
    pos = n - 1 - (tl.program_id(0) * ROWS + tl.arange(0, ROWS))
    first = tl.load(bounds_ptr + num_slots)
    rmask = (pos >= first) & (pos >= 0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(order_ptr + pos, mask=rmask, other=0).to(tl.int64)
    zeros = tl.zeros([ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], zeros, mask=rmask[:, None] & (cols < d)[None, :])


def _zero_scratch_rows(out: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor, num_slots: int) -> None:
    n, d = out.shape
    if n == 0:
        return
    rows, block_d, warps = 32, min(256, next_power_of_2(d)), 4
    _zero_scratch_rows_kernel[(cdiv(n, rows), cdiv(d, block_d))](
        out, order, bounds, n, d, num_slots, out.stride(0), ROWS=rows, BLOCK_D=block_d, num_warps=warps)


@triton.jit
def _segment_broadcast_kernel(src_ptr, order_ptr, bounds_ptr, out_ptr, d, num_slots, stride_src, stride_out,
                              ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[token] = src[slot] / count for tokens of real slots; zeros for the scratch segment."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    real = s < num_slots
    count = tl.maximum((end - start).to(tl.float32), 1.0)
    value = tl.load(src_ptr + s.to(tl.int64) * stride_src + cols, mask=cmask & real, other=0.0).to(tl.float32)
    value = (value / count).to(out_ptr.dtype.element_ty)
    i = start
    while i < end:
        r = i + tl.arange(0, ROWS)
        rmask = r < end
        row = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
        tile = tl.zeros([ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty) + value[None, :]
        tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], tile, mask=rmask[:, None] & cmask[None, :])
        i += ROWS


@triton.jit
def _expand_kernel(tok_ptr, cen_ptr, y_ptr, order_ptr, bounds_ptr, out_ptr, d, num_slots,
                   stride_tok, stride_cen, stride_y, stride_out,
                   COMPENSATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[token] = y[s] (alone, or no compensation), token + (y[s] - c[s]) (shared slot), 0 (scratch)."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    real = s < num_slots
    s64 = s.to(tl.int64)
    y = tl.load(y_ptr + s64 * stride_y + cols, mask=cmask & real, other=0.0).to(tl.float32)
    shared = real & ((end - start) > 1) & COMPENSATE
    c = tl.load(cen_ptr + s64 * stride_cen + cols, mask=cmask & shared, other=0.0).to(tl.float32)
    delta = tl.where(shared, y - c, y)
    i = start
    while i < end:
        r = i + tl.arange(0, ROWS)
        rmask = r < end
        row = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
        m = rmask[:, None] & cmask[None, :]
        # Alone, uncompensated and scratch tokens never read their own row: the masked load moves no bytes.
        tok = tl.load(tok_ptr + row[:, None] * stride_tok + cols[None, :], mask=m & shared, other=0.0)
        out = tok.to(tl.float32) + delta[None, :]
        tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
        i += ROWS


@triton.jit
def _expand_backward_kernel(grad_ptr, order_ptr, bounds_ptr, grad_tok_ptr, grad_y_ptr, grad_cen_ptr, d, num_slots,
                            stride_grad, stride_gt, stride_gy, stride_gc,
                            COMPENSATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_y[s] = sum of its tokens' grads; grad_c[s] = -grad_y[s] and grad_token = grad where compensated."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    real = s < num_slots
    shared = real & ((end - start) > 1) & COMPENSATE
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    i = start
    while i < end:
        r = i + tl.arange(0, ROWS)
        rmask = r < end
        row = tl.load(order_ptr + r, mask=rmask, other=0).to(tl.int64)
        m = rmask[:, None] & cmask[None, :]
        g = tl.load(grad_ptr + row[:, None] * stride_grad + cols[None, :], mask=m & real, other=0.0)
        acc += g.to(tl.float32)
        gt = tl.where(shared, g, tl.zeros_like(g))
        tl.store(grad_tok_ptr + row[:, None] * stride_gt + cols[None, :], gt.to(grad_tok_ptr.dtype.element_ty), mask=m)
        i += ROWS
    total = tl.sum(acc, axis=0)
    s64 = s.to(tl.int64)
    tl.store(grad_y_ptr + s64 * stride_gy + cols, total.to(grad_y_ptr.dtype.element_ty), mask=cmask & real)
    gc = tl.where(shared, -total, tl.zeros_like(total))
    tl.store(grad_cen_ptr + s64 * stride_gc + cols, gc.to(grad_cen_ptr.dtype.element_ty), mask=cmask & real)


@triton.jit
def _row_groups(group_ptr, rows, rmask, group_size, FIXED_GROUPS: tl.constexpr):
    """Group of each row: row // group_size in the fixed layout (no groups tensor to build), else loaded."""
    if FIXED_GROUPS:
        return (rows // group_size).to(tl.int64)
    return tl.load(group_ptr + rows, mask=rmask, other=0).to(tl.int64)


@triton.jit
def _group_sums_kernel(proj_ptr, group_ptr, weight_ptr, sums_ptr, counts_ptr, n, width, group_size,
                       HAS_WEIGHT: tl.constexpr, FIXED_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """Per-group sums of the projected rows (and of the weights), reduced in-block before one atomic per column."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < width
    group = _row_groups(group_ptr, rows, rmask, group_size, FIXED_GROUPS)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + rows, mask=rmask, other=0).to(tl.float32)
    else:
        weight = rmask.to(tl.float32)
    x = tl.load(proj_ptr + rows[:, None].to(tl.int64) * width + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32) * weight[:, None]
    # Tokens of one group are contiguous in both layouts, so a block usually touches one or two groups.
    first = tl.min(tl.where(rmask, group, 2**62), axis=0)
    last = tl.max(tl.where(rmask, group, -1), axis=0)
    g = first
    while g <= last:
        mine = (group == g) & rmask
        part = tl.sum(tl.where(mine[:, None], x, 0.0), axis=0)
        tl.atomic_add(sums_ptr + g * width + cols, part, mask=cmask)
        tl.atomic_add(counts_ptr + g, tl.sum(tl.where(mine, weight, 0.0), axis=0))
        g += 1


@triton.jit
def _codes_kernel(proj_ptr, group_ptr, sums_ptr, counts_ptr, valid_ptr, codes_ptr, n, group_size, sentinel,
                  NUM_HASHES: tl.constexpr, WIDTH: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr,
                  CENTER: tl.constexpr, FIXED_GROUPS: tl.constexpr, KEYS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Centre each projected row on its group mean, argmax per hash, pack the digits (first hash most significant).

    KEYS: write the assignment's sort key instead, ``group << (NUM_HASHES * BITS) | code``, and `sentinel` (sorts
    after every group) for invalid rows, so the sort that follows needs no extra pass to build it.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    h = tl.arange(0, BLOCK_H)
    w = tl.arange(0, BLOCK_W)
    col = h[:, None] * WIDTH + w[None, :]
    cmask = (h[:, None] < NUM_HASHES) & (w[None, :] < WIDTH)
    m = rmask[:, None, None] & cmask[None, :, :]
    x = tl.load(proj_ptr + rows[:, None, None].to(tl.int64) * (NUM_HASHES * WIDTH) + col[None, :, :], mask=m,
                other=0.0).to(tl.float32)
    if CENTER or KEYS:
        group = _row_groups(group_ptr, rows, rmask, group_size, FIXED_GROUPS)
    if CENTER:
        count = tl.maximum(tl.load(counts_ptr + group, mask=rmask, other=1.0), 1.0)
        total = tl.load(sums_ptr + group[:, None, None] * (NUM_HASHES * WIDTH) + col[None, :, :], mask=m, other=0.0)
        x = x - total / count[:, None, None]
    if SIGNED:  # nearest signed direction: the largest |coordinate|, its sign the low bit
        score = tl.where(cmask[None, :, :], tl.abs(x), -1.0)
    else:
        score = tl.where(cmask[None, :, :], x, float("-inf"))
    index = tl.argmax(score, axis=2, tie_break_left=True)
    digit = index.to(tl.int64)
    if SIGNED:
        picked = tl.sum(tl.where(w[None, None, :] == index[:, :, None], x, 0.0), axis=2)
        digit = digit * 2 + (picked < 0).to(tl.int64)
    shift = ((NUM_HASHES - 1 - h) * BITS).to(tl.int64)
    packed = tl.where(h[None, :] < NUM_HASHES, digit << tl.maximum(shift, 0)[None, :], 0)
    code = tl.sum(packed, axis=1)
    if KEYS:
        valid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
        code = tl.where(valid, (group << (NUM_HASHES * BITS)) | code, sentinel)
    tl.store(codes_ptr + rows, code, mask=rmask)


@triton.jit
def _lower_bound(ptr, n, value):
    """First index in the sorted int64 array ptr[0:n] whose value is >= `value` (n and value int64 scalars)."""
    lo = n * 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        right = tl.load(ptr + mid) < value
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _assign_kernel(key_ptr, order_ptr, valid_ptr, group_end_ptr, budget_ptr, slot_end_ptr,
                   slot_ptr, bounds_ptr, clusters_ptr, n, group_size, slots_per_group, num_slots,
                   NUM_HASHES: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, FIXED: tl.constexpr,
                   WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """`clustering.assign_clusters` for one group per program, on keys already sorted (with `order`).

    The group's valid tokens are the sorted range of keys with its group bits (found by binary search). A group
    with no more valid tokens than its budget keeps one token per cluster in input order; otherwise distinct
    prefixes are counted at every hash level, the longest level that fits is kept and the next one is split
    into the leftover budget, exactly as the reference does, so the slots are the reference's bit for bit.
    WRITE=False only counts clusters (the variable layout's first pass, which sizes the packed slots);
    WRITE=True also writes every token's slot and the CSR (`order` rewritten in input order for uncompressed
    groups, whose clusters are single tokens; `bounds` for every slot and the scratch segment).
    Fixed layout: group g is rows [g*group_size, (g+1)*group_size) and owns `slots_per_group` slots from
    g*slots_per_group. Variable: `group_end` is the inclusive cumsum of rows per group, `slot_end` that of
    clusters per group (WRITE only), `budget` per group.
    """
    g = tl.program_id(0).to(tl.int64)
    zero = g * 0
    total = zero + n
    code_bits: tl.constexpr = NUM_HASHES * BITS
    start = _lower_bound(key_ptr, total, g << code_bits)
    end = _lower_bound(key_ptr, total, (g + 1) << code_bits)
    valid_count = end - start
    if FIXED:
        in_start = g * group_size
        in_end = in_start + group_size
        budget = zero + slots_per_group
        slot_base = g * slots_per_group
    else:
        in_start = tl.load(group_end_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
        in_end = tl.load(group_end_ptr + g).to(tl.int64)
        budget = tl.load(budget_ptr + g).to(tl.int64)
        slot_base = zero
        if WRITE:
            slot_base = tl.load(slot_end_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    uncompressed = valid_count <= budget
    clusters = valid_count
    if uncompressed:
        if WRITE:
            carry = zero
            t = in_start
            while t < in_end:
                pos = t + lanes
                m = pos < in_end
                v = (tl.load(valid_ptr + pos, mask=m, other=0) != 0) & m
                vi = v.to(tl.int64)
                rank = carry + tl.cumsum(vi, 0) - 1
                tl.store(slot_ptr + pos, tl.where(v, slot_base + rank, num_slots), mask=m)
                tl.store(order_ptr + start + rank, pos, mask=v)
                carry += tl.sum(vi, 0)
                t += BLOCK
    else:
        level = tl.arange(0, LEVELS)
        shifts = tl.where(level <= NUM_HASHES, (NUM_HASHES - level) * BITS, 0).to(tl.int64)
        distinct = tl.zeros([LEVELS], dtype=tl.int64)
        i = start
        while i < end:
            pos = i + lanes
            m = pos < end
            key = tl.load(key_ptr + pos, mask=m, other=0)
            prev = tl.load(key_ptr + pos - 1, mask=m & (pos > start), other=0)
            new = ((key[:, None] >> shifts[None, :]) != (prev[:, None] >> shifts[None, :])) | (pos == start)[:, None]
            distinct += tl.sum((new & m[:, None]).to(tl.int64), 0)
            i += BLOCK
        # Finer levels never have fewer buckets, so the fitting levels are a prefix: count them.
        fits = (distinct <= budget) & (level <= NUM_HASHES)
        coarse = tl.sum(fits.to(tl.int64), 0) - 1
        fine = tl.minimum(coarse + 1, NUM_HASHES)
        leftover = budget - tl.sum(tl.where(level == coarse, distinct, 0), 0)
        fine_distinct = tl.maximum(tl.sum(tl.where(level == fine, distinct, 0), 0), 1)
        coarse_shift = (NUM_HASHES - coarse) * BITS
        fine_shift = (NUM_HASHES - fine) * BITS
        fine_seen = zero
        clusters = zero
        i = start
        while i < end:
            pos = i + lanes
            m = pos < end
            first = pos == start
            key = tl.load(key_ptr + pos, mask=m, other=0)
            prev = tl.load(key_ptr + pos - 1, mask=m & (pos > start), other=0)
            coarse_new = ((key >> coarse_shift) != (prev >> coarse_shift)) | first
            fine_new = ((((key >> fine_shift) != (prev >> fine_shift)) | first) & m).to(tl.int64)
            fine_rank = fine_seen + tl.cumsum(fine_new, 0) - 1
            run = fine_rank * leftover // fine_distinct
            run_before = (fine_rank - fine_new) * leftover // fine_distinct
            starts = (coarse_new | (run != run_before)) & m
            cluster = clusters + tl.cumsum(starts.to(tl.int64), 0) - 1
            if WRITE:
                token = tl.load(order_ptr + pos, mask=m, other=0)
                tl.store(slot_ptr + token, slot_base + cluster, mask=m)
                tl.store(bounds_ptr + slot_base + cluster, pos, mask=starts)
            fine_seen += tl.sum(fine_new, 0)
            clusters += tl.sum(starts.to(tl.int64), 0)
            i += BLOCK
        if WRITE:
            t = in_start
            while t < in_end:  # this group's invalid tokens (padding, dropped routes) go to the scratch row
                pos = t + lanes
                m = pos < in_end
                invalid = (tl.load(valid_ptr + pos, mask=m, other=1) == 0) & m
                tl.store(slot_ptr + pos, zero + num_slots, mask=invalid)
                t += BLOCK
    tl.store(clusters_ptr + g, clusters)
    if WRITE:
        # Slot bounds not written above: single-token clusters of an uncompressed group, and (fixed layout) the
        # unused slots, which are empty segments at the group's end.
        slots_here = clusters
        if FIXED:
            slots_here = zero + slots_per_group
        k = zero
        while k < slots_here:
            index = k + lanes
            m = (index < slots_here) & ((index >= clusters) | uncompressed)
            tl.store(bounds_ptr + slot_base + index, tl.where(index < clusters, start + index, end), mask=m)
            k += BLOCK
        if g == tl.num_programs(0) - 1:
            tl.store(bounds_ptr + num_slots, end)  # the scratch segment: every invalid token, sorted last
            tl.store(bounds_ptr + num_slots + 1, total)


# -- launches into given buffers (shared by the autograd functions and the CUDA-graphed round trip) ------------------
def _over_slots(kernel, num_slots: int, d: int, *args, **constexprs) -> None:
    """Launch a segment kernel with one program per (slot, column block); none without slots."""
    if num_slots == 0:
        return
    rows, block_d, warps = _launch_shape(d)
    kernel[(num_slots, cdiv(d, block_d))](*args, ROWS=rows, BLOCK_D=block_d, num_warps=warps, **constexprs)


def segment_mean_into(tokens: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor, centroids: torch.Tensor,
                      counts: torch.Tensor) -> None:
    """centroids[s] = mean of its tokens' rows, counts[s] = how many (tokens contiguous (N, d))."""
    num_slots, d = centroids.shape
    _over_slots(_segment_mean_kernel, num_slots, d, tokens, order, bounds, centroids, counts, d, tokens.stride(0),
                centroids.stride(0))


def segment_broadcast_into(grad_centroids: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
                           grad_tokens: torch.Tensor) -> None:
    """grad_tokens[token] = grad_centroids[slot] / count (the mean's backward); zeros for invalid tokens."""
    num_slots, d = grad_centroids.shape
    _over_slots(_segment_broadcast_kernel, num_slots, d, grad_centroids, order, bounds, grad_tokens, d, num_slots,
                grad_centroids.stride(0), grad_tokens.stride(0))
    _zero_scratch_rows(grad_tokens, order, bounds, num_slots)


def expand_into(tokens: torch.Tensor, centroids: torch.Tensor, centroid_outputs: torch.Tensor, order: torch.Tensor,
                bounds: torch.Tensor, out: torch.Tensor, compensate: bool) -> None:
    """out[token] = y[s] + (token - c[s]) where compensated, y[s] otherwise; zeros for invalid tokens."""
    num_slots, d = centroids.shape
    _over_slots(_expand_kernel, num_slots, d, tokens, centroids, centroid_outputs, order, bounds, out, d, num_slots,
                tokens.stride(0), centroids.stride(0), centroid_outputs.stride(0), out.stride(0), COMPENSATE=compensate)
    _zero_scratch_rows(out, order, bounds, num_slots)


def expand_backward_into(grad_out: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor, grad_tokens: torch.Tensor,
                         grad_y: torch.Tensor, grad_c: torch.Tensor, compensate: bool) -> None:
    """The expand's backward: grad_y[s] = sum of its tokens' grads, grad_c = -grad_y and grad_token = grad where
    compensated (zeros elsewhere)."""
    num_slots, d = grad_y.shape
    _over_slots(_expand_backward_kernel, num_slots, d, grad_out, order, bounds, grad_tokens, grad_y, grad_c, d,
                num_slots, grad_out.stride(0), grad_tokens.stride(0), grad_y.stride(0), grad_c.stride(0),
                COMPENSATE=compensate)
    _zero_scratch_rows(grad_tokens, order, bounds, num_slots)


def expand_dtype(tokens: torch.Tensor, centroid_outputs: torch.Tensor, compensate: bool) -> torch.dtype:
    return torch.promote_types(tokens.dtype, centroid_outputs.dtype) if compensate else centroid_outputs.dtype


# -- autograd functions -----------------------------------------------------------------------------------------------
class _CentroidsBySlot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, slot: torch.Tensor, num_slots: int, segments):
        tokens = tokens.contiguous()
        n, d = tokens.shape
        order, bounds = segments if segments is not None else slot_segments(slot, num_slots)
        centroids = torch.empty(num_slots, d, dtype=tokens.dtype, device=tokens.device)
        counts = torch.empty(num_slots, dtype=torch.float32, device=tokens.device)
        segment_mean_into(tokens, order, bounds, centroids, counts)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(order, bounds)
        ctx.shape, ctx.dtype = tokens.shape, tokens.dtype
        return centroids, counts

    @staticmethod
    def backward(ctx, grad_centroids: torch.Tensor, _grad_counts):
        order, bounds = ctx.saved_tensors
        grad_tokens = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_centroids.device)
        segment_broadcast_into(grad_centroids.contiguous(), order, bounds, grad_tokens)
        return grad_tokens, None, None, None


class _ExpandWithResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, slot, centroids, centroid_outputs, compensate: bool, segments):
        tokens, centroids, centroid_outputs = tokens.contiguous(), centroids.contiguous(), centroid_outputs.contiguous()
        num_slots = centroids.shape[0]
        order, bounds = segments if segments is not None else slot_segments(slot, num_slots)
        out = torch.empty(tokens.shape, dtype=expand_dtype(tokens, centroid_outputs, compensate),
                          device=tokens.device)
        expand_into(tokens, centroids, centroid_outputs, order, bounds, out, compensate)
        ctx.save_for_backward(order, bounds)
        ctx.meta = (num_slots, compensate, tokens.shape, tokens.dtype, centroids.dtype, centroid_outputs.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        order, bounds = ctx.saved_tensors
        num_slots, compensate, (n, d), tok_dtype, cen_dtype, y_dtype = ctx.meta
        device = grad_out.device
        grad_tokens = torch.empty(n, d, dtype=tok_dtype, device=device)
        grad_y = torch.empty(num_slots, d, dtype=y_dtype, device=device)
        grad_c = torch.empty(num_slots, d, dtype=cen_dtype, device=device)
        expand_backward_into(grad_out.contiguous(), order, bounds, grad_tokens, grad_y, grad_c, compensate)
        return grad_tokens, None, grad_c, grad_y, None, None


# -- the four ops -----------------------------------------------------------------------------------------------------
def centroids_by_slot(tokens: torch.Tensor, slot: torch.Tensor, num_slots: int,
                      segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused `clustering.centroids_by_slot`: one read of every token row, one write of every centroid row.

    `segments`: the CSR view of `slot` from the fused assignment; without it, one sort of `slot` builds it.
    """
    return _CentroidsBySlot.apply(tokens, slot, num_slots, segments)


def expand_with_residual(tokens: torch.Tensor, slot: torch.Tensor, centroids: torch.Tensor,
                         centroid_outputs: torch.Tensor, counts: torch.Tensor, error_compensation: bool,
                         segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Fused `clustering.expand_with_residual`: gather + residual in one pass.

    `counts` must be the counts of `slot` (as `centroids_by_slot` returns them): the kernel reads the same
    numbers off the slot segments instead.
    """
    return _ExpandWithResidual.apply(tokens, slot, centroids, centroid_outputs, bool(error_compensation), segments)


def _hash_rows(tokens: torch.Tensor, projections: torch.Tensor, config: LSHMoEConfig, out: torch.Tensor, *,
               groups: Optional[torch.Tensor] = None, group_size: int = 0, valid: Optional[torch.Tensor] = None,
               num_groups: int = 1, keys: bool = False) -> torch.Tensor:
    """One cuBLAS matmul, then group sums and the packed argmax codes (or sort keys) in two kernels.

    Groups come from `groups` (one id per row) or, when group_size > 0, from the row index (fixed layout).
    """
    projected = tokens.matmul(projections.to(tokens.dtype)).contiguous()
    n = projected.shape[0]
    if n == 0:
        return out
    width = projection_width(config)
    total_width = config.num_hashes * width
    fixed_groups = group_size > 0
    center = fixed_groups or groups is not None
    group_arg = groups.contiguous() if groups is not None else out  # unread when the groups are fixed
    # One zeroed buffer (one launch) holds the group sums (G, total_width) and then the group counts (G,).
    groups_alloc = max(num_groups, 1)
    scratch = torch.zeros(groups_alloc * (total_width + 1), dtype=torch.float32, device=tokens.device)
    sums_arg, counts_arg = scratch[:groups_alloc * total_width], scratch[groups_alloc * total_width:]
    block_n = 64
    if center:
        _group_sums_kernel[(cdiv(n, block_n),)](
            projected, group_arg, valid if valid is not None else out, sums_arg, counts_arg, n, total_width,
            max(group_size, 1), HAS_WEIGHT=valid is not None, FIXED_GROUPS=fixed_groups, BLOCK_N=block_n,
            BLOCK_W=next_power_of_2(total_width), num_warps=4)
    sentinel = num_groups << (config.num_hashes * config.code_bits_per_hash)
    _codes_kernel[(cdiv(n, block_n),)](
        projected, group_arg, sums_arg, counts_arg, valid if valid is not None else out, out, n, max(group_size, 1),
        sentinel, NUM_HASHES=config.num_hashes, WIDTH=width, BITS=config.code_bits_per_hash,
        SIGNED=config.family.signed_digit, CENTER=center, FIXED_GROUPS=fixed_groups, KEYS=keys,
        BLOCK_N=block_n, BLOCK_H=next_power_of_2(config.num_hashes), BLOCK_W=next_power_of_2(width),
        num_warps=4)
    return out


def lsh_codes(tokens: torch.Tensor, projections: torch.Tensor, config: LSHMoEConfig,
              groups: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
              num_groups: int = 1) -> torch.Tensor:
    """`hashing.lsh_codes`: bucket codes (N,) of tokens (N, d), centred on their group's mean when grouped."""
    codes = torch.empty(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    return _hash_rows(tokens, projections, config, codes, groups=groups, valid=valid, num_groups=num_groups)


def _assign(keys: torch.Tensor, valid: torch.Tensor, config: LSHMoEConfig, num_groups: int, *, group_size: int = 0,
            slots_per_group: int = 0, group_end: Optional[torch.Tensor] = None,
            budget: Optional[torch.Tensor] = None) -> clustering.Clusters:
    """Sort the keys once, then one program per group numbers its clusters (`_assign_kernel`)."""
    n = keys.shape[0]
    if n == 0:  # an empty batch: the kernel would read group rows and write slot bounds that do not exist
        num_slots = num_groups * slots_per_group if group_end is None else 0
        empty = keys.new_empty(0)
        return clustering.Clusters(empty, num_slots, torch.zeros(num_groups, dtype=torch.int64, device=keys.device),
                                   (empty, torch.zeros(num_slots + 2, dtype=torch.int64, device=keys.device)))
    _, order = torch.sort(keys, stable=True)  # stable: the tokens of a cluster keep input order (deterministic sums)
    sorted_keys = keys[order] if n else keys
    valid = valid.contiguous()
    clusters = torch.empty(num_groups, dtype=torch.int64, device=keys.device)
    levels = next_power_of_2(config.num_hashes + 1)
    meta = dict(NUM_HASHES=config.num_hashes, BITS=config.code_bits_per_hash, LEVELS=levels,
                FIXED=group_end is None, BLOCK=max(64, 4096 // levels), num_warps=4)
    fixed = group_end is None
    dummy = clusters
    if fixed:
        num_slots = num_groups * slots_per_group
        slot_end = dummy
    else:
        # First pass: clusters per group, to pack the slots; their total is the one host sync of this layout.
        _assign_kernel[(num_groups,)](sorted_keys, order, valid, group_end, budget, dummy, dummy, dummy, clusters,
                                      n, 1, 1, 0, WRITE=False, **meta)
        slot_end = torch.cumsum(clusters, 0)
        num_slots = int(slot_end[-1]) if num_groups else 0
    slot = torch.empty(n, dtype=torch.int64, device=keys.device)
    bounds = torch.empty(num_slots + 2, dtype=torch.int64, device=keys.device)
    _assign_kernel[(num_groups,)](sorted_keys, order, valid, group_end if not fixed else dummy,
                                  budget if not fixed else dummy, slot_end, slot, bounds, clusters, n,
                                  max(group_size, 1), max(slots_per_group, 1), num_slots, WRITE=True, **meta)
    return clustering.Clusters(slot, num_slots, clusters, (order, bounds))


def cluster_fixed(tokens: torch.Tensor, valid: torch.Tensor, projections: torch.Tensor, config: LSHMoEConfig,
                  num_groups: int, group_size: int, slots_per_group: int) -> clustering.Clusters:
    """Fused `clustering.cluster_fixed`: matmul, group sums, sort keys, one sort, one assignment; no host sync."""
    keys = torch.empty(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    _hash_rows(tokens, projections, config, keys, group_size=group_size, valid=valid, num_groups=num_groups,
               keys=True)
    return _assign(keys, valid, config, num_groups, group_size=group_size, slots_per_group=slots_per_group)


def cluster_variable(tokens: torch.Tensor, tokens_per_group: torch.Tensor, valid: torch.Tensor,
                     projections: torch.Tensor, config: LSHMoEConfig, budget: torch.Tensor) -> clustering.Clusters:
    """Fused `clustering.cluster_variable`; the one host sync is the packed slot count."""
    num_groups = tokens_per_group.numel()
    group_end = torch.cumsum(tokens_per_group.to(device=tokens.device, dtype=torch.int64), 0)
    groups = torch.repeat_interleave(torch.arange(num_groups, device=tokens.device), tokens_per_group,
                                     output_size=tokens.shape[0])
    keys = torch.empty(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    _hash_rows(tokens, projections, config, keys, groups=groups, valid=valid, num_groups=num_groups, keys=True)
    return _assign(keys, valid, config, num_groups, group_end=group_end, budget=budget.contiguous())


OPS = SimpleNamespace(
    name="triton",
    lsh_codes=lsh_codes,
    cluster_fixed=cluster_fixed,
    cluster_variable=cluster_variable,
    centroids_by_slot=centroids_by_slot,
    expand_with_residual=expand_with_residual,
)
