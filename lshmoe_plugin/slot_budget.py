"""How many slots per expert DeepSpeed's fixed layout sends under error-bounded merging (``clustering: "bounded"``).

The all-to-all's shape (E, S, d) must be known when the layer builds it, yet the slots a batch needs are only known
on the device once it is clustered; reading them back would stop the host in every layer. So S follows the need of
the previous optimizer step, which has long been copied to the host by the time the next step starts.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# S is set from the last step's need before this step's tokens are seen; 10% over it absorbs the step-to-step
# variation of the batches (tokens that still find no slot stay merged and are counted, never dropped) for 1/10
# more bytes than the need.
HEADROOM = 1.1
# S is rounded up to a multiple of capacity / ROUNDING_PARTS: small moves of the need leave the all-to-all's shape
# (and whatever a framework caches per shape) as it was.
ROUNDING_PARTS = 16


def fixed_slots(capacity: int, rate: float) -> int:
    """Centroid slots per expert for a fixed-capacity dispatcher: at least one, none for an empty capacity (LSH
    clustering's S, and the floor of error-bounded merging's)."""
    if capacity <= 0:  # an empty batch: stock sends nothing either
        return 0
    return max(1, math.ceil(rate * capacity - 1e-9))


class SlotBudget:
    """One layer's slots per expert S, and the running need they follow.

    - Every training forward `record`s its need (the most slots one expert needed, agreed across the
      expert-parallel ranks, whose all-to-all must have one shape) into a device tensor that keeps the step's
      maximum, and starts a non-blocking copy of it to a pinned host buffer.
    - The first training forward of the next optimizer step (`slots` with a new step) takes that maximum,
      waiting for the copy's event, which completed long before on a GPU (the rest of the step ran since), and from
      then S = ceil(need * HEADROOM), at least ceil(compression_rate * capacity), at most the capacity, rounded up
      to a multiple of max(1, capacity // ROUNDING_PARTS).
    - S changes only between optimizer steps: every micro-batch of a step, and its recomputation under activation
      checkpointing, which must rebuild the very shapes its forward had, sees the same S. The step is the
      training clock's (lshmoe_plugin.schedule), kept by the DeepSpeed engine hook or `set_training_step`.
    - Until a step has recorded a need (a layer's first step) S is the capacity: every token may have its own
      slot, and none is over budget.
    - Evaluation forwards and trial runs (`slots` without a step, no `record`) read S and change nothing.
    - `state_dict` / `load_state_dict` carry the need, the step and that step's need so far through a checkpoint:
      a resumed run's first step then sends the S the uninterrupted run sends, not the capacity.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.need: Optional[int] = None  # the need S follows (None: none recorded yet, S = capacity)
        self._step: Optional[int] = None  # the step whose forwards `record` now
        self._pending: Optional[torch.Tensor] = None  # that step's largest need so far, on the device
        self._host: Optional[torch.Tensor] = None  # its copy on the host (pinned on a GPU)
        self._copied: Optional[torch.cuda.Event] = None

    def slots(self, capacity: int, step: Optional[int] = None) -> int:
        """S for a buffer of `capacity` slots per expert; `step`: the optimizer step of a training forward (a new
        one takes the last step's need), None for a forward that only reads."""
        if step is not None and step != self._step:
            self._take_pending()
            self._step = step
        return self.slots_for(capacity)

    def slots_for(self, capacity: int) -> int:
        """S from the need taken so far (no state changes)."""
        if capacity <= 0:
            return 0
        if self.need is None:
            return capacity
        wanted = min(max(math.ceil(self.need * HEADROOM - 1e-9), fixed_slots(capacity, self.rate)), capacity)
        unit = max(1, capacity // ROUNDING_PARTS)
        return min(math.ceil(wanted / unit) * unit, capacity)

    def record(self, need: torch.Tensor, agree: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Add a training forward's need (int64 scalar tensor) to its step's; `agree` all-reduces a tensor in
        place with MAX over the expert-parallel group (None: one rank)."""
        need = need.detach().reshape(1).to(torch.long).clone()
        if agree is not None:
            agree(need)
        # .to: a need restored from a checkpoint waits on the host until its step's next forward
        self._pending = need if self._pending is None else torch.maximum(self._pending.to(need.device), need)
        if need.device.type == "cuda":
            if self._host is None:
                self._host = torch.empty(1, dtype=torch.long, pin_memory=True)
                self._copied = torch.cuda.Event()
            self._host.copy_(self._pending, non_blocking=True)
            self._copied.record()

    def state_dict(self) -> dict:
        """The need S follows, the step recording now and its need so far, as ints (a checkpoint; reading the
        pending need back waits for the device, once per checkpoint)."""
        pending = None if self._pending is None else int(self._pending[0])
        return {"need": self.need, "step": self._step, "pending": pending}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Take `state_dict`'s values; None: as new (no need recorded, S = capacity)."""
        state = state or {"need": None, "step": None, "pending": None}
        self.need, self._step = state["need"], state["step"]
        self._pending = None if state["pending"] is None else torch.tensor([state["pending"]], dtype=torch.long)

    def _take_pending(self) -> None:
        if self._pending is None:
            return  # no training forward since the last step: keep the need S follows
        if self._pending.device.type == "cuda":
            self._copied.synchronize()
            self.need = int(self._host[0])
        else:
            self.need = int(self._pending[0])
        self._pending = None
