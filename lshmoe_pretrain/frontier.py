"""Issue 24's frontier: every candidate's final gap against its all-to-all bytes at a testbed's long schedule, each
checked against the rule for the plugin's default, and the default that rule chooses.

The rule: the default ends within ±0.5% of stock's final validation loss and within stock's seed spread, over 3
seeds, its gap does not grow across the testbed's three schedule lengths (lshmoe_pretrain.testbed.LENGTHS), and it
sends at most 0.5 of stock's all-to-all bytes, all four crossings counted. If no candidate passes, the default is
the one that reaches stock's final loss soonest on a modelled 200 Gb/s link with 8 GPUs per node at EP=16: the
measured tokens to that loss over stock's, divided by the modelled step speed-up of the candidate's configuration
(its own row or its method's in a ``benchmark_gpt_moe.py --modelled-link`` section of docs/benchmarks.md; gpu_session
stage `bench-modelled-135m-candidates` times the candidates). Every figure comes from a record: the
losses and bytes from the runs, the speed-ups from the benchmark sections; one without a source is named missing,
with the command that would measure it, and never stands in for another.
"""
from __future__ import annotations

import dataclasses
import os
import re
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import bench_variants, length_study
from . import quality_study as study
from .quality_records import variant_configuration
from .step_sources import modelled_note
from .testbed import LENGTHS, TESTBEDS, Testbed, family, shapes

GAP_BAND = 0.5          # % of stock's final loss, either side; also the rise across lengths that counts as growth
BYTES_LIMIT = 0.5       # of stock's all-to-all bytes
SEEDS_NEEDED = 3
LINK, EP, GPUS_PER_NODE = "200gbps", 16, 8   # the fallback's modelled cluster
YES, NO, UNMEASURED = "yes", "no", "not measured"
CRITERIA = ("within ±0.5%", "within stock's spread", "bytes ≤ 0.5", "≥ 3 seeds", "gap not growing across lengths")
# Candidates that a one-seed screen chose, written down before their other seeds ran (docs/quality.md, "Next on a
# GPU", 2026-12-05 late evening): the seeds that chose a candidate cannot also confirm it, so its other seeds alone
# must end within ±0.5% as well as the mean of all of them.
CHOSEN_ON_SEEDS: Dict[str, Tuple[int, ...]] = {"fp4_both_sr": (1,), "fp8_fwd_fp4sr_grad": (1,)}


@dataclass(frozen=True)
class Verdict:
    """One criterion of the rule for one candidate: its state, the numbers behind it (for the table's cell) and,
    when it does not pass, why in words (for the choice's sentences)."""
    state: str      # YES, NO or UNMEASURED
    detail: str
    reason: str = ""

    def cell(self) -> str:
        return f"{self.state} ({self.detail})" if self.detail else self.state


@dataclass
class Candidate:
    """One variant at the long schedule, paired with stock's runs of the same seeds."""
    name: str
    method: str                                 # lshmoe_plugin.methods name ("custom" when none)
    knobs: Dict[str, object]                    # what it sets beside the method's own configuration
    result: study.VariantResult
    gaps: List[float]                           # per seed, % of stock's final loss of the same seed
    length_gaps: List[Tuple[float, List[float]]]  # (schedule length, per-seed gaps) at every length both ran
    target: float                               # stock's final loss, mean over the seeds both ran
    tokens: Optional[float]                     # tokens to `target` (seed-mean curve); None: not reached
    stock_tokens: float                         # stock's tokens to `target`, on the same seeds' curve
    verdicts: Dict[str, Verdict]
    crossing: List[int] = dataclasses.field(default_factory=list)  # seeds paired with stock's on another card
    gap_seeds: List[int] = dataclasses.field(default_factory=list)  # the seed of each of `gaps`

    @property
    def token_ratio(self) -> Optional[float]:
        return None if self.tokens is None else self.tokens / self.stock_tokens

    @property
    def gap(self) -> float:
        return statistics.fmean(self.gaps)

    @property
    def passes(self) -> bool:
        return all(v.state == YES for v in self.verdicts.values())

    @property
    def seeds(self) -> int:
        return len(self.gaps)

    def configuration(self) -> str:
        """'method `bounded`, merge_tolerance 0.2': the method and the knobs beside it."""
        knobs = "".join(f", {key} {value}" for key, value in self.knobs.items())
        return f"method `{self.method}`{knobs}"

    def gap_text(self) -> str:
        across = f", {study.seed_list(self.crossing)} across cards" if self.crossing else ""
        return (f"{self.gaps[0]:+.2f}% (1 seed{across})" if self.seeds == 1 else
                f"{self.gap:+.2f}% ± {statistics.stdev(self.gaps):.2f}% ({self.seeds} seeds{across})")


