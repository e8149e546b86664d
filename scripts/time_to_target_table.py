"""Issue 24's per-link time to target: for each configuration asked (the default, the paper's), each link of the
modelled sections and each testbed shape, the modelled step speed-up over stock, the measured tokens to stock's
final loss as a ratio to stock's, and the time to that loss (the ratio over the speed-up), never typed by hand.

    python scripts/time_to_target_table.py --sections SECTION [SECTION ...] --ep 16 \
        --variants fp8_fwd_fp4sr_grad lsh --testbeds gpt-25m-1pass gpt-72m-1pass t5-26m-1pass gpt-25m-long \
        t5-26m-long --root runs/testbed_pinned --report docs/benchmarks.md

The step speed-ups are per_link_table.py's (`benchmark_gpt_moe.py --modelled-link` sections, every section's figure
in a cell, the sections of one topology), taken from the rows the frontier takes for the configuration
(lshmoe_pretrain/frontier.py `timed_rows`: the variant's own row where a section records its lsh_moe block, else
its method's row at its rate and block size); the tokens are the frontier's (`collect`: each shape's longest
schedule, the variant's seed-mean validation curve against stock's on the same seeds). A separate script beside
per_link_table.py rather than an option of it: it reads run records as well as sections, and writes another section.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from per_link_table import TableError, gpus_per_node  # noqa: E402
from per_link_table import speedups as section_speedups  # noqa: E402

from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import frontier as frontiers  # noqa: E402
from lshmoe_pretrain import quality_study as study  # noqa: E402
from lshmoe_pretrain import step_sources  # noqa: E402
from lshmoe_pretrain.quality_records import variant_configuration  # noqa: E402
from lshmoe_pretrain.testbed import TESTBEDS  # noqa: E402

NOT_TRAINED = "not trained on this shape"
MEASURED, MODELLED, TIME = "**measured**", "**modelled**", "**measured tokens over modelled step**"


def configuration_label(variant: str) -> str:
    """'`fp8_fwd_fp4sr_grad` (method `fp8_fwd_fp4sr_grad`): the default' — the study variant, the method it trains and
    what it is to the plugin (DEFAULT_METHOD; the paper's method)."""
    from lshmoe_plugin.methods import DEFAULT_METHOD
    method, knobs = variant_configuration(variant)
    knob_text = "".join(f", {key} {value}" for key, value in knobs.items())
    role = ("the default (`\"enabled\": true` and nothing else)" if method == DEFAULT_METHOD and not knobs else
            "the paper's configuration" if method == "paper" and not knobs else "")
    return f"`{variant}` (method `{method}`{knob_text})" + (f": {role}" if role else "")


def check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in study.VARIANTS or v == "stock"]
    if unknown:
        raise TableError(f"--variants {unknown}: not a study variant other than stock (allowed: "
                         f"{sorted(v for v in study.VARIANTS if v != 'stock')})")


def check_testbeds(testbeds: Sequence[str]) -> None:
    unknown = [t for t in testbeds if t not in TESTBEDS]
    if unknown:
        raise TableError(f"--testbeds {unknown}: no such testbed shape (allowed: {sorted(TESTBEDS)})")


def section_texts(benchmarks: str, sections: Sequence[str]) -> Dict[str, str]:
    if not os.path.isfile(benchmarks):
        raise TableError(f"--benchmarks {benchmarks!r}: no such file")
    texts = {}
    for name in sections:
        try:
            texts[name] = bench.read_section_text(benchmarks, name)
        except KeyError:
            raise TableError(f"--sections {name!r}: {benchmarks} has no such section") from None
    return texts


