"""Quality study: does LSH-MoE train to the same validation loss as stock DeepSpeed MoE at equal tokens?

`run` trains each variant with each seed through the real deepspeed launcher (EP=1, several jobs at once on one
device with --concurrency), skipping finished runs and resuming interrupted ones, so a study can be spread over
several calls. `report` aggregates finished runs into tables and plots (mean and seed spread of the validation
loss at each evaluated token count, gap to stock, compressed vs exact evaluation) and writes docs/quality.md.
`frontier` puts every candidate of a testbed's long schedule on the curve of final gap against all-to-all bytes,
checks each against issue 24's rule for the default, and says which one the rule chooses (lshmoe_pretrain.frontier).

    # GPU: 3 seeds x (stock, LSH, LSH without error compensation), ~135M-parameter GPT-MoE, 20M tokens each
    python scripts/compare_quality.py run --model gpt --preset gpt-moe-135m --seeds 1 2 3 \\
        --variants stock lsh lsh_no_ec --tokens 20e6 --concurrency 3 --root runs/quality
    python scripts/compare_quality.py report --model gpt --root runs/quality --section gpt_main \\
        --variants stock lsh lsh_no_ec

    # issue 24: every candidate at the long schedule against the rule, and the default it chooses
    python scripts/compare_quality.py frontier --testbed gpt-25m-long --root runs/testbed \\
        --section testbed_gpt_25m_frontier --report docs/quality.md

    # CPU smoke run (tiny model, default corpus)
    DS_ACCELERATOR=cpu python scripts/compare_quality.py run --model gpt --preset tiny --data python-docs \\
        --vocab_size 4096 --base_config configs/gpt_moe_cpu.json --micro_batch 8 --tokens 2e5 --seeds 1 \\
        --variants stock lsh --root runs/quality_cpu
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lshmoe_plugin.methods import DEFAULT_METHOD  # noqa: E402
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import default_choice as choice  # noqa: E402
from lshmoe_pretrain import frontier as frontiers  # noqa: E402
from lshmoe_pretrain import (
    length_study,  # noqa: E402
    seed_scatter,  # noqa: E402
    study_throughput,  # noqa: E402
)
from lshmoe_pretrain import quality_study as study  # noqa: E402
from lshmoe_pretrain import testbed as beds  # noqa: E402

TITLES = {
    "gpt_main": "GPT-MoE: stock vs LSH-MoE vs LSH-MoE without error compensation",
    "gpt_ablations": "GPT-MoE ablations (one seed): compression rate, number of hashes, hash family",
    "t5_main": "T5-MoE: stock vs LSH-MoE",
    "cpu_gpt_main": "GPT-MoE mini (CPU): stock vs LSH-MoE over complete schedules",
    "cpu_gpt_mechanism": "GPT-MoE mini (CPU): what compression changes, separated (one seed)",
    "cpu_gpt_methods": "GPT-MoE mini (CPU): methods against the gap (one seed)",
    "cpu_gpt_rates": "GPT-MoE mini (CPU): final gap against all-to-all bytes (one seed)",
    "cpu_gpt_controls": "GPT-MoE mini (CPU): the controls, rate 1.0 and random clusters at LSH-MoE's budget",
    "cpu_t5": "T5-MoE mini (CPU): stock vs LSH-MoE, and what makes LSH-MoE lower (one seed)",
    "gpu_gpt_135m_mechanism": "GPT-MoE-135M (H200): LSH-MoE against stock, and what the compensation's backward "
                              "path is worth",
    "testbed_gpt_25m_x1": "Testbed `gpt-25m-long` (H200), the long schedule: stock (3 seeds), LSH-MoE (3 seeds) and "
                          "the control rate 1.0",
    "testbed_gpt_25m_pinned_x1": "Testbed `gpt-25m-long` (H200 and H100, the pinned corpus), the long schedule: "
                                 "stock (3 seeds), the paper's configuration, the control rate 1.0 and the "
                                 "per-token wire formats",
    "testbed_gpt_72m_pinned_x1": "Testbed `gpt-72m-long` (H100, the pinned corpus), the long schedule: stock (3 "
                                 "seeds), FP4 both ways (3 seeds), FP8 forward with FP4 gradients, the paper's "
                                 "configuration, its compensation's backward path and the control rate 1.0",
    "testbed_t5_26m_pinned_x1": "Testbed `t5-26m-long` (H100, the pinned corpus), the long schedule: stock (3 "
                                "seeds), the per-token wire formats (3 seeds), the paper's configuration, its "
                                "compensation's halves and the control rate 1.0",
    "testbed_gpt_25m_1pass_x1": "Testbed `gpt-25m-1pass` (within one pass over the pinned corpus), the long "
                                "schedule: stock (3 seeds) and the candidates",
    "testbed_gpt_72m_1pass_x1": "Testbed `gpt-72m-1pass` (within one pass over the pinned corpus), the long "
                                "schedule: stock (3 seeds) and the candidates",
    "testbed_t5_26m_1pass_x1": "Testbed `t5-26m-1pass` (within one pass over the pinned corpus), the long "
                               "schedule: stock (3 seeds) and the candidates",
    "testbed_gpt_72m_1pass_lr1p5x": "Testbed `gpt-72m-1pass` at 1.5x the study's peak learning rate: the default "
                                    "against stock at that rate (--baseline stock_lr1.5x), beside both at the "
                                    "study's rate",
    "testbed_gpt_25m_1pass_lr1p5x": "Testbed `gpt-25m-1pass` at 1.5x the study's peak learning rate: the default "
                                    "against stock at that rate (--baseline stock_lr1.5x), beside both at the "
                                    "study's rate",
    "testbed_gpt_25m_1pass_lr2x": "Testbed `gpt-25m-1pass` at 2x the study's peak learning rate, its tuned rate: the "
                                  "default and its nearest-rounded twin against stock at that rate (--baseline "
                                  "stock_lr2x), beside all three at 1.5x and the study's rate",
    "testbed_gpt_25m_1pass_null_early_x1":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at the study's peak learning rate, read at "
        "step 3,355 of 3,663: the null control and the default against stock at that rate (runs the device time "
        "cut included; an early reading, not the rule's)",
    "testbed_gpt_25m_1pass_null_early_lr1p5x":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at 1.5x the study's peak learning rate, read at "
        "step 3,355 of 3,663: the null control and the default against stock at that rate (runs the device time "
        "cut included; an early reading, not the rule's)",
    "testbed_gpt_25m_1pass_null_early_lr2x":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at 2x the study's peak learning rate, read at "
        "step 3,355 of 3,663: the null control and the default against stock at that rate (runs the device time "
        "cut included; an early reading, not the rule's)",
    "testbed_gpt_25m_1pass_null_final_x1":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at the study's peak learning rate: the null control and the "
        "default against stock at that rate, finished schedules",
    "testbed_gpt_25m_1pass_null_final_lr1p5x":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at 1.5x the study's peak learning rate: the null control and the "
        "default against stock at that rate, finished schedules",
    "testbed_gpt_25m_1pass_null_final_lr2x":
        "Testbed `gpt-25m-1pass` (1 H100 under MPS) at 2x the study's peak learning rate: the null control and the "
        "default against stock at that rate, finished schedules",
    "testbed_gpt_72m_1pass_null_final_x1":
        "Testbed `gpt-72m-1pass` at the study's peak learning rate: the null control and the candidates against "
        "stock, finished schedules",
    "testbed_t5_26m_1pass_null_final_x1":
        "Testbed `t5-26m-1pass` at the study's peak learning rate: the null control and the candidates against "
        "stock, finished schedules",
    "testbed_t5_26m_1pass_lr1p5x": "Testbed `t5-26m-1pass` at 1.5x the study's peak learning rate: the default "
                                   "against stock at that rate (--baseline stock_lr1.5x), beside both at the "
                                   "study's rate",
    "proxy_gpt_mini_lr1p5x": "CPU proxy `gpt-mini-long-cpu` (not the testbed) at 1.5x the study's peak learning "
                             "rate: the default against stock at that rate (--baseline stock_lr1.5x), beside both at "
                             "the study's rate",
    "proxy_gpt_mini_lr2x": "CPU proxy `gpt-mini-long-cpu` (not the testbed) at 2x the study's peak learning rate: "
                           "the default and the null control against stock at that rate (--baseline stock_lr2x), "
                           "beside stock at the study's rate and at 1.5x",
    "proxy_t5_mini_lr1p5x": "CPU proxy `t5-mini-long-cpu` (not the testbed) at 1.5x the study's peak learning rate: "
                            "the default against stock at that rate (--baseline stock_lr1.5x), beside both at the "
                            "study's rate",
    "proxy_gpt_mini_x1": "CPU proxy `gpt-mini-long-cpu` (not the testbed), the long schedule: stock, the paper's "
                         "configuration, the candidates and the controls",
    "proxy_t5_mini_x1": "CPU proxy `t5-mini-long-cpu` (of `t5-26m-long`, not the testbed), the long schedule: "
                        "stock, the paper's configuration, what its compensation's two halves do, its backward path "
                        "without compression, stock at higher learning rates, and the formats",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the variants x seeds that have not finished")
    run.add_argument("--testbed", default=None,
                     help=f"a long-schedule testbed preset ({', '.join(beds.TESTBEDS)}): model, preset, batch, "
                          "schedule, learning rate and evaluation from lshmoe_pretrain.testbed; the flags those set "
                          "are refused with it")
    run.add_argument("--lengths", type=float, nargs="+", default=[1.0],
                     help="with --testbed: complete schedules as fractions of its long one, each with its own "
                          "warm-up and decay (e.g. 1 0.5 0.125); runs go to ROOT/TESTBED/x<length>")
    run.add_argument("--model", choices=("gpt", "t5"), default=None, help="default gpt")
    run.add_argument("--preset", default=None, help="default gpt-moe-135m")
    run.add_argument("--variants", nargs="+", default=["stock", "lsh", "lsh_no_ec"],
                     help=f"any of {sorted(study.VARIANTS)}")
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    run.add_argument("--tokens", type=float, default=None, help="training tokens per run (default 20e6)")
    run.add_argument("--root", default="runs/quality")
    run.add_argument("--base_config", default=None, help="default: configs/{model}_moe_gpu.json")
    run.add_argument("--data", default="python-code")
    run.add_argument("--data_prefix", default=None,
                     help="a preprocessed PREFIX.bin/.idx with PREFIX.tokenizer.json (scripts/preprocess_data.py), "
                          "used instead of --data")
    run.add_argument("--vocab_size", type=int, default=16384)
    run.add_argument("--micro_batch", type=int, default=None, help="default 32")
    run.add_argument("--lr", type=float, default=None, help="default 6e-4")
    run.add_argument("--evals", type=int, default=None, help="validation points per run (default 10)")
    run.add_argument("--eval_tokens", type=float, default=None,
                     help="held-out tokens per validation point, spread over the whole split (default 2**18)")
    run.add_argument("--final_eval_tokens", type=float, default=0,
                     help="held-out tokens of the final validation point (0: the whole split)")
    run.add_argument("--eval_compressed", choices=("off", "final", "all"), default="final",
                     help="also evaluate with compress_in_eval (valid_loss_compressed): at the final point only "
                          "(default), at every point, or never")
    run.add_argument("--save_every", type=int, default=0,
                     help="checkpoint interval in steps (0: about every quarter of the run); checkpoints only "
                          "serve a resume on the same machine")
    run.add_argument("--concurrency", type=int, default=None,
                     help="runs trained at once (they share the device; default 1, or the testbed's)")
    run.add_argument("--capture_at", type=float, nargs="+", default=[],
                     help="schedule fractions at which --capture_run saves its MoE layers' dispatched tokens and "
                          "experts (e.g. 0.1 0.5 1), for scripts/compressibility.py")
    run.add_argument("--capture_run", default="stock/1", help="VARIANT/SEED of the run that captures")
    run.add_argument("--capture_experts", type=int, default=0,
                     help="experts per captured layer (default: the capture's; at d_model 512 pass 2 so that a file "
                          "fits 16 MiB)")
    run.add_argument("--deadline_s", type=float, default=None, help="stop (to resume later) after this many seconds")
    speed = sub.add_parser("throughput", help="tokens/s of a testbed's runs on this device, alone and several at "
                                              "once (what sizes a study), into docs/benchmarks.md")
    speed.add_argument("--testbed", required=True, help=f"one of {', '.join(beds.TESTBEDS)}")
    speed.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="runs at once, one batch each")
    speed.add_argument("--steps", type=int, default=300, help="steps per run (the median of the last 2/3 counts)")
    speed.add_argument("--root", default="runs/throughput")
    speed.add_argument("--data", default="python-code")
    speed.add_argument("--data_prefix", default=None)
    speed.add_argument("--label", default="", help="what else was set, e.g. 'CUDA MPS on'; names the section too")
    speed.add_argument("--report", default=None, help="write the section into this file (docs/benchmarks.md)")
    report = sub.add_parser("report", help="aggregate finished runs into docs/quality.md")
    report.add_argument("--model", choices=("gpt", "t5"), default="gpt")
    report.add_argument("--root", default="runs/quality")
    report.add_argument("--variants", nargs="+", default=["stock", "lsh", "lsh_no_ec"])
    report.add_argument("--partial", action="store_true",
                        help="also report runs a deadline stopped, all cut to the evaluations every run reached")
    report.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="only these seeds (e.g. the one seed of an ablation, so stock's row is the same seed)")
    report.add_argument("--baseline", default="stock",
                        help="the variant every gap is taken against, one of --variants (e.g. stock_lr1.5x, for a "
                             "candidate trained at that rate)")
    report.add_argument("--section", required=True, help=f"block of docs/quality.md to (re)write, e.g. {list(TITLES)}")
    report.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    report.add_argument("--output", default="docs/quality.md")
    lengths = sub.add_parser("lengths", help="final gap against schedule length for a testbed (the complete "
                                             "schedules under ROOT/TESTBED/x*) into docs/quality.md")
    lengths.add_argument("--testbed", required=True, help=f"one of {', '.join(beds.TESTBEDS)}")
    lengths.add_argument("--root", default="runs/testbed")
    lengths.add_argument("--variants", nargs="+", default=["stock", "lsh"])
    lengths.add_argument("--baseline", default="stock",
                         help="the plugin-off variant every gap is taken against, at every length (stock_lr1.5x: "
                              "the growth test at 1.5x the study's peak rate)")
    lengths.add_argument("--section", required=True)
    lengths.add_argument("--title", default=None)
    lengths.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    lengths.add_argument("--output", default="docs/quality.md")
    scatter = sub.add_parser("scatter", help="how far runs end apart seed by seed: per-seed gaps against a "
                                             "baseline, their scatter pooled over the variants, same-seed distances")
    scatter.add_argument("--root", required=True, help="one schedule length's runs, e.g. runs/testbed_pinned/"
                                                       "gpt-25m-1pass/x1")
    scatter.add_argument("--model", choices=("gpt", "t5"), default="gpt")
    scatter.add_argument("--baseline", default="stock")
    scatter.add_argument("--variants", nargs="+", required=True)
    scatter.add_argument("--pair", nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"),
                         help="two variants whose same-seed distance to print (repeatable)")
    scatter.add_argument("--also_root", action="append", default=[],
                         help="another root of the same length's runs, read for the seeds --root lacks (repeatable; "
                              "e.g. runs/testbed_pinned_unfinished/gpt-25m-1pass/x1, the runs a lease cut)")
    scatter.add_argument("--at_step", type=int, default=None,
                         help="read each run's validation loss at this evaluation step instead of its final one; runs "
                              "that stopped after it count (an early reading, not the rule's)")
    scatter.add_argument("--section", default=None, help="also write the table as this block of --output")
    scatter.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    scatter.add_argument("--output", default="docs/quality.md")
    scatter.add_argument("--null", default=None,
                         help="a null control (e.g. stock_nudge): also read each variant against the mean of the "
                              "baseline's and the null's run of each seed")
    scatter.add_argument("--after", default=None, help="a new section goes right after this one (else at the end)")
    edge = sub.add_parser("frontier", help="final gap against all-to-all bytes for every candidate at a testbed's "
                                           "long schedule, each against issue 24's rule, and the default it chooses")
    edge.add_argument("--testbed", required=True, help=f"one of {', '.join(beds.TESTBEDS)}")
    edge.add_argument("--root", default="runs/testbed")
    edge.add_argument("--variants", nargs="+", default=None,
                      help="the candidates (default: every variant with runs under ROOT/TESTBED/x1)")
    edge.add_argument("--baseline", default="stock",
                      help="the plugin-off variant that plays stock (stock_lr1.5x: the rule at 1.5x the study's peak "
                           "rate, against the candidates trained at that rate)")
    edge.add_argument("--section", required=True)
    edge.add_argument("--title", default=None)
    edge.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    edge.add_argument("--report", default=None,
                      help="write the section into this file (docs/quality.md) and its plot beside it; default: "
                           "print only")
    edge.add_argument("--benchmarks", default="docs/benchmarks.md",
                      help="where the fallback reads modelled step speed-ups (benchmark_gpt_moe.py sections)")
    edge.add_argument("--modelled_section", nargs="+", default=[],
                      help="only these sections of --benchmarks (default: every one of 8 GPUs per node, `_g8`)")
    pick = sub.add_parser("default", help="the plugin's default across a family of testbed shapes, from each "
                                          "shape's verdicts by issue 24's rule (lshmoe_pretrain/default_choice.py)")
    pick.add_argument("--shapes", choices=choice.FAMILIES, default="single-pass",
                      help="the long shapes, or the single-pass ones (half the batch: each token read once)")
    pick.add_argument("--root", default="runs/testbed")
    pick.add_argument("--section", required=True)
    pick.add_argument("--title", default=None)
    pick.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    pick.add_argument("--report", default=None,
                      help="write the section into this file (docs/quality.md); default: print only")
    target = sub.add_parser("time-to-target", help="combine a study with measured step times into docs/benchmarks.md")
    target.add_argument("--model", choices=("gpt", "t5"), default="gpt")
    target.add_argument("--root", default="runs/quality")
    target.add_argument("--partial", action="store_true")
    target.add_argument("--lsh_root", nargs="+", default=[],
                        help="studies of lsh alone on longer schedules of its own (finished runs): the tokens it "
                             "needs to reach stock's final loss, between the final losses of the schedules")
    target.add_argument("--benchmarks", default="docs/benchmarks.md")
    target.add_argument("--step_section", default=None,
                        help="benchmark_gpt_moe.py section with the same model's EP=1 tokens/s, stock and lsh "
                             "(without it: the tokens only)")
    target.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds, in every study")
    target.add_argument("--section", default="time_to_target", help="the block to (re)write")
    target.add_argument("--title", default="Time to the same validation loss: measured parts and projected parts")
    target.add_argument("--output", default=None, help="the file to write it into (default: --benchmarks)")
    target.add_argument("--link_section", default=None,
                        help="benchmark_gpt_moe.py section measured on a slow link (its lsh speed-up)")
    target.add_argument("--modelled_section", nargs="+", default=[],
                        help="benchmark_gpt_moe.py --modelled-link sections (their `lsh @ <link> EP<k>` speed-ups, "
                             "figures labelled modelled)")
    return parser.parse_args()


# What a testbed sets, and each flag's default without one.
TESTBED_FLAGS = {"model": "gpt", "preset": "gpt-moe-135m", "tokens": 20e6, "micro_batch": 32, "lr": 6e-4,
                 "evals": 10, "eval_tokens": 2**18}


def study_plans(args: argparse.Namespace) -> list:
    """One StudyPlan per schedule length: the testbed's settings, or the flags'."""
    common = dict(variants=args.variants, seeds=args.seeds, data=args.data, data_prefix=args.data_prefix,
                  vocab_size=args.vocab_size, final_eval_tokens=int(args.final_eval_tokens),
                  eval_compressed=args.eval_compressed, save_every=args.save_every,
                  capture_at=args.capture_at, capture_run=args.capture_run,
                  capture_experts=args.capture_experts)
    if args.testbed is None:
        if args.lengths != [1.0]:
            raise study.StudyError("--lengths needs --testbed (the fractions are of a testbed's long schedule)")
        flags = {key: default if getattr(args, key) is None else getattr(args, key)
                 for key, default in TESTBED_FLAGS.items()}
        return [study.StudyPlan(model_kind=flags["model"], preset=flags["preset"], train_tokens=int(flags["tokens"]),
                                output_root=args.root, micro_batch=flags["micro_batch"], lr=flags["lr"],
                                evals=flags["evals"], eval_tokens=int(flags["eval_tokens"]),
                                base_config=args.base_config or f"configs/{flags['model']}_moe_gpu.json",
                                concurrency=args.concurrency or 1, **common)]
    given = [f"--{key}" for key in TESTBED_FLAGS if getattr(args, key) is not None]
    if given:
        raise study.StudyError(f"{', '.join(given)} with --testbed {args.testbed}: the testbed sets them "
                               f"(lshmoe_pretrain/testbed.py)")
    bed = beds.testbed(args.testbed)
    beds.check_lengths(args.lengths)
    return [study.StudyPlan(model_kind=bed.model_kind, preset=bed.preset, train_tokens=bed.tokens_at(length),
                            output_root=beds.length_root(args.root, bed, length), micro_batch=bed.micro_batch,
                            lr=bed.lr, evals=bed.evals, eval_tokens=bed.eval_tokens,
                            base_config=args.base_config or bed.config(),
                            concurrency=args.concurrency or bed.concurrency, **common)
            for length in args.lengths]


def run(args: argparse.Namespace) -> None:
    plans = study_plans(args)
    complete = study.run_studies(plans, plans[0].concurrency, log=lambda line: print(line, flush=True),
                                 deadline_s=args.deadline_s)
    for plan in plans:
        try:
            print(plan.output_root)
            print(study.gap_table(study.aggregate(plan.output_root, plan.model_kind, args.variants,
                                                  partial=not complete)))
        except study.StudyError as error:
            print(error)
    if not complete:
        print("study incomplete: run the same command again to continue")


def throughput(args: argparse.Namespace) -> None:
    import torch
    bed = beds.testbed(args.testbed)
    results = study_throughput.measure(bed, args.concurrency, args.steps, args.root, args.data_prefix, args.data,
                                       log=lambda line: print(line, flush=True))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = "".join(c if c.isalnum() else "_" for c in args.label.lower()).strip("_")
    name = f"testbed_throughput_{bed.name}" + (f"_{slug}" if slug else "")
    text = "\n".join([
        bench.header(f"Testbed `{bed.name}` on one device: runs at once against tokens/s"
                     + (f" ({args.label})" if args.label else ""), device),
        f"- testbed: {bed.purpose}; preset `{bed.preset}`, {bed.micro_batch} x {bed.seq_len()} tokens per step, "
        f"EP=1 (no link crossed), {args.steps} steps per run, stock and LSH-MoE (paper defaults, output-error "
        "probe every 50 steps as in the study) alternating; tokens/s from each run's median step time over its "
        "last two thirds; the runs of a batch train at the same time, so the aggregate is their sum.",
        "- model TFLOP/s: aggregate tokens/s x 6 x the weights each token multiplies through (attention "
        "projections, FFN or top-k experts, LM head; attention scores left out; T5: encoder and decoder per input "
        "token, an upper bound). Against the H200's ~790 dense bf16 TFLOP/s (measured, KINDS.md) it says whether "
        "arithmetic or per-step overhead sets the pace. Minutes: that many runs of the long schedule "
        f"({bed.steps} steps) at this aggregate, without start-up and evaluation.", "",
        bench.markdown_table(study_throughput.HEADERS, study_throughput.table(bed, results)), "",
        "Wall time of each batch (start-up, evaluation and model build included): "
        + ", ".join(f"{r.runs} at once {r.wall_s:.0f} s" for r in results) + "."])
    print(text)
    bench.report_section(args.report, name, text)


def section_head(title: str, run_command: str) -> list:
    """The lines every quality section starts with: its title, the command that trained the runs, this report's."""
    return [f"## {title}", "",
            f"- runs: `{run_command}`" if run_command else "- runs: see the command in each run's train.log",
            f"- report: `{study.python_command()}`"]


