"""Quality study: does LSH-MoE train to the same validation loss as stock DeepSpeed MoE at equal tokens?

`run` trains each variant with each seed through the real deepspeed launcher (EP=1, several jobs at once on one
device with --concurrency), skipping finished runs and resuming interrupted ones, so a study can be spread over
several calls. `report` aggregates finished runs into tables and plots (mean and seed spread of the validation
loss at each evaluated token count, gap to stock, compressed vs exact evaluation) and writes docs/quality.md.

    # GPU: 3 seeds x (stock, LSH, LSH without error compensation), ~135M-parameter GPT-MoE, 20M tokens each
    python scripts/compare_quality.py run --model gpt --preset gpt-moe-135m --seeds 1 2 3 \\
        --variants stock lsh lsh_no_ec --tokens 20e6 --concurrency 3 --root runs/quality
    python scripts/compare_quality.py report --model gpt --root runs/quality --section gpt_main \\
        --variants stock lsh lsh_no_ec

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

from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import quality_study as study  # noqa: E402

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
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the variants x seeds that have not finished")
    run.add_argument("--model", choices=("gpt", "t5"), default="gpt")
    run.add_argument("--preset", default="gpt-moe-135m")
    run.add_argument("--variants", nargs="+", default=["stock", "lsh", "lsh_no_ec"],
                     help=f"any of {sorted(study.VARIANTS)}")
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    run.add_argument("--tokens", type=float, default=20e6, help="training tokens per run")
    run.add_argument("--root", default="runs/quality")
    run.add_argument("--base_config", default=None, help="default: configs/{model}_moe_gpu.json")
    run.add_argument("--data", default="python-code")
    run.add_argument("--data_prefix", default=None,
                     help="a preprocessed PREFIX.bin/.idx with PREFIX.tokenizer.json (scripts/preprocess_data.py), "
                          "used instead of --data")
    run.add_argument("--vocab_size", type=int, default=16384)
    run.add_argument("--micro_batch", type=int, default=32)
    run.add_argument("--lr", type=float, default=6e-4)
    run.add_argument("--evals", type=int, default=10, help="validation points per run")
    run.add_argument("--eval_tokens", type=float, default=2**18,
                     help="held-out tokens per validation point, spread over the whole split")
    run.add_argument("--final_eval_tokens", type=float, default=0,
                     help="held-out tokens of the final validation point (0: the whole split)")
    run.add_argument("--eval_compressed", choices=("off", "final", "all"), default="final",
                     help="also evaluate with compress_in_eval (valid_loss_compressed): at the final point only "
                          "(default), at every point, or never")
    run.add_argument("--save_every", type=int, default=0,
                     help="checkpoint interval in steps (0: about every quarter of the run); checkpoints only "
                          "serve a resume on the same machine")
    run.add_argument("--concurrency", type=int, default=1, help="runs trained at once (they share the device)")
    run.add_argument("--deadline_s", type=float, default=None, help="stop (to resume later) after this many seconds")
    report = sub.add_parser("report", help="aggregate finished runs into docs/quality.md")
    report.add_argument("--model", choices=("gpt", "t5"), default="gpt")
    report.add_argument("--root", default="runs/quality")
    report.add_argument("--variants", nargs="+", default=["stock", "lsh", "lsh_no_ec"])
    report.add_argument("--partial", action="store_true",
                        help="also report runs a deadline stopped, all cut to the evaluations every run reached")
    report.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="only these seeds (e.g. the one seed of an ablation, so stock's row is the same seed)")
    report.add_argument("--section", required=True, help=f"block of docs/quality.md to (re)write, e.g. {list(TITLES)}")
    report.add_argument("--run_command", default=None, help="the command that trained the runs, for the record")
    report.add_argument("--output", default="docs/quality.md")
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


def run(args: argparse.Namespace) -> None:
    plan = study.StudyPlan(model_kind=args.model, preset=args.preset, variants=args.variants, seeds=args.seeds,
                           train_tokens=int(args.tokens), output_root=args.root,
                           base_config=args.base_config or f"configs/{args.model}_moe_gpu.json", data=args.data,
                           data_prefix=args.data_prefix,
                           vocab_size=args.vocab_size, micro_batch=args.micro_batch, lr=args.lr, evals=args.evals,
                           eval_tokens=int(args.eval_tokens), final_eval_tokens=int(args.final_eval_tokens),
                           eval_compressed=args.eval_compressed, save_every=args.save_every,
                           concurrency=args.concurrency)
    complete = study.run_study(plan, log=lambda line: print(line, flush=True), deadline_s=args.deadline_s)
    try:
        print(study.gap_table(study.aggregate(args.root, args.model, args.variants, partial=not complete)))
    except study.StudyError as error:
        print(error)
    if not complete:
        print("study incomplete: run the same command again to continue")


def report(args: argparse.Namespace) -> None:
    results = study.aggregate(args.root, args.model, args.variants, partial=args.partial, seeds=args.seeds)
    plot_path = os.path.join(os.path.dirname(args.output) or ".", f"quality_{args.section}.png")
    title = TITLES.get(args.section, args.section)
    study.plot(results, plot_path, title)
    text = "\n".join([
        f"## {title}", "",
        f"- runs: `{args.run_command}`" if args.run_command else "- runs: see the command in each run's train.log",
        f"- report: `{study.python_command()}`",
        f"- {study.describe(results)}",
        "- valid loss: mean LM loss over the same held-out batches at each point, exact dispatch in eval (the "
        "default); 'compressed eval' is the same model evaluated with `compress_in_eval`. Gap per seed pairs each "
        "run with the stock run of the same seed (same initial weights, data order and gate draws).",
        "- step ms: median training step time of these runs. Several runs shared the device at once, and at EP=1 "
        "no all-to-all crosses a link, so it is not a speed figure: docs/benchmarks.md has those.", "",
        study.gap_table(results), "",
        "Validation loss (mean over seeds) along the run:", "",
        study.curve_table(results), "",
        "Relative error of the expert outputs against stock's on a sample of the tokens (1/16 of the capacity "
        "slots every 50 steps, second half of the runs; the columns after the first compensate the same clusters "
        "differently, measured by the study's probe):", "",
        study.error_table(results), "",
        f"![validation loss vs tokens]({os.path.basename(plot_path)})", ""])
    bench.write_section(args.output, args.section, text)
    print(text)


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


def main() -> None:
    args = parse_args()
    {"run": run, "report": report, "time-to-target": time_to_target}[args.command](args)


if __name__ == "__main__":
    main()