def step_speedups(benchmarks: str, sections: Sequence[str], ep: int, variant: str) -> Dict[str, List[str]]:
    """{link: [the modelled speed-up of each section that times `variant`'s configuration at EP=`ep`, in the
    sections' order]}: the rows the frontier would take (frontier.timed_rows), one per section."""
    method, knobs = variant_configuration(variant)
    found, refusal = frontiers.timed_rows(variant, method, knobs, benchmarks, sections)
    if refusal is not None:
        raise TableError(f"--variants {variant!r}: no modelled step time: {refusal}")
    per_link: Dict[str, List[str]] = {}
    taken = set()
    for section, label in found:
        if section in taken:
            continue
        rows = {link: cells[label] for link, cells in section_speedups(benchmarks, [section], ep).items()
                if label in cells}
        if rows:
            taken.add(section)
            for link, cells in rows.items():
                per_link.setdefault(link, []).extend(cells)
    if not per_link:
        raise TableError(f"--variants {variant!r}: no section of {list(sections)} has a row of its configuration at "
                         f"EP{ep} (`{variant} @ <link> EP{ep}` recording its lsh_moe block, or its method's row); "
                         f"`{frontiers.stage_command([variant])}` times it")
    return per_link


def shape_candidates(root: str, testbed: str, variants: Sequence[str]) -> Tuple[Dict[str, frontiers.Candidate],
                                                                                   Optional[dict]]:
    """({variant: its frontier candidate on `testbed`} for the variants trained there, stock's run.json or None)."""
    try:
        found = frontiers.collect(root, TESTBEDS[testbed], variants)
    except study.StudyError as error:
        if str(error).startswith("no finished runs of"):   # stock ran, none of the variants did
            return {}, None
        raise TableError(f"--testbeds {testbed!r}: {error}") from None
    return {c.name: c for c in found.candidates}, found.stock.info


def seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def tokens_cell(candidate: Optional[frontiers.Candidate]) -> str:
    if candidate is None:
        return NOT_TRAINED
    if candidate.token_ratio is None:
        return f"not reached (final gap {candidate.gap:+.2f}%; {seeds_text(candidate.seeds)})"
    return f"{candidate.token_ratio:.3f}x ({seeds_text(candidate.seeds)})"


def time_cell(candidate: Optional[frontiers.Candidate], speedups: List[str]) -> str:
    if candidate is None or candidate.token_ratio is None or not speedups:
        return "–"
    return ", ".join(f"{candidate.token_ratio / float(x):.3f}x" for x in speedups)


def models_note(texts: Dict[str, str], ep: int, quality: Dict[str, dict]) -> str:
    """What the step speed-ups were measured on against the quality runs' models, from the sections' model
    sentences and the runs' run.json, saying where they differ."""
    sections = {name: step_sources.section_model(text) for name, text in texts.items()}
    unstated = [name for name, model in sections.items() if model is None]
    if unstated:
        raise TableError(f"--sections {unstated}: no model sentence ('Preset `X` ... with d_model D, B blocks ..., "
                         f"E experts'): not a benchmark_gpt_moe.py section")
    jobs = sorted({(m.words(), m.experts * ep, m.experts, m.model[:3]) for m in sections.values()})
    step = "; ".join(f"{words}, a job of {experts} experts ({per_rank} per rank) at EP={ep}"
                     for words, experts, per_rank, _ in jobs)
    models = {bed: step_sources.quality_model(info) for bed, info in quality.items()}
    runs = "; ".join(f"`{bed}`: {model.words()}" for bed, model in models.items())
    other_model = any(model.model[:3] != job[3] for model in models.values() for job in jobs)
    other_experts = any(model.experts != job[1] for model in models.values() for job in jobs)
    differ = " and ".join(word for word, flag in (("another model", other_model),
                                                   ("another expert count", other_experts)) if flag)
    text = f"the step speed-ups are of {step}"
    if runs:
        text += f"; the quality runs': {runs}"
    if differ:
        text += (f" — {differ} than the quality runs': each time to target joins their token ratio to another "
                 f"job's step speed-up")
    return text


