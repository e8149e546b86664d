"""Patch of DeepSpeed's GShard-style ``MOELayer`` (deepspeed/moe/sharded_moe.py): LSH-compressed all-to-all.

The patched forward follows the stock 0.19.x forward stage by stage and only wraps the communication seam:
gate -> encode (E, C, d) -> compress to centroids (E, S, d) -> all-to-all -> experts -> all-to-all
-> expand + residual (E, C, d) -> decode. Layers that are not selected, and eval mode, run the stock forward.
With ``clustering: "none"`` every token crosses (no compress, no expand); with ``"bounded"`` the compressor merges
only tokens within the tolerance, into a slot count the ranks agree on; either way the all-to-alls carry
what crosses in the configured wire format (lshmoe_plugin.wire), or through DeepSpeed's own ``_AllToAll`` when
that is the model's dtype both ways.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from lshmoe_plugin import cost, schedule, wire
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.telemetry import relative_error

from . import engine_monitor
from .lifecycle import PatchLifecycle
from .versioning import DEEPSPEED_RELEASES, UnsupportedFrameworkError, require_deepspeed

SUPPORTED_RELEASES = DEEPSPEED_RELEASES
LIFECYCLE = PatchLifecycle("deepspeed")


def _sharded_moe():
    version = require_deepspeed()
    from deepspeed.moe import sharded_moe
    for name in ("_route_slots", "_sparse_encode", "_sparse_decode", "_AllToAll", "MOELayer"):
        if not hasattr(sharded_moe, name):
            raise UnsupportedFrameworkError(f"deepspeed {version}: sharded_moe.{name} is missing; "
                                            f"lshmoe-plugin supports deepspeed {SUPPORTED_RELEASES[0]}x")
    return sharded_moe


def is_applied() -> bool:
    return LIFECYCLE.is_applied()


def apply(config: LSHMoEConfig, model: Optional[torch.nn.Module] = None) -> None:
    """Patch ``MOELayer.forward`` (and hook the engine's step to write telemetry to DeepSpeed's monitor).

    With ``model``, its MoE layers are numbered in module order (the indices ``layers`` refers to) and checked
    for unsupported layouts now; layers never seen here are numbered in the order they first run.
    """
    sharded_moe = _sharded_moe()
    if model is not None:
        number_moe_layers(model)
    LIFECYCLE.use(config)
    if is_applied():
        return
    LIFECYCLE.install([(sharded_moe.MOELayer, "forward", _patched_forward)])
    engine_monitor.attach(LIFECYCLE)


def revert() -> None:
    LIFECYCLE.restore()
    engine_monitor.detach(LIFECYCLE)


def number_moe_layers(model: torch.nn.Module) -> int:
    from deepspeed.moe.sharded_moe import MOELayer
    return LIFECYCLE.number_layers((m for m in model.modules() if isinstance(m, MOELayer)), _check_layout)


def _check_layout(layer) -> None:
    if layer.use_tutel:
        raise UnsupportedFrameworkError("lshmoe-plugin does not support DeepSpeed MoE with use_tutel=True; "
                                        "allowed: use_tutel=False")
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
    if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
        raise UnsupportedFrameworkError("lshmoe-plugin does not support tensor parallelism around DeepSpeed MoE "
                                        "(tensor-model-parallel world size > 1); allowed: tensor parallel size 1")


def _stock_forward(self, *input, **kwargs):
    from deepspeed.moe import sharded_moe
    return LIFECYCLE.original(sharded_moe.MOELayer, "forward")(self, *input, **kwargs)


def _patched_forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    index = LIFECYCLE.layer_index(self)
    if not LIFECYCLE.active(index, self.training):
        return _stock_forward(self, *input, **kwargs)
    _check_layout(self)
    compressor = LIFECYCLE.compressor(self, index)
    if LIFECYCLE.config.decide_by_cost:
        if cost.measures_now(compressor, self.training):
            decide_by_cost(self, compressor, *input)
        if not compressor.pays:  # None: not decided yet (eval before any training step) runs stock
            return _stock_forward(self, *input, **kwargs)
    return _compressed_forward(self, compressor, *input)


def occupied_slots(slots: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool (E, C): which capacity slots hold a routed token; empty slots and dropped routes never cluster."""
    occupied = torch.zeros(num_experts * capacity + 1, dtype=torch.bool, device=slots.device)
    # Dropped routes all land on the scratch slot E*C, cut below. index_fill_ takes the value as a scalar:
    # `occupied[idx] = True` copies a host tensor to the device and synchronises, once per layer and step, which
    # on a GPU stalled the host until the device had drained its queue (docs/perf_notes.md).
    occupied.index_fill_(0, slots.reshape(-1), True)
    return occupied[:-1].view(num_experts, capacity)


