"""The optimizer step the plugin's schedules read (`redraw_interval`, `exact_from_step`, the rotation of
`exact_token_stride`).

A layer's own forward count is no step count: gradient accumulation runs several forwards per step, a resumed run
would start counting from zero, and activation checkpointing and evaluation run forwards that are no training
step at all. The DeepSpeed engine hook (patches/engine_monitor.py) sets the clock from the engine before every
forward and after every ``engine.step()``: its ``global_steps`` (which a checkpoint restores) and the micro-batch
within the step. Training loops without a DeepSpeed engine (Megatron-core's) call `set_training_step` themselves.
"""
from __future__ import annotations


class TrainingClock:
    """Optimizer steps taken so far (0 before the first), and which micro-batch of the next step runs now."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_batch = 0

    def set(self, step: int, micro_batch: int = 0) -> None:
        for name, value in (("training step", step), ("micro-batch", micro_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.step, self.micro_batch = step, micro_batch

    def reset(self) -> None:
        """Back to the start, as in a fresh process: a new run must not inherit the last one's step."""
        self.step = self.micro_batch = 0


TRAINING_CLOCK = TrainingClock()


def set_training_step(step: int, micro_batch: int = 0) -> None:
    """Tell the plugin how many optimizer steps have been taken (loops without a DeepSpeed engine), and optionally
    which micro-batch of the step (gradient accumulation) runs next."""
    TRAINING_CLOCK.set(step, micro_batch)


def training_step() -> int:
    return TRAINING_CLOCK.step


def micro_batch() -> int:
    return TRAINING_CLOCK.micro_batch


def rotation(period: int) -> int:
    """An offset in [0, period) that moves on by one with every optimizer step and every micro-batch within it.

    It reads only the clock, which no forward advances: a recomputation (activation checkpointing, reentrant or
    not) sees the offset its forward saw, and an evaluation neither changes it nor is changed by it. Over `period`
    consecutive steps every micro-batch index meets every offset once.
    """
    return (TRAINING_CLOCK.step + TRAINING_CLOCK.micro_batch) % period