def render(benchmarks: str, sections: Sequence[str], ep: int, variants: Sequence[str], testbeds: Sequence[str],
           root: str, command: str, only_links: Optional[Sequence[str]] = None) -> str:
    check_variants(variants)
    check_testbeds(testbeds)
    if not os.path.isdir(root):
        raise TableError(f"--root {root!r}: no such directory")
    texts = section_texts(benchmarks, sections)
    topologies = {s: gpus_per_node(t, s) for s, t in texts.items()}
    if len(set(topologies.values())) != 1:
        raise TableError(f"--sections model different topologies (GPUs per node: {topologies}); name sections of "
                         f"one topology")
    gpus = next(iter(topologies.values()))
    links = list(section_speedups(benchmarks, sections, ep))
    if not links:
        raise TableError(f"--sections {list(sections)}: no row '<variant> @ <link> EP{ep}' (--ep {ep})")
    if only_links:
        unknown = [link for link in only_links if link not in links]
        if unknown:
            raise TableError(f"--links {unknown}: the sections time EP{ep} over {links} only")
        links = list(only_links)
    steps = {v: step_speedups(benchmarks, sections, ep, v) for v in variants}
    shapes, quality = {}, {}
    for bed in testbeds:
        shapes[bed], info = shape_candidates(root, bed, variants)
        if info is not None:
            quality[bed] = info
    lines = [f"## Time to stock's final loss per link, EP={ep}, {gpus} GPUs per node (measured tokens over modelled "
             f"step)", "",
             f"- command: `{command}`",
             "- step speed-up over stock, " + MODELLED + ": per_link_table.py's figures, from "
             + ", ".join(f"section `{s}`" for s in sections) + " of this file (device, link model and command "
             f"there): one GPU's step with the all-to-alls of EP={ep} priced by the link model, {gpus} GPUs per node "
             "(NVLink inside a node, one NIC per GPU); each configuration's own row where a section records its "
             "lsh_moe block, else its method's row at its rate (lshmoe_pretrain/frontier.py `timed_rows`); several "
             "figures in a cell: the sections that time it, in their order",
             f"- {models_note(texts, ep, quality)}",
             "- tokens to stock's final loss / stock's, " + MEASURED + f": from the run records under `{root}` "
             "(lshmoe_pretrain/frontier.py `collect`): on each shape's longest schedule, where the configuration's "
             "seed-mean validation curve reaches stock's final loss (mean over the same seeds), over where stock's "
             "own curve on those seeds does; 'not reached': its curve never gets there, with its final gap (mean of "
             f"the per-seed gaps); '{NOT_TRAINED}': no finished run of it under that shape",
             "- time to target / stock's, " + TIME + ": the token ratio over the step speed-up (below 1: the "
             "configuration reaches stock's final loss sooner than stock does); '–' where it does not reach it", ""]
    for variant in variants:
        head = ["shape", f"tokens to stock's final loss / stock's ({MEASURED})"]
        for link in links:
            head += [f"{link}: step speed-up ({MODELLED})", f"{link}: time to target ({TIME})"]
        lines += [f"### {configuration_label(variant)}", "",
                  "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        for bed in testbeds:
            candidate = shapes[bed].get(variant)
            row = [f"`{bed}`", tokens_cell(candidate)]
            for link in links:
                figures = steps[variant].get(link, [])
                row += [", ".join(f"{x}x" for x in figures) or "–", time_cell(candidate, figures)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="where the sections are")
    parser.add_argument("--sections", nargs="+", required=True, help="benchmark_gpt_moe.py --modelled-link sections")
    parser.add_argument("--ep", type=int, default=16)
    parser.add_argument("--variants", nargs="+", required=True, help="study variants, one table each")
    parser.add_argument("--testbeds", nargs="+", required=True, help="testbed shapes (lshmoe_pretrain/testbed.py)")
    parser.add_argument("--root", required=True, help="the run records (<root>/<testbed>/x1/...)")
    parser.add_argument("--links", nargs="+", default=None,
                        help="the links to tabulate, in this order (default: every link the sections time)")
    parser.add_argument("--section", default=None, help="the block to write (default time_to_target_ep<EP>_g<G>)")
    parser.add_argument("--report", default=None, help="the file to write the block into (e.g. docs/benchmarks.md); "
                                                       "a new block goes after per_link_ep<EP>_g<G>")
    args = parser.parse_args(argv)
    command = "python scripts/time_to_target_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        text = render(args.benchmarks, args.sections, args.ep, args.variants, args.testbeds, args.root, command,
                      args.links)
    except TableError as error:
        parser.error(str(error))
    print(text)
    gpus = gpus_per_node(bench.read_section_text(args.benchmarks, args.sections[0]), args.sections[0])
    bench.report_section(args.report, args.section or f"time_to_target_ep{args.ep}_g{gpus}", text,
                         after=f"per_link_ep{args.ep}_g{gpus}")


if __name__ == "__main__":
    main()
