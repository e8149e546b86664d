"""The fixed-layout round trip replayed as CUDA graphs: compress, expand, and both their backwards.

Why: at training sizes the fused kernels take tens of microseconds, but eager every layer launches ~15 of them
forward and ~6 backward, each a Python call that costs more than the kernel (docs/perf_notes.md). The fixed layout
never reads a value back to the host, so each stage can be captured once per shape and replayed with one launch.

A graph reads and writes fixed addresses, so every buffer a stage touches is owned here:

- `_Workspace`, one per shape and device, shared by every layer of that shape: the token and mask inputs (read
  only between a layer's compress and its expand, within one forward) and the backward's inputs and outputs
  (handed to autograd, which consumes them before the next layer's backward starts).
- `GraphedRoundTrip`, one per layer and shape (more while forwards are in flight): what the layer's backward
  needs or its consumers keep until then: slots, their CSR, centroids, counts, and the expand's output.

An instance is in flight from a forward that records gradients until its backward has run, or until autograd
drops that forward's graph without one. A forward that finds every instance of its shape in flight captures
another (a pipeline schedule, or two forwards before one backward), so a replay never overwrites buffers a
pending backward still needs. A backward whose forward buffers were reused anyway (``retain_graph`` and a
second backward after another forward) raises instead of reading them.

Costs against eager: copying the tokens in (N x d) on the forward and the output gradient in (N x d) on the
backward, and buffers that stay allocated between steps. Values are those of the eager fused path: the same
kernels replayed.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch

from .. import clustering
from . import triton_ops

_WORKSPACES: "weakref.WeakValueDictionary[tuple, _Workspace]" = weakref.WeakValueDictionary()


class GraphReuseError(RuntimeError):
    """A backward found its forward's graph buffers overwritten by a later forward."""


