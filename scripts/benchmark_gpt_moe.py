"""GPT-MoE end to end: step time, tokens/s and loss after the same steps, LSH-MoE on vs off (stock DeepSpeed).

Both models start from the same weights, see the same batches and train through their own DeepSpeed engine in the
same processes; their steps alternate, so both meet the same machine. The batches come from a fixed random
first-order Markov source (4 successors per token): learnable, so the losses after N steps are comparable.

Links no machine here has are modelled: with ``--modelled-link 100gbps 200gbps 400gbps nvlink4 --modelled-ep 8 16
64`` (and ``--experts-per-rank 1``) the run stays one EP=1 process whose model has one rank's shapes, and the link
stand-in (lshmoe_pretrain/link_standin.py) delays the compute stream by the link model's time for each all-to-all
an EP=k rank would make, each crossing priced at the bytes of its wire format; every (EP, link) pair is timed
round-robin with the variants. Its figures are modelled.

Variants: `stock`; `lsh` (the paper's method, lsh_moe defaults), `lsh_eager`, `lsh_decide`; one per other named
method of lshmoe_plugin.methods (`paper_fp8`, `fp8`, `fp8_dispatch`: FP8 on the wire alone and stacked under LSH);
and any variant of the quality study a user could train (`fp8_both`, `fp4_both`, `bounded_0.1`, `rate_0.5`,
`exact_tail_0.15`, ...: lshmoe_pretrain/quality_study.py VARIANTS), with the lsh_moe block the study trains it with
(lshmoe_pretrain/bench_variants.py: what is refused, and how a schedule's rows are computed). Rows, labels and the
section name carry the variants' names.

    python scripts/benchmark_gpt_moe.py                                          # EP=1
    torchrun --nproc_per_node 2 scripts/benchmark_gpt_moe.py                     # EP=2 (gloo if ranks share a GPU)
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo \\
        torchrun --nproc_per_node 2 scripts/benchmark_gpt_moe.py                 # EP=2, emulated inter-node link

Each run prints its table; ``--report docs/benchmarks.md`` also (re)writes its section there, nothing is written
otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_moe_layer import describe_link, setup_distributed  # noqa: E402

import lshmoe_plugin  # noqa: E402
from lshmoe_plugin.methods import METHODS  # noqa: E402
from lshmoe_pretrain import bench_variants  # noqa: E402
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain.bench_variants import METHOD_VARIANTS, PAPER_VARIANTS  # noqa: E402
from lshmoe_pretrain.link_model import DEFAULT_GPUS_PER_NODE, parse_link  # noqa: E402
from lshmoe_pretrain.link_standin import ModelledRuns  # noqa: E402
from lshmoe_pretrain.models import PRESETS, build_gpt_moe  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--n-layers", type=int, default=None, help="override of the preset (MoE in every other block)")
    p.add_argument("--experts-per-rank", type=int, default=None, help="default: the preset's experts / ranks")
    p.add_argument("--vocab", type=int, default=None, help="default: the preset's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--timed-from", type=int, default=10, help="steps before this one are warm-up")
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--variants", nargs="+", default=["stock", "lsh", "lsh_eager"], metavar="VARIANT",
                   help="lsh: lsh_moe defaults (CUDA graphs where possible); lsh_eager: cuda_graphs=false; "
                        "lsh_decide: decide_by_cost=true (with --modelled-link, each layer decides once per link "
                        f"and EP degree); {', '.join(METHOD_VARIANTS)}: lsh_moe.method of that name "
                        "(lshmoe_plugin.methods; --rate applies to the clustered ones); any other name of "
                        "lshmoe_pretrain/quality_study.py VARIANTS: the lsh_moe block the study trains it with "
                        "(--rate and --fp8-block-size do not apply; diagnostic layers are refused)")
    p.add_argument("--fp8-block-size", default="128", metavar="N|row",
                   help="lsh_moe.fp8_block_size of the variants that send FP8 (default 128; row: one scale per row)")
    p.add_argument("--backend", default=None)
    p.add_argument("--report", default=None, metavar="PATH", help="also write the section into this markdown file "
                   "(docs/benchmarks.md holds the published ones); default: print only")
    p.add_argument("--section", default=None)
    p.add_argument("--section-suffix", default="", help="appended to the section's name (e.g. '_mb64' for a run "
                   "whose micro-batch differs from the stage's usual one, so that it does not replace that section)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="after the timed steps, profile 3 more steps of each variant (torch.profiler) and write "
                        "the op tables (by self CPU time and by device time) to PATH")
    p.add_argument("--modelled-link", nargs="+", default=None, metavar="LINK",
                   help="time the EP all-to-all of --modelled-ep ranks as modelled over each LINK: 100gbps, 200gbps, "
                        "400gbps, nvlink4, infinite or custom:<GB/s>:<latency us>[:<half-bandwidth KiB>] "
                        "(docs/link_model.md); one process")
    p.add_argument("--modelled-ep", type=int, nargs="+", default=None, metavar="K",
                   help="the EP degrees --modelled-link models (the model keeps --experts-per-rank, default 1)")
    p.add_argument("--modelled-gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE, metavar="G",
                   help=f"GPUs per node whose EP peers talk over NVLink in the model, one NIC each (default "
                        f"{DEFAULT_GPUS_PER_NODE}, an HGX node; 1: every peer behind the NIC). The section name "
                        f"ends in _g<G>")
    args = p.parse_args()
    check_modelled_flags(p, args)
    args.fp8_block_size = parse_block_size(p, args.fp8_block_size)
    check_variants(p, args)
    return args


def check_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every variant is the benchmark's own or a study variant it can time (with a modelled link: whose exchange
    the stand-in can price); a refusal names the variant, before any model is built. Sets `args.timed`: the study
    variants by the name of the engine that times them."""
    args.timed = {}
    try:
        for name in dict.fromkeys(args.variants):
            if name not in bench_variants.BENCHMARK_VARIANTS:
                variant = bench_variants.study_variant(name)
                args.timed[variant.timed] = variant
        if args.modelled_link:
            for name in engine_names(args):
                if name != "stock":
                    bench_variants.check_priceable(name, ds_config(args, name)["lsh_moe"])
    except bench_variants.VariantError as error:
        parser.error(str(error))


