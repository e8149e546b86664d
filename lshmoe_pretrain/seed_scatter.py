"""How far runs end apart, seed by seed: the floor under every gap the quality rule reads.

A variant's gap on one seed pairs its run with the baseline's run of that seed (same initial weights, data order
and gate draws). How much those per-seed gaps scatter about the variant's own mean says how well a mean over a few
seeds can place it; pooled over several variants at one learning rate it is that rate's noise (docs/quality.md,
thirteenth session: ±0.60% at the study's rate on `gpt-25m-1pass`, ±1.49% at 2x). Two variants' distance on the
same seed, and a null control's gaps (stock with its initial weights nudged), say whether that scatter is any
perturbation's or a codec's own.

Every gap against stock of the same seed carries that seed's stock trajectory, which all the variants on the seed
share (on `gpt-25m-1pass` seed 1 puts every codec above stock at the study's rate). A null control is a second draw
of that trajectory, so with one (`table(..., null=...)`, `compare_quality.py scatter --null`) each variant is also
read against the mean of the two draws (`SeedGaps.gaps_two_draws`), which halves that shared part's variance: a
reading beside the rule, which stays the same-seed gap's.

The gaps are the final validation loss's, over finished runs. With `at_step` they are the validation loss's at that
evaluation step instead, and runs a lease's device time cut count once they evaluated there (their evaluations kept
under a second root by scripts/land_device_results.py): an early reading, never the rule's.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import quality_study as study


@dataclass
class SeedGaps:
    baseline: str
    losses: Dict[str, Dict[int, float]]        # variant (the baseline too) -> seed -> validation loss read
    at_step: Optional[int] = None              # None: each run's final evaluation
    short: Dict[str, List[int]] = field(default_factory=dict)   # variant -> seeds whose runs stopped before at_step
    cards: Dict[str, str] = field(default_factory=dict)        # "variant/seed" -> run.json's device
    finals: Dict[str, Dict[int, float]] = field(default_factory=dict)   # with at_step: the finished runs' finals

    def gaps(self, variant: str) -> Dict[int, float]:
        """Per-seed gap (%) of `variant` against the baseline, on the seeds both have."""
        base = self.losses[self.baseline]
        return {s: 100 * (loss / base[s] - 1) for s, loss in sorted(self.losses[variant].items()) if s in base}

    def drift(self, variant: str) -> Dict[int, float]:
        """With `at_step`: per seed where both runs finished, how far the gap moved from that step to the final
        (points of %), which says how well the early reading stands for the final one."""
        if self.at_step is None:
            return {}
        base, own = self.finals.get(self.baseline, {}), self.finals.get(variant, {})
        early = self.gaps(variant)
        return {s: 100 * (own[s] / base[s] - 1) - early[s] for s in sorted(own) if s in base and s in early}

    def gaps_two_draws(self, variant: str, null: str) -> Dict[int, float]:
        """Per-seed gap (%) of `variant` against the mean of the baseline's and the null's runs of that seed: two
        draws of stock's trajectory (the null differs from the baseline in its initial weights' last digits only),
        so the reference's own trajectory noise, which every variant's gap on that seed shares, has half the
        variance. Seeds where all three ran."""
        base, other = self.losses[self.baseline], self.losses[null]
        return {s: 100 * (loss / ((base[s] + other[s]) / 2) - 1) for s, loss in sorted(self.losses[variant].items())
                if s in base and s in other}

    def distance(self, first: str, second: str) -> Dict[int, float]:
        """Per-seed |first / second - 1| (%), on the seeds both have."""
        other = self.losses[second]
        return {s: 100 * abs(loss / other[s] - 1) for s, loss in sorted(self.losses[first].items()) if s in other}


def _read_runs(roots: Sequence[str], model_kind: str, variant: str, at_step: Optional[int]):
    """seed -> (validation loss read, run.json) of `variant`'s runs under the roots (a seed in several: the first
    root's), the seeds whose runs stopped before `at_step`, and seed -> final validation loss of its finished runs."""
    found, short, finals = {}, [], {}
    for root in roots:
        for run_dir in sorted(glob.glob(os.path.join(root, model_kind, variant, "seed*"))):
            seed = int(os.path.basename(run_dir)[4:])
            info_path = os.path.join(run_dir, "run.json")
            if seed in found or not os.path.isfile(info_path):
                continue
            with open(info_path) as handle:
                info = json.load(handle)
            records = study.read_metrics(run_dir)   # once: study.finished would parse the file again
            if records and records[-1]["step"] >= info["train_steps"] and "valid_loss" in records[-1]:
                finals[seed] = records[-1]["valid_loss"]
            if at_step is None:
                if seed in finals:
                    found[seed] = (finals[seed], info)
                continue
            at = [r["valid_loss"] for r in records if r["step"] == at_step and "valid_loss" in r]
            if at:
                found[seed] = (at[0], info)
            elif seed not in short:
                short.append(seed)
    return found, sorted(s for s in short if s not in found), finals


