"""After every ``engine.step()``: sets the plugin's training clock to the engine's optimizer step, writes the
plugin's telemetry through DeepSpeed's monitor, and logs the layers' ``decide_by_cost`` decisions once after the
step that made them.

Shared by the DeepSpeed patches (GShard layer and AutoEP): the hook is installed while at least one of them is
applied and removed with the last, so reverting one patch never strips the other's telemetry.
"""
from __future__ import annotations

from lshmoe_plugin.schedule import set_training_step
from lshmoe_plugin.telemetry import TELEMETRY, write_to_monitor

from .lifecycle import PatchLifecycle

_OWNERS: set = set()
LIFECYCLE = PatchLifecycle("engine_monitor")


def attach(owner: str) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine
    LIFECYCLE.install([(DeepSpeedEngine, "step", _step_then_write_telemetry)])
    _OWNERS.add(owner)


def detach(owner: str) -> None:
    _OWNERS.discard(owner)
    if not _OWNERS:
        LIFECYCLE.restore()


def _step_then_write_telemetry(self, *args, **kwargs):
    from deepspeed.runtime.engine import DeepSpeedEngine
    result = LIFECYCLE.original(DeepSpeedEngine, "step")(self, *args, **kwargs)
    set_training_step(int(self.global_steps))
    write_to_monitor(self, TELEMETRY)
    TELEMETRY.log_decisions()
    return result