def _compressed_forward(self, compressor: LSHCompressor, *input: torch.Tensor) -> torch.Tensor:
    from deepspeed.moe import sharded_moe as sm
    timing = self.wall_clock_breakdown
    if timing:
        self.timers(sm.MOE_TIMER).start()
    d_model = input[0].shape[-1]
    reshaped_input = input[0].reshape(-1, d_model)
    self.l_aux, C, E, indices_, locations_, gates_, self.exp_counts = self.gate(
        reshaped_input, input[1], True, self.use_tutel)
    num_tokens, C = reshaped_input.size(0), int(C)
    slots = sm._route_slots(indices_, locations_, E, C)
    dispatched = sm._sparse_encode(reshaped_input, slots, E, C)
    # Only training forwards count and report: an evaluation (compress_in_eval) must leave the training
    # telemetry and the layer's forward count as they were.
    record = self.training
    if compressor.config.clustering == "none":
        if record:
            compressor.record_exchange(dispatched, occupied_slots(slots, E, C))
        expert_output = _exchange(self, dispatched, d_model, timed=True)
        combined = sm._sparse_decode(expert_output.view(E * C, d_model), slots, gates_, num_tokens)
        return _finish(self, combined, input[0].shape)
    valid = occupied_slots(slots, E, C)
    centroids, state = compressor.compress_fixed(dispatched, valid, record=record, agree=_group_max(self))

    centroid_outputs = _exchange(self, centroids, d_model, timed=True)
    expert_output = compressor.decompress_fixed(centroid_outputs, state)
    if compressor.config.exact_token_stride:
        expert_output = with_exact_tokens(self, compressor, dispatched, expert_output, record)
    if record and compressor.output_error_due():
        record_output_error(self, compressor, dispatched, valid, centroid_outputs, state, expert_output)
    combined = sm._sparse_decode(expert_output.view(E * C, d_model), slots, gates_, num_tokens)
    return _finish(self, combined, input[0].shape)


