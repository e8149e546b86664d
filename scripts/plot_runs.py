"""Plot loss against step and against wall time for several run directories (their metrics.jsonl) in one PNG.

    python scripts/plot_runs.py runs/gpt_moe runs/gpt_moe_lsh --output runs/gpt_loss.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: is {run_dir!r} a run directory of pretrain_*_moe.py?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def with_wall_clock(records: list) -> list:
    """The records with `elapsed_s` on every line: a tracked record keeps it on its evaluation lines and last line
    only (lshmoe_pretrain.run_records), and between them it is the running sum of `step_time_s`."""
    elapsed = 0.0
    for record in records:
        elapsed = record.get("elapsed_s", elapsed + record.get("step_time_s", 0.0))
        record["elapsed_s"] = elapsed
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--output", default="loss.png")
    args = parser.parse_args()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in args.runs:
        records = with_wall_clock(read_metrics(run))
        label = os.path.basename(os.path.normpath(run))
        steps, times, losses = zip(*[(r["step"], r["elapsed_s"], r["loss"]) for r in records])
        line, = by_step.plot(steps, losses, label=f"{label} train", alpha=0.8)
        by_time.plot(times, losses, label=f"{label} train", color=line.get_color(), alpha=0.8)
        valid = [(r["step"], r["elapsed_s"], r["valid_loss"]) for r in records if "valid_loss" in r]
        if valid:
            vs, vt, vl = zip(*valid)
            by_step.plot(vs, vl, "o--", color=line.get_color(), label=f"{label} valid")
            by_time.plot(vt, vl, "o--", color=line.get_color(), label=f"{label} valid")
    by_step.set(xlabel="step", ylabel="LM loss", title="loss vs step")
    by_time.set(xlabel="wall time (s)", ylabel="LM loss", title="loss vs wall time")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
