"""scripts/step_overlap_table.py: step time minus the modelled exchange, per row, read from modelled benchmark
sections: stock's remainder and each variant's beyond it, and refusals by name."""
import os
import sys

import pytest

from lshmoe_pretrain.benchmarking import write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import step_overlap_table  # noqa: E402

HEAD = ("| variant | step ms (modelled) | modelled all-to-all ms per step | modelled dense all-reduce ms per step |\n"
        "| --- | --- | --- | --- |")


def modelled_section(path, name, rows, gpus=8):
    lines = [f"## {name}", "", f"- link: **modelled**; **{gpus} GPU(s) per node**", "", HEAD]
    lines += [f"| {label} | {step} | {a2a} | {ar} |" for label, step, a2a, ar in rows]
    write_section(path, name, "\n".join(lines))


def test_the_remainder_of_each_row_and_each_variants_beyond_stocks(tmp_path):
    path = str(tmp_path / "benchmarks.md")
    # a host-paced stock: 110 ms whatever the exchange until the exchange passes the host's slack
    modelled_section(path, "a", [("stock @ 100gbps EP16", 130, 50, 10), ("fp8 @ 100gbps EP16", 120, 25, 10),
                                 ("stock @ 400gbps EP16", 112, 10, 2), ("fp8 @ 400gbps EP16", 118, 5, 2)])
    text = step_overlap_table.render(path, ["a"])
    assert "| `a` | 16 | 100gbps | 130 | 60.0 | 70.0 | +15.0 |" in text  # 120 - 35 - 70
    assert "| `a` | 16 | 400gbps | 112 | 12.0 | 100.0 | +11.0 |" in text  # 118 - 7 - 100
    assert "70.0 ms beside its largest modelled exchange (60.0 ms), 100.0 ms beside its smallest (12.0 ms)" in text
    step_overlap_table.main(["--benchmarks", path, "--sections", "a", "--report", path])
    assert "| `a` | 16 | 400gbps |" in open(path).read().split("<!-- BEGIN step_overlap -->")[1]


def test_refusals_name_what_is_wrong(tmp_path):
    path = str(tmp_path / "benchmarks.md")
    modelled_section(path, "no_stock", [("fp8 @ 100gbps EP16", 120, 25, 10)])
    with pytest.raises(step_overlap_table.TableError, match="no stock row at EP16 @ 100gbps"):
        step_overlap_table.render(path, ["no_stock"])
    write_section(path, "plain", "## x\n\n- **8 GPU(s) per node**\n\n| variant | step ms (modelled) |\n| --- | --- |\n"
                                 "| stock @ 100gbps EP16 | 1 |")
    with pytest.raises(step_overlap_table.TableError, match="has no column"):
        step_overlap_table.render(path, ["plain"])
    write_section(path, "untopological", "## y\n\n" + HEAD + "\n| stock @ 100gbps EP16 | 1 | 0 | 0 |")
    with pytest.raises(step_overlap_table.TableError, match="does not state one topology"):
        step_overlap_table.render(path, ["untopological"])