def report(args: argparse.Namespace) -> None:
    if args.baseline not in args.variants:
        raise SystemExit(f"--baseline {args.baseline!r}: it must be one of --variants {args.variants}")
    results = study.aggregate(args.root, args.model, args.variants, partial=args.partial, seeds=args.seeds)
    plot_path = os.path.join(os.path.dirname(args.output) or ".", f"quality_{args.section}.png")
    title = TITLES.get(args.section, args.section)
    study.plot(results, plot_path, title)
    text = "\n".join([
        *section_head(title, args.run_command),
        f"- {study.describe(results)}",
        "- valid loss: mean LM loss over the same held-out batches at each point, exact dispatch in eval (the "
        "default); 'compressed eval' is the same model evaluated with `compress_in_eval`. Gap per seed pairs each "
        f"run with the {args.baseline} run of the same seed (same initial weights, data order and gate draws).",
        "- step ms: median training step time of these runs. Several runs shared the device at once, and at EP=1 "
        "no all-to-all crosses a link, so it is not a speed figure: docs/benchmarks.md has those.",
        *([note] if (note := study.cards_note(results)) else []),
        *([note] if (note := study.as_trained_note(results)) else []), "",
        study.gap_table(results, args.baseline), "",
        "Validation loss (mean over seeds) along the run:", "",
        study.curve_table(results), "",
        *([("Relative error of the expert outputs against stock's on a sample of the tokens (1/16 of the capacity "
            "slots every 50 steps, second half of the runs; the columns after the first compensate the same "
            "clusters differently, measured by the study's probe):"), "", errors, ""]
          if (errors := study.error_table(results)) else []),
        f"![validation loss vs tokens]({os.path.basename(plot_path)})", ""])
    bench.write_section(args.output, args.section, text)
    print(text)


