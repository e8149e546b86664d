"""The README's quality tables against the sections of docs/quality.md they copy (`testbed_*_x1`, written by
`compare_quality.py report` from the tracked records): the single-pass table's gap on every shape and stock's loss,
and each long shape's table's gaps. A section written again after new seeds must not leave the README behind."""
import json
import os
import re

import pytest

from lshmoe_pretrain.benchmarking import read_section_table
from lshmoe_pretrain.quality_records import variant_configuration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY = os.path.join(ROOT, "docs", "quality.md")
README = open(os.path.join(ROOT, "README.md")).read()
SINGLE_PASS = ("gpt-72m-1pass", "gpt-25m-1pass", "t5-26m-1pass")  # the single-pass table's column order
GAP = "gap vs stock per seed (mean ± std)"


def cells_of(line: str):
    # the README writes a minus as U+2212, the sections as "-"
    return [c.strip().replace("\u2212", "-") for c in line.strip().strip("|").split("|")]


def section_rows(key: str):
    """{variant: {column: cell}} of an x1 section's first table, minus written as the README writes it."""
    return {variant: {column: cell.replace("\u2212", "-") for column, cell in row.items()}
            for variant, row in read_section_table(QUALITY, key).items()}


def readme_table(after: str):
    """(header, rows) of the first table after the README text `after`, each row its cells."""
    text = README.split(after, 1)[1]
    lines = text[text.index("\n| "):].strip("\n").split("\n\n")[0].splitlines()
    return cells_of(lines[0]), [cells_of(line) for line in lines[2:]]


def variant_of(lsh_moe: str, variants):
    """The section's variant whose configuration the README's `lsh_moe` cell names: its method and every other
    key given beside it."""
    keys = {k: json.loads(v) for k, v in re.findall(r'`"(\w+)": ("[^"]*"|[0-9.]+|true|false)`', lsh_moe)}
    keys.pop("enabled", None)
    method = keys.pop("method")
    found = [v for v in variants if v != "stock" and variant_configuration(v) == (method, keys)]
    assert len(found) == 1, (lsh_moe, found)
    return found[0]


def named_above(label: str) -> str:
    """The `lsh_moe` cell of the README's first row labelled `label` that names one ("as above" refers to it)."""
    for line in README.splitlines():
        cells = cells_of(line) if line.startswith(f"| {label} |") else []
        if cells and cells[1] != "as above":
            return cells[1]
    raise AssertionError(f"no row {label!r} names its lsh_moe block")


def copies_gap(cell: str, row) -> bool:
    """Whether the README's cell opens with the section's per-seed gap (bold or not): mean ± std, or the mean
    alone where the cell then names its seeds."""
    gap = row[GAP].split(" (")[0]  # less the note on pairs across cards
    mean = gap.split(" ± ")[0]
    cell = cell.replace("**", "")
    if mean in ("+0.00%", "-0.00%"):
        mean, gap = "0.00%", gap.replace(mean, "0.00%")
        cell = cell.lstrip("+")
    return cell.startswith(gap) or re.match(re.escape(mean) + r" \(\d seeds", cell) is not None


def test_the_single_pass_table_copies_its_sections():
    sections = {shape: section_rows("testbed_" + shape.replace("-", "_") + "_x1") for shape in SINGLE_PASS}
    header, rows = readme_table("**Within one pass over the data, on all three single-pass shapes**")
    columns = [next(i for i, name in enumerate(header) if f"`{shape}`" in name) for shape in SINGLE_PASS]
    checked = 0
    for cells in rows:
        for shape, column in zip(SINGLE_PASS, columns):
            cell = cells[column]
            if cells[1] == "off":  # stock's loss: mean ± std over its seeds
                assert cell.startswith(sections[shape]["stock"]["valid loss (mean ± std)"] + " "), (shape, cell)
            else:
                row = sections[shape][variant_of(cells[1], sections[shape])]
                assert cell.startswith(f"**{row[GAP]}**"), (cells[0], shape, cell, row[GAP])
                if row["seeds"] != "3":  # the table's rule is 3 seeds; a row with fewer says how many
                    assert f"({row['seeds']} seeds)" in cell, (cells[0], shape, cell, row["seeds"])
            checked += 1
    assert checked >= 3 * 7, rows


@pytest.mark.parametrize("section", ["testbed_gpt_72m_pinned_x1", "testbed_gpt_25m_pinned_x1",
                                     "testbed_t5_26m_pinned_x1"])
def test_each_long_shape_table_copies_its_section(section):
    """Each configuration's final gap in the long shape's table (the control's row gives its same-card figure and
    is left to the section's own note)."""
    rows = section_rows(section)
    header, table = readme_table(f"`{section}`")
    column = header.index("final loss vs stock (same seed)")
    assert table[0][column].startswith(rows["stock"]["valid loss (mean ± std)"] + ":"), table[0]
    checked = 0
    for cells in table[1:]:
        if cells[0].startswith("control"):
            continue
        lsh_moe = named_above(cells[0]) if cells[1] == "as above" else cells[1]
        row = rows[variant_of(lsh_moe, rows)]
        assert copies_gap(cells[column], row), (cells[0], cells[column], row[GAP])
        checked += 1
    assert checked >= 3, table