@dataclass
class Frontier:
    bed: Testbed
    rows: List[length_study.LengthRow]   # every schedule length with finished stock runs, shortest first
    candidates: List[Candidate]
    unfinished: List[str] = dataclasses.field(default_factory=list)  # asked for, no finished run at the long one
    root: Optional[str] = None           # where the records were read: the other shapes' verdicts are read there too

    @property
    def long(self) -> length_study.LengthRow:
        return self.rows[-1]

    @property
    def baseline(self) -> str:
        """The plugin-off variant that plays stock (`stock` unless collect was given another)."""
        return length_study.baseline_of(self.rows)

    @property
    def stock(self) -> study.VariantResult:
        return self.long.stock

    @property
    def target(self) -> float:
        """Stock's final validation loss at the long schedule, mean over its seeds."""
        return self.stock.mean_at(len(self.stock.tokens) - 1)

    @property
    def stock_tokens(self) -> float:
        return study.tokens_to_reach(self.stock, self.target)


def at_rate_of(variant: str, baseline: str) -> bool:
    """Whether `variant` is a candidate against `baseline` (a plugin-off variant): an lsh_moe block a user trains,
    at the baseline's learning rate. Against stock, the variants that are not study-only; against stock_lr1.5x,
    those at 1.5x the study's rate (fp8_fwd_fp4sr_grad_lr1.5x: the default's block there). A diagnostic layer never
    is."""
    return (variant in study.VARIANTS and variant != baseline and bool(study.VARIANTS[variant].get("enabled"))
            and variant not in study.DIAGNOSTICS and study.lr_scale(variant) == study.lr_scale(baseline))


def collect(root: str, bed: Testbed, variants: Optional[Sequence[str]] = None, baseline: str = "stock") -> Frontier:
    """Every candidate with finished runs at the long schedule (``<root>/<testbed>/x1``), each checked against the
    rule. `variants`: those only (default: every study variant with a run directory there that is a candidate at
    `baseline`'s rate (`at_rate_of`): the study-only diagnostic layers and, against stock, the learning-rate
    controls left out). `baseline`: the plugin-off variant that plays stock (stock_lr1.5x: the rule at 1.5x the
    study's peak rate, every gap, spread and token count against it)."""
    long_root = os.path.join(root, bed.name, "x1", bed.model_kind)
    if variants is None:
        variants = sorted(v for v in (os.listdir(long_root) if os.path.isdir(long_root) else [])
                          if at_rate_of(v, baseline))
    unknown = [v for v in variants if v not in study.VARIANTS]
    if unknown:
        raise study.StudyError(f"--variants {unknown}: allowed {sorted(study.VARIANTS)}")
    variants = [v for v in variants if v != baseline]
    rows = length_study.collect(root, bed, variants, baseline)
    if rows[-1].length != 1.0:
        raise study.StudyError(f"no finished {baseline} runs at the long schedule ({long_root}/{baseline}/seed*)")
    frontier = Frontier(bed, rows, [], [v for v in variants if v not in rows[-1].variants], root)
    for name in (v for v in variants if v in rows[-1].variants):
        gaps = rows[-1].gap(name)
        if gaps is None:
            raise study.StudyError(f"{long_root}/{name}: seeds {rows[-1].variants[name].seeds} share none with "
                                   f"{baseline}'s ({rows[-1].stock.seeds}); its gap pairs each seed with "
                                   f"{baseline}'s")
        method, knobs = variant_configuration(name)
        result = rows[-1].variants[name]
        # Paired like the gap: stock on the candidate's seeds, so that a one-seed control identical to stock's run
        # of that seed reads 1.000x, not the difference between that seed and stock's mean over all of its seeds.
        stock = dataclasses.replace(rows[-1].stock, seeds=[s for s in result.seeds if s in rows[-1].stock.seeds])
        target = stock.mean_at(len(stock.tokens) - 1)
        candidate = Candidate(name, method, knobs, result, gaps,
                              [(row.length, row.gap(name)) for row in rows if row.gap(name)], target,
                              study.tokens_to_reach(result, target), study.tokens_to_reach(stock, target), {},
                              study.cross_card_seeds(result, rows[-1].stock),
                              [seed for seed in result.seeds if seed in rows[-1].stock.seeds])
        candidate.verdicts = verdicts(candidate, rows[-1].stock_spread())
        frontier.candidates.append(candidate)
    if not frontier.candidates:
        raise study.StudyError(f"no finished runs of {list(variants) or 'any candidate'} under {long_root}")
    return frontier