def bed_label(bed) -> str:
    """How a section names its testbed: a CPU proxy says so in the title, so no one reads it as the testbed."""
    return f"CPU proxy `{bed.name}` (of `{bed.proxy_of}`, not the testbed)" if bed.proxy_of else f"Testbed `{bed.name}`"


def lengths(args: argparse.Namespace) -> None:
    bed = beds.testbed(args.testbed)
    rows = length_study.collect(args.root, bed, args.variants, args.baseline)
    title = args.title or f"{bed_label(bed)}: the final gap as the schedule grows"
    plot_path = os.path.join(os.path.dirname(args.output) or ".", f"quality_{args.section}.png")
    length_study.plot(rows, args.variants, plot_path, title)
    longest = next(iter(rows[-1].variants.values()), rows[-1].stock)
    text = "\n".join([
        *section_head(title, args.run_command),
        f"- testbed: {bed.purpose}. Longest schedule: {study.describe([longest])}",
        "- each row is a complete schedule of its own (5% warm-up, linear decay to zero at its last step), final "
        "point on the whole validation split, exact dispatch in evaluation; a gap per seed pairs a run with "
        f"{'stock' if args.baseline == 'stock' else args.baseline}'s run of the same seed (same initial weights, "
        "data order and gate draws).",
        *([note] if (note := study.cards_note([rows[-1].stock, *rows[-1].variants.values()])) else []),
        *([note] if (note := shorter_cards(rows)) else []), "",
        length_study.table(rows, args.variants), "",
        "Validation against training loss: the passes each schedule makes over the train split, and each "
        "variant's gap in final validation loss beside its gap in training loss over the last 10% of steps (the "
        "same seeds, the same data order). Within one pass the two agree; where a schedule repeats the corpus, a "
        "validation gap below the training gap is the variant memorising the repeats less than stock, which a "
        "user training on one pass would not get.", "",
        length_study.train_against_valid_table(rows, args.variants), "",
        *([f"Within the longest schedule, which reads the corpus {study.passes_over_data(rows[-1].stock):.2f} "
           "times: each variant's gaps at the end of its first pass and at the end, in the same runs (what the "
           "second pass changes):", "", repeats, ""]
          if (repeats := length_study.repeats_table(rows, args.variants)) else []),
        f"![final gap against schedule length]({os.path.basename(plot_path)})", ""])
    bench.write_section(args.output, args.section, text)
    print(text)