def engine_names(args) -> list:
    """One engine per variant; a schedule's engine times its compressed steps, under their own name."""
    schedules = {variant.name: timed for timed, variant in args.timed.items()}
    return [schedules.get(name, name) for name in dict.fromkeys(args.variants)]


def parse_block_size(parser: argparse.ArgumentParser, value: str):
    if value == "row":
        return value
    try:
        block = int(value)
    except ValueError:
        block = 0
    if block < 1:
        parser.error(f"--fp8-block-size must be 'row' or an integer >= 1, got {value!r}")
    return block


def clustered(variant: str) -> bool:
    """Whether the variant's exchange sends LSH centroids (so that --rate applies to it)."""
    return variant not in METHOD_VARIANTS or METHODS[variant].stages["clustering"] != "none"


def sends_fp8(variant: str) -> bool:
    return variant in METHOD_VARIANTS and "fp8_e4m3" in METHODS[variant].stages.values()


def check_modelled_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad --modelled-* flags end the run here, before any model is built, naming the flag."""
    if bool(args.modelled_link) != bool(args.modelled_ep):
        parser.error("--modelled-link and --modelled-ep go together: give both (e.g. --modelled-link 200gbps "
                     "--modelled-ep 16)")
    for name in args.modelled_link or []:
        try:
            parse_link(name)
        except ValueError as error:
            parser.error(f"--modelled-link: {error}")
    for flag, values in (("--modelled-ep", args.modelled_ep or []), ("--modelled-gpus-per-node",
                                                                     [args.modelled_gpus_per_node])):
        if any(value < 1 for value in values):
            parser.error(f"{flag} must be >= 1, got {' '.join(map(str, values))}")
    if args.modelled_link and int(os.environ.get("WORLD_SIZE", "1")) != 1:
        parser.error(f"--modelled-link models the exchange of an EP=1 run: launch one process (got WORLD_SIZE="
                     f"{os.environ['WORLD_SIZE']})")


def markov_batch(step: int, rank: int, args, device) -> torch.Tensor:
    """(micro_batch, seq_len + 1) token ids from a fixed sparse Markov chain; the same on every run."""
    table = torch.randint(0, args.vocab, (args.vocab, 4), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.empty(args.micro_batch, args.seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, args.vocab, (args.micro_batch,), generator=gen)
    choice = torch.randint(0, 4, (args.micro_batch, args.seq_len), generator=gen)
    for t in range(args.seq_len):
        tokens[:, t + 1] = table[tokens[:, t], choice[:, t]]
    return tokens.to(device)


def ds_config(args, variant: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "lsh_moe": {"enabled": variant != "stock", "method": "paper", "compression_rate": args.rate,
                    "kernel": args.kernel,
                    "telemetry_interval": 0, "cuda_graphs": False if variant == "lsh_eager" else "auto",
                    "decide_by_cost": variant == "lsh_decide"},
    }
    if variant in args.timed:  # the study's block as it trains it; the kernel flag and no telemetry, as every row
        config["lsh_moe"] = {"kernel": args.kernel, **args.timed[variant].block, "telemetry_interval": 0}
    elif variant in METHOD_VARIANTS:
        config["lsh_moe"]["method"] = variant
        if not clustered(variant):  # a method without clustering refuses a rate: it has none
            del config["lsh_moe"]["compression_rate"]
        if sends_fp8(variant):
            config["lsh_moe"]["fp8_block_size"] = args.fp8_block_size
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


class DecisionsPerPair:
    """`decide_by_cost` decides each layer once and keeps it; the modelled runs switch the link under the same
    engine, so each layer's decision is kept per (EP, link) pair: the first step of a pair decides afresh under
    that pair's modelled exchange, later steps of the pair reuse it."""

    def __init__(self):
        self.saved = {}  # (pair, layer index) -> compressor.pays

    @staticmethod
    def compressors(engine):
        from lshmoe_plugin.patches.lifecycle import COMPRESSOR_ATTRIBUTE
        found = (getattr(m, COMPRESSOR_ATTRIBUTE, None) for m in engine.module.modules())
        return [c for c in found if c is not None]

    def restore(self, engine, pair) -> None:
        for compressor in self.compressors(engine):
            compressor.pays = self.saved.get((pair, compressor.layer_index))

    def keep(self, engine, pair) -> None:
        for compressor in self.compressors(engine):
            self.saved[(pair, compressor.layer_index)] = compressor.pays

    def compressing(self, pair) -> str:
        """'k/n': layers that chose compression at this pair."""
        chosen = [pays for (p, _), pays in self.saved.items() if p == pair]
        return f"{sum(bool(pays) for pays in chosen)}/{len(chosen)}"


