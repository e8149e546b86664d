"""The DeepSpeed engine's side of the plugin: before every engine forward and after every ``engine.step()`` it sets
the plugin's training clock to the engine's position (optimizer step and micro-batch); after every step it writes
the plugin's telemetry through DeepSpeed's monitor and logs the layers' ``decide_by_cost`` decisions once after
the step that made them; ``save_checkpoint`` and ``load_checkpoint`` carry the plugin's per-layer state
(engine_checkpoint.py).

Shared by the DeepSpeed patches (GShard layer and AutoEP): the hooks are installed while at least one of them is
applied and removed with the last, so reverting one patch never strips the other's telemetry or state.
"""
from __future__ import annotations

from typing import Dict

from lshmoe_plugin.schedule import set_training_step
from lshmoe_plugin.telemetry import TELEMETRY, write_to_monitor

from . import engine_checkpoint
from .lifecycle import PatchLifecycle

_OWNERS: Dict[str, PatchLifecycle] = {}  # the applied DeepSpeed patches, by name; their states go in checkpoints
LIFECYCLE = PatchLifecycle("engine_monitor")


def attach(owner: PatchLifecycle) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine
    _OWNERS[owner.name] = owner
    if LIFECYCLE.is_applied():
        return
    save, load = DeepSpeedEngine.save_checkpoint, DeepSpeedEngine.load_checkpoint
    LIFECYCLE.install([(DeepSpeedEngine, "forward", _sync_clock_then_forward),
                       (DeepSpeedEngine, "step", _step_then_write_telemetry),
                       (DeepSpeedEngine, "save_checkpoint", engine_checkpoint.save_with_plugin_state(save, _OWNERS)),
                       (DeepSpeedEngine, "load_checkpoint", engine_checkpoint.load_with_plugin_state(load, _OWNERS))])


def detach(owner: PatchLifecycle) -> None:
    _OWNERS.pop(owner.name, None)
    if not _OWNERS:
        LIFECYCLE.restore()


def sync_clock(engine) -> None:
    """The clock to `engine`'s position: ``global_steps`` (restored by a checkpoint) and the micro-batch within the
    step, both of which only ``engine.step()`` moves (after the backward, and so after any recomputation)."""
    set_training_step(int(engine.global_steps), int(engine.micro_steps) % int(engine.gradient_accumulation_steps()))


def _sync_clock_then_forward(self, *args, **kwargs):
    # Before the forward too, not only after a step: a new engine, or one just resumed from a checkpoint, would
    # otherwise run its first step on the clock that another engine (or a fresh process) left.
    from deepspeed.runtime.engine import DeepSpeedEngine
    sync_clock(self)
    return LIFECYCLE.original(DeepSpeedEngine, "forward")(self, *args, **kwargs)


def _step_then_write_telemetry(self, *args, **kwargs):
    from deepspeed.runtime.engine import DeepSpeedEngine
    result = LIFECYCLE.original(DeepSpeedEngine, "step")(self, *args, **kwargs)
    sync_clock(self)
    write_to_monitor(self, TELEMETRY)
    TELEMETRY.log_decisions()
    return result
