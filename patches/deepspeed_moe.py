"""Patch of DeepSpeed's GShard-style ``MOELayer`` (deepspeed/moe/sharded_moe.py): LSH-compressed all-to-all.

The patched forward follows the stock 0.19.x forward stage by stage and only wraps the communication seam:
gate -> encode (E, C, d) -> compress to centroids (E, S, d) -> all-to-all -> experts -> all-to-all
-> expand + residual (E, C, d) -> decode. Layers that are not selected, and eval mode, run the stock forward.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.telemetry import TELEMETRY

from . import engine_monitor
from .versioning import UnsupportedFrameworkError, require_release

SUPPORTED_RELEASES = ("0.19.",)
_ORIGINAL = {}
_STATE = {"config": None}


def _sharded_moe():
    import deepspeed
    from deepspeed.moe import sharded_moe
    require_release("deepspeed", deepspeed.__version__, SUPPORTED_RELEASES)
    for name in ("_route_slots", "_sparse_encode", "_sparse_decode", "_AllToAll", "MOELayer"):
        if not hasattr(sharded_moe, name):
            raise UnsupportedFrameworkError(f"deepspeed {deepspeed.__version__}: sharded_moe.{name} is missing; "
                                            f"lshmoe-plugin supports deepspeed {SUPPORTED_RELEASES[0]}x")
    return sharded_moe


def is_applied() -> bool:
    return bool(_ORIGINAL)


def apply(config: LSHMoEConfig, model: Optional[torch.nn.Module] = None) -> None:
    """Patch ``MOELayer.forward`` (and hook the engine's step to write telemetry to DeepSpeed's monitor).

    With ``model``, its MoE layers are numbered in module order (the indices ``layers`` refers to) and checked
    for unsupported layouts now; layers never seen here are numbered in the order they first run.
    """
    sharded_moe = _sharded_moe()
    if model is not None:
        number_moe_layers(model)
    if _STATE["config"] is not config:
        TELEMETRY.clear()  # stats of an earlier config must not mix with this one's
    _STATE["config"] = config
    if is_applied():
        return
    _ORIGINAL["forward"] = sharded_moe.MOELayer.forward
    sharded_moe.MOELayer.forward = _patched_forward
    engine_monitor.attach(__name__)


def revert() -> None:
    if not is_applied():
        return
    from deepspeed.moe import sharded_moe
    sharded_moe.MOELayer.forward = _ORIGINAL.pop("forward")
    engine_monitor.detach(__name__)
    _STATE["config"] = None
    TELEMETRY.clear()


def number_moe_layers(model: torch.nn.Module) -> int:
    from deepspeed.moe.sharded_moe import MOELayer
    count = 0
    for module in model.modules():
        if isinstance(module, MOELayer):
            _check_layout(module)
            module._lshmoe_index = count
            count += 1
    _STATE["next_index"] = count
    return count


def _check_layout(layer) -> None:
    if layer.use_tutel:
        raise UnsupportedFrameworkError("lshmoe-plugin does not support DeepSpeed MoE with use_tutel=True; "
                                        "allowed: use_tutel=False")
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
    if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
        raise UnsupportedFrameworkError("lshmoe-plugin does not support tensor parallelism around DeepSpeed MoE "
                                        "(tensor-model-parallel world size > 1); allowed: tensor parallel size 1")


def _compressor(layer) -> LSHCompressor:
    config = _STATE["config"]
    compressor = getattr(layer, "_lshmoe_compressor", None)
    if compressor is None or compressor.config is not config:
        if not hasattr(layer, "_lshmoe_index"):
            layer._lshmoe_index = _STATE.get("next_index", 0)
            _STATE["next_index"] = layer._lshmoe_index + 1
        compressor = LSHCompressor(config, layer._lshmoe_index, TELEMETRY)
        layer._lshmoe_compressor = compressor
    return compressor


def _patched_forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    config: LSHMoEConfig = _STATE["config"]
    compressor = _compressor(self)
    active = (config.enabled and config.applies_to_layer(self._lshmoe_index)
              and (self.training or config.compress_in_eval))
    if not active:
        return _ORIGINAL["forward"](self, *input, **kwargs)
    _check_layout(self)
    if config.decide_by_cost:
        if compressor.pays is None:
            compressor.pays = compression_pays(self, compressor, *input)
        if not compressor.pays:
            return _ORIGINAL["forward"](self, *input, **kwargs)
    return _compressed_forward(self, compressor, *input)


def occupied_slots(slots: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool (E, C): which capacity slots hold a routed token; empty slots and dropped routes never cluster."""
    occupied = torch.zeros(num_experts * capacity + 1, dtype=torch.bool, device=slots.device)
    occupied[slots.reshape(-1)] = True  # dropped routes all land on the scratch slot E*C, cut below
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
    centroids, state = compressor.compress_fixed(dispatched, occupied_slots(slots, E, C))

    centroids = _timed_all_to_all(self, centroids, sm.FIRST_ALLTOALL_TIMER, "time_falltoall")
    centroids = centroids.reshape(self.ep_size, self.num_local_experts, -1, d_model)
    expert_output = self.experts(centroids).reshape(self.ep_size * self.num_local_experts, -1, d_model)
    expert_output = _timed_all_to_all(self, expert_output, sm.SECOND_ALLTOALL_TIMER, "time_salltoall")

    expert_output = compressor.decompress_fixed(expert_output, state)
    combined = sm._sparse_decode(expert_output.view(E * C, d_model), slots, gates_, num_tokens)
    if timing:
        self.timers(sm.MOE_TIMER).stop()
        self.time_moe = self.timers(sm.MOE_TIMER).elapsed(reset=False)
    return combined.reshape(input[0].shape)


