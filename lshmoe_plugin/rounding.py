"""Stochastic rounding for the scaled wire formats (lshmoe_plugin.wire): a value rounds to one of its two neighbours
on the format's grid with the probabilities that make the rounding unbiased, E[Q(y)] = y.

Why: round-to-nearest in FP4 moves every gradient element the same way each time it meets the same value, and over
a long run that bias accumulates; stochastic rounding trades it for variance (NVIDIA's NVFP4 pretraining recipe,
Tseng et al. 2025, "Training LLMs with MXFP4", round gradients this way).

Where the uniforms come from: not torch's generator. Drawing from it would shift every later random draw of the
model against a stock run of the same seed, and a generator call cannot be captured in a CUDA graph the way a plain
kernel can. Instead each element's uniform is a counter-based hash (`hash32`) of its index in the tensor and of a
per-format, per-device draw counter (`DrawCounters`), a small int64 device tensor advanced in place after every
draw: shape-static, no host synchronisation, fresh bits on every call (a graph replay included), and the same bits on
CPU and CUDA. The plugin's checkpoint state keeps the counts (lshmoe_plugin.plugin_state), so a resumed run draws
what the uninterrupted one would. The hash is built from int64 torch ops that never overflow (every step masked to
32 bits, products split into 16-bit halves), so a Triton kernel with uint32 arithmetic reproduces it bit for bit.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

MASK32 = 0xFFFFFFFF
SEED = 0x2545F491  # a fixed constant of the wire formats (not lsh_moe.seed, which seeds the LSH projections)
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the key space
UNIFORM_BITS = 24  # what a float32 in [0, 1) holds exactly


def mul32(a: torch.Tensor, factor) -> torch.Tensor:
    """a * factor mod 2^32, a int64 in [0, 2^32) and factor an int or an int64 tensor in [0, 2^32): the factor split
    into 16-bit halves so that no product exceeds 2^48 (int64 never overflows), as uint32 multiplication wraps in a
    kernel."""
    low = a * (factor & 0xFFFF)
    high = a * (factor >> 16)
    high &= 0xFFFF
    high <<= 16
    low += high
    return low.bitwise_and_(MASK32)


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser, a bijection of [0, 2^32) in which every input bit flips each output bit with
    probability about 1/2. h int64 in [0, 2^32), returned likewise (h itself is left as it is)."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def hash32(index: torch.Tensor, counter: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """32 random-looking bits (int64 in [0, 2^32)) per element of `index` (int64 >= 0), for draw `counter` (an int64
    tensor of one element, >= 0): with lo/hi the low and high 32 bits, arithmetic mod 2^32,

        k = fmix32(fmix32(hi(counter) ^ seed) ^ lo(counter) * GOLDEN)   the draw's offset
        m = fmix32(k ^ GOLDEN) | 1                                       the draw's odd multiplier
        h = fmix32((lo(index) * m + k) ^ hi(index))

    One round per element, through an affine map of the index that differs per draw: within a draw it is a bijection
    of [0, 2^32), so no two elements (fewer than 2^32) share their bits, and two draws share a value about as often
    as independent random draws would. Not fmix32(index ^ k) or fmix32(index + k): there two draws whose keys differ
    only in their low bits would send the same inputs, permuted or shifted, through the same bijection."""
    offset = fmix32(fmix32((counter >> 32) ^ (seed & MASK32)) ^ mul32(counter & MASK32, GOLDEN))
    multiplier = fmix32(offset ^ GOLDEN) | 1
    h = mul32(index & MASK32, multiplier)
    h += offset
    h &= MASK32
    h ^= index >> 32
    return fmix32(h)


def uniforms(shape: torch.Size, counter: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), multiples of 2^-24, one per element of a tensor of `shape` (the element's flat
    index hashed with `counter`), on the counter's device."""
    index = torch.arange(shape.numel(), dtype=torch.int64, device=counter.device).view(shape)
    return (hash32(index, counter) >> (32 - UNIFORM_BITS)).float() * 2.0**-UNIFORM_BITS