def shorter_cards(rows) -> str:
    """Where the shorter schedules trained, when that is not the device the section's model sentence names (the
    longest schedule's first stock run): '' if every run of every row trained there."""
    named = rows[-1].stock.info.get("device")
    cells = []
    for row in rows[:-1]:
        found = sorted({d for r in (row.stock, *row.variants.values()) for d in r.devices.values()})
        if found != [named]:
            cells.append(f"{row.length:g}x on {' and '.join(found)}")
    return (f"- the shorter schedules trained elsewhere than {named}: {'; '.join(cells)} (each row's pairs on one "
            f"card unless it names two)." if cells else "")


def frontier(args: argparse.Namespace) -> None:
    bed = beds.testbed(args.testbed)
    found = frontiers.collect(args.root, bed, args.variants, args.baseline)
    speedups = frontiers.speedups_for(found, args.benchmarks, args.modelled_section)
    choice = frontiers.choose(found, speedups)
    title = (args.title or
             f"{bed_label(bed)}: final gap against all-to-all bytes, and the default by issue 24's rule")
    plot_name = f"quality_{args.section}.png"
    text = "\n".join([*section_head(title, args.run_command), frontiers.body(found, choice, speedups, plot_name)])
    print(text)
    if args.report:
        frontiers.plot(found, os.path.join(os.path.dirname(args.report) or ".", plot_name), title)
        bench.write_section(args.report, args.section, text)
        print(f"wrote {args.report} [{args.section}] and {plot_name} beside it")
    else:
        print(f"section '{args.section}' not written (pass --report docs/quality.md to write it and its plot)")