def collect(root: str, model_kind: str, baseline: str, variants: Sequence[str], also: Sequence[str] = (),
            at_step: Optional[int] = None) -> SeedGaps:
    """The runs under ``root/model_kind/<variant>/seed*`` (then under each of `also`, for the seeds `root` lacks) of
    the baseline and each variant: their final validation loss (finished runs only), or with `at_step` the one at
    that evaluation step (every run that evaluated there). One corpus for all, or refused."""
    unknown = [v for v in (baseline, *variants) if v not in study.VARIANTS]
    if unknown:
        raise study.StudyError(f"--variants/--baseline {unknown}: allowed {sorted(study.VARIANTS)}")
    if at_step is not None and at_step < 1:
        raise study.StudyError(f"--at_step {at_step}: an evaluation step (a positive integer)")
    roots = [root, *also]
    losses, short, infos, finals = {}, {}, {}, {}
    for name in dict.fromkeys((baseline, *variants)):
        found, short[name], finals[name] = _read_runs(roots, model_kind, name, at_step)
        if not found:
            what = "finished runs" if at_step is None else f"runs evaluated at step {at_step}"
            raise study.StudyError(f"no {what} of {name!r} under {' or '.join(roots)}/{model_kind}")
        losses[name] = {seed: loss for seed, (loss, _) in found.items()}
        infos.update({f"{name}/seed{seed}": info for seed, (_, info) in found.items()})
    study.check_one_corpus({run: info.get("data_sha256") for run, info in infos.items()})
    return SeedGaps(baseline, losses, at_step, {k: v for k, v in short.items() if v},
                    {run: info.get("device", "?") for run, info in infos.items()},
                    finals if at_step is not None else {})


def pooled_std(groups: Sequence[Sequence[float]]) -> Optional[Tuple[float, int, int]]:
    """(std, groups, values): the scatter of each group's values about the group's own mean, pooled (sum of squared
    deviations over values minus groups); groups of one value carry no scatter and are left out. None without any
    degree of freedom."""
    groups = [list(g) for g in groups if len(g) > 1]
    values = sum(len(g) for g in groups)
    if values - len(groups) < 1:
        return None
    squares = sum((x - statistics.fmean(g)) ** 2 for g in groups for x in g)
    return math.sqrt(squares / (values - len(groups))), len(groups), values


def _mean_with_errors(values: Sequence[float]) -> Tuple[str, str]:
    """("mean ± std", "mean ± 2 standard errors") of per-seed gaps in %, or the mean alone for one value."""
    if not values:
        return "–", "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:+.2f}%", f"{mean:+.2f}%"
    std = statistics.stdev(values)
    return f"{mean:+.2f}% ± {std:.2f}%", f"{mean:+.2f}% ± {2 * std / math.sqrt(len(values)):.2f}%"