def steps_of(magnitude: torch.Tensor, spacing: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """|y| / spacing (float32; the grid's spacing where |y| lies, a power of two) rounded to the integer below or the
    one above, up with probability its fractional part: E[steps] * spacing = |y| up to the uniform's granularity
    (2^-24 of a spacing). Exact: dividing by a power of two and taking the fraction lose nothing. A value on the grid
    never moves (its fraction is 0); NaN stays NaN."""
    scaled = magnitude / spacing
    steps = scaled.floor()
    return steps + (uniform < scaled - steps)


def one_name(device: torch.device) -> torch.device:
    """The device as a tensor on it names itself: "cuda" becomes "cuda:<current device>" and "cpu:0" becomes
    "cpu". torch.device("cuda") and a tensor's torch.device("cuda", 0) are different dictionary keys, so without
    this a counter set through one name is not the counter an encode on the same GPU reads."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def rank_start() -> int:
    """Where this process's counters start: its rank << 32 (0 without a process group)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (torch.distributed.get_rank() if distributed else 0) << 32


class DrawCounters:
    """One draw counter per device: an int64 tensor of one element that `draw` reads and then advances in place,
    so a captured CUDA graph advances it on every replay. A device's counter starts at the process's rank << 32:
    each rank draws its own bits (ranks' gradients meet in the experts' weight gradients, where shared bits would
    correlate their rounding errors).

    A checkpoint keeps the draws made on each device (`state_dict`: the counter less its start, so equal counts on
    every rank give equal states), and a resumed run's counters continue from them (`load_state_dict`): the same
    rank then draws the same bits as the uninterrupted run. Restoring writes a counter that exists in place (no
    host synchronisation; a CUDA graph that reads it stays valid) and leaves the others to be made at their first
    draw, from the restored count.
    """

    def __init__(self) -> None:
        self._counters: Dict[torch.device, torch.Tensor] = {}
        self._starts: Dict[torch.device, int] = {}  # each counter's start: the rank << 32 it was made under
        self._restored: Dict[str, int] = {}  # draws of a loaded state whose device has no counter yet, by name

    def counter(self, device: torch.device) -> torch.Tensor:
        """The device's counter, created on first use: what a fused kernel reads for its draw, after which the
        caller advances it by 1 on the same stream, as `draw` does (kernels/wire_fp4_triton.py)."""
        device = one_name(torch.device(device))
        if device not in self._counters:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # created inside a capture, its initial value would be written again on every replay
                raise RuntimeError("stochastic rounding's first draw on a device must run before a CUDA graph "
                                   "captures it (a warm-up step creates its draw counter)")
            self._starts[device] = start = rank_start()
            self._counters[device] = torch.full((), start + self._take_restored(device), dtype=torch.int64,
                                                device=device)
        return self._counters[device]

    def draw(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """uniforms (`shape`, float32 on `device`) of the device's next draw."""
        counter = self.counter(device)
        drawn = uniforms(shape, counter)
        counter.add_(1)
        return drawn

    # -- checkpoints (lshmoe_plugin.plugin_state) -----------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        """The draws made on each device, by its name ("cpu", "cuda:0"), a restored count whose device has not drawn
        since included. Reads every counter back to the host: for a checkpoint's save, not for a training step."""
        state = dict(self._restored)
        state.update((str(device), int(counter.item()) - self._starts[device])
                     for device, counter in self._counters.items())
        return dict(sorted(state.items()))

    def load_state_dict(self, state: Optional[Mapping[str, int]]) -> None:
        """Continue from `state_dict`'s draws; None: from the start, as a new process's counters. A counter that
        exists is written in place, on its stream (no host synchronisation); one made later takes its count then.

        A count saved on another device than the one that draws now goes to it by device type, then to any:
        - the same device name: its own count;
        - else a device of the same type (a rank placed on another GPU index): the largest count saved for that type;
        - else any (a CPU run resumed on a GPU, or the reverse): the largest count saved.
        Each saved count continues on one device only. A process draws on one device in every framework here, so
        its one count continues there, after the last draw it made, and the hash gives the bits it gives on the
        device that saved it. The rank is not saved: a counter starts at this process's rank << 32 plus the count,
        so each rank continues its own stream, and on another world size (where every rank takes the same state,
        patches/engine_checkpoint.py) the ranks' streams stay apart."""
        self._restored = {str(name): int(draws) for name, draws in (state or {}).items()}
        start = rank_start()
        types = {torch.device(name).type for name in self._restored}
        # the counters with a count of their own name first, then those with one of their type, then the rest
        for device in sorted(self._counters, key=lambda d: (str(d) not in self._restored, d.type not in types, str(d))):
            self._starts[device] = start
            self._counters[device].fill_(start + self._take_restored(device))

    def _take_restored(self, device: torch.device) -> int:
        """The restored count `device` continues from (0: none), taken out of those left (load_state_dict's rule)."""
        if not self._restored:
            return 0
        name = str(device)
        if name not in self._restored:
            same_type = [key for key in self._restored if torch.device(key).type == device.type]
            name = max(same_type or self._restored, key=lambda key: (self._restored[key], key))
        return self._restored.pop(name)
