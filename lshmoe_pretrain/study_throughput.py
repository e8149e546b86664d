"""How fast one device trains a testbed's runs, alone and several at once: what sizes a quality study.

Runs are launched exactly as the study launches them (`quality_study.run_studies`: the deepspeed launcher, one
process per run, stock and LSH-MoE runs mixed), for a few hundred steps. Per run, the median step time after the
first third of its steps gives its tokens/s; the runs of one batch train at once, so their sum is the device's
aggregate. Next to it: the GPU's busy share sampled by nvidia-smi during the batch, and the model FLOPs those tokens
need (6 x active parameters per token, attention scores left out), against which the aggregate shows whether the
arithmetic or the per-step overhead sets the pace.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

from . import quality_study as study
from .models.config import PRESETS, ModelConfig
from .testbed import Testbed


def active_parameters(config: ModelConfig, model_kind: str) -> int:
    """Weights each token multiplies through (the matmuls only): attention projections, dense FFNs, top_k of the
    experts in MoE blocks, the LM head. T5 counts the encoder and the decoder (with its cross-attention); a
    token of either side goes through one of the two stacks, so this is an upper bound for T5."""
    d, ff = config.d_model, config.d_ff
    per_block = []
    stacks = (("encoder", 4), ("decoder", 8)) if model_kind == "t5" else (("decoder", 4),)
    for _, attention in stacks:
        for i in range(config.n_layers):
            ffn = 2 * d * ff * (config.top_k if config.is_moe_layer(i) else 1)
            per_block.append(attention * d * d + ffn)
    return sum(per_block) + d * config.vocab_size


@dataclass
class BatchResult:
    runs: int
    variant_rows: List[tuple]       # (variant, runs, per-run tokens/s, per-run steps/s)
    aggregate_tokens_s: float
    wall_s: float
    gpu_busy: Optional[float]       # mean utilization.gpu over the batch, %, None without nvidia-smi
    model_tflops: float             # aggregate tokens/s x 6 x active parameters


class GpuSampler:
    """nvidia-smi's utilization.gpu once a second in a thread, while a batch runs."""

    def __init__(self) -> None:
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean(self) -> Optional[float]:
        # The first seconds are the launcher and model build, with the GPU idle: leave out the first fifth.
        samples = self.samples[len(self.samples) // 5:]
        return statistics.fmean(samples) if samples else None


def batch_plans(base: study.StudyPlan, runs: int, root: str) -> List[study.StudyPlan]:
    """`runs` runs as the study mixes them: stock and LSH-MoE alternately (seeds 1, 2, ...), in `root`."""
    stock, lsh = math.ceil(runs / 2), runs // 2
    plans = [replace(base, variants=["stock"], seeds=list(range(1, stock + 1)), output_root=root)]
    if lsh:
        plans.append(replace(base, variants=["lsh"], seeds=list(range(1, lsh + 1)), output_root=root))
    return plans


def measure_batch(base: study.StudyPlan, runs: int, root: str, log=print) -> BatchResult:
    shutil.rmtree(root, ignore_errors=True)
    plans = batch_plans(base, runs, root)
    started = time.time()
    with GpuSampler() as sampler:
        study.run_studies(plans, runs, log=log)
    wall = time.time() - started
    steps = base.train_steps()
    rows, aggregate = [], 0.0
    for plan in plans:
        per_run = []
        for seed in plan.seeds:
            records = study.read_metrics(plan.run_dir(plan.variants[0], seed))
            steady = [r["step_time_s"] for r in records if r["step"] > steps // 3 and "step_time_s" in r]
            per_run.append(statistics.median(steady))
        tokens_per_step = base.tokens_per_step()
        tokens_s = [tokens_per_step / t for t in per_run]
        aggregate += sum(tokens_s)
        rows.append((plan.variants[0], len(per_run), statistics.fmean(tokens_s),
                     statistics.fmean(1 / t for t in per_run)))
    config = PRESETS[base.preset]
    tflops = aggregate * 6 * active_parameters(config, base.model_kind) / 1e12
    return BatchResult(runs, rows, aggregate, wall, sampler.mean(), tflops)


def measure(bed: Testbed, concurrencies: Sequence[int], steps: int, root: str, data_prefix: Optional[str],
            data: str = "python-code", vocab_size: int = 16384, base_config: Optional[str] = None,
            log=print) -> List[BatchResult]:
    """One batch per concurrency level, each `steps` steps of the testbed's shape and batch (its learning-rate
    schedule shrunk to those steps, which does not change the step time), evaluation at the end only."""
    base = study.StudyPlan(model_kind=bed.model_kind, preset=bed.preset, variants=["stock"], seeds=[1],
                           train_tokens=steps * bed.micro_batch * bed.seq_len(), output_root=root,
                           base_config=base_config or bed.config(), data=data,
                           data_prefix=data_prefix, vocab_size=vocab_size, micro_batch=bed.micro_batch,
                           lr=bed.lr, evals=1, eval_tokens=2**16, final_eval_tokens=2**16, eval_compressed="off",
                           save_every=10**9)
    return [measure_batch(base, runs, os.path.join(root, f"runs{runs}"), log) for runs in concurrencies]


def table(bed: Testbed, results: Sequence[BatchResult]) -> List[list]:
    """Rows of the throughput table: per variant of each batch, then the batch's aggregate."""
    rows = []
    single = next((r.aggregate_tokens_s for r in results if r.runs == 1), None)
    for r in results:
        busy = f"{r.gpu_busy:.0f}%" if r.gpu_busy is not None else "–"
        for variant, count, tokens_s, steps_s in r.variant_rows:
            rows.append([r.runs, f"{variant} x{count}", f"{tokens_s:,.0f}", f"{steps_s:.1f}", "", "", "", "", ""])
        long_min = (bed.steps * bed.micro_batch * bed.seq_len() * r.runs / r.aggregate_tokens_s) / 60
        rows.append([r.runs, "all runs", "", "", f"{r.aggregate_tokens_s:,.0f}",
                     f"{r.aggregate_tokens_s / single:.2f}x" if single else "–", busy,
                     f"{r.model_tflops:.1f}", f"{long_min:.0f}"])
    return rows


HEADERS = ["runs at once", "runs", "tokens/s per run", "steps/s per run", "aggregate tokens/s",
           "aggregate vs one run", "GPU busy (nvidia-smi)", "model TFLOP/s (6N)",
           "minutes for that many long schedules"]
