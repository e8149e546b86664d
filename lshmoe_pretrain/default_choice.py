"""The plugin's default across the testbed's shapes. Issue 24 asks its rule of every shape, so the default is chosen
from each shape's verdicts (lshmoe_pretrain.frontier), by a decision written down before the single-pass shapes
trained (docs/quality.md, "Next on a GPU", 2026-12-05 night):

1. of the candidates that pass the rule on every shape, the one that sends the fewest bytes;
2. else, of the candidates with at least 3 seeds at every shape's long schedule and at most 0.5 of stock's bytes,
   the one whose worst shape (its largest mean gap) has the smallest gap, said plainly to fail the rule and by how
   much;
3. else none: which shapes are still to measure, or which candidates lack seeds.

Candidates tied on bytes in 1 are ordered by their worst shape's gap (the code since the rule was written; first
used on 2026-12-06, when three candidates passed everywhere at 0.391 of the bytes).

A guard on 1, written before the stretch candidate's last runs (docs/quality.md, "Next on a GPU", 2026-12-07,
sixteenth session): on `gpt-25m-1pass` a change that does nothing ends +0.56% ± 0.48% from stock over 3 seeds, so a
pass at ±0.5% does not show that a candidate costs no more than the present default. A candidate other than the
present default takes its place only if it is shown not worse than it by more than NONINFERIORITY_MARGIN points:
over every seed of every shape both ran, the seed-paired difference of their gaps, whose mean plus two standard
errors must lie below the margin (`Guard`). Else the next that passes everywhere is taken, the present default among
them; the text names the candidate the guard held back. Where the present default is not measured on every shape,
the guard cannot be read and the text says so.

The long shapes answer for each other and the single-pass shapes for each other (a single-pass shape halves its
long shape's batch so that the long schedule reads each training token once). The single-pass family sets
DEFAULT_METHOD (DECIDING_FAMILY): the long shapes read their corpus twice, which flatters validation (docs/quality.md),
so their decision is reported beside it, not applied. CPU proxies never set a default.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from . import frontier as frontiers
from . import quality_study as study
from . import testbed as beds
from .testbed import Testbed

FAMILIES = beds.FAMILIES
DECIDING_FAMILY = "single-pass"
NONINFERIORITY_MARGIN = 0.5   # points of %: the rule's own band


def shapes(family: str) -> List[Testbed]:
    """The GPU shapes that answer for each other: the long ones, or the single-pass ones."""
    try:
        return beds.shapes(family)
    except beds.TestbedError as error:
        raise study.StudyError(str(error)) from None


def collect(root: str, beds: Sequence[Testbed]) -> Dict[str, Optional[frontiers.Frontier]]:
    """Each shape's frontier under `root`, None where its long schedule has no finished stock or candidate."""
    found = {}
    for bed in beds:
        try:
            found[bed.name] = frontiers.collect(root, bed)
        except study.StudyError:
            found[bed.name] = None
    return found


@dataclass
class Guard:
    """The candidate's gap minus the present default's, seed by seed on every shape both ran (points of %)."""
    candidate: str
    default: str
    differences: List[float]

    @property
    def bound(self) -> Optional[float]:
        """Mean + 2 standard errors of the differences; None below two of them."""
        n = len(self.differences)
        if n < 2:
            return None
        return statistics.fmean(self.differences) + 2 * statistics.stdev(self.differences) / math.sqrt(n)

    @property
    def holds(self) -> bool:
        return self.bound is not None and self.bound < NONINFERIORITY_MARGIN

    def text(self) -> str:
        n = len(self.differences)
        if self.bound is None:
            return (f"`{self.candidate}` cannot be shown not worse than the present default `{self.default}` on "
                    f"{n} paired seed{'s' if n != 1 else ''}")
        mean = statistics.fmean(self.differences)
        return (f"`{self.candidate}` against the present default `{self.default}`, seed by seed on every shape: "
                f"{mean:+.2f} points, {self.bound:+.2f} at two standard errors ({n} seeds), "
                f"{'below' if self.holds else 'not below'} the guard's +{NONINFERIORITY_MARGIN:.1f}")


def paired_differences(candidate: Dict[str, frontiers.Candidate],
                       default: Dict[str, frontiers.Candidate]) -> List[float]:
    """`candidate`'s gap minus `default`'s on each (shape, seed) both ran, shapes in `candidate`'s order."""
    found = []
    for shape, mine in candidate.items():
        theirs = default.get(shape)
        if theirs is None:
            continue
        by_seed = dict(zip(theirs.gap_seeds, theirs.gaps))
        found += [gap - by_seed[seed] for seed, gap in zip(mine.gap_seeds, mine.gaps) if seed in by_seed]
    return found