def verdicts(candidate: Candidate, spread: Optional[float]) -> Dict[str, Verdict]:
    """The rule's criteria, in CRITERIA's order. The gap is the mean of the per-seed gaps; stock's spread is its
    sample standard deviation over seeds as % of its mean (the band the gap must stay within)."""
    gap, bytes_ratio, seeds = candidate.gap, candidate.result.bytes_ratio, candidate.seeds
    band = (Verdict(YES, f"{gap:+.2f}%") if abs(gap) <= GAP_BAND else
            Verdict(NO, f"{gap:+.2f}%", f"ends {gap:+.2f}% from stock's final loss, outside ±{GAP_BAND:g}%"))
    if band.state == YES and candidate.name in CHOSEN_ON_SEEDS:
        band = confirming_seeds(candidate, band)
    if spread is None:
        within = Verdict(UNMEASURED, "stock has 1 seed", "cannot be held to stock's seed spread (1 stock seed)")
    elif abs(gap) <= spread:
        within = Verdict(YES, f"{gap:+.2f}% vs ±{spread:.2f}%")
    else:
        within = Verdict(NO, f"{gap:+.2f}% vs ±{spread:.2f}%", f"is outside stock's seed spread (±{spread:.2f}%)")
    sends = (Verdict(YES, f"{bytes_ratio:.3f}") if bytes_ratio <= BYTES_LIMIT else
             Verdict(NO, f"{bytes_ratio:.3f}", f"sends {bytes_ratio:.3f} of stock's bytes (> {BYTES_LIMIT:g})"))
    enough = (Verdict(YES, str(seeds)) if seeds >= SEEDS_NEEDED else
              Verdict(NO, str(seeds), f"has {seeds} seed{'s' if seeds > 1 else ''} (the rule needs {SEEDS_NEEDED})"))
    return dict(zip(CRITERIA, (band, within, sends, enough, growth(candidate.length_gaps))))


def confirming_seeds(candidate: Candidate, band: Verdict) -> Verdict:
    """The band's verdict for a candidate a screen chose (CHOSEN_ON_SEEDS): it passes only if its other seeds'
    mean gap is within ±GAP_BAND too; with no other seed yet, the seeds rule says so and this adds nothing."""
    chosen = CHOSEN_ON_SEEDS[candidate.name]
    others = [(seed, gap) for seed, gap in zip(candidate.gap_seeds, candidate.gaps) if seed not in chosen]
    if not others:
        return band
    gap = statistics.fmean(g for _, g in others)
    detail = f"{band.detail}; {study.seed_list([s for s, _ in others])} alone {gap:+.2f}%"
    if abs(gap) <= GAP_BAND:
        return Verdict(YES, detail)
    return Verdict(NO, detail, f"was chosen by {study.seed_list(chosen)}, and its other seeds alone end {gap:+.2f}% "
                               f"from stock's final loss, outside ±{GAP_BAND:g}%")


def growth(length_gaps: Sequence[Tuple[float, List[float]]]) -> Verdict:
    """Whether the gap grows with the schedule: it does when the mean gap of a longer schedule exceeds that of a
    shorter one by more than GAP_BAND points (less cannot be told from the rule's own band). It passes only over
    all three lengths; with fewer, a rise already fails, and no rise is 'not measured'."""
    means = [(length, statistics.fmean(gaps)) for length, gaps in sorted(length_gaps)]
    series = " → ".join(f"{gap:+.2f}%" for _, gap in means)
    lengths = ", ".join(f"{length:g}x" for length, _ in means)
    rise = max((later - earlier for i, (_, earlier) in enumerate(means) for _, later in means[i + 1:]), default=None)
    if rise is not None and rise > GAP_BAND:
        return Verdict(NO, f"{series} over {lengths}", f"its gap grows with the schedule ({series} over {lengths})")
    missing = [length for length in LENGTHS if length not in {length for length, _ in means}]
    if missing:
        detail = (f"{series} over {lengths}; " if len(means) > 1 else "") + "no run at " + ", ".join(
            f"{length:g}x" for length in missing)
        return Verdict(UNMEASURED, detail, f"its gap across lengths is not measured ({detail})")
    return Verdict(YES, f"{series} over {lengths}")


# -- the fallback's step speed-ups -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speedup:
    """A candidate's modelled step speed-up against stock at LINK, EP, GPUS_PER_NODE, or why there is none."""
    value: Optional[float]
    section: Optional[str]
    note: str
    preset: Optional[str] = None    # the model whose step time it is (the section's), when the section states it


_BEGIN = re.compile(r"<!-- BEGIN (\S+) -->")
_TOPOLOGY = re.compile(rf"_modelled_ep[\d-]+_g{GPUS_PER_NODE}(?:_|$)")
_SPEEDUP = "speed-up vs stock (modelled)"
# The gpu_session.sh stage that times candidates at LINK, EP and GPUS_PER_NODE (VARIANTS="..." names them), and the
# model it times: one rank's shapes of STAGE_PRESET with 1 expert per rank.
STAGE, STAGE_PRESET = "bench-modelled-135m-candidates", "gpt-moe-135m"


def modelled_sections(benchmarks: str, names: Sequence[str] = ()) -> List[str]:
    """The sections of `benchmarks` that model GPUS_PER_NODE GPUs per node (``..._modelled_ep<K>_g8[_variants]``,
    the current link model), or `names` as given, each checked to exist."""
    if not os.path.isfile(benchmarks):
        raise study.StudyError(f"--benchmarks {benchmarks!r}: no such file")
    found = _BEGIN.findall(open(benchmarks).read())
    missing = [name for name in names if name not in found]
    if missing:
        raise study.StudyError(f"--modelled_section {missing}: {benchmarks} has no such section")
    return list(names) or [name for name in found if _TOPOLOGY.search(name)]


