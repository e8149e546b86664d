"""scripts/time_to_target_table.py: issue 24's per-link time to target, from fake modelled sections and fake run
records: a reached case (token ratio over each section's speed-up), a not-reached case with its gap, a shape the
configuration never trained on, the section's place in the file, and the refusals by argument."""
import os
import sys

import pytest
from test_frontier import FLAT, bench_section, write_study

from lshmoe_pretrain import bench_variants
from lshmoe_pretrain import quality_study as study
from lshmoe_pretrain import testbed as beds
from lshmoe_pretrain.benchmarking import write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import time_to_target_table as ttt  # noqa: E402

LONG, WIDE = beds.TESTBEDS["gpt-25m-long"], beds.TESTBEDS["gpt-72m-long"]
PAPER = "gpt_moe_tiny_modelled_ep8-16_g8"
OWN = "gpt_moe_tiny_modelled_ep16_g8_fp6_fwd_fp4sr_grad"
SECTIONS = [PAPER, OWN]
DEFAULT, THE_PAPERS = "fp6_fwd_fp4sr_grad", "lsh"  # lshmoe_plugin.methods.DEFAULT_METHOD's variant


def ratio(stock_final, gap):
    """Tokens to stock's final loss over stock's, for write_run's curves: validation 5.0 at 10k tokens and the final
    loss at 20k, linear between; stock reaches its own final loss at its last evaluation (20k)."""
    final = stock_final * (1 + gap / 100)
    return (10000 + 10000 * (5.0 - stock_final) / (5.0 - final)) / 20000


@pytest.fixture()
def inputs(tmp_path):
    root = str(tmp_path / "runs")
    # gpt-25m-long: the default reaches stock's loss over 3 seeds; the paper's, 1 seed, never does
    write_study(root, {DEFAULT: (-0.2, [1, 2, 3], 0.39, FLAT), THE_PAPERS: (10.0, [1], 0.2, FLAT)})
    # gpt-72m-long: only the paper's, 1 seed, reaches it
    write_study(root, {THE_PAPERS: (-0.2, [1], 0.2, FLAT)}, bed=WIDE)
    block = study.lsh_moe_block(DEFAULT)
    benchmarks = str(tmp_path / "benchmarks.md")
    with open(benchmarks, "w") as f:
        f.write(bench_section(PAPER, "modelled EP=8/16: stock DeepSpeed vs LSH-MoE rate 0.2", [
            ("stock @ 100gbps EP16", 1), ("lsh @ 100gbps EP16", 1.5), ("stock @ 200gbps EP16", 1),
            ("lsh @ 200gbps EP16", 1.25), ("stock @ 100gbps EP8", 1), ("lsh @ 100gbps EP8", 9.0)]))
        f.write(bench_section(OWN, f"modelled EP=16: stock DeepSpeed vs LSH-MoE rate 0.2, `{DEFAULT}`", [
            ("stock @ 100gbps EP16", 1), ("lsh @ 100gbps EP16", 1.6), (f"{DEFAULT} @ 100gbps EP16", 1.2),
            ("stock @ 200gbps EP16", 1), (f"{DEFAULT} @ 200gbps EP16", 0.8)],
            variants=bench_variants.StudyVariant(DEFAULT, block).describe()))
    return root, benchmarks


def render(root, benchmarks, variants=(DEFAULT, THE_PAPERS), testbeds=("gpt-25m-long", "gpt-72m-long"),
           sections=SECTIONS, ep=16, links=None):
    return ttt.render(benchmarks, list(sections), ep, list(variants), list(testbeds), root, "python x", links)