def _gap_row(name: str, per_seed: Dict[int, float]) -> Tuple[str, List[float]]:
    """A table row of one variant's per-seed gaps (seeds, gaps, mean ± std, mean ± 2 s.e.), and the gaps."""
    values = [per_seed[s] for s in sorted(per_seed)]
    spread, interval = _mean_with_errors(values)
    return (f"| {name} | {', '.join(map(str, sorted(per_seed))) or '–'} | "
            f"{', '.join(f'{x:+.2f}%' for x in values) or '–'} | {spread} | {interval} |"), values


def two_draw_table(gaps: SeedGaps, variants: Sequence[str], null: str) -> List[str]:
    """Markdown lines: each variant's gaps against the mean of the baseline's and the null's run of each seed."""
    lines = ["", f"Against two draws of {gaps.baseline} per seed ({gaps.baseline} and {null}, which differs from it "
                 "in its initial weights' last digits only): their mean as the reference halves the variance of the "
                 "reference's own trajectory, which every variant's gap on that seed shares.", "",
             f"| variant | seeds | gap vs the mean of {gaps.baseline} and {null} per seed | mean ± std | "
             "mean ± 2 s.e. |", "| --- | --- | --- | --- | --- |"]
    lines += [_gap_row(name, gaps.gaps_two_draws(name, null))[0]
              for name in variants if name not in (gaps.baseline, null)]
    return lines


def table(gaps: SeedGaps, variants: Sequence[str], pairs: Sequence[Tuple[str, str]] = (),
          null: Optional[str] = None) -> str:
    """Markdown: each variant's per-seed gaps with their mean ± std and mean ± 2 standard errors, the pooled
    scatter, each pair's same-seed distance, (with `null`) the gaps against the mean of the baseline's and the
    null's runs, and (with `at_step`) the runs that stopped before that step."""
    read = "final" if gaps.at_step is None else f"at step {gaps.at_step}"
    lines = [f"| variant | seeds | gap vs {gaps.baseline} per seed ({read}) | mean ± std | mean ± 2 s.e. |",
             "| --- | --- | --- | --- | --- |"]
    groups: List[List[float]] = []
    for name in (v for v in variants if v != gaps.baseline):
        line, values = _gap_row(name, gaps.gaps(name))
        lines.append(line)
        groups.append(values)
    base = [gaps.losses[gaps.baseline][s] for s in sorted(gaps.losses[gaps.baseline])]
    if len(base) > 1:
        lines += ["", f"{gaps.baseline}'s own seeds ({', '.join(map(str, sorted(gaps.losses[gaps.baseline])))}), "
                      f"{read}: {statistics.fmean(base):.4f} ± {statistics.stdev(base):.4f}, a seed spread of "
                      f"{100 * statistics.stdev(base) / statistics.fmean(base):.2f}%."]
    pooled = pooled_std(groups)
    lines += ["", (f"Pooled scatter of the per-seed gaps about each variant's mean: ±{pooled[0]:.2f}% ({pooled[1]} "
                   f"variants, {pooled[2]} runs)." if pooled else "Pooled scatter: too few seeds (a variant needs 2).")]
    if null is not None:
        if null not in gaps.losses:
            raise study.StudyError(f"--null {null}: not among the variants read ({', '.join(gaps.losses)})")
        lines += two_draw_table(gaps, variants, null) + [""]
    for first, second in pairs:
        distance = gaps.distance(first, second)
        lines.append(f"Same-seed distance, {first} against {second}: "
                     + (", ".join(f"seed {s} {distance[s]:.2f}%" for s in sorted(distance)) or "no common seed")
                     + ".")
    moved = [d for name in variants if name != gaps.baseline for d in gaps.drift(name).values()]
    if moved:
        lines.append(f"Where both runs finished ({len(moved)} runs), the gap moved from step {gaps.at_step} to the "
                     f"final by {max(moved, key=abs):+.2f} points at most (mean |move| "
                     f"{statistics.fmean(abs(d) for d in moved):.2f}).")
    for name, seeds in gaps.short.items():
        lines.append(f"Not evaluated at step {gaps.at_step} (stopped before it): {name} seed "
                     f"{', '.join(map(str, seeds))}.")
    return "\n".join(lines)
