"""The published quality measurements (docs/quality.md), as records the planning command can look up by layer
shape and method: how many of stock's tokens LSH-MoE (or another method of lshmoe_plugin.methods) needed to reach
stock's final validation loss, or how far above it it ended when it never got there.

Every section of docs/quality.md is written by `compare_quality.py report` or `time-to-target` from the runs' own
records, so reading them back gives the same figures as the records, with the shape they were measured at: the
preset (d_model, FFN, experts, top-k, capacity factor), the tokens per step of one rank, the variant's method and
its rate. Runs a deadline stopped before the end of their schedule (the superseded 2026-11 sections) are left out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

_SECTION = re.compile(r"<!-- BEGIN (\S+) -->\n(.*?)<!-- END \1 -->", re.S)
_DESCRIPTION = re.compile(r"(GPT|T5)-MoE preset `([^`]+)` \([\d.]+M parameters\), (\d+) tokens per step, compared "
                          r"after ([\d.]+[MK]?) training tokens")
_DEFAULT_RATE = re.compile(r"LSH defaults unless the variant says otherwise: rate ([\d.]+)")


@dataclass(frozen=True)
class QualityRecord:
    """LSH-MoE (one variant) against stock in one published section."""
    section: str
    model_kind: str            # "gpt" or "t5"
    preset: str
    tokens_per_step: int       # per rank and step, i.e. what one rank's MoE layer sees at EP=1 with one GPU
    trained_tokens: str        # "10M": the schedule both were compared after
    rate: Optional[float]      # None for a method without clustering
    variant: str
    seeds: int
    final_gap: Optional[float]  # LSH-MoE's final loss over stock's, minus 1 (gap of the seed means), if given
    token_ratio: Optional[float] = None  # tokens LSH-MoE needed to reach stock's final loss / stock's, if measured
    method: str = "paper"      # the lshmoe_plugin.methods name of the variant's configuration

    @property
    def reached(self) -> bool:
        """Whether LSH-MoE reached stock's final loss (a measured token ratio, or an end at or below it)."""
        return self.token_ratio is not None or (self.final_gap is not None and self.final_gap <= 0)

    def where(self) -> str:
        seeds = f"{self.seeds} seed{'s' if self.seeds != 1 else ''}"
        return (f"docs/quality.md `{self.section}`: {self.model_kind.upper()}-MoE preset `{self.preset}`, "
                f"{self.tokens_per_step} tokens per step, {seeds}, compared after {self.trained_tokens} tokens, "
                f"EP=1, variant `{self.variant}` (" + ("" if self.method == "paper" else f"method {self.method}, ")
                + ("no clustering)" if self.rate is None else f"rate {self.rate:g})"))


def read_records(path: str) -> List[QualityRecord]:
    """Every LSH-MoE record of the finished runs of `path` (docs/quality.md), in file order."""
    records = []
    for section, body in _SECTION.findall(open(path).read()):
        described = _DESCRIPTION.search(body)
        if described is None or "stopped by the device-time deadline" in body:
            continue
        default_rate = _DEFAULT_RATE.search(body)
        shape = dict(section=section, model_kind=described.group(1).lower(), preset=described.group(2),
                     tokens_per_step=int(described.group(3)), trained_tokens=described.group(4))
        ratio = _token_ratio_row(body)
        if ratio is not None:  # a time-to-target section: LSH-MoE's defaults
            records.append(QualityRecord(rate=float(default_rate.group(1)), variant="lsh",
                                         seeds=_seeds(body), final_gap=ratio[1], token_ratio=ratio[0], **shape))
            continue
        for variant, seeds, gap in _gap_rows(body):
            method = _variant_method(variant, float(default_rate.group(1)) if default_rate else None)
            if method is not None:
                records.append(QualityRecord(rate=method[1], variant=variant, seeds=seeds, final_gap=gap,
                                             method=method[0], **shape))
    return records


def find_record(records: Sequence[QualityRecord], d_model: int, ffn: int, experts: int, top_k: int,
                capacity_factor: float, tokens_per_rank: int, rate: float,
                method: str = "paper") -> Tuple[Optional[QualityRecord], int]:
    """The published record of the layer shape and method asked about, and how many records match it. A GPT-MoE
    record of a preset with this d_model, FFN, experts, top-k and capacity factor, these tokens per rank, this
    method and (for a clustered method) this rate; a measured token ratio first, then the most seeds, then file
    order. Another method's record never stands in. (Quality at EP=k needs no EP=k run: each sender compresses its
    own E x C buffer, the same at EP=1 with the same experts and tokens per rank.)"""
    from .models import PRESETS
    matches = []
    for record in records:
        preset = PRESETS.get(record.preset)
        if record.model_kind != "gpt" or preset is None:
            continue
        if record.method != method or record.rate not in (None, rate):
            continue
        if ((preset.d_model, preset.d_ff, preset.num_experts, preset.top_k, preset.capacity_factor,
             record.tokens_per_step) == (d_model, ffn, experts, top_k, capacity_factor, tokens_per_rank)):
            matches.append(record)
    if not matches:
        return None, 0
    best = max(matches, key=lambda r: (r.token_ratio is not None, r.seeds, -matches.index(r)))
    return best, len(matches)