def speedup(candidate: Candidate, bed: Testbed, benchmarks: str, sections: Sequence[str]) -> Speedup:
    """The modelled step speed-up of the candidate's configuration at LINK and EP from a row of exactly that
    configuration: first by the candidate's own name, ``<name> @ <link> EP<k>`` of a section that records the study's
    lsh_moe block of that name as it is now (lshmoe_pretrain/bench_variants.py); then, for a named method with
    nothing set beside it but the rate, the benchmark's row of that method (``lsh`` for the paper's, the method's
    name for the others) at the candidate's rate and, for FP8, the default block size. Either in the first of
    `sections` that has it, those of the quality runs' preset first, then in file order. A row of another
    configuration is never taken; without one, the note names the stage that would time the candidate."""
    from . import benchmarking as bench
    from .step_sources import section_model
    where = f"{LINK} EP{EP}"
    # a block trained at a scaled learning rate steps as the same block at the study's rate: its row is that one's
    timed = study.rate_base(candidate.name)
    knobs = candidate.knobs if timed == candidate.name else variant_configuration(timed)[1]
    found, refusal = timed_rows(timed, candidate.method, knobs, benchmarks, sections, bed.preset)
    if refusal is not None:
        return Speedup(None, None, f"no modelled step time for `{candidate.name}`: {refusal}")
    method = _method_row(candidate.method, knobs)
    texts = {name: bench.read_section_text(benchmarks, name) for name in sections}
    models = {name: section_model(texts[name]) for name in sections}
    tables = {name: bench.read_section_table(benchmarks, name) for name in sections}
    for name, label in found:
        rows = tables[name]
        if f"{label} @ {where}" in rows and f"stock @ {where}" in rows:
            preset = getattr(models[name], "preset", None)
            note = modelled_note(candidate.result.info, name, texts[name], EP)
            if timed != candidate.name:
                note = f"`{timed}`'s step (the same lsh_moe block at the study's rate): {note}"
            return Speedup(float(rows[f"{label} @ {where}"][_SPEEDUP]), name,
                           (f"step time of preset `{preset}`: " if preset else "") + note, preset)
    rows_sought = f"`{timed} @ {where}`"
    if method is not None:
        at_rate = f" at rate {method[1]:g}" if method[1] is not None else ""
        rows_sought += (f" (method `{candidate.method}`{at_rate})" if method[0] == timed else
                        f" nor `{method[0]} @ {where}` (method `{candidate.method}`{at_rate}, the same lsh_moe block)")
    return Speedup(None, None, f"no modelled step time for `{candidate.name}` at {LINK}, EP={EP}, {GPUS_PER_NODE} "
                               f"GPUs per node yet: no section has a row {rows_sought} (command: "
                               f"`{stage_command([timed])}`, {stage_words()})")


def timed_rows(variant: str, method: str, knobs: Dict[str, object], benchmarks: str, sections: Sequence[str],
               preset: Optional[str] = None) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    """(every (section, row label) that times exactly study variant `variant`'s configuration, None), in the order
    `speedup` looks: the sections of `preset` first, then as given; rows under the variant's own name where a
    section records its lsh_moe block as it is now, then its method's row (`method` with `knobs` beside it: see
    `_method_row`). ([], why) for a variant no benchmark times (a diagnostic layer, say)."""
    from . import benchmarking as bench
    from .step_sources import section_model
    own, refusal = _own_block(variant)
    if refusal is not None:
        return [], refusal
    row = _method_row(method, knobs)
    texts = {name: bench.read_section_text(benchmarks, name) for name in sections}
    ordered = sorted(sections, key=lambda name: getattr(section_model(texts[name]), "preset", None) != preset)
    found = [(name, variant) for name in ordered if own is not None
             and bench_variants.recorded_study_variants(texts[name]).get(variant) == own]
    found += [(name, row[0]) for name in ordered if row is not None and _section_runs_method(texts[name], *row)]
    return found, None


def stage_command(variants: Sequence[str]) -> str:
    return f"VARIANTS=\"{' '.join(variants)}\" bash scripts/gpu_session.sh {STAGE}"


def stage_words() -> str:
    return (f"the step time of preset `{STAGE_PRESET}` with 1 expert per rank, a {EP}-expert job at EP={EP}, "
            f"timed with stock at 100/200/400 Gb/s")