def default(args: argparse.Namespace) -> None:
    beds_of_family = choice.shapes(args.shapes)
    found = choice.collect(args.root, beds_of_family)
    decision = choice.decide(found, DEFAULT_METHOD, deciding=args.shapes == choice.DECIDING_FAMILY)
    title = args.title or f"The default across the {args.shapes} shapes ({', '.join(b.name for b in beds_of_family)})"
    text = "\n".join([
        *section_head(title, args.run_command),
        "- each shape's verdicts are its frontier section's (issue 24's rule at its long schedule); the default is "
        "the candidate that passes on every shape with the fewest bytes, else the one whose worst shape has the "
        "smallest gap among those with 3 seeds everywhere and at most 0.5 of the bytes (written down before the "
        "single-pass shapes trained: docs/quality.md, 2026-12-05 night). The last column pools every seed of every "
        "shape measured (mean ± standard error): information beside the rule, not part of it.", "",
        choice.table(found), "",
        f"**The default:** {decision.text}", ""])
    print(text)
    if args.report:
        bench.write_section(args.report, args.section, text)
        print(f"wrote {args.report} [{args.section}]")
    else:
        print(f"section '{args.section}' not written (pass --report docs/quality.md to write it)")


def time_to_target(args: argparse.Namespace) -> None:
    results = study.aggregate(args.root, args.model, ["stock", "lsh"], partial=args.partial, seeds=args.seeds)
    longer = [r for root in args.lsh_root for r in study.aggregate(root, args.model, ["lsh"], seeds=args.seeds)]
    link_rows = bench.read_section_table(args.benchmarks, args.link_section) if args.link_section else None
    modelled = [(name, bench.read_section_table(args.benchmarks, name)) for name in args.modelled_section]
    step_rows = bench.read_section_table(args.benchmarks, args.step_section) if args.step_section else None
    texts = {name: bench.read_section_text(args.benchmarks, name)
             for name in [args.step_section, args.link_section, *args.modelled_section] if name}
    table = study.time_to_target(results, step_rows, link_rows, args.step_section, args.link_section, modelled,
                                 longer, texts)
    text = "\n".join([
        f"## {args.title}", "",
        f"- command: `{study.python_command()}`",
        f"- quality runs: {study.describe(results)}"
        + "".join(f" LSH-MoE also from `{root}`, on a schedule of its own of {study.millions(r.tokens[-1])} tokens "
                  f"(seeds {', '.join(map(str, r.seeds))})." for root, r in zip(args.lsh_root, longer)),
        "- step times: " + (", ".join(f"section `{name}`" for name in [args.step_section, args.link_section]
                                      + args.modelled_section if name) + f" of {args.benchmarks} (device, link "
                            "and command there)" if args.step_section or args.modelled_section or args.link_section
                            else "none given: tokens only"), "", table, ""])
    bench.write_section(args.output or args.benchmarks, args.section, text)
    print(text)