class _Workspace:
    """Buffers every layer of one shape shares: the forward inputs and everything the backward reads or returns."""

    def __init__(self, n: int, d: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.tokens = torch.empty(n, d, dtype=dtype, device=device)
        self.valid = torch.empty(n, dtype=torch.bool, device=device)
        self.grad_centroids = torch.empty(num_slots, d, dtype=dtype, device=device)
        self.grad_tokens_mean = torch.empty(n, d, dtype=dtype, device=device)
        self._by_output: Dict[tuple, Dict[str, torch.Tensor]] = {}
        self.num_slots = num_slots

    def for_output(self, y_dtype: torch.dtype, compensate: bool) -> Dict[str, torch.Tensor]:
        """The expand's input and its backward's buffers, for expert outputs of `y_dtype`."""
        key = (y_dtype, compensate)
        if key not in self._by_output:
            tokens, s = self.tokens, self.num_slots
            out_dtype = triton_ops.expand_dtype(tokens, torch.empty(0, dtype=y_dtype), compensate)
            self._by_output[key] = dict(
                y=tokens.new_empty(s, tokens.shape[1], dtype=y_dtype),
                grad_out=tokens.new_empty(tokens.shape, dtype=out_dtype),
                grad_tokens=torch.empty_like(tokens),
                grad_y=tokens.new_empty(s, tokens.shape[1], dtype=y_dtype),
                grad_c=tokens.new_empty(s, tokens.shape[1]),
            )
        return self._by_output[key]


def workspace(n: int, d: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
    key = (n, d, num_slots, dtype, device)
    found = _WORKSPACES.get(key)
    if found is None:
        found = _Workspace(n, d, num_slots, dtype, device)
        _WORKSPACES[key] = found
    return found


def _capture(run) -> torch.cuda.CUDAGraph:
    """Run `run` once eagerly on a side stream (compiles the Triton kernels, sets cuBLAS up), then capture it.

    Each graph keeps a private memory pool: its temporaries never alias another graph's outputs, which a
    pending backward may still need.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog and DeepSpeed's threads may touch CUDA while we capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run()
    return graph


class _Lease:
    """Marks an instance in flight for as long as a forward's autograd graph may still run its backward."""

    def __init__(self, instance: "GraphedRoundTrip") -> None:
        self.instance: Optional[GraphedRoundTrip] = instance
        instance.in_flight = True

    def release(self) -> None:
        if self.instance is not None:
            self.instance.in_flight = False
            self.instance = None

    def __del__(self) -> None:  # autograd dropped the graph without running its backward
        self.release()


class GraphedRoundTrip:
    """One layer's captured compress, expand and backwards, for one shape."""

    def __init__(self, space: _Workspace, projections: torch.Tensor, config, num_groups: int, group_size: int,
                 slots_per_group: int) -> None:
        self.space = space
        self.in_flight = False
        self.generation = 0
        tokens = space.tokens
        num_slots = num_groups * slots_per_group
        self.centroids = tokens.new_empty(num_slots, tokens.shape[1])
        self.counts = tokens.new_empty(num_slots, dtype=torch.float32)
        captured = {}

        def compress():
            clusters = triton_ops.cluster_fixed(tokens, space.valid, projections, config, num_groups, group_size,
                                                slots_per_group)
            slot, (order, bounds), per_group = clusters.slot, clusters.segments, clusters.clusters_per_group
            if config.refine_iterations:
                slot = clustering.refine_fixed(tokens, space.valid, slot, num_groups, group_size, slots_per_group,
                                               config.refine_iterations, self._means)
                order, bounds = triton_ops.segments_of(slot, num_slots)
            triton_ops.segment_mean_into(tokens, order, bounds, self.centroids, self.counts)
            if config.refine_iterations:
                per_group = (self.counts.view(num_groups, slots_per_group) > 0).sum(1)
            captured.update(slot=slot, order=order, bounds=bounds, clusters=per_group)

        self._compress = _capture(compress)
        # What the capture allocated lives in the graph's private pool; every replay rewrites it in place.
        self.slot, self.order, self.bounds = captured["slot"], captured["order"], captured["bounds"]
        self.clusters_per_group = captured["clusters"]
        self._centroids_backward = _capture(lambda: triton_ops.segment_broadcast_into(
            space.grad_centroids, self.order, self.bounds, space.grad_tokens_mean))
        self._expand: Dict[tuple, tuple] = {}

    def _means(self, tokens: torch.Tensor, slot: torch.Tensor):
        """Centroids and counts of `slot` into this instance's buffers (a refinement pass's starting point)."""
        order, bounds = triton_ops.segments_of(slot, self.centroids.shape[0])
        triton_ops.segment_mean_into(tokens, order, bounds, self.centroids, self.counts)
        return self.centroids, self.counts

    # -- forward ----------------------------------------------------------------------------------------------------
    def compress(self, tokens: torch.Tensor, valid: torch.Tensor, keep_for_backward: bool) -> Optional[_Lease]:
        self.space.tokens.copy_(tokens)
        self.space.valid.copy_(valid)
        self._compress.replay()
        self.generation += 1
        return _Lease(self) if keep_for_backward else None

    def expand(self, centroid_outputs: torch.Tensor, compensate: bool) -> torch.Tensor:
        buffers, out, expand, _ = self._expand_graphs(centroid_outputs.dtype, compensate)
        buffers["y"].copy_(centroid_outputs)
        expand.replay()
        return out

    # -- backward ---------------------------------------------------------------------------------------------------
    def expand_backward(self, grad_out: torch.Tensor, y_dtype: torch.dtype, compensate: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        buffers, _, _, backward = self._expand_graphs(y_dtype, compensate)
        buffers["grad_out"].copy_(grad_out)
        backward.replay()
        return buffers["grad_tokens"], buffers["grad_c"], buffers["grad_y"]

    def centroids_backward(self, grad_centroids: torch.Tensor) -> torch.Tensor:
        self.space.grad_centroids.copy_(grad_centroids)
        self._centroids_backward.replay()
        return self.space.grad_tokens_mean

    def check_generation(self, generation: int) -> None:
        if generation != self.generation:
            raise GraphReuseError(
                "lsh_moe.cuda_graphs: this backward's forward buffers were overwritten by a later forward of the "
                "same layer (a second backward through a retained graph after another forward?). Set "
                "lsh_moe.cuda_graphs=false to run the compressor eagerly")

    def _expand_graphs(self, y_dtype: torch.dtype, compensate: bool) -> tuple:
        key = (y_dtype, compensate)
        if key not in self._expand:
            buffers = self.space.for_output(y_dtype, compensate)
            tokens = self.space.tokens
            out = tokens.new_empty(tokens.shape, dtype=buffers["grad_out"].dtype)
            expand = _capture(lambda: triton_ops.expand_into(tokens, self.centroids, buffers["y"], self.order,
                                                             self.bounds, out, compensate))
            backward = _capture(lambda: triton_ops.expand_backward_into(
                buffers["grad_out"], self.order, self.bounds, buffers["grad_tokens"], buffers["grad_y"],
                buffers["grad_c"], compensate))
            self._expand[key] = (buffers, out, expand, backward)
        return self._expand[key]


class _GraphedCentroids(torch.autograd.Function):
    """tokens (N, d) -> centroids (S, d) through the instance's compress graph; the backward broadcasts."""

    @staticmethod
    def forward(ctx, tokens, valid, instance, keep_for_backward):
        ctx.lease = instance.compress(tokens, valid, keep_for_backward)
        ctx.instance, ctx.generation = instance, instance.generation
        return instance.centroids.detach()  # an alias: autograd's output, the graph's buffer

    @staticmethod
    def backward(ctx, grad_centroids):
        ctx.instance.check_generation(ctx.generation)
        grad_tokens = ctx.instance.centroids_backward(grad_centroids)
        if ctx.lease is not None:  # the last stage of this forward's backward: the instance may be reused
            ctx.lease.release()
        return grad_tokens.detach(), None, None, None


class _GraphedExpand(torch.autograd.Function):
    """(tokens, centroids, expert outputs) -> token outputs through the instance's expand graph."""

    @staticmethod
    def forward(ctx, tokens, centroids, centroid_outputs, instance, compensate):
        ctx.instance, ctx.generation = instance, instance.generation
        ctx.y_dtype, ctx.compensate = centroid_outputs.dtype, compensate
        return instance.expand(centroid_outputs, compensate).detach()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.instance.check_generation(ctx.generation)
        grad_tokens, grad_c, grad_y = ctx.instance.expand_backward(grad_out, ctx.y_dtype, ctx.compensate)
        return grad_tokens.detach(), grad_c.detach(), grad_y.detach(), None, None


class GraphedFixedLayout:
    """One compressor's graph instances, by shape; hands a forward an instance no pending backward needs."""

    def __init__(self) -> None:
        self._instances: Dict[tuple, list] = {}

    def compress(self, tokens: torch.Tensor, valid: torch.Tensor, projections: torch.Tensor, config,
                 num_groups: int, group_size: int, slots_per_group: int
                 ) -> Tuple[torch.Tensor, GraphedRoundTrip]:
        """Graphed `cluster_fixed` + `centroids_by_slot`: centroids (S, d) with autograd, and the instance that
        holds the slots (for `expand`)."""
        keep = torch.is_grad_enabled() and tokens.requires_grad
        instance = self._free_instance(tokens, valid, projections, config, num_groups, group_size, slots_per_group)
        return _GraphedCentroids.apply(tokens, valid, instance, keep), instance

    @staticmethod
    def expand(instance: GraphedRoundTrip, tokens: torch.Tensor, centroids: torch.Tensor,
               centroid_outputs: torch.Tensor, compensate: bool) -> torch.Tensor:
        """Graphed `expand_with_residual` of the forward that `instance` compressed last."""
        return _GraphedExpand.apply(tokens, centroids, centroid_outputs.contiguous(), instance, bool(compensate))

    def _free_instance(self, tokens, valid, projections, config, num_groups, group_size, slots_per_group):
        n, d = tokens.shape
        key = (n, d, num_groups, slots_per_group, tokens.dtype, tokens.device)
        pool = self._instances.setdefault(key, [])
        for candidate in pool:
            if not candidate.in_flight:
                return candidate
        space = workspace(n, d, num_groups * slots_per_group, tokens.dtype, tokens.device)
        space.tokens.copy_(tokens)  # the capture's warm-up run hashes real data, not uninitialised memory
        space.valid.copy_(valid)
        created = GraphedRoundTrip(space, projections, config, num_groups, group_size, slots_per_group)
        pool.append(created)
        return created

    def __len__(self) -> int:
        return sum(len(pool) for pool in self._instances.values())
