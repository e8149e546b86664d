"""Two `benchmark_wire.py` sections side by side: each fused kernel's encode and decode time in the first and in the
second (another tile, another card, another commit), their ratio, and which rows the second makes faster, read
from docs/benchmarks.md, never typed by hand.

    python scripts/wire_sections_table.py --sections wire_codec_tile4096_h100 wire_codec_tile8192_h100 \
        --section wire_codec_tile_h100 --report docs/benchmarks.md

Rows pair up by (d_model, tokens, format, block, kernel); a row in only one section is left out and counted. Both
sections' floors are printed: figures of two runs compare only where the floors (the copy bandwidth each run
measured) agree.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import benchmarking as bench  # noqa: E402

KEY = ("d_model", "tokens", "format", "block", "kernel")
TIMES = ("encode µs", "decode µs", "encode + decode µs")


class TableError(ValueError):
    """Sections that cannot give the table: the message names the argument and what is missing."""


def rows_of(benchmarks: str, section: str) -> Dict[Tuple[str, ...], Dict[str, str]]:
    """{(d_model, tokens, format, block, kernel): row} of a benchmark_wire.py section's table."""
    try:
        text = bench.read_section_text(benchmarks, section)
    except KeyError as error:
        raise TableError(f"--sections {section!r}: {error.args[0]}") from None
    lines = [line for line in text.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")] if lines else []
    missing = [h for h in KEY + TIMES + ("floor µs", "per layer / floor") if h not in headers]
    if missing:
        raise TableError(f"--sections {section!r}: not a benchmark_wire.py table (no column {missing})")
    rows = [dict(zip(headers, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {tuple(row[k] for k in KEY): row for row in rows}


def render(benchmarks: str, sections: Sequence[str], command: str) -> str:
    if len(sections) != 2:
        raise TableError(f"--sections {list(sections)}: name two sections, the first and the second to compare")
    first, second = (rows_of(benchmarks, s) for s in sections)
    shared = [key for key in first if key in second]
    if not shared:
        raise TableError(f"--sections {list(sections)}: no (d_model, tokens, format, block, kernel) row in both")
    a, b = sections
    table: List[List[object]] = []
    faster, slower = [], []
    for key in shared:
        x, y = first[key], second[key]
        ratio = float(y["encode + decode µs"]) / float(x["encode + decode µs"])
        both = all(float(y[t]) < float(x[t]) for t in TIMES[:2])
        (faster if both else slower).append(key)
        table.append([key[0], key[2], key[3], key[4], f"{x['floor µs']} / {y['floor µs']}",
                      f"{x['encode µs']} → {y['encode µs']}", f"{x['decode µs']} → {y['decode µs']}",
                      f"{x['per layer / floor']} → {y['per layer / floor']}", f"{ratio:.3f}",
                      "yes" if both else "no"])
    label = lambda key: f"{key[0]} {key[2]} {key[3]}"  # noqa: E731
    left_out = len(first) + len(second) - 2 * len(shared)
    lines = [f"## Wire kernels: `{a}` against `{b}`", "",
             f"- command: `{command}`",
             f"- from sections `{a}` (first) and `{b}` (second) of this file (device, command and tile there); rows "
             f"paired by d_model, tokens, format, block and kernel; {left_out} row(s) in only one of them left out",
             "- floor µs: each run's own memory-bandwidth floor (first / second); times compare where they agree",
             f"- the second faster in both encode and decode: {len(faster)} of {len(shared)} rows; not: "
             + (", ".join(label(k) for k in slower) or "none"), "",
             bench.markdown_table(["d_model", "format", "block", "kernel", "floor µs", "encode µs", "decode µs",
                                   "per layer / floor", "second / first, encode + decode",
                                   "second faster both ways"], table)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="where the sections are")
    parser.add_argument("--sections", nargs="+", required=True, help="two benchmark_wire.py sections")
    parser.add_argument("--section", default=None, help="the block to write (default: <first>_vs_<second>)")
    parser.add_argument("--report", default=None, help="the file to write the block into (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    command = "python scripts/wire_sections_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        text = render(args.benchmarks, args.sections, command)
    except TableError as error:
        parser.error(str(error))
    print(text)
    bench.report_section(args.report, args.section or "_vs_".join(args.sections), text, after=args.sections[-1])


if __name__ == "__main__":
    main()
