"""The optimizer step the plugin's schedules read (`redraw_interval`, `exact_from_step`).

A layer's own forward count is no step count: gradient accumulation runs several forwards per step, and a resumed
run would start counting from zero. The DeepSpeed engine hook (patches/engine_monitor.py) sets the clock to
``engine.global_steps`` after every ``engine.step()``, which a checkpoint restores; training loops without a
DeepSpeed engine (Megatron-core's) call `set_training_step` themselves.
"""
from __future__ import annotations


class TrainingClock:
    """Optimizer steps taken so far (0 before the first)."""

    def __init__(self) -> None:
        self.step = 0

    def set(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"training step must be an integer >= 0, got {step!r}")
        self.step = step


TRAINING_CLOCK = TrainingClock()


def set_training_step(step: int) -> None:
    """Tell the plugin how many optimizer steps have been taken (loops without a DeepSpeed engine)."""
    TRAINING_CLOCK.set(step)


def training_step() -> int:
    return TRAINING_CLOCK.step