def _present_default(everywhere: Dict[str, Dict[str, frontiers.Candidate]],
                     default_method: str) -> Optional[str]:
    """The candidate measured on every shape that is the present default: its method, nothing beside it."""
    for name, per in everywhere.items():
        if all(c.method == default_method and not c.knobs for c in per.values()):
            return name
    return None


@dataclass
class Decision:
    chosen: Optional[frontiers.Candidate]   # its record on the shape where it is worst
    by: str                                 # "rule", "worst shape" or "none"
    text: str


def _candidates(found: Dict[str, Optional[frontiers.Frontier]]) -> Dict[str, Dict[str, frontiers.Candidate]]:
    """name -> {shape: its candidate there}, defaults only (no study-only layer), in first-seen order."""
    names: Dict[str, Dict[str, frontiers.Candidate]] = {}
    for shape, frontier in found.items():
        for candidate in (frontier.candidates if frontier else []):
            if not study.is_study_only(candidate.name):
                names.setdefault(candidate.name, {})[shape] = candidate
    return names


def _bytes(per_shape: Dict[str, frontiers.Candidate]) -> float:
    return max(c.result.bytes_ratio for c in per_shape.values())


def _worst(per_shape: Dict[str, frontiers.Candidate]) -> frontiers.Candidate:
    return per_shape[_worst_shape(per_shape)]


def _worst_shape(per_shape: Dict[str, frontiers.Candidate]) -> str:
    """The shape where the candidate's mean gap is largest."""
    return max(per_shape, key=lambda shape: per_shape[shape].gap)


def _method_line(candidate: frontiers.Candidate, default_method: str, deciding: bool = True) -> str:
    """What lshmoe_plugin.methods.DEFAULT_METHOD needs to become the decision; for a family that does not decide,
    only how the two compare."""
    if not deciding:
        return (f" These shapes do not set `DEFAULT_METHOD` (the {DECIDING_FAMILY} shapes do; it is "
                f"`{default_method}`)" + (": the same." if candidate.method == default_method and not candidate.knobs
                                         else "."))
    if candidate.knobs:
        return (f" Its configuration ({candidate.configuration()}) is not a named method: name it in "
                f"lshmoe_plugin/methods.py, then set `DEFAULT_METHOD` to it (now `{default_method}`).")
    if candidate.method == default_method:
        return f" `DEFAULT_METHOD` is `{default_method}` already."
    return f" Set `DEFAULT_METHOD` to `{candidate.method}` (now `{default_method}`)."


def _guarded_choice(passing, everywhere, default_method: str):
    """(name, per shape, the Guard that let a new default through or None, the Guards that held candidates back,
    a note where the guard cannot be read) over `passing` [(name, per shape)]: the cheapest by bytes, then by worst
    gap, that is the present default or passes the guard against it."""
    ordered = sorted(passing, key=lambda item: (_bytes(item[1]), _worst(item[1]).gap))
    present = _present_default(everywhere, default_method)
    if present is None or present not in dict(passing):
        name, per = ordered[0]
        if name == present:
            return name, per, None, [], ""
        why = "is not measured on every shape" if present is None else "does not pass the rule on every shape"
        return name, per, None, [], (f" The guard against the present default (`{default_method}`) does not apply: "
                                     f"it {why}.")
    held = []
    for name, per in ordered:
        if name == present:
            return name, per, None, held, ""
        guard = Guard(name, present, paired_differences(per, everywhere[present]))
        if guard.holds:
            return name, per, guard, held, ""
        held.append(guard)
    raise AssertionError("the present default passes, so the loop returns")