def _finish(self, combined: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    from deepspeed.moe import sharded_moe as sm
    if self.wall_clock_breakdown:
        self.timers(sm.MOE_TIMER).stop()
        self.time_moe = self.timers(sm.MOE_TIMER).elapsed(reset=False)
    return combined.reshape(shape)


def _exchange(self, rows: torch.Tensor, d_model: int, timed: bool = False) -> torch.Tensor:
    """rows (E, S, d) to their experts' ranks, through the experts, and back, each crossing in its wire format;
    `timed`: under DeepSpeed's all-to-all timers (the layer's own exchange, not a sample's)."""
    from deepspeed.moe import sharded_moe as sm
    first = (sm.FIRST_ALLTOALL_TIMER, "time_falltoall") if timed else None
    second = (sm.SECOND_ALLTOALL_TIMER, "time_salltoall") if timed else None
    received = _crossing(self, rows, "dispatch", first)
    return _crossing(self, _experts(self, received, d_model), "combine", second)


def with_exact_tokens(self, compressor: LSHCompressor, dispatched: torch.Tensor, expert_output: torch.Tensor,
                      record: bool = True) -> torch.Tensor:
    """`exact_token_stride`: every N-th capacity slot goes through the stock exchange too and its exact output
    replaces the compressed one, with gradients.

    The offset rotates with the optimizer step and the micro-batch (`schedule.rotation`), not with the layer's
    forwards: a recomputation under activation checkpointing must send the very slots its forward sent (reentrant:
    else the backward differentiates another function than the forward computed; non-reentrant: else the saved
    tensors do not match), and an evaluation must not move the rotation of training.
    """
    num_experts, capacity, d_model = dispatched.shape
    stride = compressor.config.exact_token_stride
    offset = schedule.rotation(stride)
    if offset >= capacity:
        return expert_output
    positions = torch.arange(offset, capacity, stride, device=dispatched.device)
    sample = dispatched[:, positions].contiguous()
    exact = _exchange(self, sample, d_model)  # in the wire format, as the centroids cross
    if record:
        compressor.record_extra_bytes(wire.bytes_per_crossing(compressor.config, sample.numel() // d_model, d_model,
                                                              sample.dtype))
    return expert_output.index_copy(1, positions, exact.to(expert_output.dtype))


# The output error is measured on every 16th capacity slot of every expert: slots fill in token order, so a stride
# samples the whole batch, and 1/16 of stock's bytes is a small price every `output_error_interval` steps.
OUTPUT_ERROR_STRIDE = 16


@torch.no_grad()
def record_output_error(self, compressor: LSHCompressor, dispatched: torch.Tensor, valid: torch.Tensor,
                        centroid_outputs: torch.Tensor, state, returned: torch.Tensor) -> None:
    """Send a strided sample of the dispatch buffer through the stock exchange and compare what compression gave
    those tokens (`returned`, (E, C, d)), and what the paper's compensation and none would have given (telemetry
    `output_error*`)."""
    num_experts, capacity, d_model = dispatched.shape
    positions = torch.arange(0, capacity, OUTPUT_ERROR_STRIDE, device=dispatched.device)
    sample = dispatched.detach()[:, positions].contiguous()
    devices = [sample.device] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # an expert with dropout must not shift the training draws
        exact = _all_to_all(self, _experts(self, _all_to_all(self, sample), d_model))
    compressor.record_extra_bytes(sample.numel() * sample.element_size())  # the sample crossed the network too
    tokens = sample.float()
    slot_rows = (torch.arange(num_experts, device=positions.device).unsqueeze(1) * capacity + positions).reshape(-1)
    picked = type(state)(state.tokens, state.slot[slot_rows], state.centroids, state.counts, state.out_shape)
    outputs = compressor.per_token(centroid_outputs.float(), picked).view_as(tokens)
    centroids = compressor.per_token(state.centroids.float(), picked).view_as(tokens)
    members = compressor.per_token(state.counts.float().unsqueeze(-1), picked).view(num_experts, -1, 1)
    compensated = torch.where(members <= 1, outputs, tokens + outputs - centroids)  # as the expand forms it
    keep = valid[:, positions]
    compressor.record_output_error(relative_error(returned.detach()[:, positions], exact, keep),
                                   relative_error(compensated, exact, keep), relative_error(outputs, exact, keep))


def _experts(self, received: torch.Tensor, d_model: int) -> torch.Tensor:
    """What this rank received (ep_size * local experts rows of slots) through its local experts."""
    received = received.reshape(self.ep_size, self.num_local_experts, -1, d_model)
    return self.experts(received).reshape(self.ep_size * self.num_local_experts, -1, d_model)


def decide_by_cost(self, compressor: LSHCompressor, *input: torch.Tensor) -> bool:
    """Time this layer's stock exchange against the compressed one on this step's tokens (`lshmoe_plugin.cost`).

    Exchange = all-to-all, experts, all-to-all (plus compress and expand when compressed): the part the plugin
    changes. The gate runs once, without gradients, to build the dispatch buffer both trials start from.
    """
    from deepspeed.moe import sharded_moe as sm
    d_model = input[0].shape[-1]
    devices = [input[0].device] if input[0].device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the real step draws the gate's noise again
        tokens = input[0].reshape(-1, d_model)
        _, C, E, indices_, locations_, _, _ = self.gate(tokens, input[1] if len(input) > 1 else None, True,
                                                        self.use_tutel)
        slots = sm._route_slots(indices_, locations_, E, int(C))
        dispatched = sm._sparse_encode(tokens, slots, E, int(C))
        valid = occupied_slots(slots, E, int(C))

    def stock():
        leaf = dispatched.detach().requires_grad_()
        out = _all_to_all(self, _experts(self, _all_to_all(self, leaf), d_model))
        torch.autograd.grad(out, leaf, torch.ones_like(out))

    def compressed():
        leaf = dispatched.detach().requires_grad_()
        if compressor.config.clustering == "none":  # the wire format alone
            out = _exchange(self, leaf, d_model)
        else:
            centroids, state = compressor.compress_fixed(leaf, valid, record=False)
            out = compressor.decompress_fixed(_exchange(self, centroids, d_model), state)
        torch.autograd.grad(out, leaf, torch.ones_like(out))

    return cost.decide(compressor, stock, compressed, input[0].device, _group_sum(self), self.ep_size)


def _group_sum(self):
    if self.ep_size == 1:
        return None
    import deepspeed.comm as dist
    return lambda times: dist.all_reduce(times, group=self.ep_group)


def _group_max(self):
    """In-place MAX over the expert-parallel group (every rank must send the same slot count); None at EP=1."""
    if self.ep_size == 1:
        return None
    import deepspeed.comm as dist
    return lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.ep_group)


def _all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
    from deepspeed.moe import sharded_moe as sm
    return sm._AllToAll.apply(self.ep_group, tensor) if self.ep_size > 1 else tensor.contiguous()


def _crossing(self, rows: torch.Tensor, crossing: str, timer: Optional[tuple] = None) -> torch.Tensor:
    """One all-to-all ("dispatch" or "combine") of rows (E, S, d). In the model's dtype both ways it is DeepSpeed's
    own `_AllToAll`, as before; otherwise `wire.cross` sends the encoded buffer and decodes what arrives."""
    timed = timer is not None and self.wall_clock_breakdown
    if timed:
        self.timers(timer[0]).start()
    config = LIFECYCLE.config
    if wire.changes_crossing(config, crossing):
        rows = wire.cross(rows, *wire.formats(config, crossing), _raw_all_to_all(self))
    else:
        rows = _all_to_all(self, rows)
    if timed:
        self.timers(timer[0]).stop()
        setattr(self, timer[1], self.timers(timer[0]).elapsed(reset=False))
    return rows


def _raw_all_to_all(self):
    """A plain all-to-all of one buffer over the layer's expert-parallel group (the identity at EP=1, where the
    wire format still applies, as compression does: what a run at EP=1 trains is what EP>1 would)."""
    if self.ep_size == 1:
        return _same
    import deepspeed.comm as dist
    group = self.ep_group

    def exchange(buffer: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(buffer)
        dist.all_to_all_single(received, buffer, group=group)
        return received
    return exchange


def _same(buffer: torch.Tensor) -> torch.Tensor:
    return buffer
