"""scripts/wire_sections_table.py: two benchmark_wire.py sections side by side, from fake sections: rows paired by
their key, the ratio and which rows the second makes faster in both directions, rows in one section only counted,
and the refusals by argument."""
import os
import sys

import pytest

from lshmoe_pretrain.benchmarking import markdown_table, read_section_text, write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import wire_sections_table as wst  # noqa: E402

HEADERS = ["d_model", "tokens", "format", "block", "kernel", "MiB read + written", "floor µs", "encode µs",
           "encode / floor", "decode µs", "decode / floor", "encode + decode µs", "per layer / floor",
           "within 1.5x"]


def wire_section(path, name, rows):
    """A benchmark_wire.py-shaped section: rows of (d_model, format, block, encode µs, decode µs)."""
    table = [[d, 16384, fmt, block, "triton", 80, 28.0, enc, enc / 28, dec, dec / 28, enc + dec,
              (enc + dec) / 56, "no"] for d, fmt, block, enc, dec in rows]
    write_section(path, name, "## Wire formats\n\n- command: `python scripts/benchmark_wire.py`\n\n"
                  + markdown_table(HEADERS, table))


@pytest.fixture()
def benchmarks(tmp_path):
    path = str(tmp_path / "benchmarks.md")
    wire_section(path, "a", [(1024, "fp4_e2m1 e8m0", "32", 26.0, 22.0), (1024, "fp6_e2m3 e8m0", "32", 23.0, 29.0),
                             (2048, "fp4_e2m1 e8m0", "32", 48.0, 41.0)])
    wire_section(path, "b", [(1024, "fp4_e2m1 e8m0", "32", 25.0, 21.0), (1024, "fp6_e2m3 e8m0", "32", 22.0, 37.0),
                             (4096, "fp4_e2m1 e8m0", "32", 87.0, 70.0)])
    return path


def rows(text):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| 1") or line.startswith("| 2") or line.startswith("| 4")]


def test_pairs_rows_and_says_which_the_second_makes_faster(benchmarks):
    text = wst.render(benchmarks, ["a", "b"], "python x")
    fp4, fp6 = rows(text)
    assert fp4 == ["1024", "fp4_e2m1 e8m0", "32", "triton", "28 / 28", "26 → 25", "22 → 21",
                   f"{48 / 56:.3g} → {46 / 56:.3g}", f"{46 / 48:.3f}", "yes"]
    # a faster encode does not make the row faster: its decode is slower
    assert fp6[5:7] == ["23 → 22", "29 → 37"] and fp6[-2:] == [f"{59 / 52:.3f}", "no"]
    assert "faster in both encode and decode: 1 of 2 rows; not: 1024 fp6_e2m3 e8m0 32" in text
    assert "2 row(s) in only one of them left out" in text  # 2048 in a, 4096 in b
    assert "- command: `python x`" in text


def test_main_writes_its_section_after_the_second(benchmarks):
    write_section(benchmarks, "later", "## later")
    wst.main(["--benchmarks", benchmarks, "--sections", "a", "b", "--section", "a_vs_b", "--report", benchmarks])
    text = open(benchmarks).read()
    assert text.index("<!-- END b -->") < text.index("<!-- BEGIN a_vs_b -->") < text.index("<!-- BEGIN later -->")
    assert "wire_sections_table.py --benchmarks" in read_section_text(benchmarks, "a_vs_b")


def test_refusals_name_the_argument(benchmarks):
    with pytest.raises(wst.TableError, match=r"--sections \['a'\]: name two sections"):
        wst.render(benchmarks, ["a"], "x")
    with pytest.raises(wst.TableError, match=r"--sections 'missing'"):
        wst.render(benchmarks, ["a", "missing"], "x")
    write_section(benchmarks, "other", "## other\n\n| variant | step ms |\n| --- | --- |\n| stock | 1 |")
    with pytest.raises(wst.TableError, match=r"--sections 'other': not a benchmark_wire.py table"):
        wst.render(benchmarks, ["a", "other"], "x")
    wire_section(benchmarks, "c", [(8192, "fp4_e2m1 e8m0", "32", 1.0, 1.0)])
    with pytest.raises(wst.TableError, match=r"no \(d_model, tokens, format, block, kernel\) row in both"):
        wst.render(benchmarks, ["a", "c"], "x")
    with pytest.raises(SystemExit):
        wst.main(["--benchmarks", benchmarks, "--sections", "a"])