def _own_block(name: str) -> Tuple[Optional[Tuple[dict, Optional[float]]], Optional[str]]:
    """(the study's lsh_moe block and exact tail of variant `name` as the benchmark times it, None) for a study
    variant the benchmark times under its own name; (None, None) for one of the benchmark's own names that the
    study has no variant of (found by method); (None, why) for a variant no benchmark times (a diagnostic layer,
    say)."""
    if name in bench_variants.BENCHMARK_VARIANTS:
        if name in study.VARIANTS and not study.is_study_only(name):
            # a method named after the study's variant (fp8_fwd_fp4_grad): sections from before it had its name
            # timed the study's block under that name, and count where they record that block as it is now
            return (study.lsh_moe_block(name), study.exact_tail(name)), None
        return None, None
    try:
        variant = bench_variants.study_variant(name)
    except bench_variants.VariantError as error:
        return None, str(error).split(": ", 1)[1]
    return (variant.block, variant.exact_tail), None


def _method_row(method: str, knobs: Dict[str, object]) -> Optional[Tuple[str, Optional[float]]]:
    """(the benchmark's variant of a candidate's method, its rate or None) when the candidate is that method with
    nothing set beside it (`knobs`) but the rate; else None (a custom configuration, another knob, a schedule)."""
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.methods import CUSTOM, METHODS
    if method == CUSTOM or any(k != "compression_rate" for k in knobs):
        return None
    if METHODS[method].stages["clustering"] == "none":
        return method, None
    rate = float(knobs.get("compression_rate", LSHMoEConfig().compression_rate))
    return ("lsh" if method == "paper" else method), rate


def _section_runs_method(text: str, label: str, rate: Optional[float]) -> bool:
    """Whether a benchmark_gpt_moe.py section ran the benchmark's variant `label` as the method's own
    configuration: at `rate` (from the title: 'LSH-MoE rate 0.2' for lsh, '`paper_fp8` (rate 0.2)' for a method),
    and, for a method that sends FP8, at the default block size (the method's sentence: 'one FP8 scale per 128
    elements')."""
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.methods import METHODS
    title = next((line for line in text.splitlines() if line.startswith("## ")), "")
    if rate is not None:
        pattern = r"LSH-MoE rate ([\d.]+)" if label == "lsh" else rf"`{re.escape(label)}` \(rate ([\d.]+)\)"
        found = re.search(pattern, title)
        if found is None or float(found.group(1)) != rate:
            return False
    if label in METHODS and "fp8_e4m3" in METHODS[label].stages.values():
        block = re.search(rf"`{re.escape(label)}` \(lsh_moe\.method `{re.escape(label)}`[^)]*one FP8 scale per "
                          rf"(\d+) elements", text)
        return block is not None and int(block.group(1)) == LSHMoEConfig().fp8_block_size
    return True


def _knob_text(knobs: Dict[str, object]) -> str:
    return ", ".join(f"{key} {value}" for key, value in knobs.items())


# -- the choice ---------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    chosen: Optional[Candidate]
    by: str            # "rule", "fallback" or "none"
    text: str


def choose(frontier: Frontier, speedups: Dict[str, Speedup]) -> Choice:
    """The rule applied: of the candidates that pass every criterion, the one that sends the fewest bytes (then the
    smallest gap); if none passes, the one with the shortest modelled time to stock's final loss; else none, and
    why. `speedups` by candidate name: only the fallback reads them."""
    passing = _passing(frontier)
    if passing:
        best = passing[0]
        shapes = _scope(frontier, best.name)
        lengths = best.verdicts[CRITERIA[4]].detail
        return Choice(best, "rule", (
            f"The rule chooses `{best.name}` ({best.configuration()}): it ends "
            f"{best.gap_text()} from stock's final loss (stock's seed spread "
            f"±{frontier.long.stock_spread():.2f}%), its gap does not grow ({lengths}), and it sends "
            f"{best.result.bytes_ratio:.3f} of stock's all-to-all bytes"
            + (f"; of the {len(passing)} candidates that pass, it sends the fewest." if len(passing) > 1
               else "; it is the only candidate that passes.") + _repeats_caveat(frontier, best) + shapes))
    shapes = _scope(frontier, None)
    failing = "; ".join(f"`{c.name}` ({c.configuration()}) " + ", ".join(
        v.reason for v in c.verdicts.values() if v.state != YES) for c in frontier.candidates)
    text = f"No candidate passes the rule on `{frontier.bed.name}` yet: {failing}."
    timed, untimed = [], []
    for c in frontier.candidates:
        ratio, step = c.token_ratio, speedups[c.name]
        if ratio is None:
            untimed.append(f"`{c.name}` never reaches stock's final loss (ends {c.gap:+.2f}%)")
        elif step.value is None:
            untimed.append(f"`{c.name}` reaches it at {ratio:.3f}x stock's tokens, but has {step.note}")
        else:
            timed.append((ratio / step.value, ratio, step, c))
    cluster = f"{LINK}, EP={EP}, {GPUS_PER_NODE} GPUs per node"
    if not timed:
        return Choice(None, "none", text + f" The fallback (the shortest time to stock's final loss at {cluster}) "
                                           f"has no candidate to choose: {'; '.join(untimed)}." + shapes)
    time, ratio, step, best = min(timed, key=lambda t: t[0])
    slower = (" — slower than stock itself, so no configuration reaches stock's loss sooner there"
              if time >= 1 else "")
    rest = f" The others: {'; '.join(untimed)}." if untimed else ""
    if best.seeds < SEEDS_NEEDED:
        # One seed's token ratio is within the trajectories' spread (on the H200 testbed a same-seed pair ends up to
        # 0.8% apart with no cost at all), so the fallback, like the rule, sets nothing on fewer than 3 seeds.
        return Choice(None, "none", text + (
            f" The fallback (the shortest time to stock's final loss at {cluster}) would point at `{best.name}` "
            f"({best.configuration()}): {ratio:.3f}x stock's tokens at a step speed-up of {step.value:.3f}, "
            f"{time:.3f}x stock's time{slower}, but on {best.seeds} seed{'s' if best.seeds > 1 else ''}: like the "
            f"rule it needs {SEEDS_NEEDED} before it sets a default.") + rest + shapes)
    return Choice(best, "fallback", text + (
        f" By the fallback the default is `{best.name}` ({best.configuration()}): it needs "
        f"{ratio:.3f}x stock's tokens to stock's final loss (measured) at a step speed-up of {step.value:.3f} "
        f"(modelled at {cluster}" + (f" for preset `{step.preset}`" if step.preset else "") + f", `{step.section}`), "
        f"{time:.3f}x stock's time{slower}.") + rest + shapes)


