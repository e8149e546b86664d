"""scripts/per_link_table.py: the README's per-link table read from modelled benchmark sections: every section's
figure for a configuration, links in order, refusals by name for a missing column or mixed topologies."""
import os
import sys

import pytest

from lshmoe_pretrain.benchmarking import write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import per_link_table  # noqa: E402


def modelled_section(path, name, gpus, rows):
    lines = [f"## {name}", "", f"- link: **modelled**; **{gpus} GPU(s) per node** (NVLink inside a node)", "",
             "| variant | step ms (modelled) | speed-up vs stock (modelled) |", "| --- | --- | --- |"]
    lines += [f"| {label} | 100 | {speedup} |" for label, speedup in rows]
    write_section(path, name, "\n".join(lines))


def test_every_sections_figure_per_link_and_configuration(tmp_path):
    path = str(tmp_path / "benchmarks.md")
    modelled_section(path, "a", 8, [("stock @ 100gbps EP16", 1), ("lsh @ 100gbps EP16", 1.06),
                                    ("lsh @ 200gbps EP16", 0.953), ("lsh @ 100gbps EP8", 0.9)])
    modelled_section(path, "b", 8, [("lsh @ 100gbps EP16", 1.14), ("fp8 @ 200gbps EP16", 0.935)])
    text = per_link_table.render(path, ["a", "b"], 16, ["lsh", "fp8"])
    assert "| link | `lsh` (modelled) | `fp8` (modelled) |" in text
    assert "| 100gbps | 1.06x, 1.14x | – |" in text  # both sections' runs, in their order; EP=8 rows left out
    assert "| 200gbps | 0.95x | 0.94x |" in text
    assert "EP=16, 8 GPUs per node (modelled)" in text
    per_link_table.main(["--benchmarks", path, "--sections", "a", "b", "--variants", "lsh", "--report", path])
    assert "| 100gbps | 1.06x, 1.14x |" in open(path).read().split("<!-- BEGIN per_link_ep16_g8 -->")[1]


def test_refusals_name_what_is_wrong(tmp_path):
    path = str(tmp_path / "benchmarks.md")
    modelled_section(path, "g8", 8, [("lsh @ 100gbps EP16", 1.06)])
    modelled_section(path, "g1", 1, [("lsh @ 100gbps EP16", 1.5)])
    with pytest.raises(per_link_table.TableError, match="different topologies"):
        per_link_table.render(path, ["g8", "g1"], 16, ["lsh"])
    with pytest.raises(per_link_table.TableError, match=r"--variants \['fp4_both'\]"):
        per_link_table.render(path, ["g8"], 16, ["lsh", "fp4_both"])
    with pytest.raises(per_link_table.TableError, match="EP64"):
        per_link_table.render(path, ["g8"], 64, ["lsh"])
    write_section(path, "plain",
                  "## no topology\n\n| variant | speed-up vs stock (modelled) |\n| --- | --- |\n| x | 1 |")
    with pytest.raises(per_link_table.TableError, match="does not state one topology"):
        per_link_table.render(path, ["plain"], 16, ["lsh"])