def table_rows(text, variant):
    """{shape: [cells]} of the variant's table."""
    block = text.split(f"### `{variant}`", 1)[1].split("### ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in block.splitlines() if line.startswith("| `")]
    return {row[0].strip(" `"): [cell.strip() for cell in row[1:]] for row in rows}


def test_cells_reached_not_reached_and_not_trained(inputs):
    root, benchmarks = inputs
    text = render(root, benchmarks)
    default, papers = table_rows(text, DEFAULT), table_rows(text, THE_PAPERS)
    reached = ratio(3.0, -0.2)  # the seed mean of stock's 3 seeds is 3.0
    # columns: tokens, then per link (100gbps, 200gbps) the speed-up and the time to target
    assert default["gpt-25m-long"] == [f"{reached:.3f}x (3 seeds)", "1.2x", f"{reached / 1.2:.3f}x", "0.8x",
                                       f"{reached / 0.8:.3f}x"]
    assert default["gpt-72m-long"] == ["not trained on this shape", "1.2x", "–", "0.8x", "–"]
    # the paper's: its method's row of both sections at 100gbps, in their order (EP=8 left out), one at 200gbps
    assert papers["gpt-25m-long"] == ["not reached (final gap +10.00%; 1 seed)", "1.5x, 1.6x", "–", "1.25x", "–"]
    one_seed = ratio(3.009, -0.2)  # paired with stock's seed 1
    assert papers["gpt-72m-long"] == [f"{one_seed:.3f}x (1 seed)", "1.5x, 1.6x",
                                      f"{one_seed / 1.5:.3f}x, {one_seed / 1.6:.3f}x", "1.25x",
                                      f"{one_seed / 1.25:.3f}x"]
    assert ("### `fp6_fwd_fp4sr_grad` (method `fp6_fwd_fp4sr_grad`): the default (`\"enabled\": true` and nothing "
            "else)") in text
    # the defaults before it are methods like any other now
    assert ttt.configuration_label("fp8_fwd_fp4sr_grad") == "`fp8_fwd_fp4sr_grad` (method `fp8_fwd_fp4sr_grad`)"
    assert ttt.configuration_label("fp8_fwd_fp4_grad") == "`fp8_fwd_fp4_grad` (method `fp8_fwd_fp4_grad`)"
    assert "### `lsh` (method `paper`): the paper's configuration" in text
    assert ("| shape | tokens to stock's final loss / stock's (**measured**) | 100gbps: step speed-up (**modelled**) "
            "| 100gbps: time to target (**measured tokens over modelled step**) | 200gbps: step speed-up") in text
    assert "EP=16, 8 GPUs per node" in text and "- command: `python x`" in text
    assert (f"from section `{PAPER}`, section `{OWN}` of this file" in text and f"under `{root}`" in text)
    assert ("the step speed-ups are of preset `tiny`: d_model 128, 4 blocks, 1 expert, a job of 16 experts (1 per "
            "rank) at EP=16") in text
    # the same preset's shapes (tiny), but 16 experts in the modelled job against the runs' 4: said so
    assert ("; the quality runs': `gpt-25m-long`: preset `tiny`: d_model 128, 4 blocks, 4 experts; `gpt-72m-long`: "
            "preset `tiny`: d_model 128, 4 blocks, 4 experts — another expert count than the quality runs': each time "
            "to target joins their token ratio to another job's step speed-up") in text


def test_links_keeps_the_links_asked_in_their_order(inputs):
    """--links tabulates only the links named (a section that also times NVLink need not add its column)."""
    root, benchmarks = inputs
    text = render(root, benchmarks, links=["200gbps"])
    assert table_rows(text, THE_PAPERS)["gpt-25m-long"] == ["not reached (final gap +10.00%; 1 seed)", "1.25x", "–"]
    assert "100gbps:" not in text
    swapped = table_rows(render(root, benchmarks, links=["200gbps", "100gbps"]), DEFAULT)["gpt-72m-long"]
    assert swapped == ["not trained on this shape", "0.8x", "–", "1.2x", "–"]


def test_main_writes_the_section_after_the_per_link_table(inputs):
    root, benchmarks = inputs
    write_section(benchmarks, "per_link_ep16_g8", "## per link")
    write_section(benchmarks, "step_overlap", "## overlap")
    ttt.main(["--benchmarks", benchmarks, "--sections", *SECTIONS, "--variants", DEFAULT, "--testbeds",
              "gpt-25m-long", "--root", root, "--report", benchmarks])
    text = open(benchmarks).read()
    order = [text.index(f"<!-- BEGIN {name} -->") for name in ("per_link_ep16_g8", "time_to_target_ep16_g8",
                                                               "step_overlap")]
    assert order == sorted(order)
    assert "- command: `python scripts/time_to_target_table.py --benchmarks" in text


def test_refusals_name_the_argument(inputs, tmp_path):
    root, benchmarks = inputs
    with pytest.raises(ttt.TableError, match=r"--variants \['nope'\]"):
        render(root, benchmarks, variants=[DEFAULT, "nope"])
    with pytest.raises(ttt.TableError, match=r"--variants \['stock'\]"):
        render(root, benchmarks, variants=["stock"])
    with pytest.raises(ttt.TableError, match=r"--testbeds \['gpt-1t'\]"):
        render(root, benchmarks, testbeds=["gpt-25m-long", "gpt-1t"])
    with pytest.raises(ttt.TableError, match=r"--testbeds 'gpt-25m-1pass': no finished stock runs"):
        render(root, benchmarks, testbeds=["gpt-25m-1pass"])
    with pytest.raises(ttt.TableError, match=r"--root"):
        render(str(tmp_path / "nowhere"), benchmarks)
    with pytest.raises(ttt.TableError, match=r"--sections 'missing'"):
        render(root, benchmarks, sections=[PAPER, "missing"])
    with pytest.raises(ttt.TableError, match=r"--variants 'fp4_both': no section"):
        render(root, benchmarks, variants=["fp4_both"])
    with pytest.raises(ttt.TableError, match=r"no row '<variant> @ <link> EP64'"):
        render(root, benchmarks, ep=64)
    with pytest.raises(ttt.TableError, match=r"--links \['nvlink4'\]: the sections time EP16 over \['100gbps', "
                                             r"'200gbps'\] only"):
        render(root, benchmarks, links=["100gbps", "nvlink4"])
    with open(benchmarks, "a") as f:
        f.write(bench_section("g1", "modelled EP=16: stock DeepSpeed vs LSH-MoE rate 0.2",
                              [("stock @ 100gbps EP16", 1), ("lsh @ 100gbps EP16", 2)], gpus=1))
    with pytest.raises(ttt.TableError, match="--sections model different topologies"):
        render(root, benchmarks, sections=[PAPER, "g1"])
    write_section(benchmarks, "plain",
                  "## no topology\n\n| variant | speed-up vs stock (modelled) |\n| --- | --- |\n| x | 1 |")
    with pytest.raises(ttt.TableError, match="section 'plain' does not state one topology"):
        render(root, benchmarks, sections=["plain"])
    with pytest.raises(SystemExit):  # the command line refuses through argparse
        ttt.main(["--benchmarks", benchmarks, "--sections", "plain", "--variants", DEFAULT, "--testbeds",
                  "gpt-25m-long", "--root", root])
