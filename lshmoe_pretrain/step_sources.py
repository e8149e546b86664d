"""What a step-time section of docs/benchmarks.md was measured on, next to the quality runs it is combined with:
the labels of the time-to-target rows (quality_study.time_to_target), so that a row that joins a token ratio of one
model to a step time of another model, another expert count or another topology says so.

benchmark_gpt_moe.py writes each section's model in one sentence ("Preset `X` (...) with d_model D, B blocks (MoE
every 2), E experts (top-k ...") and, for modelled links, the experts per rank and the GPUs per node; the quality
runs' model is their preset (run.json).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_MODEL = re.compile(r"Preset `([^`]+)`(?: \([^)]*\))? with d_model (\d+), (\d+) blocks \(MoE every \d+\), (\d+) "
                    r"experts")
_GPUS = re.compile(r"\*\*(\d+) GPU\(s\) per node\*\*")
_GPUS_FLAG = re.compile(r"--modelled-gpus-per-node (\d+)")


@dataclass(frozen=True)
class SectionModel:
    preset: str
    d_model: int
    blocks: int
    experts: int                     # of the model the section ran (one rank's, for modelled links)
    gpus_per_node: Optional[int] = None
    old_link_model: bool = False     # made before per-peer costs were modelled (docs/link_model.md)

    @property
    def model(self) -> tuple:
        return self.preset, self.d_model, self.blocks, self.experts

    def words(self) -> str:
        experts = "1 expert" if self.experts == 1 else f"{self.experts} experts"
        return f"preset `{self.preset}`: d_model {self.d_model}, {self.blocks} blocks, {experts}"


def gpus_per_node(text: Optional[str]) -> Optional[int]:
    """The GPUs per node a modelled benchmark_gpt_moe.py section states, or None."""
    gpus = _GPUS.search(text or "") or _GPUS_FLAG.search(text or "")
    return int(gpus.group(1)) if gpus else None


def section_model(text: Optional[str]) -> Optional[SectionModel]:
    """The model of a benchmark_gpt_moe.py section, or None when the text does not state it."""
    found = _MODEL.search(text or "")
    if found is None:
        return None
    return SectionModel(found.group(1), int(found.group(2)), int(found.group(3)), int(found.group(4)),
                        gpus_per_node(text), "half of it at" not in text)


def quality_model(info: dict) -> SectionModel:
    """The model of the quality runs, from their run.json and the preset it names."""
    from .models import PRESETS
    preset = PRESETS[info["preset"]]
    return SectionModel(info["preset"], preset.d_model, preset.n_layers, preset.num_experts)


def measured_note(info: dict, name: str, text: Optional[str]) -> str:
    """Where a measured step time comes from, against the quality runs: the same model or not, always another run."""
    section = section_model(text)
    if section is None:
        return f"another run (`{name}`), whose model is not stated here"
    quality = quality_model(info)
    if section.model == quality.model:
        return f"the same model ({quality.words()}), another run (`{name}`)"
    return f"another model ({section.words()}; the quality runs': {quality.words()}) and run (`{name}`)"


def modelled_note(info: dict, name: str, text: Optional[str], ep: int) -> str:
    """Where a modelled step speed-up at EP=`ep` comes from: the job's experts and topology against the quality
    runs', so a row that combines different expert counts says so."""
    section = section_model(text)
    if section is None:
        return f"`{name}`, whose model and topology are not stated here"
    quality = quality_model(info)
    experts = section.experts * ep
    gpus = section.gpus_per_node or 1
    topology = f"{gpus} GPU{'s' if gpus > 1 else ''} per node" + (
        ", old link model: superseded until re-run" if section.old_link_model else "")
    parts = [f"`{name}`, {topology}: a job of {experts} experts ({section.experts} per rank)"]
    if experts != quality.experts:
        parts.append(f"the token ratio is of the quality runs' {quality.experts} experts: different expert counts")
    if section.model[:3] != quality.model[:3]:
        parts.append(f"and another model ({section.words()})")
    return "; ".join(parts)
