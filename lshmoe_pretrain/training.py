"""The pretraining loop behind scripts/pretrain_gpt_moe.py and scripts/pretrain_t5_moe.py.

The scripts parse arguments, build a model from a preset, call ``lshmoe_plugin.enable`` and
``deepspeed.initialize``; everything else (distributed setup, data, the loop, metrics) is here, checkpoints in
checkpoints.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

import lshmoe_plugin
from lshmoe_plugin.config import ENABLED_ENV_VAR
from lshmoe_plugin.telemetry import TELEMETRY

from . import capture, checkpoints, diagnostics
from .data import (
    Batches,
    EvalBatches,
    GPTSamples,
    IndexedDataset,
    T5Samples,
    cached_preprocess,
    check_vocabulary,
    corpus_digest,
    load_tokenizer,
    special_ids,
    train_valid_split,
)
from .data.corpus import DEFAULT_CORPUS
from .data.preprocess import DEFAULT_CACHE
from .models.config import PRESETS

MONITOR_BLOCKS = ("csv_monitor", "tensorboard", "wandb", "comet")
# An evaluation point reads this many held-out tokens: on the 135M-parameter presets the loss of one point then
# moves by less than 0.1% between disjoint samples (98k tokens from the first files moved it by ~1%).
EVAL_TOKENS = 2**18
# Seeds the gates' random draws in evaluation (DeepSpeed's top-2 gate samples its second expert in eval too), so
# every point, run and variant evaluates with the same draws.
EVAL_SEED = 0x5EED


class PretrainConfigError(ValueError):
    """A bad command line or DeepSpeed config for pretraining; the message names the file or flag."""


def parse_args(model_kind: str, argv=None) -> argparse.Namespace:
    import deepspeed
    parser = argparse.ArgumentParser(description=f"Pretrain {model_kind.upper()}-MoE with DeepSpeed (+ LSH-MoE)")
    add = parser.add_argument
    add("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (lshmoe_pretrain.models.PRESETS)")
    add("--data", default=DEFAULT_CORPUS, help="python-docs (default, offline, small), python-docs+modules, "
        "python-code (offline, ~70M tokens of installed Python source), hf:NAME[:CONFIG], or comma-separated "
        ".txt/.jsonl files or directories")
    add("--data_prefix", default=None, help="an indexed dataset (PREFIX.bin/.idx) from preprocess_data.py; "
        "its tokenizer is PREFIX.tokenizer.json unless --tokenizer is given")
    add("--tokenizer", default=None, help="a tokenizers JSON file; default: BPE trained on the corpus")
    add("--vocab_size", type=int, default=4096, help="vocabulary of the trained BPE tokenizer")
    add("--cache_dir", default=DEFAULT_CACHE, help="where tokenized corpora are cached")
    add("--valid_fraction", type=float, default=0.05)
    add("--train_steps", type=int, default=200, help="optimizer steps in total (a resumed run counts on)")
    add("--eval_interval", type=int, default=50, help="validation loss every N steps (0: never)")
    add("--eval_tokens", type=float, default=EVAL_TOKENS, help="held-out tokens per evaluation point, in samples "
        "spread evenly over the whole validation split, the same ones every time (capped at the split)")
    add("--final_eval_tokens", type=float, default=0, help="held-out tokens of the evaluation after the last step "
        "(0: the whole validation split)")
    add("--eval_iters", type=int, default=None, help="validation micro-batches per evaluation point, instead of "
        "--eval_tokens (still spread over the split)")
    add("--eval_compressed", nargs="?", const="all", default="off", choices=("off", "final", "all"),
        help="with LSH-MoE on, also validate with compress_in_eval at every point (all, the flag alone) or only "
        "after the last step (final); "
        "(recorded as valid_loss_compressed next to the exact-dispatch valid_loss)")
    add("--log_interval", type=int, default=10, help="print a metrics line every N steps")
    add("--save_interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--output_dir", default=None, help=f"run directory (metrics.jsonl, monitor csv, checkpoints); "
        f"default runs/{model_kind}_moe")
    add("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT_DIR/checkpoints")
    add("--lsh_moe", choices=("on", "off"), default=None,
        help=f"override lsh_moe.enabled (over {ENABLED_ENV_VAR} and the config)")
    add("--ep_size", type=int, default=None, help="expert-parallel size; default: the world size")
    add("--diagnostic", default="", help="study-only variants that separate what compression changes "
        f"(lshmoe_pretrain.diagnostics), comma-separated: {', '.join(diagnostics.MODES)}")
    add("--seed", type=int, default=1234)
    add("--init_nudge", type=float, default=0.0,
        help="study-only null perturbation: every initial weight times (1 + INIT_NUDGE * z), z ~ N(0, 1) from a "
        "generator of its own (data order and gate draws stay the seed's); 0 (default): untouched")
    capture.add_arguments(parser)
    add("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    args.model_kind = model_kind
    args.output_dir = args.output_dir or os.path.join("runs", f"{model_kind}_moe")
    if args.deepspeed_config is None:
        parser.error("--deepspeed_config is required (see configs/)")
    if not 0.0 <= args.init_nudge < 1.0:
        parser.error(f"--init_nudge {args.init_nudge}: allowed 0 (off) or a relative size in (0, 1)")
    capture.check_counts(args)
    return args


# A JIT build of an op takes about a minute on a 2-core machine; a lock older than this is no build in progress.
STALE_BUILD_LOCK_S = 600


def refuse_stale_build_lock(extension: str) -> None:
    """Fail, naming the file, where a killed JIT build of `extension` left torch's build lock behind.

    `deepspeed.init_distributed` on the CPU JIT-loads DeepSpeed's shared-memory comm op, and torch guards each
    build directory with a `lock` file that a process killed mid-build never removes; every later rank would
    then wait for it in silence, forever (docs/faults.md).
    """
    from torch.utils.cpp_extension import _get_build_directory  # where torch itself will look for the lock
    lock = os.path.join(_get_build_directory(extension, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_S:
        raise RuntimeError(
            f"{lock} is {age / 60:.0f} minutes old: a JIT build of DeepSpeed's '{extension}' op was killed and "
            f"left torch's build lock behind, so every rank would wait for it forever in init_distributed. "
            f"Delete that file if no build is running (or set TORCH_EXTENSIONS_DIR to another directory).")


def setup(args: argparse.Namespace) -> None:
    """Parse the configs once (``args.ds_config``, ``args.lsh``), then the process group (gloo on CPU, NCCL on
    GPUs), threads, seeds and the default ep_size."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    # A bad config fails before any process group exists, naming the file or key; so does a missing or incomplete
    # checkpoint to resume from.
    args.ds_config = deepspeed_config(args)
    args.lsh = lshmoe_plugin.load_config(args.ds_config, enabled=switch(args.lsh_moe))
    diagnostics.install(diagnostics.parse(args.diagnostic), args.lsh)
    if args.resume:
        checkpoints.resumable_tag(checkpoint_dir(args))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if "RANK" not in os.environ:
        # Started as plain `python script.py`: one rank, instead of DeepSpeed's MPI discovery.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if get_accelerator().device_name() == "cpu":
        refuse_stale_build_lock("deepspeed_shm_comm")
    deepspeed.init_distributed()
    if get_accelerator().device_name() != "cpu":
        # Before the first collective (the data barrier): NCCL must not put every rank on device 0.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif "OMP_NUM_THREADS" not in os.environ:
        # The launcher starts one process per rank on the same cores: share them instead of oversubscribing.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    world = dist.get_world_size()
    args.ep_size = args.ep_size or world
    if world % args.ep_size:
        raise PretrainConfigError(f"--ep_size {args.ep_size} must divide the world size {world}")
    torch.manual_seed(args.seed)