def _cells(line: str) -> List[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _token_ratio_row(body: str) -> Optional[Tuple[Optional[float], Optional[float]]]:
    """(token ratio, final gap) from a time-to-target table's first row, if the section has one: the ratio when
    LSH-MoE reached stock's final loss (its gap is then in the runs' own gap tables), the gap when it did not."""
    for line in body.splitlines():
        if line.startswith("| tokens to valid loss"):
            _, _, lsh, ratio, how = _cells(line)[:5]
            if lsh.startswith("not reached"):
                return None, float(re.search(r"ends ([+-][\d.]+)% above", how).group(1)) / 100
            return float(ratio), None
    return None


def _seeds(body: str) -> int:
    seeds = re.search(r"\(seeds? ([\d, ]+)\)", body)
    return len(seeds.group(1).split(",")) if seeds else 1


def _gap_rows(body: str) -> List[Tuple[str, int, float]]:
    """(variant, seeds, final gap) of each row of the section's gap table."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line) if line.startswith("|") else []
        if cells[:2] == ["variant", "seeds"] and "gap vs stock (means)" in cells:
            column = cells.index("gap vs stock (means)")
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                values = _cells(row)
                if values[column].endswith("%"):
                    rows.append((values[0], int(values[1]), float(values[column].rstrip("%")) / 100))
            return rows
    return []




def _variant_method(variant: str, default_rate: Optional[float]) -> Optional[Tuple[str, Optional[float]]]:
    """(method, rate) of `lsh` (LSH-MoE's defaults: the paper's), of a `rate_<r>` study variant (the defaults but
    for the rate), or of a variant that names a method by its stage keys alone (the rate: the section's default
    for a clustered method, None without clustering); None for any other variant (ablations, controls, the
    study-only diagnostic layers, a method's keys with others beside them)."""
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.methods import CUSTOM, STAGE_KEYS

    from .quality_study import DIAGNOSTICS, VARIANTS
    if variant == "lsh":
        return ("paper", default_rate) if default_rate is not None else None
    settings = VARIANTS.get(variant, {})
    if variant.startswith("rate_") and set(settings) - {"method"} == {"enabled", "compression_rate"}:
        return "paper", float(settings["compression_rate"])
    keys = set(settings) - {"enabled"}
    stages_only = bool(keys) and keys <= {"method", *STAGE_KEYS}  # a method's record sets nothing else
    if settings.get("enabled") is not True or not stages_only or variant in DIAGNOSTICS:
        return None
    config = LSHMoEConfig(**settings)
    if config.method == CUSTOM:
        return None
    if config.clustering == "none":
        return config.method, None
    return (config.method, default_rate) if default_rate is not None else None


def variant_configuration(variant: str) -> Tuple[str, Dict[str, object]]:
    """(method, knobs) of any study variant, as the plugin resolves its lsh_moe block: ``stock`` with the plugin
    off; else the method its stage keys name (lshmoe_plugin.methods; ``custom`` when none does) and every setting
    that differs from that method's own configuration (merge_tolerance, the rate, an FP4 gradient, ...), with the
    study-only ones (``exact_tail``, a diagnostic layer) beside them. Unlike `_variant_method`, which admits only a
    method's exact configuration as its record, this names every candidate, knobs and all (the frontier's table)."""
    import dataclasses

    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.methods import COMPOSITION_BASE, CUSTOM

    from .quality_study import DIAGNOSTICS, STUDY_ONLY_KEYS, VARIANTS
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {sorted(VARIANTS)}")
    settings = dict(VARIANTS[variant])
    study_only = {key: settings.pop(key) for key in STUDY_ONLY_KEYS if key in settings}
    if variant in DIAGNOSTICS:
        study_only["diagnostic"] = DIAGNOSTICS[variant]
    config = LSHMoEConfig(**settings)
    if not config.enabled:
        return "stock", study_only
    # a custom composition's keys are read against the base its stage keys left out took (the paper's)
    own = LSHMoEConfig(enabled=True, method=COMPOSITION_BASE if config.method == CUSTOM else config.method)
    knobs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name != "method" and getattr(config, f.name) != getattr(own, f.name)}
    return config.method, {**knobs, **study_only}
