"""LSH-MoE compressor: hash -> assign -> reduce to centroids, and later expand + residual.

Framework-independent. Two layouts share one pipeline:
- fixed (DeepSpeed GShard layer): tokens (E, C, d) with a validity mask; every expert gets S = ceil(rate * C)
  centroid slots, unused slots stay zero, so the all-to-all keeps a fixed shape (E, S, d).
- variable (Megatron-core, AutoEP): tokens (N, d) sorted by group (expert); each group sends only its non-empty
  clusters, at most ceil(rate * tokens_in_group), packed as (K, d) with per-group counts for the split sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import ops
from .clustering import assign_clusters
from .config import LSHMoEConfig
from .hashing import hash_projections
from .telemetry import TELEMETRY, LayerStats, Telemetry, relative_residual_norm


@dataclass
class ClusterState:
    """What the sender keeps between compress and decompress (no residual tensor: the tokens themselves)."""
    tokens: torch.Tensor      # (N, d) flattened input tokens
    slot: torch.Tensor        # (N,) cluster row of each token; num_slots for invalid tokens
    centroids: torch.Tensor   # (num_slots, d)
    counts: torch.Tensor      # (num_slots,) tokens per cluster
    out_shape: torch.Size


def fixed_slots(capacity: int, rate: float) -> int:
    """Centroid slots per expert for a fixed-capacity dispatcher."""
    return max(1, math.ceil(rate * capacity - 1e-9))


class LSHCompressor:
    """Compresses one MoE layer's dispatch; holds that layer's hash projections."""

    def __init__(self, config: LSHMoEConfig, layer_index: int, telemetry: Telemetry = TELEMETRY) -> None:
        self.config = config
        self.layer_index = layer_index
        self.telemetry = telemetry
        self.step = 0
        self.pays: Optional[bool] = None  # set by a patch's cost decision (decide_by_cost), None until measured
        self._projections: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._ops = None

    def projections(self, d_model: int, device: torch.device) -> torch.Tensor:
        key = (d_model, device)
        if key not in self._projections:
            self._projections[key] = hash_projections(self.config, d_model, self.layer_index).to(device)
        return self._projections[key]

    def _clusters(self, tokens: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor,
                  num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._ops is None:
            self._ops = ops.select(self.config.kernel, tokens.device)
        codes = self._ops.lsh_codes(tokens.detach(), self.projections(tokens.shape[-1], tokens.device), self.config,
                                    groups, valid, num_groups)
        # Assignment is a sort over int64 keys (N * 8 bytes): negligible next to the tokens, so it has no
        # fused variant and every path shares the reference.
        return assign_clusters(codes, groups, valid, budget, num_groups, self.config.code_bits_per_hash,
                               self.config.num_hashes)

    # -- fixed layout -------------------------------------------------------------------------------------------
    def compress_fixed(self, dispatched: torch.Tensor, valid: torch.Tensor,
                       record: bool = True) -> Tuple[torch.Tensor, ClusterState]:
        """dispatched (E, C, d), valid bool (E, C) -> centroids (E, S, d) and the state to decompress with.

        record=False leaves telemetry and the step count alone (for trial runs such as cost measurements).
        """
        num_experts, capacity, d_model = dispatched.shape
        slots_per_expert = fixed_slots(capacity, self.config.compression_rate)
        tokens = dispatched.reshape(-1, d_model)
        valid = valid.reshape(-1)
        groups = torch.arange(num_experts, device=tokens.device).repeat_interleave(capacity)
        budget = torch.full((num_experts,), slots_per_expert, dtype=torch.long, device=tokens.device)
        local, clusters = self._clusters(tokens, groups, valid, budget, num_experts)
        num_slots = num_experts * slots_per_expert
        slot = torch.where(valid, groups * slots_per_expert + local, torch.full_like(local, num_slots))
        centroids, counts = self._ops.centroids_by_slot(tokens, slot, num_slots)
        state = ClusterState(tokens, slot, centroids, counts, dispatched.shape)
        elem = dispatched.element_size()
        if record:
            self._record(state, valid, clusters.sum(), num_slots * d_model * elem, tokens.numel() * elem)
        return centroids.view(num_experts, slots_per_expert, d_model), state

    def decompress_fixed(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        """centroid_outputs (E, S, d) -> token outputs (E, C, d)."""
        flat = centroid_outputs.reshape(-1, centroid_outputs.shape[-1])
        return self._expand(flat, state).view(state.out_shape)

    # -- variable layout ----------------------------------------------------------------------------------------
    def compress_variable(self, tokens: torch.Tensor, tokens_per_group: torch.Tensor,
                          valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, ClusterState]:
        """tokens (N, d) sorted by group, tokens_per_group int (G,) -> centroids (K, d), clusters_per_group (G,).

        Only non-empty clusters are kept, packed group after group, so clusters_per_group gives the split sizes
        of the all-to-all. K is read back to the host once (the split sizes need it anyway).
        """
        num_groups = tokens_per_group.numel()
        tokens_per_group = tokens_per_group.to(device=tokens.device, dtype=torch.long)
        groups = torch.repeat_interleave(torch.arange(num_groups, device=tokens.device), tokens_per_group,
                                         output_size=tokens.shape[0])
        if valid is None:
            valid = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        budget = torch.ceil(tokens_per_group.double() * self.config.compression_rate - 1e-9).long().clamp(min=1)
        local, clusters = self._clusters(tokens, groups, valid, budget, num_groups)
        offsets = torch.cumsum(clusters, 0) - clusters
        num_slots = int(clusters.sum())
        slot = torch.where(valid, offsets[groups] + local, torch.full_like(local, num_slots))
        centroids, counts = self._ops.centroids_by_slot(tokens, slot, num_slots)
        state = ClusterState(tokens, slot, centroids, counts, tokens.shape)
        elem = tokens.element_size()
        self._record(state, valid, clusters.sum(), num_slots * tokens.shape[1] * elem, tokens.numel() * elem)
        return centroids, clusters, state

    def decompress_variable(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        """centroid_outputs (K, d) -> token outputs (N, d)."""
        return self._expand(centroid_outputs, state)

    # -- shared -------------------------------------------------------------------------------------------------
    def _expand(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        return self._ops.expand_with_residual(state.tokens, state.slot, state.centroids, centroid_outputs,
                                              state.counts, self.config.error_compensation)

    def _record(self, state: ClusterState, valid: torch.Tensor, clusters: torch.Tensor, sent: int, full: int) -> None:
        self.step += 1
        interval = self.config.telemetry_interval
        residual = None
        if interval and (self.step - 1) % interval == 0:
            zero = state.centroids.new_zeros(1, state.centroids.shape[1])
            per_token = torch.cat([state.centroids.detach(), zero])[state.slot]
            residual = relative_residual_norm(state.tokens, per_token, valid)
        self.telemetry.record(LayerStats(self.layer_index, self.step, valid.sum(), clusters, sent, full, residual))
