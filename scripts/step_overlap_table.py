"""What a modelled step spends besides its modelled exchange, read from `benchmark_gpt_moe.py --modelled-link`
sections of docs/benchmarks.md: whether the device or the host sets the pace of the step being modelled.

    python scripts/step_overlap_table.py --sections SECTION [SECTION ...] --report docs/benchmarks.md

The stand-in (lshmoe_pretrain/link_standin.py) holds up the device for each modelled all-to-all without stopping
the host. If the device set the pace, step time minus the modelled exchange (all-to-all and dense all-reduce)
would be the same for one variant at every link and EP degree: its compute. Where the host sets it (launches,
DeepSpeed's own host syncs), a modelled exchange shorter than the host's slack hides behind it, and that
remainder grows as the exchange shrinks. The table gives the remainder per row, and each variant's remainder
beyond stock's in the same row (what the variant adds to the step besides its exchange, host and device).
Every figure is derived from modelled rows.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import step_sources  # noqa: E402

STEP, ALL_TO_ALL, ALL_REDUCE = ("step ms (modelled)", "modelled all-to-all ms per step",
                                "modelled dense all-reduce ms per step")
_ROW = re.compile(r"^(?P<variant>\S+) @ (?P<link>\S+) EP(?P<ep>\d+)$")


class TableError(ValueError):
    """A section that cannot give the table: the message names it and what is missing."""


def rows_of(benchmarks: str, section: str) -> Dict[Tuple[int, str], Dict[str, Tuple[float, float]]]:
    """{(ep, link): {variant: (step ms, modelled exchange ms)}} of one section, rows in its order."""
    out: Dict[Tuple[int, str], Dict[str, Tuple[float, float]]] = {}
    for label, row in bench.read_section_table(benchmarks, section).items():
        match = _ROW.match(label)
        if not match:
            continue
        missing = [h for h in (STEP, ALL_TO_ALL, ALL_REDUCE) if h not in row]
        if missing:
            raise TableError(f"section {section!r} has no column {missing}: not a --modelled-link section")
        exchange = float(row[ALL_TO_ALL]) + float(row[ALL_REDUCE])
        out.setdefault((int(match["ep"]), match["link"]), {})[match["variant"]] = (float(row[STEP]), exchange)
    if not out:
        raise TableError(f"section {section!r} has no row '<variant> @ <link> EP<k>'")
    return out


def render(benchmarks: str, sections: Sequence[str]) -> str:
    variants: List[str] = []
    lines_out: List[List[str]] = []
    stock_rest: List[Tuple[float, float]] = []  # (modelled exchange, remainder) of every stock row
    per_section = {}
    for section in sections:
        if step_sources.gpus_per_node(bench.read_section_text(benchmarks, section)) is None:
            raise TableError(f"section {section!r} does not state one topology ('**N GPU(s) per node**')")
        per_section[section] = rows_of(benchmarks, section)
        for cells in per_section[section].values():
            variants += [v for v in cells if v != "stock" and v not in variants]
    for section, table in per_section.items():
        for (ep, link), cells in table.items():
            if "stock" not in cells:
                raise TableError(f"section {section!r}: no stock row at EP{ep} @ {link}")
            step, exchange = cells["stock"]
            rest = step - exchange
            stock_rest.append((exchange, rest))
            row = [f"`{section}`", str(ep), link, f"{step:.0f}", f"{exchange:.1f}", f"{rest:.1f}"]
            for v in variants:
                if v in cells:
                    row.append(f"{cells[v][0] - cells[v][1] - rest:+.1f}")
                else:
                    row.append("–")
            lines_out.append(row)
    head = ["section", "EP", "link", "stock step ms", "stock's modelled exchange ms", "stock: step − exchange ms"]
    head += [f"`{v}`: step − exchange, beyond stock's, ms" for v in variants]
    stock_rest.sort()
    (big_exchange, rest_at_big), (small_exchange, rest_at_small) = stock_rest[-1], stock_rest[0]
    command = "python scripts/step_overlap_table.py " + " ".join(sys.argv[1:])
    lines = ["## What a modelled step spends besides its modelled exchange (derived from modelled rows)", "",
             f"- command: `{command}`",
             "- from: " + ", ".join(f"section `{s}`" for s in sections) + " of this file (device, model, link model, "
             "topology and command there)",
             "- step − exchange: the row's step time minus its modelled all-to-all and dense all-reduce. If the "
             "device set the pace it would be one number per variant, its compute; where the host does, the "
             "stand-in's delays (device-side, the host runs on) hide behind the host's slack, and the remainder "
             "grows as the exchange shrinks",
             f"- stock's remainder: {rest_at_big:.1f} ms beside its largest modelled exchange ({big_exchange:.1f} "
             f"ms), {rest_at_small:.1f} ms beside its smallest ({small_exchange:.1f} ms); over all rows "
             f"{min(r for _, r in stock_rest):.1f}-{max(r for _, r in stock_rest):.1f} ms", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in lines_out]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="where the sections are")
    parser.add_argument("--sections", nargs="+", required=True, help="benchmark_gpt_moe.py --modelled-link sections")
    parser.add_argument("--section", default="step_overlap", help="the block to write")
    parser.add_argument("--report", default=None, help="the file to write the block into (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    try:
        text = render(args.benchmarks, args.sections)
    except (TableError, KeyError) as error:
        parser.error(str(error))
    print(text)
    bench.report_section(args.report, args.section, text)


if __name__ == "__main__":
    main()
