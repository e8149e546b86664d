"""The variants scripts/benchmark_gpt_moe.py times, and the lsh_moe block of each.

Two kinds share one ``--variants`` list:

- the benchmark's own: `stock`, the paper's method at ``--rate`` (`lsh`; `lsh_eager` without CUDA graphs,
  `lsh_decide` with ``decide_by_cost``) and one per other named method of lshmoe_plugin.methods. Their names keep
  this meaning where the quality study has a variant of the same name (`lsh`, `fp8_dispatch`; `fp8_fwd_fp4_grad`
  and `fp8_fwd_fp4sr_grad`, methods named after the study's variants, train the same configuration).
- every other variant of the quality study (lshmoe_pretrain/quality_study.py VARIANTS) that a user could train,
  with the lsh_moe block the study trains it with (`quality_study.lsh_moe_block`, without the study's output-error
  probe, which measures and changes nothing trained), so that the frontier's fallback (lshmoe_pretrain/frontier.py)
  has a modelled step speed-up for every candidate.

A section records each study variant's block in one sentence (`StudyVariant.describe`), which the frontier reads
back (`recorded_study_variants`) and compares with the study's block of that name now: a row is never taken for
another configuration.

A schedule (`exact_tail`: compressed steps, then exact dispatch for the last share of the schedule) has no single
step time. Its compressed steps are timed (rows ``<variant> (compressed steps) @ ...``), and its own rows are
computed from those and stock's at the same link and EP: the step-weighted mix over the schedule
(`schedule_mix`), so their speed-up is the schedule's mean step speed-up.

Refused by name: the study-only diagnostic layers (they replace the layer to locate a gap, nobody trains them), a
schedule at an absolute step (its share of a schedule depends on the schedule's length), and, under a modelled
link, a configuration the link stand-in cannot price (lshmoe_pretrain/link_standin.py `unpriceable`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from lshmoe_plugin.methods import METHODS

from . import quality_study as study

PAPER_VARIANTS = ("lsh", "lsh_eager", "lsh_decide")  # the paper's method at --rate
METHOD_VARIANTS = tuple(name for name in METHODS if name != "paper")  # lsh_moe.method of that name
BENCHMARK_VARIANTS = ("stock",) + PAPER_VARIANTS + METHOD_VARIANTS


class VariantError(ValueError):
    """A variant the benchmark cannot time; the message names it and why."""


@dataclass(frozen=True)
class StudyVariant:
    """A quality-study variant as the benchmark times it."""
    name: str
    block: Dict[str, object]            # the lsh_moe settings the study trains it with, its schedule left out
    exact_tail: Optional[float] = None  # share of the schedule run with exact dispatch; None: compressed throughout

    @property
    def timed(self) -> str:
        """The name of the engine and rows that time `block`: the variant's own, or its compressed steps'."""
        return self.name if self.exact_tail is None else f"{self.name} (compressed steps)"

    def describe(self) -> str:
        """The section's record of what was timed (`recorded_study_variants` reads it back), then what a schedule's
        rows are."""
        text = f"`{self.name}`: quality-study variant, lsh_moe `{json.dumps(self.block)}`"
        if self.exact_tail is None:
            return text + "."
        compressed = 1 - self.exact_tail
        return (text + f", exact for the last {self.exact_tail:g} of the schedule: its rows `{self.timed} @ ...` "
                f"time that block; its rows `{self.name} @ ...` are not timed but the step-weighted mix of those and "
                f"stock's at the same link and EP ({compressed:g} of the steps compressed, {self.exact_tail:g} "
                f"stock's), so their speed-up is the schedule's mean step speed-up (a loss reached before the "
                f"schedule's end weighs the steps up to it instead).")


_RECORD = re.compile(r"`([^`]+)`: quality-study variant, lsh_moe `(\{[^`]*\})`(?:, exact for the last ([\d.]+) of "
                     r"the schedule)?")


def recorded_study_variants(text: str) -> Dict[str, Tuple[dict, Optional[float]]]:
    """{variant: (lsh_moe block, exact tail)} of every study variant a section's text records (`describe`)."""
    return {name: (json.loads(block), float(tail) if tail else None)
            for name, block, tail in _RECORD.findall(text)}


def study_variant(name: str) -> StudyVariant:
    """The study variant `name` as the benchmark times it; VariantError (naming it and why) when it cannot be."""
    if name in BENCHMARK_VARIANTS:
        raise VariantError(f"--variants {name}: the benchmark's own variant, not the study's")
    if name not in study.VARIANTS:
        raise VariantError(f"--variants {name}: unknown; allowed: {list(BENCHMARK_VARIANTS)} or a variant of "
                           f"lshmoe_pretrain/quality_study.py VARIANTS: {sorted(timeable_study_variants())}")
    if name in study.DIAGNOSTICS:
        raise VariantError(f"--variants {name}: a study-only diagnostic layer (lshmoe_pretrain.diagnostics "
                           f"'{study.DIAGNOSTICS[name]}') that locates a quality gap; it is no configuration a user "
                           f"trains, so it has no step time to compare")
    if study.init_nudge(name):
        raise VariantError(f"--variants {name}: a null control of the quality study (its initial weights nudged by "
                           f"init_nudge {study.init_nudge(name):g}); its step time is stock's")
    if study.lr_scale(name) != 1.0:
        raise VariantError(f"--variants {name}: a learning-rate control of the quality study (lr_scale "
                           f"{study.lr_scale(name)}); its step time is that of the same block at the study's rate")
    block = study.lsh_moe_block(name)
    if "exact_from_step" in block:
        raise VariantError(f"--variants {name}: a schedule at an absolute step (lsh_moe.exact_from_step "
                           f"{block['exact_from_step']}); what share of a schedule runs compressed depends on the "
                           f"schedule's length, so it has no one step time (an `exact_tail` share has)")
    return StudyVariant(name, block, study.exact_tail(name))


def timeable_study_variants() -> Sequence[str]:
    """The study's variants the benchmark times as the study's (not its own names, not the diagnostic layers)."""
    return [name for name in study.VARIANTS
            if name not in BENCHMARK_VARIANTS and not study.is_study_only(name)
            and "exact_from_step" not in study.VARIANTS[name]]


def check_priceable(name: str, lsh_moe: dict) -> None:
    """Refuse, naming the variant, an lsh_moe block whose exchange the link stand-in cannot price."""
    import lshmoe_plugin

    from .link_standin import unpriceable
    refusal = unpriceable(lshmoe_plugin.load_config({"lsh_moe": lsh_moe}))
    if refusal is not None:
        raise VariantError(f"--variants {name} with --modelled-link: {refusal}")


def schedule_mix(exact_tail: float, compressed: float, stock: float) -> float:
    """A per-step figure of a schedule (ms, modelled ms): `compressed`'s for 1 - exact_tail of its steps, stock's
    for the rest."""
    return (1 - exact_tail) * compressed + exact_tail * stock
