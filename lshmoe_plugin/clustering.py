"""From bucket codes to clusters, centroids and back: the pure tensor stages of the compressor.

All functions are shape-static (no host synchronisation) so they can run inside every MoE layer's forward.
Shapes: N tokens of width d in G groups (one group per expert); invalid tokens (empty capacity slots,
dropped tokens) belong to no cluster and are routed to one scratch row that callers drop.
"""
from __future__ import annotations

from typing import Tuple

import torch


def assign_clusters(codes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor,
                    num_groups: int, code_bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every token a cluster index local to its group.

    codes, groups: int64 (N,); valid: bool (N,); budget: int64 (G,) clusters allowed per group.
    Returns (local_cluster (N,), clusters_per_group (G,)); invalid tokens get local_cluster -1.

    A group with no more valid tokens than its budget needs no compression: each token keeps its own cluster,
    numbered by its position, so at rate 1.0 the centroids are the tokens themselves in their original order.
    Otherwise tokens with equal codes share a bucket; if a group has more distinct buckets than its budget,
    neighbouring buckets in code order (which agree on the leading hashes) are merged evenly into the budget.
    """
    n = codes.shape[0]
    device = codes.device
    sentinel = num_groups << code_bits  # sorts after every valid key
    key = torch.where(valid, (groups << code_bits) | codes, torch.full_like(codes, sentinel))
    sorted_key, order = torch.sort(key, stable=True)
    sorted_group = torch.clamp(sorted_key >> code_bits, max=num_groups)  # sentinel -> group G
    is_new_bucket = torch.ones(n, dtype=torch.bool, device=device)
    is_new_bucket[1:] = sorted_key[1:] != sorted_key[:-1]
    bucket_rank = torch.cumsum(is_new_bucket.long(), 0) - 1

    group_ids = torch.arange(num_groups + 1, device=device)
    group_start = torch.searchsorted(sorted_group, group_ids)
    first_rank = bucket_rank[group_start.clamp(max=max(n - 1, 0))]
    rank_in_group = bucket_rank - first_rank[sorted_group]
    distinct = torch.zeros(num_groups + 1, dtype=torch.long, device=device).index_add_(
        0, sorted_group, is_new_bucket.long())[:num_groups]
    valid_count = torch.zeros(num_groups + 1, dtype=torch.long, device=device).index_add_(
        0, groups.where(valid, num_groups), torch.ones_like(groups))[:num_groups]

    merged_clusters = torch.minimum(distinct, budget)
    pad = torch.ones(1, dtype=torch.long, device=device)
    merged_g = torch.cat([merged_clusters, pad])[sorted_group]
    distinct_g = torch.cat([distinct, pad])[sorted_group].clamp(min=1)
    bucket_local = torch.empty_like(codes).scatter_(0, order, rank_in_group * merged_g // distinct_g)

    position_local = _position_in_group(groups, valid, num_groups)
    uncompressed = (valid_count <= budget)
    local = torch.where(torch.cat([uncompressed, pad.bool()])[groups], position_local, bucket_local)
    local = torch.where(valid, local, torch.full_like(local, -1))
    clusters_per_group = torch.where(uncompressed, valid_count, merged_clusters)
    return local, clusters_per_group


def _position_in_group(groups: torch.Tensor, valid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rank of each valid token among the valid tokens of its group, in input order."""
    one_hot_free = valid.long()
    order = torch.argsort(groups, stable=True)
    running = torch.cumsum(one_hot_free[order], 0)
    counts = torch.zeros(num_groups, dtype=torch.long, device=groups.device).index_add_(0, groups, one_hot_free)
    before = torch.cumsum(counts, 0) - counts
    rank_sorted = running - 1 - before[groups[order]]
    return torch.empty_like(groups).scatter_(0, order, rank_sorted)


def centroids_by_slot(tokens: torch.Tensor, slot: torch.Tensor, num_slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of the tokens (N, d) that share a slot (N,) in [0, num_slots]; slot num_slots is the scratch row.

    Returns (centroids (num_slots, d) in the tokens' dtype, counts (num_slots,) float32). Sums accumulate in
    float32: a bf16 running sum over dozens of tokens would lose the residual's precision. Empty slots are zero.
    """
    sums = tokens.new_zeros(num_slots + 1, tokens.shape[1], dtype=torch.float32).index_add(0, slot, tokens.float())
    counts = torch.zeros(num_slots + 1, device=tokens.device).index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32))
    centroids = sums[:num_slots] / counts[:num_slots].clamp(min=1).unsqueeze(-1)
    return centroids.to(tokens.dtype), counts[:num_slots]


def expand_with_residual(tokens: torch.Tensor, slot: torch.Tensor, centroids: torch.Tensor,
                         centroid_outputs: torch.Tensor, counts: torch.Tensor,
                         error_compensation: bool) -> torch.Tensor:
    """Each token's output (N, d): its centroid's expert output, plus (token - centroid) when compensating.

    Computed as token + (output - centroid)[slot], which is exactly the token again when the expert is the
    identity; a token alone in its cluster takes its centroid's output unchanged, which is exactly the stock
    result. Invalid tokens (scratch slot) get zeros.
    """
    num_slots = centroids.shape[0]
    zero_row = centroid_outputs.new_zeros(1, centroid_outputs.shape[1])
    outputs = torch.cat([centroid_outputs, zero_row])[slot]
    if not error_compensation:
        return outputs
    delta = torch.cat([centroid_outputs - centroids, zero_row])[slot]
    alone = torch.cat([counts <= 1, torch.ones(1, dtype=torch.bool, device=counts.device)])[slot]
    valid = (slot < num_slots).unsqueeze(-1)
    compensated = torch.where(alone.unsqueeze(-1), outputs, tokens + delta)
    return torch.where(valid, compensated, torch.zeros_like(compensated))