def scatter(args: argparse.Namespace) -> None:
    names = list(dict.fromkeys([*args.variants, *(v for pair in args.pair for v in pair),
                                *([args.null] if args.null else [])]))
    gaps = seed_scatter.collect(args.root, args.model, args.baseline, names, args.also_root, args.at_step)
    table = seed_scatter.table(gaps, args.variants, [tuple(pair) for pair in args.pair], args.null)
    if args.section:
        read = ("its final validation loss (finished runs only)" if args.at_step is None else
                f"its validation loss at step {args.at_step}, read before the end of the schedule: runs the device "
                "time cut count once they evaluated there. An early reading, never the rule's: the rule reads "
                "finished schedules")
        cards = ", ".join(sorted(set(gaps.cards.values())))
        table = "\n".join([*section_head(TITLES.get(args.section, args.section), args.run_command),
                           f"- each variant's run against the {args.baseline} run of the same seed (same initial "
                           f"weights, data order and gate draws), by {read}; runs on {cards}.", "", table, ""])
        bench.write_section(args.output, args.section, table, after=args.after)
    print(table)


def main() -> None:
    args = parse_args()
    {"run": run, "throughput": throughput, "report": report, "lengths": lengths, "scatter": scatter,
     "frontier": frontier, "default": default, "time-to-target": time_to_target}[args.command](args)


if __name__ == "__main__":
    main()
