"""The README's per-link table: each configuration's modelled step speed-up over stock at one EP degree, per link,
read from `benchmark_gpt_moe.py --modelled-link` sections of docs/benchmarks.md, never typed by hand.

    python scripts/per_link_table.py --sections SECTION [SECTION ...] --ep 16 \
        --variants lsh fp8 fp8_dispatch fp4_both fp8_fwd_fp4sr_grad --report docs/benchmarks.md

A configuration timed by several sections (two runs of the same stage, say) gets every figure, in the order the
sections are named: the spread between runs is part of the result. The sections must model the same topology
(GPUs per node); the table says which, and that every figure is modelled.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import step_sources  # noqa: E402

SPEEDUP = "speed-up vs stock (modelled)"
_ROW = re.compile(r"^(?P<variant>\S+) @ (?P<link>\S+) EP(?P<ep>\d+)$")


class TableError(ValueError):
    """A section that cannot give the table: the message names it and what is missing."""


def gpus_per_node(text: str, section: str) -> int:
    gpus = step_sources.gpus_per_node(text)
    if gpus is None:
        raise TableError(f"section {section!r} does not state one topology ('**N GPU(s) per node**'): it is not a "
                         f"--modelled-link section of benchmark_gpt_moe.py, or predates the topology")
    return gpus


def speedups(benchmarks: str, sections: Sequence[str], ep: int) -> Dict[str, Dict[str, List[str]]]:
    """{link: {variant: [speed-up per section that has the row]}}, links in the order first seen."""
    table: Dict[str, Dict[str, List[str]]] = {}
    for section in sections:
        for label, row in bench.read_section_table(benchmarks, section).items():
            match = _ROW.match(label)
            if not match or int(match["ep"]) != ep or SPEEDUP not in row:
                continue
            table.setdefault(match["link"], {}).setdefault(match["variant"], []).append(row[SPEEDUP])
    return table


def render(benchmarks: str, sections: Sequence[str], ep: int, variants: Sequence[str]) -> str:
    texts = {s: bench.read_section_text(benchmarks, s) for s in sections}
    topologies = {s: gpus_per_node(t, s) for s, t in texts.items()}
    if len(set(topologies.values())) != 1:
        raise TableError(f"the sections model different topologies (GPUs per node: {topologies}); name sections of "
                         f"one topology")
    per_link = speedups(benchmarks, sections, ep)
    if not per_link:
        raise TableError(f"no section has a row '<variant> @ <link> EP{ep}': {list(sections)}")
    missing = [v for v in variants if not any(v in cells for cells in per_link.values())]
    if missing:
        raise TableError(f"--variants {missing}: no row '<variant> @ <link> EP{ep}' in {list(sections)}")
    gpus = next(iter(topologies.values()))
    head = ["link"] + [f"`{v}` (modelled)" for v in variants]
    rows = [[link] + [", ".join(f"{float(x):.2f}x" for x in cells.get(v, [])) or "–" for v in variants]
            for link, cells in per_link.items()]
    command = "python scripts/per_link_table.py " + " ".join(sys.argv[1:])
    lines = [f"## Step speed-up over stock per link, EP={ep}, {gpus} GPUs per node (modelled)", "",
             f"- command: `{command}`",
             "- from: " + ", ".join(f"section `{s}`" for s in sections) + " of this file (device, model, link "
             "model and command there); every figure is **modelled**: one GPU's step with the all-to-alls of "
             f"EP={ep} priced by the link model, {gpus} GPUs per node (NVLink inside a node, one NIC per GPU)",
             "- several figures in a cell: the same configuration timed by several of those sections, in their "
             "order; their spread is the measurement's", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="where the sections are")
    parser.add_argument("--sections", nargs="+", required=True, help="benchmark_gpt_moe.py --modelled-link sections")
    parser.add_argument("--ep", type=int, default=16)
    parser.add_argument("--variants", nargs="+", required=True, help="the columns, as the sections' rows name them")
    parser.add_argument("--section", default=None, help="the block to write (default per_link_ep<EP>_g<G>)")
    parser.add_argument("--report", default=None, help="the file to write the block into (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    try:
        text = render(args.benchmarks, args.sections, args.ep, args.variants)
    except (TableError, KeyError) as error:
        parser.error(str(error))
    print(text)
    gpus = gpus_per_node(bench.read_section_text(args.benchmarks, args.sections[0]), args.sections[0])
    bench.report_section(args.report, args.section or f"per_link_ep{args.ep}_g{gpus}", text)


if __name__ == "__main__":
    main()