# The nudge's generator: apart from the global one, which sets the initial weights, the data order and the gate
# draws, so a nudged run differs from its seed's run in the initial weights' last digits and nothing else.
NUDGE_SEED_OFFSET = 0x4E0D6E


def nudge_initial_weights(model: torch.nn.Module, relative: float, seed: int) -> None:
    """A null perturbation for the quality study (`--init_nudge`): how far two runs of one seed end apart when
    nothing but a few digits of their initial weights differ, which is the smallest gap a codec's can be told
    from. Every parameter is multiplied by (1 + relative * z), z ~ N(0, 1) drawn on the CPU in parameter order from
    a generator seeded by `seed` alone: every rank draws the same z, so replicated parameters stay replicated, and
    the global generator is not advanced. relative 0: the model is not touched."""
    if not relative:
        return
    generator = torch.Generator().manual_seed(NUDGE_SEED_OFFSET + seed)
    with torch.no_grad():
        for param in model.parameters():
            z = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.mul_((1.0 + relative * z).to(device=param.device, dtype=param.dtype))


def checkpoint_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, "checkpoints")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(args: argparse.Namespace) -> dict:
    """The JSON config with the monitors pointed into the run directory; bad files fail with their name."""
    path = args.deepspeed_config
    if not os.path.isfile(path):
        raise PretrainConfigError(f"DeepSpeed config {path!r} does not exist (see configs/)")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise PretrainConfigError(f"DeepSpeed config {path!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise PretrainConfigError(f"DeepSpeed config {path!r} must hold a JSON object")
    checkpoint = config.get("checkpoint")
    writer = checkpoint.get("writer") if isinstance(checkpoint, dict) else None
    if isinstance(writer, dict) and writer.get("decoupled"):
        # It writes after save_checkpoint returns: `latest` and the manifest (checkpoints.py) could then vouch for
        # files still being written.
        raise PretrainConfigError(f"DeepSpeed config {path!r}: checkpoint.writer.decoupled is not supported by "
                                  f"lshmoe_pretrain (its checkpoints are complete when `latest` names them); "
                                  f"remove it")
    for block in MONITOR_BLOCKS:
        if isinstance(config.get(block), dict) and config[block].get("enabled"):
            config[block]["output_path"] = os.path.join(args.output_dir, "monitor")
            config[block].setdefault("job_name", args.model_kind + "_moe")
    return config


def switch(value: Optional[str]) -> Optional[bool]:
    """``--lsh_moe on|off`` as the `enabled` override of `lshmoe_plugin.load_config` (None: not given)."""
    return None if value is None else value == "on"


@dataclass
class PretrainData:
    train: object          # GPTSamples or T5Samples
    valid: object
    vocab_size: int
    pad_id: int
    digest: str            # corpus_digest of the tokenized corpus: run.json's data_sha256


def load_data(args: argparse.Namespace) -> PretrainData:
    """Tokenized corpus (rank 0 builds the cache, the others wait), split and packed for `args.model_kind`."""
    import torch.distributed as dist
    if args.data_prefix:
        prefix = args.data_prefix
        tokenizer_path = args.tokenizer or prefix + ".tokenizer.json"
    else:
        if dist.get_rank() == 0:
            cached_preprocess(args.data, args.vocab_size, args.tokenizer, args.cache_dir)
        dist.barrier()
        prepared = cached_preprocess(args.data, args.vocab_size, args.tokenizer, args.cache_dir)
        prefix, tokenizer_path = prepared.prefix, prepared.tokenizer_path
    dataset = IndexedDataset(prefix)
    tokenizer = load_tokenizer(tokenizer_path)
    special = special_ids(tokenizer)
    check_vocabulary(dataset, tokenizer.get_vocab_size(), tokenizer_path)
    train, valid = train_valid_split(dataset, args.valid_fraction)
    seq_len = PRESETS[args.preset].seq_len
    if args.model_kind == "gpt":
        samples = (GPTSamples(train, seq_len), GPTSamples(valid, seq_len))
    else:
        samples = tuple(T5Samples(s, seq_len, special["sentinels"], special["eos"], args.seed) for s in (train, valid))
    return PretrainData(samples[0], samples[1], tokenizer.get_vocab_size(), special["pad"],
                        corpus_digest(prefix, tokenizer_path))


def train(engine, data: PretrainData, args: argparse.Namespace) -> Dict[str, float]:
    """Run optimizer steps up to ``args.train_steps``; returns the last metrics record."""
    import torch.distributed as dist
    from tqdm import tqdm
    rank, world = dist.get_rank(), dist.get_world_size()
    # The effective settings (after --lsh_moe / LSHMOE_ENABLED), kept with every checkpoint to compare on resume.
    lsh_moe = args.lsh.to_dict()
    start_step, elapsed_before = load_checkpoint(engine, checkpoint_dir(args), lsh_moe) if args.resume else (0, 0.0)
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    batches = Batches(data.train, micro, accum, rank, world, args.seed)
    # A small validation tail (long sequences, little text) still evaluates, in smaller micro-batches.
    if args.eval_interval and len(data.valid) < world:
        raise PretrainConfigError(f"the validation split holds {len(data.valid)} samples, fewer than the {world} "
                                  f"ranks: raise --valid_fraction, use more data, or pass --eval_interval 0")
    valid = final_valid = None
    args.eval_points_samples = args.final_eval_samples = 0
    if args.eval_interval:
        valid = EvalBatches(data.valid, eval_samples(args, data.valid, micro, world), micro, rank, world)
        final_valid = EvalBatches(data.valid, eval_samples(args, data.valid, micro, world, final=True), micro, rank,
                                  world)
        args.eval_points_samples, args.final_eval_samples = valid.num_samples, final_valid.num_samples
    first = batches.get(0)
    tokens_per_step = (first["input_ids"].numel() + (first["labels"].numel() if args.model_kind == "t5" else 0)) \
        * accum * world
    metrics = MetricsLog(args.output_dir, enabled=rank == 0, resumed_at=start_step if args.resume else None)
    # fp16 scales the loss before the backward; the captured output gradients divide DeepSpeed's scale out.
    loss_scale = engine._get_optimizer_loss_scale if engine.fp16_enabled() else None
    capturer = capture.Capturer(engine.module, args, rank, loss_scale)
    if rank == 0:
        print(run_summary(engine, data, args, world, tokens_per_step), flush=True)
        write_run_info(engine, data, args, world, tokens_per_step)
    # disable=None: rank 0 shows the bar on a terminal only; the log lines below print either way.
    bar = tqdm(total=args.train_steps, initial=start_step, disable=True if rank else None, unit="step")
    started, record = time.perf_counter(), {}
    for step in range(start_step, args.train_steps):
        capturing = capturer.arm(step + 1)
        tick = time.perf_counter()
        loss, aux = train_step(engine, batches, step, args.seed)
        step_time = time.perf_counter() - tick
        if capturing:
            for path in capturer.save(step + 1):
                bar.write(f"captured {path}")
        record = {"step": step + 1, "loss": loss, "aux_loss": aux, "lr": engine.optimizer.param_groups[0]["lr"],
                  "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                  "elapsed_s": elapsed_before + time.perf_counter() - started, **TELEMETRY.summary(),
                  **diagnostics.summary()}
        if args.eval_interval and step + 1 == args.train_steps:
            record.update(validation_losses(engine, final_valid, args, final=True))
        elif args.eval_interval and (step + 1) % args.eval_interval == 0:
            record.update(validation_losses(engine, valid, args))
        metrics.write(record, engine)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if rank == 0 and ((step + 1) % args.log_interval == 0 or "valid_loss" in record):
            bar.write(format_record(record))
        if args.save_interval and (step + 1) % args.save_interval == 0 or step + 1 == args.train_steps:
            save_checkpoint(engine, checkpoint_dir(args), step + 1, record["elapsed_s"], lsh_moe)
    bar.close()
    return record


def compression_summary(lsh) -> str:
    """What the start-up line says of the lsh_moe block: off, or on with its method, and the clustering rate only
    where tokens are clustered (the default method sends every token: a rate there would say it merges a fifth)."""
    if not lsh.enabled:
        return "off"
    rate = f", rate {lsh.compression_rate:g}" if lsh.clustering == "lsh" else ""
    return f"on (method {lsh.method}{rate})"


def run_summary(engine, data: PretrainData, args: argparse.Namespace, world: int, tokens_per_step: int) -> str:
    lsh = args.lsh
    params = sum(p.numel() for p in engine.module.parameters())
    compression = compression_summary(lsh)
    return (f"{args.model_kind.upper()}-MoE preset {args.preset} ({params / 1e6:.1f}M parameters on rank 0), "
            f"{world} rank(s), ep_size {args.ep_size}, LSH-MoE {compression} | "
            f"data {args.data_prefix or args.data}: {len(data.train)} train / {len(data.valid)} valid samples | "
            f"{tokens_per_step} tokens per step | steps {args.train_steps} -> {args.output_dir}")


def train_step(engine, batches: Batches, step: int, seed: int):
    """One optimizer step over the gradient-accumulation micro-batches; (LM loss, aux loss) averaged over ranks."""
    import torch.distributed as dist
    # The gates draw random numbers (random token selection, 2nd-expert sampling): seeding them by step makes a
    # resumed run draw what the uninterrupted one would have.
    torch.manual_seed(seed + 7919 * step + dist.get_rank())
    model = engine.module
    totals = torch.zeros(2)
    for micro_step in range(engine.gradient_accumulation_steps()):
        batch = batches.get(step, micro_step)
        loss = engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device))
        engine.backward(loss)
        engine.step()
        totals += torch.stack([model.last_lm_loss.float().cpu(), model.last_aux_loss.float().cpu()])
    totals /= engine.gradient_accumulation_steps()
    return tuple(all_ranks_mean(totals).tolist())