# How far (percentage points) a candidate's training-loss gap may sit above its validation gap on a schedule that
# repeats the corpus before the choice says its pass rests on the repeats. Within one pass the two gaps of every
# per-token format on every testbed shape agree to 0.2 points (docs/quality.md, the lengths sections' second table).
REPEATS_TOLERANCE = 0.3


def _repeats_caveat(frontier: Frontier, candidate: Candidate) -> str:
    """'' unless the long schedule goes over the train split more than once and the candidate's training loss over
    the last 10% of steps is further from stock's than its validation loss by more than REPEATS_TOLERANCE: then its
    validation gap is partly the repeats, which stock memorised better, and a user training on one pass gets the
    larger cost. The rule as issue 24 wrote it reads validation only; this says what that leaves out."""
    passes = study.passes_over_data(frontier.stock)
    train, valid = frontier.long.train_gap(candidate.name), frontier.long.gap(candidate.name)
    if passes <= 1 or not train or not valid:
        return ""
    train_mean, valid_mean = statistics.fmean(train), statistics.fmean(valid)
    if train_mean - valid_mean <= REPEATS_TOLERANCE:
        return ""
    text = (f" But its pass rests on the repeats: the long schedule goes {passes:.2f} times over the train split, "
            f"and there `{candidate.name}`'s training loss over the last 10% of steps ends {train_mean:+.2f}% from "
            f"stock's against {valid_mean:+.2f}% in validation.")
    within = [row for row in frontier.rows if study.passes_over_data(row.stock) <= 1 and row.gap(candidate.name)]
    if within:
        row = within[-1]
        train_within = row.train_gap(candidate.name)
        text += (f" The longest schedule within one pass ({row.length:g}x, {study.passes_over_data(row.stock):.2f} "
                 f"passes) has it at {statistics.fmean(row.gap(candidate.name)):+.2f}% in validation"
                 + (f" and {statistics.fmean(train_within):+.2f}% in training" if train_within else "")
                 + ": the nearest measurement of what a user who trains on one pass gets.")
    single = [b.name for b in TESTBEDS.values() if b.single_pass_of == frontier.bed.name]
    if single:
        text += f" `{single[0]}` reads the rule within one pass."
    return text


def _passing(frontier: Frontier) -> List[Candidate]:
    """The candidates that pass every criterion, the one the rule chooses first (fewest bytes, then smallest gap).
    A diagnostic layer, or a learning-rate control at another rate than the baseline's, named on purpose keeps its
    row, but is never a default: no lsh_moe block trains what it does at that rate."""
    passing = [c for c in frontier.candidates if c.passes and at_rate_of(c.name, frontier.baseline)]
    return sorted(passing, key=lambda c: (c.result.bytes_ratio, abs(c.gap)))


