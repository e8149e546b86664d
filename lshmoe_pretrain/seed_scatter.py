"""How far runs end apart, seed by seed: the floor under every gap the quality rule reads.

A variant's gap on one seed pairs its run with the baseline's run of that seed (same initial weights, data order
and gate draws). How much those per-seed gaps scatter about the variant's own mean says how well a mean over a few
seeds can place it; pooled over several variants at one learning rate it is that rate's noise (docs/quality.md,
thirteenth session: ±0.60% at the study's rate on `gpt-25m-1pass`, ±1.49% at 2x). Two variants' distance on the
same seed, and a null control's gaps (stock with its initial weights nudged), say whether that scatter is any
perturbation's or a codec's own.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import quality_study as study


@dataclass
class SeedGaps:
    baseline: str
    results: Dict[str, study.VariantResult]   # variant (the baseline too) -> its finished runs

    def gaps(self, variant: str) -> Dict[int, float]:
        """Per-seed gap (%) of `variant` against the baseline, on the seeds both finished."""
        return study.paired_gaps(self.results[variant], self.results[self.baseline])

    def distance(self, first: str, second: str) -> Dict[int, float]:
        """Per-seed |first / second - 1| (%), on the seeds both finished."""
        return {seed: abs(gap) for seed, gap in study.paired_gaps(self.results[first], self.results[second]).items()}


def collect(root: str, model_kind: str, baseline: str, variants: Sequence[str]) -> SeedGaps:
    """The finished runs under ``root/model_kind/<variant>/seed*`` of the baseline and each variant."""
    unknown = [v for v in (baseline, *variants) if v not in study.VARIANTS]
    if unknown:
        raise study.StudyError(f"--variants/--baseline {unknown}: allowed {sorted(study.VARIANTS)}")
    results = {}
    for name in dict.fromkeys((baseline, *variants)):
        results[name] = study.load_variant(root, model_kind, name)
        if results[name] is None:
            raise study.StudyError(f"no finished runs of {name!r} under {root}/{model_kind}")
    return SeedGaps(baseline, results)


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


def table(gaps: SeedGaps, variants: Sequence[str], pairs: Sequence[Tuple[str, str]] = ()) -> str:
    """Markdown: each variant's per-seed gaps with their mean ± std, the pooled scatter, and each pair's same-seed
    distance."""
    lines = [f"| variant | seeds | gap vs {gaps.baseline} per seed | mean ± std |", "| --- | --- | --- | --- |"]
    groups: List[List[float]] = []
    for name in (v for v in variants if v != gaps.baseline):
        per_seed = gaps.gaps(name)
        values = [per_seed[s] for s in sorted(per_seed)]
        groups.append(values)
        spread = f" ± {statistics.stdev(values):.2f}%" if len(values) > 1 else ""
        mean = f"{statistics.fmean(values):+.2f}%{spread}" if values else "–"
        lines.append(f"| {name} | {', '.join(map(str, sorted(per_seed))) or '–'} | "
                     f"{', '.join(f'{x:+.2f}%' for x in values) or '–'} | {mean} |")
    pooled = pooled_std(groups)
    lines += ["", (f"Pooled scatter of the per-seed gaps about each variant's mean: ±{pooled[0]:.2f}% ({pooled[1]} "
                   f"variants, {pooled[2]} runs)." if pooled else "Pooled scatter: too few seeds (a variant needs 2).")]
    for first, second in pairs:
        distance = gaps.distance(first, second)
        lines.append(f"Same-seed distance, {first} against {second}: "
                     + (", ".join(f"seed {s} {distance[s]:.2f}%" for s in sorted(distance)) or "no common seed")
                     + ".")
    return "\n".join(lines)