def eval_samples(args: argparse.Namespace, valid, micro_batch: int, world: int, final: bool = False) -> int:
    """Validation samples an evaluation point reads: --eval_iters batches, else --eval_tokens (the final point
    --final_eval_tokens, 0 for the whole split), at least one per rank and at most the split."""
    if final and not args.final_eval_tokens:
        return len(valid)
    if final:
        tokens = args.final_eval_tokens
    elif args.eval_iters is not None:
        return max(world, args.eval_iters * micro_batch * world)
    else:
        tokens = args.eval_tokens
    per_sample = sum(int(np.asarray(part).size) for part in valid[0]) if args.model_kind == "t5" else valid.length - 1
    return int(min(len(valid), max(world, math.ceil(tokens / per_sample))))


def validation_losses(engine, valid: EvalBatches, args: argparse.Namespace, final: bool = False) -> Dict[str, float]:
    """valid_loss with exact dispatch in eval (the default), and with --eval_compressed (at every point, or at the
    final one) also valid_loss_compressed: the same batches with the compressor on in eval
    (``lshmoe_plugin.compressed_eval``, which keeps every layer's compressor and ``decide_by_cost`` decision)."""
    losses = {"valid_loss": evaluate(engine, valid), "valid_samples": valid.num_samples}
    wanted = args.eval_compressed == "all" or (final and args.eval_compressed == "final")
    if wanted and args.lsh.enabled:
        with lshmoe_plugin.compressed_eval():
            losses["valid_loss_compressed"] = evaluate(engine, valid)
    return losses


