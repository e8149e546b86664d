"""The README's time-to-target tables against the sections of docs/benchmarks.md that scripts wrote them from
(`time_to_target_ep16_g8`, `time_to_target_ep16_g8_1p3b` and the 1.3B modelled section): the README copies those
figures, and a section written again by its command must not leave the README behind."""
import os
import re

from lshmoe_pretrain.benchmarking import read_section_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "docs", "benchmarks.md")
README = open(os.path.join(ROOT, "README.md")).read()
SHAPES = ("gpt-25m-1pass", "gpt-72m-1pass", "t5-26m-1pass")


def default_rows(section: str):
    """{shape: its cells} of the default's table (the section's first) in a time-to-target section: tokens, then per
    link a speed-up and a time to target."""
    table = read_section_text(BENCHMARKS, section).split("### ")[1]
    return {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", table, re.M)}


def test_the_135m_table_copies_its_section():
    rows = default_rows("time_to_target_ep16_g8")
    for i, shape in enumerate(SHAPES):
        tokens, _, t100, _, t200, _, t400 = rows[shape]
        first = "| the default until 2026-12-07, `fp8_fwd_fp4sr_grad` " if i == 0 else "|  "
        assert f"{first}| `{shape}` | {tokens} | {t100} / {t200} / {t400} |" in README, shape


def configuration_rows(section: str):
    """{variant: {shape: its cells}} of every configuration's table in a time-to-target section."""
    tables = read_section_text(BENCHMARKS, section).split("### ")[1:]
    return {re.match(r"`([^`]+)`", table).group(1): {m.group(1): [c.strip() for c in m.group(2).split("|")]
                                                    for m in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", table, re.M)}
            for table in tables}


def test_the_135m_tables_other_rows_copy_their_section():
    """The paper's and the stacked configuration's rows, on every shape the README names them on: tokens (or "not
    reached", with the final gap and the seeds) and the three times to target ("–" where never reached)."""
    rows = configuration_rows("time_to_target_ep16_g8")
    table = README.split("**Time to stock's final loss**")[1].split("\n\n")[1]
    checked, current = 0, None
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        variant = re.search(r"`([^`]+)`$", cells[0])
        current = variant.group(1) if variant else current if cells[0] == "" else None
        if current is None or current == "fp8_fwd_fp4sr_grad" or not cells[1].startswith("`"):
            continue
        tokens, _, t100, _, t200, _, t400 = rows[current][cells[1].strip("`")]
        times = "–" if t100 == t200 == t400 == "–" else f"{t100} / {t200} / {t400}"
        assert cells[2:] == [tokens, times], line
        checked += 1
    assert checked >= 7, table


def test_the_1p3b_table_copies_its_sections():
    rows = default_rows("time_to_target_ep16_g8_1p3b")
    modelled = read_section_text(BENCHMARKS, "gpt_moe_gpt-moe-1.3b_modelled_ep16_g8_fp8_fwd_fp4sr_grad_mb4")
    for k, link in enumerate((100, 200, 400)):
        speedup = rows[SHAPES[0]][1 + 2 * k]
        times = " / ".join(rows[shape][2 + 2 * k] for shape in SHAPES)
        steps = [re.search(rf"^\| {v} @ {link}gbps EP16 \| ([0-9.]+) \|", modelled, re.M).group(1)
                 for v in ("stock", "fp8_fwd_fp4sr_grad")]
        assert f"| {link} Gb/s | {speedup} | {steps[0]} / {steps[1]} | {times} |" in README, link