def _scope(frontier: Frontier, chosen: Optional[str]) -> str:
    """What the verdict on one testbed is worth: a GPU shape is one of the shapes the rule asks about, so the
    sentence says what the rule chose on each other GPU shape with records under the same root (and whether
    `chosen` passes there), and which shapes are still to measure; a CPU proxy only orders what the testbed it
    stands in for screens, and never sets the default."""
    bed = frontier.bed
    if bed.proxy_of:
        return (f" `{bed.name}` is a CPU proxy of `{bed.proxy_of}`: this verdict orders what `{bed.proxy_of}` "
                f"screens first and sets no default.")
    if bed.widens is not None:
        return (f" `{bed.name}` is a width check of `{bed.widens}`: what its verdict may change is written before "
                f"its runs (docs/quality.md), and by the rule it sets no default.")
    # the long shapes answer for each other, and the single-pass shapes for each other
    others = [b for b in shapes(family(bed)) if b.name != bed.name]
    if not others:
        return ""
    measured, unmeasured = [], []
    for other in others:
        try:
            found = collect(frontier.root, other, baseline=frontier.baseline) if frontier.root else None
        except study.StudyError:   # no finished stock or candidate at that shape's long schedule
            found = None
        if found is None:
            unmeasured.append(f"`{other.name}`")
            continue
        passing = [c.name for c in _passing(found)]
        if chosen is not None and chosen in passing:
            verdict = (f"chooses `{chosen}` too" if passing[0] == chosen else
                       f"passes `{chosen}` too, and chooses `{passing[0]}`")
        elif passing:
            trained = chosen in {c.name for c in found.candidates}
            verdict = f"chooses `{passing[0]}`" + (
                f" (`{chosen}` {'does not pass' if trained else 'has not trained'} there)" if chosen else "")
        else:
            verdict = "passes no candidate"
        measured.append(f"`{other.name}` {verdict}")
    text = f" The rule asks this of every shape: on the same records, {'; '.join(measured)}" if measured else \
        " The rule asks this of every shape"
    if unmeasured:
        text += (f"{'; ' if measured else ': '}{', '.join(unmeasured)} "
                 f"{'are' if len(unmeasured) > 1 else 'is'} still to measure")
    return text + "."


# -- the section ----------------------------------------------------------------------------------------------------
def table(frontier: Frontier) -> str:
    """One row per candidate (stock first, as the reference): seeds, final loss, gap, stock's spread, bytes, each
    criterion of the rule, whether it passes all of them, tokens to stock's final loss."""
    baseline = frontier.baseline
    headers = ["variant", "method", "seeds", "final loss (mean ± std)", f"gap vs {baseline} per seed (mean ± std)",
               f"{baseline}'s seed spread (std)", "all-to-all bytes vs stock", *CRITERIA, "passes the rule",
               f"tokens to {baseline}'s final loss"]
    stock, spread = frontier.stock, frontier.long.stock_spread()
    spread_cell = f"±{spread:.2f}%" if spread is not None else "– (1 seed)"
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |",
             "| " + " | ".join([baseline, "plugin off" + ("" if baseline == "stock" else
                                                          f", {study.lr_scale(baseline):g}x the peak rate"),
                                str(len(stock.seeds)),
                                study.mean_and_spread([stock.final(s) for s in stock.seeds]), "–", spread_cell,
                                f"{stock.bytes_ratio:.3f}", *("–" for _ in CRITERIA), "–",
                                f"{study.millions(frontier.stock_tokens)} (1.000x)"]) + " |"]
    for c in frontier.candidates:
        ratio = c.token_ratio
        tokens = (f"{study.millions(c.tokens)} ({ratio:.3f}x)" if ratio is not None else
                  f"not reached in {study.millions(c.result.tokens[-1])} (final gap {c.gap:+.2f}%)")
        lines.append("| " + " | ".join([
            c.name, c.configuration()[len("method "):], str(c.seeds),
            study.mean_and_spread([c.result.final(s) for s in c.result.seeds]), c.gap_text(), spread_cell,
            f"{c.result.bytes_ratio:.3f}", *(c.verdicts[name].cell() for name in CRITERIA),
            YES if c.passes else NO, tokens]) + " |")
    return "\n".join(lines)