def write_run_info(engine, data: PretrainData, args: argparse.Namespace, world: int, tokens_per_step: int) -> None:
    """OUTPUT_DIR/run.json: what was trained on what, for reports that aggregate runs (compare_quality.py)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    device = accelerator.device_name()
    if device == "cuda":
        device = torch.cuda.get_device_name()
    info = {"model_kind": args.model_kind, "preset": args.preset, "seed": args.seed, "world_size": world,
            "ep_size": args.ep_size, "train_steps": args.train_steps, "tokens_per_step": tokens_per_step,
            "parameters": sum(p.numel() for p in engine.module.parameters()), "device": device,
            "data": args.data_prefix or args.data, "data_sha256": data.digest,
            "train_tokens": int(len(data.train.stream)),
            "valid_tokens": int(len(data.valid.stream)), "vocab_size": data.vocab_size,
            "lsh_moe": args.lsh.to_dict(), "diagnostic": args.diagnostic,
            **({"init_nudge": args.init_nudge} if args.init_nudge else {}),
            "eval_samples": {"point": args.eval_points_samples, "final": args.final_eval_samples},
            "torch": torch.__version__,
            # Intra-op threads change a CPU run's reduction order: same-seed pairs are bitwise only at equal counts.
            "cpu_threads": torch.get_num_threads()}
    with open(os.path.join(args.output_dir, "run.json"), "w") as f:
        json.dump(info, f, indent=1)


@torch.no_grad()
def evaluate(engine, valid: EvalBatches) -> float:
    """Mean LM loss per target token (no gate loss) over every batch of `valid`, on every rank.

    The gates draw their random numbers from a generator seeded per batch, inside a forked RNG state, so every
    evaluation sees the same draws and training continues from the state it had.
    """
    from deepspeed.accelerator import get_accelerator
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # summed loss x tokens, tokens
    devices = [torch.cuda.current_device()] if get_accelerator().device_name() == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i in range(len(valid)):
            batch = valid.get(i)
            torch.manual_seed(EVAL_SEED + i)
            engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device))
            tokens = batch["labels"].numel()
            totals += torch.tensor([float(engine.module.last_lm_loss) * tokens, tokens], dtype=torch.float64)
    engine.train()
    summed = all_ranks_mean(totals)
    return float(summed[0] / summed[1])


def all_ranks_mean(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    # NCCL reduces only device tensors; gloo takes CPU ones.
    on_device = values.to(get_accelerator().current_device_name())
    dist.all_reduce(on_device)
    return on_device.cpu() / dist.get_world_size()


def format_record(record: Dict[str, float]) -> str:
    line = (f"step {record['step']:5d} | loss {record['loss']:.4f} | aux {record['aux_loss']:.4f} | "
            f"{record['step_time_s'] * 1000:.0f} ms/step | {record['tokens_per_s']:.0f} tok/s")
    if "valid_loss" in record:
        line += f" | valid loss {record['valid_loss']:.4f}"
    if "valid_loss_compressed" in record:
        line += f" (compressed eval {record['valid_loss_compressed']:.4f})"
    if "lsh_moe/mean/compression_rate" in record:
        line += f" | lsh rate {record['lsh_moe/mean/compression_rate']:.3f}"
    return line


class MetricsLog:
    """Per-step records to OUTPUT_DIR/metrics.jsonl and, as events, to DeepSpeed's monitor (csv/tensorboard)."""

    def __init__(self, output_dir: str, enabled: bool, resumed_at: Optional[int] = None) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resumed_at is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        elif os.path.exists(self.path):
            # Steps logged after the checkpoint by a run that then died are trained again: drop them, so the file
            # holds each step once, as the resumed run computes it.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_at]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def write(self, record: Dict[str, float], engine) -> None:
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            names = {"loss": "Train/lm_loss", "aux_loss": "Train/aux_loss", "step_time_s": "Train/step_time_s",
                     "tokens_per_s": "Train/tokens_per_s", "valid_loss": "Valid/lm_loss"}
            monitor.write_events([(name, record[key], engine.global_samples) for key, name in names.items()
                                  if key in record])
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_checkpoint(engine, directory: str, step: int, elapsed_s: float, lsh_moe: dict) -> None:
    checkpoints.save(engine, directory, step, {"step": step, "elapsed_s": elapsed_s, "lsh_moe": lsh_moe})


def load_checkpoint(engine, directory: str, lsh_moe: dict):
    """(step, elapsed seconds) of the checkpoint `latest` names in `directory`; a missing or incomplete one is an
    error, not a restart. Prints on rank 0 how the lsh_moe settings differ from the checkpoint's."""
    import torch.distributed as dist
    tag_dir, client_state = checkpoints.load(engine, directory)
    if dist.get_rank() == 0:
        print(checkpoints.lsh_moe_resume_line(tag_dir, client_state.get("lsh_moe"), lsh_moe), flush=True)
    return int(client_state["step"]), float(client_state.get("elapsed_s", 0.0))