def decide(found: Dict[str, Optional[frontiers.Frontier]], default_method: str, deciding: bool = True) -> Decision:
    """The decision of the module docstring over the shapes in `found` (every shape of one family); `deciding`:
    whether that family sets DEFAULT_METHOD (DECIDING_FAMILY), which only changes what the text asks of it."""
    missing = [shape for shape, frontier in found.items() if frontier is None]
    if missing:
        return Decision(None, "none", f"No default yet: {', '.join(f'`{s}`' for s in missing)} "
                                      f"{'have' if len(missing) > 1 else 'has'} no finished stock and candidate runs "
                                      f"at the long schedule.")
    every = list(found)
    names = _candidates(found)
    everywhere = {n: per for n, per in names.items() if set(per) == set(every)}
    passing = [(n, per) for n, per in everywhere.items() if all(c.passes for c in per.values())]
    if passing:
        name, per, let_through, held, guard_note = _guarded_choice(passing, everywhere, default_method)
        worst = _worst(per)
        gaps = "; ".join(f"`{shape}` {per[shape].gap_text()}" for shape in every)
        tied = [(n, p) for n, p in passing if n != name and math.isclose(_bytes(p), _bytes(per), abs_tol=5e-4)]
        if len(passing) == 1:
            why = "; it is the only one that passes everywhere."
        elif tied:
            why = (f"; of the {len(passing)} that pass everywhere, the fewest, tied with "
                   + ", ".join(f"`{n}`" for n, _ in tied) + f" and ahead on its worst shape's gap ({worst.gap:+.2f}%"
                   f" against " + ", ".join(f"{_worst(p).gap:+.2f}% on `{_worst_shape(p)}`" for _, p in tied) + ").")
        else:
            why = f"; of the {len(passing)} that pass everywhere, the fewest."
        if held:
            why = (f"; of the {len(passing)} that pass everywhere, the fewest once the guard against the present "
                   f"default is read.")
        guard_text = "".join(f" The guard holds back {g.text()}." for g in held)
        if let_through:
            guard_text += f" The guard lets it through: {let_through.text()}."
        guard_text += guard_note
        return Decision(worst, "rule", (
            f"`{name}` ({worst.configuration()}) passes the rule on every shape ({gaps}) and sends at most "
            f"{_bytes(per):.3f} of stock's bytes" + why + guard_text + _method_line(worst, default_method, deciding)))
    eligible = [(n, per) for n, per in everywhere.items()
                if all(c.seeds >= frontiers.SEEDS_NEEDED for c in per.values())
                and _bytes(per) <= frontiers.BYTES_LIMIT]
    if not eligible:
        short = [f"`{n}` ({', '.join(f'{s} {c.seeds}' for s, c in per.items())}"
                 + (f"; not trained on {', '.join(s for s in every if s not in per)}" if set(per) != set(every)
                    else "") + ")" for n, per in names.items() if _bytes(per) <= frontiers.BYTES_LIMIT]
        return Decision(None, "none", "No candidate passes the rule on every shape, and none within the bytes "
                                      f"limit has {frontiers.SEEDS_NEEDED} seeds on every shape to be chosen by "
                                      f"its worst shape: " + ("; ".join(short) or "no candidate within the bytes "
                                                                                 "limit") + ".")
    name, per = min(eligible, key=lambda item: (_worst(item[1]).gap, _bytes(item[1])))
    worst = _worst(per)
    failing = "; ".join(f"`{shape}`: " + ", ".join(v.reason for v in c.verdicts.values()
                                                   if v.state != frontiers.YES)
                        for shape, c in per.items() if not c.passes)
    others = [f"`{n}` {_worst(p).gap:+.2f}% on `{_worst_shape(p)}`" for n, p in eligible if n != name]
    return Decision(worst, "worst shape", (
        f"No candidate passes the rule on every shape. By its worst shape the default is `{name}` "
        f"({worst.configuration()}): it ends at most {worst.gap:+.2f}% from stock's final loss (on "
        f"`{_worst_shape(per)}`), and fails the rule on {failing}."
        + (f" The others within the bytes limit with {frontiers.SEEDS_NEEDED} seeds everywhere, at their worst: "
           f"{'; '.join(others)}." if others else "") + _method_line(worst, default_method, deciding)))


def pooled(per_shape: Dict[str, frontiers.Candidate]) -> str:
    """Every seed's gap on every shape measured, as one sample: its mean ± standard error. Informational, not the
    rule: three seeds of one shape leave a mean gap uncertain by about stdev / sqrt(3) (0.4 points where seeds move
    0.7), which the rule's ±0.5% band cannot resolve alone; pooling the shapes shows a cost that every shape shares."""
    gaps = [gap for candidate in per_shape.values() for gap in candidate.gaps]
    if len(gaps) < 2:
        return f"{gaps[0]:+.2f}% (1 seed)"
    return (f"{statistics.fmean(gaps):+.2f}% ± {statistics.stdev(gaps) / math.sqrt(len(gaps)):.2f}% "
            f"({len(gaps)} seeds)")


def table(found: Dict[str, Optional[frontiers.Frontier]]) -> str:
    """One row per candidate: its mean gap and seeds on each shape, whether it passes there, its bytes, its worst
    gap, and every seed of every shape pooled (`pooled`)."""
    every = list(found)
    headers = ["candidate", *[f"`{shape}`" for shape in every], "passes on every shape", "bytes vs stock (max)",
               "worst gap", "every seed of every shape (mean ± s.e.)"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for name, per in _candidates(found).items():
        cells = [f"`{name}`"]
        for shape in every:
            c = per.get(shape)
            cells.append(("not measured" if found[shape] is None else "not trained") if c is None else
                         f"{c.gap:+.2f}% ({c.seeds} seed{'s' if c.seeds > 1 else ''}), "
                         f"{'passes' if c.passes else 'fails'}")
        cells += ["yes" if set(per) == set(every) and all(c.passes for c in per.values()) else "no",
                  f"{_bytes(per):.3f}", f"{_worst(per).gap:+.2f}% (`{_worst_shape(per)}`)", pooled(per)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
