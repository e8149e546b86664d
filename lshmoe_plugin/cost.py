"""`decide_by_cost`: measure once whether compressing a layer's exchange makes it faster, and keep the answer.

Framework-independent: a patch hands over its stock and compressed exchange (all-to-all, experts, all-to-all,
plus compress and expand when compressed), each a function that runs forward and input backward on this step's
tokens, and a way to sum the two timings over its expert-parallel group. Most of the expert work compression
saves is in the backward, so a forward-only timing would undersell it. The exchanges run on forked RNG states
and record no telemetry, so the real step that follows is exactly what it would have been without the trial.

Only training decides: an eval-mode forward never measures (`measures_now`), and a layer that has not decided
yet runs stock there.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import torch

from .compressor import LSHCompressor
from .telemetry import CostDecision
from .timing import time_ms

logger = logging.getLogger("lshmoe_plugin")
TRIAL_REPEATS = 3


def measures_now(compressor: LSHCompressor, training: bool) -> bool:
    """Whether this forward decides the layer: its first one in training mode.

    Evaluation must not decide: it would time a batch that trains nothing, usually under no_grad, and the
    decision would then hold for training too.
    """
    return compressor.pays is None and training


def measure(stock: Callable[[], None], compressed: Callable[[], None], device: torch.device,
            repeats: int = TRIAL_REPEATS) -> Tuple[float, float]:
    """Median ms of each exchange after one warm-up run, the RNG state restored afterwards."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return (time_ms(stock, device, warmup=1, reps=repeats),
                time_ms(compressed, device, warmup=1, reps=repeats))


def decide(compressor: LSHCompressor, stock: Callable[[], None], compressed: Callable[[], None],
           device: torch.device, sum_over_group: Optional[Callable[[torch.Tensor], None]] = None,
           ranks: int = 1) -> bool:
    """Set and return ``compressor.pays``: True where the compressed exchange is faster; the decision goes to the
    compressor's telemetry (`CostDecision`), which the DeepSpeed patches log once after the step.

    `sum_over_group` all-reduces a (2,) tensor in place over the expert-parallel group, so every rank takes the
    same decision (their all-to-alls must keep matching shapes); None on a single rank.
    """
    # The trial times a backward, so it needs autograd even inside a training-mode no_grad forward (the first
    # pass of reentrant activation checkpointing, whose recomputation must then take the same branch).
    with torch.enable_grad():
        times = torch.tensor(measure(stock, compressed, device), dtype=torch.float64, device=device)
    if sum_over_group is not None:
        sum_over_group(times)
    stock_ms, compressed_ms = times.tolist()
    compressor.pays = compressed_ms < stock_ms
    compressor.decision = CostDecision(compressor.layer_index, compressor.pays, stock_ms, compressed_ms, ranks)
    compressor.telemetry.record_decision(compressor.decision)
    logger.info(f"lsh_moe: layer {compressor.layer_index} compression {'on' if compressor.pays else 'off'} "
                f"(exchange fwd+bwd: stock {stock_ms:.2f} ms vs compressed {compressed_ms:.2f} ms, summed over "
                f"{ranks} rank(s))")
    return compressor.pays
