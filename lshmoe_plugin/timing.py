"""Timing on any device: the one timer behind the cost decision (`cost.py`) and the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 20) -> float:
    """Median wall time of fn() in ms: CUDA events around each call on a GPU, a synchronised host clock elsewhere.

    The warm-up runs keep kernel compilation, allocator growth and first-call communicator setup out of it.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
