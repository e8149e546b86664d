"""The gap as training grows: final validation loss against stock over complete schedules of several lengths.

A single long run's intermediate points cannot answer this: the gap grows most while the learning rate anneals, so
each length is its own complete schedule (warm-up, decay to zero), trained under ``<root>/<testbed>/x<length>``
(lshmoe_pretrain.testbed). Each row reads the finished runs of one length; a gap is taken over the seeds that the
variant and stock both finished, and stock's own seed spread at that length sits beside it. "Stock" is the
baseline variant, `stock` unless another is named: `stock_lr1.5x` takes every gap against stock at 1.5x the study's
peak rate, the rule's growth test at a tuned rate (docs/quality.md, twelfth session).
"""
from __future__ import annotations

import glob
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import quality_study as study
from .testbed import Testbed


@dataclass
class LengthRow:
    length: float
    steps: int
    tokens: int
    stock: study.VariantResult
    variants: Dict[str, study.VariantResult]

    def gap(self, name: str) -> Optional[List[float]]:
        """Per-seed gaps (%) of `name` against stock on the seeds both finished; None if there are none."""
        result = self.variants.get(name)
        if result is None:
            return None
        return list(study.paired_gaps(result, self.stock).values()) or None

    def train_gap(self, name: str) -> Optional[List[float]]:
        """Per-seed gaps (%) of `name`'s mean training loss over the last 10% of steps against stock's, on the seeds
        both finished (the same data order: a paired difference); None if there are none."""
        last = self.stock.info["train_steps"]
        return self.train_gap_between(name, int(0.9 * last), last)

    def first_repeat_step(self) -> Optional[int]:
        """The last step before the schedule reads a training token for the second time; None within one pass."""
        info = self.stock.info
        steps_per_pass = int(info["train_tokens"] // info["tokens_per_step"])
        return steps_per_pass if steps_per_pass < info["train_steps"] else None

    def train_gap_between(self, name: str, first: int, last: int) -> Optional[List[float]]:
        """Per-seed gaps (%) of `name`'s mean training loss over steps first < step <= last against stock's."""
        result = self.variants.get(name)
        if result is None:
            return None
        gaps = []
        for seed in (s for s in result.seeds if s in self.stock.train_curve and s in result.train_curve):
            ours = [loss for step, loss in result.train_curve[seed].items() if first < step <= last]
            theirs = [loss for step, loss in self.stock.train_curve[seed].items() if first < step <= last]
            if ours and theirs:
                gaps.append(100 * (statistics.fmean(ours) / statistics.fmean(theirs) - 1))
        return gaps or None

    def valid_gap_at(self, name: str, step: int) -> Optional[Tuple[int, List[float]]]:
        """The last evaluation at or before `step` (its step) and `name`'s per-seed validation gaps there."""
        result = self.variants.get(name)
        per_step = self.stock.info["tokens_per_step"]
        points = [i for i, tokens in enumerate(self.stock.tokens) if tokens <= step * per_step]
        if result is None or not points:
            return None
        i = points[-1]
        common = [s for s in result.seeds if s in self.stock.seeds]
        gaps = [100 * (result.valid[s][i] / self.stock.valid[s][i] - 1) for s in common]
        return (self.stock.tokens[i] // per_step, gaps) if gaps else None

    def stock_spread(self) -> Optional[float]:
        """Stock's sample standard deviation over seeds, as % of its mean (None with one seed)."""
        finals = [self.stock.final(s) for s in self.stock.seeds]
        return 100 * statistics.stdev(finals) / statistics.fmean(finals) if len(finals) > 1 else None


def lengths_found(root: str, bed: Testbed) -> List[float]:
    found = [float(os.path.basename(path)[1:]) for path in glob.glob(os.path.join(root, bed.name, "x*"))]
    return sorted(found)


def collect(root: str, bed: Testbed, variants: Sequence[str], baseline: str = "stock") -> List[LengthRow]:
    """One row per schedule length that has finished runs of `baseline` (the rows' `stock`)."""
    if baseline not in study.VARIANTS or study.VARIANTS[baseline].get("enabled"):
        raise study.StudyError(f"--baseline {baseline!r}: a variant with the plugin off, one of "
                               f"{[v for v, block in study.VARIANTS.items() if not block.get('enabled')]}")
    rows = []
    for length in lengths_found(root, bed):
        length_root = os.path.join(root, bed.name, f"x{length:g}")
        stock = study.load_variant(length_root, bed.model_kind, baseline)
        if stock is None:
            continue
        found = {v: study.load_variant(length_root, bed.model_kind, v) for v in variants if v != baseline}
        rows.append(LengthRow(length, stock.info["train_steps"], stock.tokens[-1], stock,
                              {v: r for v, r in found.items() if r is not None}))
    if not rows:
        raise study.StudyError(f"no finished {baseline} runs under {os.path.join(root, bed.name)}/x*")
    study.check_one_corpus({f"x{row.length:g}/{result.name}": result.info.get("data_sha256")
                            for row in rows for result in (row.stock, *row.variants.values())})
    return rows


def baseline_of(rows: Sequence[LengthRow]) -> str:
    """The variant the rows' gaps are taken against (`stock` unless collect was given another)."""
    return rows[0].stock.name


def table(rows: Sequence[LengthRow], variants: Sequence[str]) -> str:
    baseline = baseline_of(rows)
    names = [v for v in variants if v != baseline]
    headers = ["schedule", "steps", "tokens", f"{baseline}: final loss (seeds)", f"{baseline} seed spread (std)"]
    for name in names:
        headers += [f"{name}: final loss (seeds)", f"{name}: gap per seed (mean ± std)"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        spread = row.stock_spread()
        cells = [f"{row.length:g}x", f"{row.steps:,}", study.millions(row.tokens),
                 f"{study.mean_and_spread([row.stock.final(s) for s in row.stock.seeds])} ({len(row.stock.seeds)})",
                 f"{spread:.2f}%" if spread is not None else "– (1 seed)"]
        for name in names:
            result, gaps = row.variants.get(name), row.gap(name)
            if result is None or gaps is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{study.mean_and_spread([result.final(s) for s in result.seeds])} ({len(result.seeds)})")
            cells.append(f"{gaps[0]:+.2f}%" if len(gaps) == 1 else
                         f"{statistics.fmean(gaps):+.2f}% ± {statistics.stdev(gaps):.2f}% ({len(gaps)} seeds)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_text(gaps: Optional[List[float]]) -> str:
    if not gaps:
        return "–"
    return f"{gaps[0]:+.2f}%" if len(gaps) == 1 else f"{statistics.fmean(gaps):+.2f}% ({len(gaps)} seeds)"


def train_against_valid_table(rows: Sequence[LengthRow], variants: Sequence[str]) -> str:
    """Per schedule: how many passes over the train split it makes, and each variant's gap in final validation loss
    beside its gap in training loss over the last 10% of steps (seed-paired means). While a schedule sees each
    token once the two measure the same thing and agree; once it repeats the corpus, a validation gap below the
    training gap means the variant memorised the repeats less than stock, not that it lost nothing (users train
    on one pass)."""
    names = [v for v in variants if v != baseline_of(rows)]
    headers = ["schedule", "passes over the train split"]
    for name in names:
        headers += [f"{name}: validation gap", f"{name}: training-loss gap (last 10% of steps)"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [f"{row.length:g}x", f"{study.passes_over_data(row.stock):.2f}"]
        for name in names:
            cells += [_mean_text(row.gap(name)), _mean_text(row.train_gap(name))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repeats_table(rows: Sequence[LengthRow], variants: Sequence[str]) -> str:
    """Within the longest schedule, where it reads the corpus more than once: each variant's validation and
    training-loss gaps at the end of the first pass (the last evaluation before the first repeated token; the
    training loss over the last 10% of the first pass's steps) and at the end of the schedule (final point; last
    10% of its steps). What the second pass changes, in one set of runs. '' within one pass."""
    row = rows[-1]
    repeat = row.first_repeat_step()
    if repeat is None:
        return ""
    names = [v for v in variants if v != baseline_of(rows) and v in row.variants]
    last = row.stock.info["train_steps"]
    first_eval = next((found[0] for found in (row.valid_gap_at(n, repeat) for n in names) if found), None)
    headers = ["variant", f"validation gap, step {first_eval:,} (first pass)" if first_eval else "validation gap, "
               "first pass", "validation gap, final", f"training-loss gap, steps {int(0.9 * repeat):,}-{repeat:,}",
               f"training-loss gap, steps {int(0.9 * last):,}-{last:,}"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for name in names:
        at_repeat = row.valid_gap_at(name, repeat)
        lines.append("| " + " | ".join([
            name, _mean_text(at_repeat[1] if at_repeat else None), _mean_text(row.gap(name)),
            _mean_text(row.train_gap_between(name, int(0.9 * repeat), repeat)),
            _mean_text(row.train_gap_between(name, int(0.9 * last), last))]) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[LengthRow], variants: Sequence[str], path: str, title: str) -> None:
    """Final gap (%) against schedule length in steps, one line per variant (mean over seeds, seed range as error
    bars), stock's seed spread (± one std) as a grey bar at zero where stock has several seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    baseline = baseline_of(rows)
    for name in (v for v in variants if v != baseline):
        points = [(row.steps, row.gap(name)) for row in rows if row.gap(name)]
        if not points:
            continue
        x = [steps for steps, _ in points]
        mean = [statistics.fmean(g) for _, g in points]
        low = [m - min(g) for m, (_, g) in zip(mean, points)]
        high = [max(g) - m for m, (_, g) in zip(mean, points)]
        ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3, label=name)
    spread = [(row.steps, row.stock_spread()) for row in rows if row.stock_spread() is not None]
    if spread:
        ax.errorbar([s for s, _ in spread], [0.0] * len(spread), yerr=[v for _, v in spread], fmt="none",
                    ecolor="grey", elinewidth=8, alpha=0.35, label=f"{baseline}'s seed spread (± std)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([row.steps for row in rows])
    ax.set_xticklabels([f"{row.steps:,}" for row in rows])
    ax.set_xlabel("optimizer steps of the complete schedule")
    ax.set_ylabel(f"final validation loss vs {baseline} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
