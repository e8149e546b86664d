"""LSH-MoE compressor: hash -> assign -> reduce to centroids, and later expand + residual.

Framework-independent. Two layouts share one pipeline:
- fixed (DeepSpeed GShard layer): tokens (E, C, d) with a validity mask; every expert gets S = ceil(rate * C)
  centroid slots, unused slots stay zero, so the all-to-all keeps a fixed shape (E, S, d).
- variable (Megatron-core, AutoEP): tokens (N, d) sorted by group (expert); each group sends only its non-empty
  clusters, at most ceil(rate * tokens_in_group), packed as (K, d) with per-group counts for the split sizes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import ops, residual_map, wire
from .bounded import BoundedClusters, bounded_clusters
from .clustering import pack_clusters, refine_fixed
from .config import LSHMoEConfig, LSHMoEConfigError
from .hashing import hash_projections
from .schedule import training_step
from .slot_budget import SlotBudget, fixed_slots
from .telemetry import TELEMETRY, CostDecision, LayerStats, Telemetry, mean_over, relative_residuals


@dataclass
class ClusterState:
    """What the sender keeps between compress and decompress (no residual tensor: the tokens themselves)."""
    tokens: torch.Tensor      # (N, d) flattened input tokens
    slot: torch.Tensor        # (N,) cluster row of each token; num_slots for invalid tokens
    centroids: torch.Tensor   # (num_slots, d)
    counts: torch.Tensor      # (num_slots,) tokens per cluster
    out_shape: torch.Size
    segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # CSR of `slot` from the fused assignment
    graphed: Optional[object] = None  # the CUDA-graph instance that compressed (kernels.graphed), if any


# `cuda_graphs: "auto"` replays a layer only up to this many bytes of token rows (N x d x element size): above
# it the copies into and out of the graphs' buffers (N x d each way, forward and backward) cost more than the
# ~20 launches they save. Measured per layer as a training step sees it (8 chained round trips, H200, bf16,
# docs/benchmarks.md, compressor table): graphs 1.20x eager at d=2048 x 40960 tokens (168 MB), 0.77x at
# d=4096 x 40960 (336 MB); the bound sits near the linear crossover between them (246 MB).
AUTO_MAX_TOKEN_BYTES = 240 * 2**20


def replay_pays_off(tokens: torch.Tensor) -> bool:
    """Whether `auto` replays a layer whose flat token rows are `tokens` (see AUTO_MAX_TOKEN_BYTES)."""
    return tokens.numel() * tokens.element_size() <= AUTO_MAX_TOKEN_BYTES


class _Projections:
    """One layer's hash directions on one device, and which draw they are."""

    def __init__(self, tensor: torch.Tensor, draw: int) -> None:
        self.tensor, self.draw = tensor, draw
        self._staging: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None

    def redraw(self, values: torch.Tensor, draw: int) -> None:
        if self.tensor.device.type != "cuda":
            self.tensor.copy_(values)
        else:
            # A pageable host-to-device copy would wait for the stream to drain; the pinned buffer is reused once
            # its last copy (a step ago) has completed.
            if self._staging is None:
                self._staging = torch.empty(values.shape, dtype=self.tensor.dtype, pin_memory=True)
                self._copied = torch.cuda.Event()
            else:
                self._copied.synchronize()
            self._staging.copy_(values)
            self.tensor.copy_(self._staging, non_blocking=True)
            self._copied.record()
        self.draw = draw