def use(variant: str, engine, lsh_configs: dict) -> None:
    if variant == "stock":
        lshmoe_plugin.disable()
    else:
        lshmoe_plugin.enable(lsh_configs[variant], engine.module)


def profile_steps(args, engines, lsh_configs, rank: int, device, steps: int = 3) -> None:
    """Where a step's time goes, per variant: the ops by self CPU time (launch-bound code shows here) and by
    device time, and the step's wall time against the device's busy time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sections = []
    for variant, engine in engines.items():
        use(variant, engine, lsh_configs)
        batch = markov_batch(args.steps, rank, args, device)
        bench.synchronize(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                loss = engine(batch[:, :-1], batch[:, 1:])
                engine.backward(loss)
                engine.step()
            bench.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        events = prof.key_averages()
        device_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
        sections.append(f"## {variant}: {wall_ms:.1f} ms wall per profiled step, {device_ms:.1f} ms of device "
                        f"kernels per step\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=30)
                        + "\n\n" + events.table(sort_by="cpu_time_total", row_limit=40)
                        + "\n\n" + (events.table(sort_by="self_device_time_total", row_limit=30)
                                      if device.type == "cuda" else ""))
    lshmoe_plugin.disable()
    if rank == 0:
        with open(args.profile, "w") as f:
            f.write("\n\n".join(sections))
        print(f"wrote {args.profile}")


def modelled_runs(args, device) -> Optional[ModelledRuns]:
    """The (EP, link) pairs of --modelled-link/--modelled-ep (checked in parse_args), or None."""
    if not args.modelled_link:
        return None
    return ModelledRuns(args.modelled_link, args.modelled_ep, args.modelled_gpus_per_node, device)


def modelled_notes(modelled: ModelledRuns) -> str:
    """Rows are named `variant @ link EPk`; each speed-up is against stock at the same link and EP degree."""
    drift = modelled.drift()
    return (" Modelled runs: every row `variant @ link EPk` is timed with the stand-in switched to that link and EP "
            "degree, round-robin with every other row in the same process (each engine therefore takes one optimizer "
            "step per row and step, and the table has no loss columns: rows' losses would follow different numbers "
            "of updates; quality comes from the quality study, docs/quality.md); its speed-up is against `stock` at "
            "the same link and "
            "EP degree, and it includes each step's modelled all-to-alls and the dense gradients' all-reduce. "
            "Labelled modelled: no network was used."
            + (f" The GPU's spin delays ran at {drift:.3f}x their calibrated rate at the end of the run (1: the "
               f"delays lasted what the model says; below 1 they lasted longer)."
               if modelled.device.type == "cuda" else ""))


def compared(args) -> str:
    """What the section's title compares stock with: LSH-MoE at its rate, each named method's variant, and each
    study variant."""
    named = named_variants(args)
    lsh = [v for v in args.variants if v in PAPER_VARIANTS]
    parts = ([f"LSH-MoE rate {args.rate}"] if lsh or not named else []) + [
        f"`{v}`" + (f" (rate {args.rate})" if v in METHOD_VARIANTS and clustered(v) else "") for v in named]
    return ", ".join(parts)


def named_variants(args) -> list:
    """The variants the section's name and title name: all but stock and the paper's at --rate."""
    return [v for v in dict.fromkeys(args.variants) if v != "stock" and v not in PAPER_VARIANTS]


def methods_text(args) -> str:
    """One sentence per method variant: what its stages send (lshmoe_plugin.methods), at which rate and block."""
    sentences = []
    for variant in (v for v in dict.fromkeys(args.variants) if v in METHOD_VARIANTS):
        block = "row" if args.fp8_block_size == "row" else f"{args.fp8_block_size} elements"
        settings = ([f"lsh_moe.method `{variant}`"] + ([f"rate {args.rate}"] if clustered(variant) else [])
                    + ([f"one FP8 scale per {block}"] if sends_fp8(variant) else []))
        sentences.append(f"`{variant}` ({', '.join(settings)}): {METHODS[variant].summary}. ")
    if args.timed:
        sentences.append("The quality-study variants run the lsh_moe block the study trains them with "
                         "(lshmoe_pretrain/quality_study.py `lsh_moe_block`, without the study's output-error probe, "
                         "which measures and changes nothing trained), beside this run's kernel and no telemetry "
                         "(as every row); --rate and --fp8-block-size do not apply to them. ")
        sentences += [variant.describe() + " " for variant in args.timed.values()]
    return "".join(sentences)


def with_schedules(args, rows: list, runs: list, tokens_per_step: int, modelled: bool) -> list:
    """`rows` with, after each schedule's compressed-steps row, the schedule's own row at that link and EP: every
    per-step figure the step-weighted mix of that row's and stock's (bench_variants.schedule_mix), its speed-up
    stock's step over the mix; computed, not timed, as the section's text says. No loss of its own."""
    by_label = {row[0]: row for row in rows}
    out = []
    for row, (variant, pair) in zip(rows, runs):
        out.append(row)
        schedule = args.timed.get(variant)
        if schedule is None or schedule.exact_tail is None:
            continue
        stock = by_label[ModelledRuns.label("stock", pair)]

        def mix(column: int) -> float:
            return bench_variants.schedule_mix(schedule.exact_tail, row[column], stock[column])
        ms = mix(1)
        mixed = (ModelledRuns.label(schedule.name, pair), ms, tokens_per_step / ms * 1e3, stock[1] / ms)
        out.append(mixed + ((mix(4), mix(5), row[6]) if modelled else ("–", "–", "–")))
    return out


def main() -> None:
    args = parse_args()
    rank, world, device, backend, shared = setup_distributed(args)
    import deepspeed
    import torch.distributed as dist
    link, key = describe_link(world, backend, shared)
    modelled = modelled_runs(args, device)
    if modelled:
        args.experts_per_rank = args.experts_per_rank or 1
        link = modelled.describe(args.experts_per_rank)
        # The topology is in the name: sections without it are the 1-GPU-per-node runs of the old link model.
        key = "modelled_ep" + "-".join(map(str, args.modelled_ep)) + f"_g{args.modelled_gpus_per_node}"
    named = named_variants(args)
    if named:  # sections of stock and the paper's variants keep their names; others name their variants
        key += "_" + "+".join(named)
    section = (args.section or f"gpt_moe_{args.preset}_{key}") + args.section_suffix
    preset = PRESETS[args.preset]
    args.vocab = args.vocab or preset.vocab_size
    args.seq_len = args.seq_len or preset.seq_len
    overrides = dict(vocab_size=args.vocab, seq_len=args.seq_len, n_layers=args.n_layers or preset.n_layers,
                     num_experts=args.experts_per_rank * world if args.experts_per_rank else preset.num_experts)
    engines = {}
    if "stock" not in args.variants:
        args.variants = ["stock"] + args.variants  # every ratio is against stock measured in the same run
    for variant in engine_names(args):
        torch.manual_seed(1234)
        model = build_gpt_moe(args.preset, ep_size=world, **overrides)
        config = ds_config(args, variant)
        engines[variant] = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]
        if modelled:
            grad_bytes = torch.empty((), dtype=engines[variant].communication_data_type).element_size()
            modelled.install(variant, engines[variant].module, grad_bytes)
    # Parsed once, outside the timed loop; the patch keeps each layer's compressor while the config is unchanged.
    lsh_configs = {v: lshmoe_plugin.load_config(ds_config(args, v)) for v in engines if v != "stock"}
    runs = [(v, pair) for pair in (modelled.pairs if modelled else [None]) for v in engines]
    times = {ModelledRuns.label(*run): [] for run in runs}
    losses = {label: [] for label in times}
    modelled_ms = {}  # label -> [(all-to-all ms, all-reduce ms) per timed step]
    decisions = DecisionsPerPair()
    for step in range(args.steps):
        batch = markov_batch(step, rank, args, device)
        for variant, pair in runs:
            engine, label = engines[variant], ModelledRuns.label(variant, pair)
            use(variant, engine, lsh_configs)
            if variant == "lsh_decide":
                decisions.restore(engine, pair)
            if modelled:
                modelled.use(variant, pair)
                modelled_before = modelled.standins[variant].modelled_s
            torch.manual_seed(7919 * step + rank)  # the gates' random token selection: same draws for both
            dist.barrier()
            bench.synchronize(device)
            t0 = time.perf_counter()
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            if modelled:  # where DeepSpeed would all-reduce the dense gradients over the data-parallel ranks
                all_reduce_s = modelled.all_reduce(variant, pair)
            engine.step()
            bench.synchronize(device)
            if variant == "lsh_decide":
                decisions.keep(engine, pair)
            if step >= args.timed_from:
                times[label].append((time.perf_counter() - t0) * 1e3)
                if modelled:
                    modelled_ms.setdefault(label, []).append(
                        (1e3 * (modelled.standins[variant].modelled_s - modelled_before), 1e3 * all_reduce_s))
            lm = engine.module.last_lm_loss.float().reshape(1)
            dist.all_reduce(lm)
            losses[label].append(float(lm) / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss " + " ".join(f"{v} {losses[v][-1]:.4f}" for v in losses), flush=True)
    lshmoe_plugin.disable()
    if args.profile:
        profile_steps(args, engines, lsh_configs, rank, device)

    if rank == 0:
        tokens_per_step = args.micro_batch * args.seq_len * world
        rows = []
        for variant, pair in runs:
            label, stock = ModelledRuns.label(variant, pair), ModelledRuns.label("stock", pair)
            ms, stock_ms = statistics.median(times[label]), statistics.median(times[stock])
            last = statistics.mean(losses[label][-5:])
            rows.append((label, ms, tokens_per_step / ms * 1e3, stock_ms / ms, losses[label][-1], last,
                         last / statistics.mean(losses[stock][-5:])))
        headers = ["variant", "step ms", "tokens/s", "speed-up vs stock", f"loss at step {args.steps}",
                   "mean loss, last 5 steps", "loss / stock"]
        if modelled:  # the step times include modelled delays: every timing column says so
            # No loss columns: each engine takes one optimizer step per (link, EP) row, so two rows' losses come
            # after different numbers of updates and compare nothing (quality comes from the quality study).
            headers = headers[:1] + [f"{h} (modelled)" for h in headers[1:4]]
            headers += ["modelled all-to-all ms per step", "modelled dense all-reduce ms per step",
                        "EP peers over NVLink / over the NIC"]
            rows = [row[:4] + tuple(statistics.median(ms) for ms in zip(*modelled_ms[row[0]]))
                    + ("{} / {}".format(*modelled.links[pair[1]].peers(pair[0])),)
                    for row, (_, pair) in zip(rows, runs)]
        rows = with_schedules(args, rows, runs, tokens_per_step, bool(modelled))
        if "lsh_decide" in args.variants:  # what each layer's cost decision chose (under that row's link)
            chosen = {ModelledRuns.label("lsh_decide", pair): decisions.compressing(pair) for _, pair in runs}
            headers = headers + ["layers compressing (decide_by_cost)"]
            rows = [row + (chosen.get(row[0], "–"),) for row in rows]
        table = bench.markdown_table(headers, rows)
        print(table)
        cfg = engines["stock"].module.config
        params = sum(p.numel() for p in engines["stock"].module.parameters())
        ep_text = f"modelled EP={'/'.join(map(str, args.modelled_ep))}" if modelled else f"EP={world}"
        text = bench.header(f"GPT-MoE end to end, {ep_text}: stock DeepSpeed vs {compared(args)}",
                            device, link, "run, link modelled" if modelled else "measured") + (
            f"\nPreset `{args.preset}` ({params / 1e6:.0f}M parameters per rank) with d_model {cfg.d_model}, "
            f"{cfg.n_layers} blocks (MoE every "
            f"{cfg.moe_every}), {cfg.num_experts} experts (top-{cfg.top_k}, capacity factor {cfg.capacity_factor}), "
            f"vocab {cfg.vocab_size}, seq {cfg.seq_len}, micro-batch {args.micro_batch} per rank, {args.dtype}, "
            f"AdamW lr {args.lr}, ZeRO 0, {args.steps} steps (timed from step {args.timed_from}), kernel "
            f"`{args.kernel}`; `lsh` runs the compressor as CUDA graphs where possible (`cuda_graphs` 'auto', "
            f"the default), `lsh_eager` launches it op by op (`cuda_graphs: false`). " + methods_text(args)
            + "Same initial weights, same batches (a fixed sparse Markov source), same gate seeds; "
            "the engines' steps alternate in the same processes."
            + ("" if modelled else " Loss = LM loss averaged over ranks.")
            + (modelled_notes(modelled) if modelled else "") + "\n\n"
            + table + "\n")
        bench.report_section(args.report, section, text)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