def fallback_table(frontier: Frontier, speedups: Dict[str, Speedup]) -> str:
    """Per candidate: measured token ratio, modelled step speed-up and their quotient, the time to stock's final
    loss against stock's, each labelled measured or modelled."""
    headers = ["variant", "tokens to stock's final loss / stock's (measured)",
               f"step speed-up at {LINK}, EP={EP}, {GPUS_PER_NODE} GPUs per node (modelled)",
               "time to stock's final loss / stock's", "step time from"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for c in frontier.candidates:
        ratio, step = c.token_ratio, speedups[c.name]
        tokens = f"{ratio:.3f}" if ratio is not None else f"not reached (final gap {c.gap:+.2f}%)"
        time = (f"{ratio / step.value:.3f} (measured / modelled)" if ratio is not None and step.value is not None
                else "–")
        lines.append("| " + " | ".join([c.name, tokens, f"{step.value:.3f}" if step.value is not None else "–",
                                         time, step.note]) + " |")
    return "\n".join(lines)


def plot(frontier: Frontier, path: str, title: str) -> None:
    """Final gap (%) against all-to-all bytes as a fraction of stock's (log x), one point per candidate (mean of
    the per-seed gaps, the seeds' range as error bars), stock's seed spread (± one std) as a grey band, and the
    rule's box (bytes ≤ 0.5, gap within ±0.5%) outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.5))
    spread = frontier.long.stock_spread()
    if spread is not None:
        ax.axhspan(-spread, spread, color="grey", alpha=0.25, label=f"{frontier.baseline}'s seed spread (± std)")
    xs = [c.result.bytes_ratio for c in frontier.candidates] + [1.0]
    ax.add_patch(plt.Rectangle((min(xs) / 2, -GAP_BAND), BYTES_LIMIT - min(xs) / 2, 2 * GAP_BAND, fill=False,
                               edgecolor="green", linestyle="--", label="the rule: bytes ≤ 0.5, gap within ±0.5%"))
    ax.plot([1.0], [0.0], "ks", label=frontier.baseline)
    for c in frontier.candidates:
        low, high = c.gap - min(c.gaps), max(c.gaps) - c.gap
        ax.errorbar([c.result.bytes_ratio], [c.gap], yerr=[[low], [high]], marker="o", capsize=3,
                    label=f"{c.name} ({c.seeds} seed{'s' if c.seeds > 1 else ''})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 2, 1.5)
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if min(xs) / 2 <= t <= 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("all-to-all bytes vs stock (all four crossings, log scale)")
    ax.set_ylabel(f"final validation loss vs {frontier.baseline} (%)")
    ax.set_title(title.replace(": ", ":\n", 1), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def body(frontier: Frontier, choice: Choice, speedups: Dict[str, Speedup], plot_name: str) -> str:
    """The section after its title and command lines: what the columns mean, the table, the choice, the fallback's
    figures when the rule passed none, the plot."""
    lines = [
        f"- testbed: {frontier.bed.purpose}. Longest schedule: {study.describe([frontier.stock])}",
        f"- the rule (issue 24): the default ends within ±{GAP_BAND:g}% of stock's final validation loss and within "
        f"stock's seed spread, over {SEEDS_NEEDED} seeds, its gap does not grow across the schedule lengths "
        f"({', '.join(f'{length:g}x' for length in LENGTHS)}: a rise of more than {GAP_BAND:g} points from a shorter "
        f"to a longer one is growth), and it sends ≤ {BYTES_LIMIT:g} of stock's all-to-all bytes. Of the candidates "
        f"that pass, the one with the fewest bytes; if none passes, the shortest time to stock's final loss at "
        f"{LINK}, EP={EP}, {GPUS_PER_NODE} GPUs per node (measured tokens / modelled step speed-up).",
        "- gap: each seed's final loss against stock's run of the same seed (same initial weights, data order and "
        "gate draws), mean ± std over seeds; stock's seed spread: its std over seeds as % of its mean; bytes: every "
        "step's telemetry (the mean of the four crossings, exact steps as stock's), mean over seeds; tokens to "
        "stock's final loss: where the candidate's seed-mean validation curve (linear between evaluations; points "
        f"before the last on 2^{frontier.bed.eval_tokens.bit_length() - 1} held-out tokens, the last on the whole "
        "split) reaches stock's final loss on the "
        f"same seeds ({frontier.target:.4f} over all {len(frontier.stock.seeds)}), against where stock's own curve "
        "on those seeds does.",
        *([note] if (note := study.cards_note([frontier.stock] + [c.result for c in frontier.candidates])) else []),
        *([f"- **stock here is `{frontier.baseline}`**: stock at {study.lr_scale(frontier.baseline):g}x the study's "
           f"peak learning rate, and the candidates are blocks trained at that rate; every gap, spread and token "
           f"count below, and \"stock\" in the verdicts, are against it (the rule at a tuned rate)."]
          if frontier.baseline != "stock" else []),
        "", table(frontier), ""]
    if frontier.unfinished:
        lines += [f"Not on the frontier (no finished run at the long schedule): "
                  f"{', '.join(f'`{v}`' for v in frontier.unfinished)}.", ""]
    lines += [f"**The choice:** {choice.text}", ""]
    if choice.by != "rule":
        lines += [f"The fallback's figures (each step speed-up is of the preset its last column names: a modelled job "
                  f"of one rank's shapes of that preset, not the quality runs' model; `{STAGE}` times the missing "
                  f"ones, {stage_words()}):", "", fallback_table(frontier, speedups), ""]
        untimed = [c.name for c in frontier.candidates if speedups[c.name].value is None
                   and _own_block(c.name)[1] is None]
        if untimed:
            lines += [f"Timing every candidate without a step speed-up: `{stage_command(untimed)}`.", ""]
    lines += [f"![final gap against all-to-all bytes]({plot_name})", ""]
    return "\n".join(lines)


def speedups_for(frontier: Frontier, benchmarks: str, names: Sequence[str] = ()) -> Dict[str, Speedup]:
    """Every candidate's modelled step speed-up when the fallback needs them (no candidate passes), else none."""
    if any(c.passes for c in frontier.candidates):
        return {}
    sections = modelled_sections(benchmarks, names)
    return {c.name: speedup(c, frontier.bed, benchmarks, sections) for c in frontier.candidates}