class LSHCompressor:
    """Compresses one MoE layer's dispatch; holds that layer's hash projections."""

    def __init__(self, config: LSHMoEConfig, layer_index: int, telemetry: Telemetry = TELEMETRY) -> None:
        self.config = config
        self.layer_index = layer_index
        self.telemetry = telemetry
        self.step = 0
        self.pays: Optional[bool] = None  # set by a patch's cost decision (decide_by_cost), None until measured
        self.decision: Optional[CostDecision] = None  # what that decision measured
        self._projections: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._ops = None
        self._graphs = None  # kernels.graphed.GraphedFixedLayout, built on the first graphed forward
        self.slot_budget = SlotBudget(config.compression_rate)  # S of the fixed layout under clustering "bounded"

    def projections(self, d_model: int, device: torch.device) -> torch.Tensor:
        """This layer's hash directions for the current draw (one draw per run unless `redraw_interval`).

        A redraw writes the new directions into the same tensor, so the CUDA graphs that read it stay valid; on a
        GPU the copy goes through a pinned buffer without stopping the host.
        """
        key = (d_model, device)
        interval = self.config.redraw_interval
        draw = training_step() // interval if interval else 0
        held = self._projections.get(key)
        if held is None:
            tensor = hash_projections(self.config, d_model, self.layer_index, draw).to(device)
            self._projections[key] = held = _Projections(tensor, draw)
        elif held.draw != draw:
            held.redraw(hash_projections(self.config, d_model, self.layer_index, draw), draw)
        return held.tensor

    # -- state a checkpoint carries (lshmoe_plugin.plugin_state) ---------------------------------------------------
    def state_dict(self) -> dict:
        """What this layer's next forwards depend on besides the config and the training clock: its forward count
        (which forwards sample the residual norm and the output error), the slot budget of clustering "bounded",
        and the `decide_by_cost` decision with what it measured. Plain Python values."""
        return {"forwards": self.step, "slot_budget": self.slot_budget.state_dict(), "pays": self.pays,
                "decision": None if self.decision is None else dataclasses.asdict(self.decision)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue from `state_dict`'s values; None: start as a new compressor does. A restored decision goes back
        into the telemetry without being logged again (the run that made it logged it)."""
        state = state or {"forwards": 0, "slot_budget": None, "pays": None, "decision": None}
        self.step, self.pays = int(state["forwards"]), state["pays"]
        self.slot_budget.load_state_dict(state["slot_budget"])
        self.decision = None if state["decision"] is None else CostDecision(**state["decision"])
        self.telemetry.decisions.pop(self.layer_index, None)
        if self.decision is not None:
            self.telemetry.decisions[self.layer_index] = self.decision

    def check_experts(self, num_experts: int) -> None:
        """Refuse a layer whose expert ids would overflow the int64 bucket key, instead of mis-sorting its tokens."""
        limit = self.config.max_experts
        if num_experts > limit:
            bits = self.config.num_hashes * self.config.code_bits_per_hash
            raise LSHMoEConfigError(
                f"MoE layer {self.layer_index} has {num_experts} experts; lsh_moe.num_hashes={self.config.num_hashes} "
                f"with hash_dim={self.config.hash_dim} ({bits} bits of bucket code) fits int64 bucket keys for at most "
                f"{limit} experts. Allowed: experts <= 2**(63 - num_hashes * ceil(log2(2 * hash_dim))) - 1; fewer "
                f"num_hashes or a smaller hash_dim raise the limit")

    def _ops_for(self, device: torch.device):
        if self._ops is None:
            self._ops = ops.select(self.config.kernel, device)
        return self._ops

    # -- fixed layout -------------------------------------------------------------------------------------------
    def compress_fixed(self, dispatched: torch.Tensor, valid: torch.Tensor, record: bool = True,
                       agree: Optional[Callable[[torch.Tensor], None]] = None) -> Tuple[torch.Tensor, ClusterState]:
        """dispatched (E, C, d), valid bool (E, C) -> centroids (E, S, d) and the state to decompress with.

        record=False leaves telemetry, the step count and the slot budget alone (for evaluations and trial runs
        such as cost measurements). `agree`: all-reduces a tensor in place with MAX over the expert-parallel group,
        so that under clustering "bounded" every rank sends the same S (`slot_budget`); None for one rank.
        """
        with torch.profiler.record_function("lsh_moe.compress"):  # names the stage in torch.profiler and nsys
            if self.config.clustering == "bounded":
                return self._compress_bounded_fixed(dispatched, valid, record, agree)
            return self._compress_fixed(dispatched, valid, record)

    def _compress_fixed(self, dispatched: torch.Tensor, valid: torch.Tensor,
                        record: bool) -> Tuple[torch.Tensor, ClusterState]:
        num_experts, capacity, d_model = dispatched.shape
        self.check_experts(num_experts)
        slots_per_expert = fixed_slots(capacity, self.config.compression_rate)
        tokens = dispatched.reshape(-1, d_model)
        valid = valid.reshape(-1)
        impl = self._ops_for(tokens.device)
        projections = self.projections(d_model, tokens.device)
        graphs = self._graphs_for(tokens, impl) if tokens.numel() and slots_per_expert else None
        if graphs is not None:
            centroids, instance = graphs.compress(tokens, valid, projections, self.config, num_experts, capacity,
                                                  slots_per_expert)
            state = ClusterState(tokens, instance.slot, centroids, instance.counts, dispatched.shape,
                                 (instance.order, instance.bounds), instance)
            clusters_sent = instance.clusters_per_group
        else:
            clusters = impl.cluster_fixed(tokens.detach(), valid, projections, self.config, num_experts, capacity,
                                          slots_per_expert)
            slot, segments = clusters.slot, clusters.segments
            if self.config.refine_iterations:
                slot = refine_fixed(tokens, valid, slot, num_experts, capacity, slots_per_expert,
                                    self.config.refine_iterations,
                                    lambda t, s: impl.centroids_by_slot(t, s, clusters.num_slots))
                segments = None  # the assignment's CSR view describes the unrefined slots
            centroids, counts = impl.centroids_by_slot(tokens, slot, clusters.num_slots, segments)
            state = ClusterState(tokens, slot, centroids, counts, dispatched.shape, segments)
            clusters_sent = (clusters.clusters_per_group if not self.config.refine_iterations else
                             (counts.view(num_experts, slots_per_expert) > 0).sum(1))
        if record:
            self._record(state, valid, clusters_sent.sum(),
                         wire.bytes_per_crossing(self.config, state.centroids.shape[0], d_model, dispatched.dtype),
                         tokens.numel() * dispatched.element_size())
        return centroids.view(num_experts, slots_per_expert, d_model), state

    def _compress_bounded_fixed(self, dispatched: torch.Tensor, valid: torch.Tensor, record: bool,
                                agree: Optional[Callable[[torch.Tensor], None]]) -> Tuple[torch.Tensor, ClusterState]:
        """Error-bounded merging into S slots per expert, S from the slot budget (eager: S moves between steps)."""
        num_experts, capacity, d_model = dispatched.shape
        self.check_experts(num_experts)
        slots_per_expert = self.slot_budget.slots(capacity, training_step() if record else None)
        tokens, valid = dispatched.reshape(-1, d_model), valid.reshape(-1)
        groups = torch.arange(num_experts, device=tokens.device).repeat_interleave(capacity)
        budget = torch.full((num_experts,), slots_per_expert, dtype=torch.long, device=tokens.device)
        clusters = self._bounded_clusters(tokens, groups, valid, budget, num_experts)
        num_slots = num_experts * slots_per_expert
        slot = torch.where(valid, groups * slots_per_expert + clusters.local, torch.full_like(groups, num_slots))
        centroids, counts = self._ops_for(tokens.device).centroids_by_slot(tokens, slot, num_slots)
        state = ClusterState(tokens, slot, centroids, counts, dispatched.shape)
        if record:
            self.slot_budget.record(clusters.needed.max(), agree)
            self._record(state, valid, clusters.clusters_per_group.sum(),
                         wire.bytes_per_crossing(self.config, num_slots, d_model, dispatched.dtype),
                         tokens.numel() * dispatched.element_size(), (clusters, slots_per_expert))
        return centroids.view(num_experts, slots_per_expert, d_model), state

    def _bounded_clusters(self, tokens: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                          budget: Optional[torch.Tensor], num_groups: int) -> BoundedClusters:
        impl = self._ops_for(tokens.device)
        detached = tokens.detach()
        codes = impl.lsh_codes(detached, self.projections(tokens.shape[1], tokens.device), self.config, groups,
                               valid, num_groups)
        return bounded_clusters(detached, codes, groups, valid, budget, num_groups, self.config.merge_tolerance,
                                self.config.code_bits_per_hash, self.config.num_hashes, impl.centroids_by_slot)

    def decompress_fixed(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        """centroid_outputs (E, S, d) -> token outputs (E, C, d)."""
        flat = centroid_outputs.reshape(-1, centroid_outputs.shape[-1])
        with torch.profiler.record_function("lsh_moe.expand"):
            return self._expand(flat, state).view(state.out_shape)

    # -- variable layout ----------------------------------------------------------------------------------------
    def compress_variable(self, tokens: torch.Tensor, tokens_per_group: torch.Tensor,
                          valid: Optional[torch.Tensor] = None,
                          record: bool = True) -> Tuple[torch.Tensor, torch.Tensor, ClusterState]:
        """tokens (N, d) sorted by group, tokens_per_group int (G,) -> centroids (K, d), clusters_per_group (G,).

        Only non-empty clusters are kept, packed group after group, so clusters_per_group gives the split sizes
        of the all-to-all. K is read back to the host once (the split sizes need it anyway). record=False as in
        `compress_fixed`. Under clustering "bounded" each group gets exactly the clusters it needs.
        """
        self.check_experts(tokens_per_group.numel())
        tokens_per_group = tokens_per_group.to(device=tokens.device, dtype=torch.long)
        if valid is None:
            valid = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        impl = self._ops_for(tokens.device)
        bounded = None
        if self.config.clustering == "bounded":
            groups = torch.repeat_interleave(torch.arange(tokens_per_group.numel(), device=tokens.device),
                                             tokens_per_group, output_size=tokens.shape[0])
            bounded = self._bounded_clusters(tokens, groups, valid, None, tokens_per_group.numel())
            clusters = pack_clusters(bounded.local, bounded.clusters_per_group, groups, valid)
        else:
            budget = torch.ceil(tokens_per_group.double() * self.config.compression_rate - 1e-9).long().clamp(min=1)
            clusters = impl.cluster_variable(tokens.detach(), tokens_per_group, valid,
                                             self.projections(tokens.shape[1], tokens.device), self.config, budget)
        centroids, counts = impl.centroids_by_slot(tokens, clusters.slot, clusters.num_slots, clusters.segments)
        state = ClusterState(tokens, clusters.slot, centroids, counts, tokens.shape, clusters.segments)
        if record:
            self._record(state, valid, clusters.clusters_per_group.sum(),
                         wire.bytes_per_crossing(self.config, clusters.num_slots, tokens.shape[1], tokens.dtype),
                         tokens.numel() * tokens.element_size(), None if bounded is None else (bounded, None))
        return centroids, clusters.clusters_per_group, state

    def decompress_variable(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        """centroid_outputs (K, d) -> token outputs (N, d)."""
        return self._expand(centroid_outputs, state)

    # -- output error -----------------------------------------------------------------------------------------
    def output_error_due(self) -> bool:
        """Whether the forward just compressed is one whose output error `output_error_interval` asks for."""
        interval = self.config.output_error_interval
        return bool(interval) and self.step > 0 and (self.step - 1) % interval == 0

    def record_output_error(self, returned: torch.Tensor, compensated: torch.Tensor,
                            uncompensated: torch.Tensor) -> None:
        """Attach the sampled output errors to this forward's stats (`telemetry.relative_error` of each): of what
        the layer returned, of E(c) + x - c (the paper's compensation) and of E(c) alone."""
        stats = self.telemetry.latest.get(self.layer_index)
        if stats is None or stats.step != self.step:
            return
        stats.output_error = returned
        stats.output_error_compensated, stats.output_error_uncompensated = compensated, uncompensated

    # -- no clustering -----------------------------------------------------------------------------------------
    def record_exchange(self, dispatched: torch.Tensor, valid: torch.Tensor) -> None:
        """The stats of a forward that sent every token (`clustering: "none"`): rate 1, the wire format's bytes."""
        self.step += 1
        count = valid.sum()
        rows, d_model = dispatched.numel() // dispatched.shape[-1], dispatched.shape[-1]
        self.telemetry.record(LayerStats(self.layer_index, self.step, count, count,
                                         wire.bytes_per_crossing(self.config, rows, d_model, dispatched.dtype),
                                         dispatched.numel() * dispatched.element_size()))

    def record_extra_bytes(self, count: int) -> None:
        """Bytes this forward sent per direction besides the centroids (`exact_token_stride`, the output-error
        sample); only for a forward that recorded its stats."""
        stats = self.telemetry.latest.get(self.layer_index)
        if stats is not None and stats.step == self.step:
            stats.bytes_sent += count

    def per_token(self, rows: torch.Tensor, state: ClusterState) -> torch.Tensor:
        """Each token's row of `rows` (num_slots, d), e.g. its centroid or its centroid's output; zero if invalid."""
        flat = rows.reshape(-1, rows.shape[-1])
        return torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[state.slot]

    # -- shared -------------------------------------------------------------------------------------------------
    def _graphs_for(self, tokens: torch.Tensor, impl):
        """The CUDA-graph cache of the fixed layout, or None where the config or the device says eager."""
        setting = self.config.cuda_graphs
        if setting is False:
            return None
        if impl is ops.REFERENCE or tokens.device.type != "cuda":
            if setting is True:
                raise RuntimeError(f"lsh_moe.cuda_graphs=true needs the fused kernels on a CUDA device; got device "
                                   f"{tokens.device} with kernel {self.config.kernel!r}. Allowed here: "
                                   f"cuda_graphs 'auto' or false")
            return None
        if torch.cuda.is_current_stream_capturing():
            return None  # inside someone else's capture: our eager kernels are recorded into it instead
        if setting == "auto" and not replay_pays_off(tokens):
            return None
        if self._graphs is None:
            from .kernels.graphed import GraphedFixedLayout
            self._graphs = GraphedFixedLayout()
        return self._graphs

    def _expand(self, centroid_outputs: torch.Tensor, state: ClusterState) -> torch.Tensor:
        mapped = self.config.error_compensation and self.config.residual_map != "identity"
        compensate = self.config.error_compensation and not mapped
        tokens, centroids = state.tokens, state.centroids
        if compensate and self.config.residual_grad == "stop":
            # The residual's operands, detached: the same arithmetic (so the forward is bit for bit the
            # compensated one), with the gradient flowing only into the centroids' expert outputs.
            tokens, centroids = tokens.detach(), centroids.detach()
        if state.graphed is not None:
            out = self._graphs.expand(state.graphed, tokens, centroids, centroid_outputs, compensate)
        else:
            out = self._ops.expand_with_residual(tokens, state.slot, centroids, centroid_outputs,
                                                 state.counts, compensate, state.segments)
        return self._add_mapped_residuals(out, centroid_outputs, state) if mapped else out

    def _add_mapped_residuals(self, outputs: torch.Tensor, centroid_outputs: torch.Tensor,
                              state: ClusterState) -> torch.Tensor:
        """E(c) per token (`outputs`) + M (token - c), M fitted per expert (fixed layout: groups of equal size)."""
        groups = state.out_shape[0]
        d = state.tokens.shape[1]
        kind = self.config.residual_map
        fitted = residual_map.fit(kind, state.centroids.view(groups, -1, d), centroid_outputs.view(groups, -1, d),
                                  state.counts.view(groups, -1),
                                  differentiable=self.config.residual_grad == "through_map")
        residuals = (state.tokens - self.per_token(state.centroids, state)).view(groups, -1, d)
        if self.config.residual_grad == "stop":
            residuals = residuals.detach()
        out_dtype = torch.promote_types(state.tokens.dtype, centroid_outputs.dtype)
        mapped = residual_map.apply(kind, residuals, fitted).view(-1, d)
        return (outputs.to(mapped.dtype) + mapped).to(out_dtype)

    def _record(self, state: ClusterState, valid: torch.Tensor, clusters: torch.Tensor, sent: int, full: int,
                bounded: Optional[Tuple[BoundedClusters, Optional[int]]] = None) -> None:
        """Count this forward in the telemetry; `bounded`: the merging's clusters and slots per expert (fixed
        layout) under clustering "bounded"."""
        self.step += 1
        interval = self.config.telemetry_interval
        ratio = None
        if interval and (self.step - 1) % interval == 0:
            zero = state.centroids.new_zeros(1, state.centroids.shape[1])
            ratio = relative_residuals(state.tokens, torch.cat([state.centroids.detach(), zero])[state.slot])
        stats = LayerStats(self.layer_index, self.step, valid.sum(), clusters, sent, full,
                           None if ratio is None else mean_over(ratio, valid))
        if bounded is not None:
            merging, stats.slots_per_expert = bounded
            stats.slots_needed, stats.over_budget_tokens = merging.needed.max(), merging.over_budget.sum()
            if ratio is not None:  # the bound, measured on the final centroids
                members = torch.cat([state.counts, state.counts.new_zeros(1)])[state.slot]
                merged = valid & (members > 1)
                stats.merged_tokens = merged.sum()
                stats.merged_over_tolerance = (merged & (ratio > self.config.merge_tolerance)).sum()
        self.telemetry.record(stats)
