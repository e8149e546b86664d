"""From bucket codes to clusters, centroids and back: the pure tensor stages of the compressor.

All functions are shape-static (no host synchronisation) so they can run inside every MoE layer's forward.
Shapes: N tokens of width d in G groups (one group per expert); invalid tokens (empty capacity slots,
dropped tokens) belong to no cluster and are routed to one scratch row that callers drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .config import LSHMoEConfig
from .hashing import lsh_codes


@dataclass
class Clusters:
    """Where the tokens of one dispatch went: the output of hash + assign.

    slot: (N,) int64 centroid row of every token; num_slots for invalid tokens (the scratch row callers drop).
    clusters_per_group: (G,) int64 non-empty clusters of every group (expert).
    segments: the CSR view of `slot` as ``(order (N,), bounds (num_slots + 2,))``, where the tokens of slot s are
        ``order[bounds[s]:bounds[s + 1]]`` and the scratch row is the last segment. The fused assignment builds it
        on the way; None on the reference path, which has no use for it.
    """
    slot: torch.Tensor
    num_slots: int
    clusters_per_group: torch.Tensor
    segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def cluster_fixed(tokens: torch.Tensor, valid: torch.Tensor, projections: torch.Tensor, config: LSHMoEConfig,
                  num_groups: int, group_size: int, slots_per_group: int) -> Clusters:
    """Hash + assign for a fixed-capacity buffer: tokens (G * group_size, d), group g in rows [g*size, (g+1)*size).

    Group g owns slots [g * slots_per_group, (g + 1) * slots_per_group); unused slots stay empty. No host sync.
    """
    device = tokens.device
    groups = torch.arange(num_groups, device=device).repeat_interleave(group_size)
    codes = lsh_codes(tokens, projections, config, groups, valid, num_groups)
    budget = torch.full((num_groups,), slots_per_group, dtype=torch.long, device=device)
    local, clusters = assign_clusters(codes, groups, valid, budget, num_groups, config.code_bits_per_hash,
                                      config.num_hashes)
    num_slots = num_groups * slots_per_group
    slot = torch.where(valid, groups * slots_per_group + local, torch.full_like(local, num_slots))
    return Clusters(slot, num_slots, clusters)


def cluster_variable(tokens: torch.Tensor, tokens_per_group: torch.Tensor, valid: torch.Tensor,
                     projections: torch.Tensor, config: LSHMoEConfig, budget: torch.Tensor) -> Clusters:
    """Hash + assign for tokens (N, d) sorted by group, `tokens_per_group` (G,) of them each, at most `budget[g]`
    clusters per group, packed: only non-empty clusters get slots, group after group. One host sync (the slot
    count, which the all-to-all's split sizes need anyway)."""
    num_groups = tokens_per_group.numel()
    groups = torch.repeat_interleave(torch.arange(num_groups, device=tokens.device), tokens_per_group,
                                     output_size=tokens.shape[0])
    codes = lsh_codes(tokens, projections, config, groups, valid, num_groups)
    local, clusters = assign_clusters(codes, groups, valid, budget, num_groups, config.code_bits_per_hash,
                                      config.num_hashes)
    return pack_clusters(local, clusters, groups, valid)


def pack_clusters(local: torch.Tensor, clusters_per_group: torch.Tensor, groups: torch.Tensor,
                  valid: torch.Tensor) -> Clusters:
    """The variable layout's slots: each group's clusters (`local` (N,) indices, `clusters_per_group` (G,)) packed
    group after group. One host sync: the slot count."""
    offsets = torch.cumsum(clusters_per_group, 0) - clusters_per_group
    num_slots = int(clusters_per_group.sum())
    slot = torch.where(valid, offsets[groups] + local, torch.full_like(local, num_slots))
    return Clusters(slot, num_slots, clusters_per_group)


def assign_clusters(codes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor,
                    num_groups: int, bits_per_hash: int, num_hashes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every token a cluster index local to its group.

    codes, groups: int64 (N,); valid: bool (N,); budget: int64 (G,) clusters allowed per group. A code holds
    `num_hashes` digits of `bits_per_hash` bits, the first hash most significant.
    Returns (local_cluster (N,), clusters_per_group (G,)); invalid tokens get local_cluster -1.

    A group with no more valid tokens than its budget needs no compression: each token keeps its own cluster,
    numbered by its position, so at rate 1.0 the centroids are the tokens themselves in their original order.
    Otherwise the group keeps the buckets of the longest hash prefix that fits its budget (more hashes, finer
    buckets, as in the paper) and spends the rest of the budget splitting them along the next hash: the next
    level's buckets, in key order, are cut into (budget - coarse buckets) even runs, and a cluster also starts at
    every coarse bucket, so no cluster ever mixes two coarse buckets and the budget is used in full.
    """
    n = codes.shape[0]
    device = codes.device
    if n == 0:  # an empty batch (stock DeepSpeed runs it, capacity 0): the gathers below read row 0
        return codes.new_empty(0), torch.zeros(num_groups, dtype=torch.long, device=device)
    code_bits = bits_per_hash * num_hashes
    sentinel = num_groups << code_bits  # sorts after every valid key
    key = torch.where(valid, (groups << code_bits) | codes, torch.full_like(codes, sentinel))
    sorted_key, order = torch.sort(key)
    sorted_group = torch.clamp(sorted_key >> code_bits, max=num_groups)  # sentinel -> group G
    group_start = torch.searchsorted(sorted_group, torch.arange(num_groups + 1, device=device))
    first_of_group = group_start.clamp(max=max(n - 1, 0))
    pad = torch.ones(1, dtype=torch.long, device=device)

    # Bucket boundaries at every level at once, (num_hashes + 1, N): level 0 is the whole group, level l the
    # first l hashes. Sorting by the full key sorts every prefix too, so one sort serves all levels.
    shifts = torch.arange(num_hashes, -1, -1, device=device).unsqueeze(1) * bits_per_hash
    prefixes = sorted_key.unsqueeze(0) >> shifts
    is_new = torch.ones(num_hashes + 1, n, dtype=torch.bool, device=device)
    is_new[:, 1:] = prefixes[:, 1:] != prefixes[:, :-1]
    distinct = torch.zeros(num_hashes + 1, num_groups + 1, dtype=torch.long, device=device).index_add_(
        1, sorted_group, is_new.long())[:, :num_groups]
    fits = distinct <= budget.unsqueeze(0)
    coarse = fits.long().cumprod(0).sum(0) - 1           # longest fitting level (level 0 always fits)
    fine = (coarse + 1).clamp(max=num_hashes)            # the level that is split into the leftover budget
    coarse_tok = torch.cat([coarse, pad * 0])[sorted_group]
    fine_tok = torch.cat([fine, pad * 0])[sorted_group]
    coarse_new = is_new.gather(0, coarse_tok.unsqueeze(0)).squeeze(0)
    fine_new = is_new.gather(0, fine_tok.unsqueeze(0)).squeeze(0)

    fine_rank = torch.cumsum(fine_new.long(), 0) - 1
    fine_rank = fine_rank - fine_rank[first_of_group][sorted_group]
    leftover = budget - distinct.gather(0, coarse.unsqueeze(0)).squeeze(0)
    fine_distinct = distinct.gather(0, fine.unsqueeze(0)).squeeze(0).clamp(min=1)
    run = fine_rank * torch.cat([leftover, pad * 0])[sorted_group] // torch.cat([fine_distinct, pad])[sorted_group]
    starts = coarse_new.clone()
    starts[1:] |= run[1:] != run[:-1]
    cluster_rank = torch.cumsum(starts.long(), 0) - 1
    rank_in_group = cluster_rank - cluster_rank[first_of_group][sorted_group]
    bucket_local = torch.empty_like(codes).scatter_(0, order, rank_in_group)
    merged_clusters = torch.zeros(num_groups + 1, dtype=torch.long, device=device).index_add_(
        0, sorted_group, starts.long())[:num_groups]

    valid_count = torch.zeros(num_groups + 1, dtype=torch.long, device=device).index_add_(
        0, groups.where(valid, num_groups), torch.ones_like(groups))[:num_groups]
    uncompressed = valid_count <= budget
    position_local = position_in_group(groups, valid, num_groups)
    local = torch.where(torch.cat([uncompressed, pad.bool()])[groups], position_local, bucket_local)
    local = torch.where(valid, local, torch.full_like(local, -1))
    clusters_per_group = torch.where(uncompressed, valid_count, merged_clusters)
    return local, clusters_per_group


def position_in_group(groups: torch.Tensor, valid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rank of each valid token among the valid tokens of its group, in input order."""
    one_hot_free = valid.long()
    order = torch.argsort(groups, stable=True)
    running = torch.cumsum(one_hot_free[order], 0)
    counts = torch.zeros(num_groups, dtype=torch.long, device=groups.device).index_add_(0, groups, one_hot_free)
    before = torch.cumsum(counts, 0) - counts
    rank_sorted = running - 1 - before[groups[order]]
    return torch.empty_like(groups).scatter_(0, order, rank_sorted)


def centroids_by_slot(tokens: torch.Tensor, slot: torch.Tensor, num_slots: int,
                      segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of the tokens (N, d) that share a slot (N,) in [0, num_slots]; slot num_slots is the scratch row.
    (`segments`, the CSR view of `slot` that the fused kernels read, is not needed here.)

    Returns (centroids (num_slots, d) in the tokens' dtype, counts (num_slots,) float32). Sums accumulate in
    float32 at least: a bf16 running sum over dozens of tokens would lose the residual's precision. Empty slots are
    zero.
    """
    accumulate = torch.promote_types(tokens.dtype, torch.float32)
    sums = tokens.new_zeros(num_slots + 1, tokens.shape[1], dtype=accumulate).index_add(0, slot, tokens.to(accumulate))
    ones = torch.ones_like(slot, dtype=torch.float32)
    counts = torch.zeros(num_slots + 1, device=tokens.device).index_add_(0, slot, ones)
    centroids = sums[:num_slots] / counts[:num_slots].clamp(min=1).unsqueeze(-1)
    return centroids.to(tokens.dtype), counts[:num_slots]


def expand_with_residual(tokens: torch.Tensor, slot: torch.Tensor, centroids: torch.Tensor,
                         centroid_outputs: torch.Tensor, counts: torch.Tensor, error_compensation: bool,
                         segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Each token's output (N, d): its centroid's expert output, plus (token - centroid) when compensating.

    Computed as token + (output - centroid)[slot], which is exactly the token again when the expert is the
    identity; a token alone in its cluster takes its centroid's output unchanged, which is exactly the stock
    result. Invalid tokens (scratch slot) get zeros.

    The sum is formed in float32 at least and cast once, as the fused kernel does: in fp16, output - centroid
    can overflow (an expert that negates 40000 gives -80000) although the token's result fits, and such an
    overflow would not go away with a lower loss scale. A result that does not fit the dtype becomes inf.
    """
    num_slots = centroids.shape[0]
    zero_row = centroid_outputs.new_zeros(1, centroid_outputs.shape[1])
    outputs = torch.cat([centroid_outputs, zero_row])[slot]
    if not error_compensation:
        return outputs
    out_dtype = torch.promote_types(tokens.dtype, centroid_outputs.dtype)
    accumulate = torch.promote_types(out_dtype, torch.float32)
    delta = torch.cat([centroid_outputs.to(accumulate) - centroids.to(accumulate), zero_row.to(accumulate)])[slot]
    alone = torch.cat([counts <= 1, torch.ones(1, dtype=torch.bool, device=counts.device)])[slot]
    valid = (slot < num_slots).unsqueeze(-1)
    shared = (tokens.to(accumulate) + delta).to(out_dtype)
    compensated = torch.where(alone.unsqueeze(-1), outputs, shared)
    return torch.where(valid, compensated, torch.zeros_like(compensated))


# Rows of the (experts, tokens, centroids) distance block one refinement pass forms at a time: 2**26 float32 values
# (256 MiB) bounds the pass's scratch memory whatever the capacity.
_REFINE_BLOCK_VALUES = 1 << 26


def refine_fixed(tokens: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, num_groups: int, group_size: int,
                 slots_per_group: int, iterations: int,
                 means: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Lloyd iterations on the fixed layout: each valid token moves to the nearest occupied centroid of its group.

    tokens (G * group_size, d), valid (N,), slot (N,) as `cluster_fixed` returns them; `means(tokens, slot)` gives
    (centroids (G * slots_per_group, d), counts). Returns the refined slot (N,). The LSH clusters are the starting
    point, so the budget and the layout are unchanged and the residuals can only shrink (k-means never raises its
    objective). A group with no more valid tokens than slots keeps one token per slot: it is exact already.
    Shape-static, no host sync (it runs inside the compressor's CUDA graph).
    """
    if iterations <= 0 or tokens.shape[0] == 0 or slots_per_group == 0:
        return slot
    num_slots = num_groups * slots_per_group
    d = tokens.shape[1]
    x = tokens.detach().float().view(num_groups, group_size, d)
    group = torch.arange(num_groups, device=tokens.device).repeat_interleave(group_size)
    crowded = (valid.view(num_groups, group_size).sum(1) > slots_per_group).repeat_interleave(group_size)
    movable = valid & crowded
    rows = max(1, _REFINE_BLOCK_VALUES // max(1, num_groups * slots_per_group))
    for _ in range(iterations):
        centroids, counts = means(tokens.detach(), slot)
        c = centroids.float().view(num_groups, slots_per_group, d)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term is the same for every candidate of a token.
        penalty = (c * c).sum(-1).masked_fill((counts == 0).view(num_groups, slots_per_group), float("inf"))
        nearest = torch.cat([
            torch.baddbmm(penalty.unsqueeze(1), x[:, start:start + rows], c.transpose(1, 2), alpha=-2.0).argmin(-1)
            for start in range(0, group_size, rows)], dim=1)
        slot = torch.where(movable, group * slots_per_group + nearest.reshape(-1), slot)
        slot = torch.where(valid, slot, torch.full_like(slot, num_slots))
        slot = _reseed_empty_slots(x, c, slot, nearest, movable, num_groups, group_size, slots_per_group)
    return slot


def _reseed_empty_slots(x: torch.Tensor, c: torch.Tensor, slot: torch.Tensor, nearest: torch.Tensor,
                        movable: torch.Tensor, num_groups: int, group_size: int, slots_per_group: int) -> torch.Tensor:
    """A slot that lost every token to the reassignment would be budget sent for nothing (and fewer distinct
    points for the expert): it takes the token farthest from its new centroid instead, the r-th empty slot of a
    group the r-th farthest token. Shape-static (top-k and a scatter into a padded row).

    Every occupied slot keeps its member nearest to its centroid out of the candidates, so a re-seed never empties
    another slot (a singleton's only token, or all members of a small slot, would otherwise be taken). A crowded
    group has more valid tokens than slots, so more candidates remain than it has empty slots."""
    num_slots = num_groups * slots_per_group
    ones = torch.ones_like(slot, dtype=torch.float)
    counts = torch.zeros(num_slots + 1, device=slot.device).index_add_(0, slot, ones)
    crowded = movable.view(num_groups, group_size).any(1, keepdim=True)
    empty = (counts[:num_slots].view(num_groups, slots_per_group) == 0) & crowded
    own = torch.gather(c, 1, nearest.unsqueeze(-1).expand(-1, -1, c.shape[-1]))
    distance = (x - own).square().sum(-1)
    candidate = movable.view(num_groups, group_size) & ~_nearest_member(distance.reshape(-1), slot, movable,
                                                                        num_slots).view(num_groups, group_size)
    distance = distance.masked_fill(~candidate, -1.0)
    farthest = distance.topk(min(slots_per_group, group_size), dim=1).indices
    rank = (empty.long().cumsum(1) - 1).clamp(min=0, max=farthest.shape[1] - 1)
    target = torch.gather(farthest, 1, rank).masked_fill(~empty, group_size)  # non-empty slots write the pad
    new_slot = torch.arange(num_groups, device=slot.device).unsqueeze(1) * slots_per_group + \
        torch.arange(slots_per_group, device=slot.device)
    padded = torch.cat([slot.view(num_groups, group_size), slot.new_zeros(num_groups, 1)], dim=1)
    padded.scatter_(1, target, new_slot)
    return padded[:, :group_size].reshape(-1)


def _nearest_member(distance: torch.Tensor, slot: torch.Tensor, movable: torch.Tensor, num_slots: int) -> torch.Tensor:
    """bool (N,): whether a movable token is its slot's member nearest to the centroid (the lowest index among
    equals, so exactly one per occupied slot). Shape-static (two scatter-reduce passes)."""
    n = slot.shape[0]
    member_slot = torch.where(movable, slot, torch.full_like(slot, num_slots))  # the rest to the scratch row
    least = distance.new_full((num_slots + 1,), float("inf")).scatter_reduce(0, member_slot, distance, "amin")
    token = torch.arange(n, device=slot.device)
    ties = torch.where(distance == least[member_slot], token, torch.full_like(token, n))
    first = torch.full((num_slots + 1,), n, dtype=token.dtype, device=slot.device).scatter_reduce(0, member_slot,
                                                                                                 ties, "amin")
    return movable & (first[member_slot] == token)