def measure_exchanges(self, compressor: LSHCompressor, *input: torch.Tensor, repeats: int = 3):
    """Wall time (s) of this layer's stock exchange and of the compressed one, forward and backward, on this step.

    Exchange = all-to-all, experts, all-to-all (plus compress and expand when compressed): the part the plugin
    changes. The backward is timed for the inputs only (autograd.grad), so no parameter gradient is touched;
    most of the expert work compression saves is in the backward, so a forward-only timing would undersell it.
    The gate runs on a forked RNG and nothing is recorded: the real step that follows is exactly what it would
    have been without the measurement.
    """
    import time

    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe import sharded_moe as sm
    accelerator = get_accelerator()
    device = input[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        d_model = input[0].shape[-1]
        with torch.no_grad():
            tokens = input[0].reshape(-1, d_model)
            _, C, E, indices_, locations_, _, _ = self.gate(tokens, input[1] if len(input) > 1 else None, True,
                                                            self.use_tutel)
            C = int(C)
            slots = sm._route_slots(indices_, locations_, E, C)
            dispatched = sm._sparse_encode(tokens, slots, E, C)
            valid = occupied_slots(slots, E, C)

        def exchange(buffer):
            buffer = _all_to_all(self, buffer).reshape(self.ep_size, self.num_local_experts, -1, d_model)
            return _all_to_all(self, self.experts(buffer).reshape(self.ep_size * self.num_local_experts, -1, d_model))

        def stock():
            leaf = dispatched.detach().requires_grad_()
            out = exchange(leaf)
            torch.autograd.grad(out, leaf, torch.ones_like(out))

        def compressed():
            leaf = dispatched.detach().requires_grad_()
            centroids, state = compressor.compress_fixed(leaf, valid, record=False)
            out = compressor.decompress_fixed(exchange(centroids), state)
            torch.autograd.grad(out, leaf, torch.ones_like(out))

        def seconds(fn):
            fn()  # warm-up: kernel compilation and allocator growth stay out of the numbers
            times = []
            for _ in range(repeats):
                accelerator.synchronize()
                start = time.perf_counter()
                fn()
                accelerator.synchronize()
                times.append(time.perf_counter() - start)
            return sorted(times)[len(times) // 2]

        return seconds(stock), seconds(compressed)


def compression_pays(self, compressor: LSHCompressor, *input: torch.Tensor) -> bool:
    """Measure once and decide; all ranks of the expert-parallel group must agree (the shapes must match)."""
    import deepspeed.comm as dist
    from deepspeed.utils import logger
    stock, lsh = measure_exchanges(self, compressor, *input)
    times = torch.tensor([stock, lsh], dtype=torch.float64, device=input[0].device)
    if self.ep_size > 1:
        dist.all_reduce(times, group=self.ep_group)  # summed over the group: one decision for all ranks
    pays = bool(times[1] < times[0])
    logger.info(f"lsh_moe: layer {self._lshmoe_index} compression {'on' if pays else 'off'} "
                f"(exchange fwd+bwd: stock {times[0].item() * 1e3:.2f} ms vs compressed {times[1].item() * 1e3:.2f} ms, "
                f"summed over {self.ep_size} rank(s))")
    return pays


def _all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
    from deepspeed.moe import sharded_moe as sm
    return sm._AllToAll.apply(self.ep_group, tensor) if self.ep_size > 1 else tensor.contiguous()


def _timed_all_to_all(self, tensor: torch.Tensor, timer_name: str, attribute: str) -> torch.Tensor:
    if self.wall_clock_breakdown:
        self.timers(timer_name).start()
    tensor = _all_to_all(self, tensor)
    if self.wall_clock_breakdown:
        self.timers(timer_name).stop()
        setattr(self, attribute, self.timers(timer_name).elapsed(reset=False))
    return tensor
