"""Error-bounded merging (``clustering: "bounded"``): tokens share a centroid only while they are alike.

A token merges only while its relative residual ||x - c|| / ||x|| to its centroid stays within the tolerance
(``merge_tolerance``); every other token gets a slot of its own and crosses as itself, so its expert computes on it
exactly. The hash proposes the merges, as in LSH clustering; the tolerance decides. Per group (expert):

1. finest buckets: the tokens with the same full LSH code (every hash), and their mean, each member's first
   centroid;
2. outliers: the tokens whose relative residual to that mean exceeds the tolerance. The group *needs* one slot per
   bucket that keeps an inlier plus one per outlier. The need is measured at the finest level whatever the budget,
   so that a fixed layout's budget can follow it (lshmoe_plugin.slot_budget): measured under the budget, a group
   given a slot per token would need a slot per token, and the budget would never come down;
3. solo slots: every outlier, when the need fits the budget. Otherwise the slots the inlier buckets leave go to the
   outliers of largest residual (a slot kept for a bucket keeps all its inliers within the tolerance, a solo slot
   one token), and at least one slot stays for the tokens left over;
4. the rest (the inliers, and the outliers left without a slot: over budget) is clustered again by
   `clustering.assign_clusters` under the budget the solo slots leave: a slot per token where it allows that,
   else the finest buckets, else coarser hash prefixes. Their centroids, computed by the caller, are means of
   inliers only, and can move a member slightly past the tolerance (the telemetry counts it; no second pass);
5. a group's clusters are numbered in the order of their first token: where every token has a slot of its own, the
   slots are the capacity buffer's own rows, in order, and the layer computes what stock computes, bit for bit.

Shape-static (no host sync), as the rest of the pipeline. Shapes: tokens (N, d) sorted by group, G groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .clustering import assign_clusters, position_in_group
from .telemetry import relative_residuals

Means = Callable[[torch.Tensor, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]]  # centroids_by_slot


@dataclass
class BoundedClusters:
    """Where the tokens of one dispatch went under error-bounded merging.

    local: (N,) int64 cluster of every token within its group, numbered in order of first token; -1 if invalid.
    clusters_per_group: (G,) int64 clusters (non-empty, at most the group's budget).
    needed: (G,) int64 slots the group needs so that every token stays within the tolerance (finest level).
    over_budget: (G,) int64 outliers that found no slot of their own (they go through the merging with the rest).
    """
    local: torch.Tensor
    clusters_per_group: torch.Tensor
    needed: torch.Tensor
    over_budget: torch.Tensor


def bounded_clusters(tokens: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                     budget: Optional[torch.Tensor], num_groups: int, tolerance: float, bits_per_hash: int,
                     num_hashes: int, means: Means) -> BoundedClusters:
    """Cluster tokens (N, d) with bucket codes (N,) in groups (N,) (sorted), valid bool (N,), at most budget[g]
    (int64 (G,)) clusters per group, or with None exactly the clusters each group needs. `means` is the ops'
    `centroids_by_slot`."""
    n = tokens.shape[0]
    if n == 0:  # an empty batch: nothing to merge
        none = torch.zeros(num_groups, dtype=torch.long, device=tokens.device)
        return BoundedClusters(codes.new_empty(0), none, none, none)
    bucket = finest_buckets(codes, groups, valid, num_groups, bits_per_hash * num_hashes)
    centroids, _ = means(tokens, bucket, n)
    residual = relative_residuals(tokens, torch.cat([centroids, centroids.new_zeros(1, tokens.shape[1])])[bucket])
    outlier = valid & (residual > tolerance)
    keeps_inlier = torch.zeros(n + 1, dtype=torch.long, device=tokens.device).index_add_(
        0, bucket, (valid & ~outlier).long()) > 0
    bucket_group = torch.full((n + 1,), num_groups, dtype=torch.long, device=tokens.device).scatter_(
        0, bucket, torch.where(valid, groups, num_groups))  # every member writes its group; the scratch row G
    inlier_buckets = _per_group(bucket_group, keeps_inlier, num_groups)
    outliers = _per_group(groups, outlier, num_groups)
    needed = inlier_buckets + outliers
    if budget is None:
        budget = needed
    solo_count = torch.where(needed <= budget, outliers, (budget - inlier_buckets.clamp(min=1)).clamp(min=0))
    solo = outlier & (_rank_by_residual(residual, outlier, groups, num_groups) < solo_count[groups])
    local, merged_clusters = assign_clusters(codes, groups, valid & ~solo, budget - solo_count, num_groups,
                                             bits_per_hash, num_hashes)
    local = torch.where(solo, merged_clusters[groups] + position_in_group(groups, solo, num_groups), local)
    clusters = merged_clusters + solo_count
    return BoundedClusters(in_order_of_first_token(local, clusters, groups, valid, num_groups), clusters, needed,
                           outliers - solo_count)


def finest_buckets(codes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, num_groups: int,
                   code_bits: int) -> torch.Tensor:
    """(N,) int64: one id in [0, N) per (group, full code) of the valid tokens; N for invalid tokens."""
    n = codes.shape[0]
    key = torch.where(valid, (groups << code_bits) | codes, torch.full_like(codes, num_groups << code_bits))
    sorted_key, order = torch.sort(key)
    is_new = torch.ones(n, dtype=torch.bool, device=codes.device)
    is_new[1:] = sorted_key[1:] != sorted_key[:-1]
    bucket = torch.empty_like(codes).scatter_(0, order, torch.cumsum(is_new.long(), 0) - 1)
    return torch.where(valid, bucket, torch.full_like(bucket, n))


def in_order_of_first_token(local: torch.Tensor, clusters_per_group: torch.Tensor, groups: torch.Tensor,
                            valid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Renumber each group's clusters (`local` (N,), -1 for invalid tokens) by the position of their first token.
    Tokens must be sorted by group."""
    n = local.shape[0]
    index = torch.arange(n, device=local.device)
    offsets = torch.cumsum(clusters_per_group, 0) - clusters_per_group
    cluster = torch.where(valid, offsets[groups] + local, torch.full_like(local, n))  # one id per cluster, < N
    first = torch.full((n + 1,), n, dtype=torch.long, device=local.device).scatter_reduce(0, cluster, index, "amin")
    is_first = valid & (first[cluster] == index)
    firsts_before = torch.cumsum(is_first.long(), 0) - is_first.long()
    tokens_per_group = _per_group(groups, torch.ones_like(valid), num_groups)
    group_start = (torch.cumsum(tokens_per_group, 0) - tokens_per_group).clamp(max=n - 1)
    renumbered = firsts_before[first[cluster].clamp(max=n - 1)] - firsts_before[group_start[groups]]
    return torch.where(valid, renumbered, torch.full_like(local, -1))


def _per_group(index: torch.Tensor, flags: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G,) int64: how many of `flags` are set per group (`index` in [0, G], G dropped)."""
    return torch.zeros(num_groups + 1, dtype=torch.long, device=index.device).index_add_(
        0, index, flags.long())[:num_groups]


def _rank_by_residual(residual: torch.Tensor, outlier: torch.Tensor, groups: torch.Tensor,
                      num_groups: int) -> torch.Tensor:
    """(N,) rank of each outlier among its group's outliers by descending residual (0: the largest; ties by
    position); the other tokens rank after them."""
    score = torch.where(outlier, residual, torch.full_like(residual, -1.0))
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    tokens_per_group = _per_group(groups, torch.ones_like(outlier), num_groups)
    group_start = torch.cumsum(tokens_per_group, 0) - tokens_per_group
    ranked = torch.arange(order.shape[0], device=order.device) - group_start[groups[order]]
    return torch.empty_like(ranked).scatter_(0, order, ranked)
