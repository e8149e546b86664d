"""The seed-by-seed floor under the rule's gaps (lshmoe_pretrain.seed_scatter, `compare_quality.py scatter`), on run
records written the way training.py writes them: per-seed gaps against a baseline, their scatter pooled about each
variant's own mean, same-seed distances, and refusals by name."""
import json
import math
import os
import subprocess
import sys

import pytest
from test_frontier import BED, write_run

from lshmoe_pretrain import quality_study as study
from lshmoe_pretrain import seed_scatter
from lshmoe_pretrain import testbed as beds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK = {1: 3.0, 2: 3.1, 3: 2.9}
NUDGED = {1: 3.03, 2: 3.069, 3: 2.9}         # +1%, -1%, 0%
CODEC = {1: 3.06, 2: 3.1, 3: 2.842}          # +2%, 0%, -2%


@pytest.fixture
def root(tmp_path):
    for name, finals in (("stock", STOCK), ("stock_nudge", NUDGED), ("fp8_fwd_fp4sr_grad", CODEC)):
        for seed, final in finals.items():
            write_run(str(tmp_path), 1.0, name, seed, final, 0.39)
    write_run(str(tmp_path), 1.0, "fp8_fwd_fp4_grad", 1, 3.03, 0.39)  # one seed: no scatter of its own
    return beds.length_root(str(tmp_path), BED, 1.0)


def test_gaps_pooled_scatter_and_distance(root):
    gaps = seed_scatter.collect(root, "gpt", "stock", ["stock_nudge", "fp8_fwd_fp4sr_grad", "fp8_fwd_fp4_grad"])
    assert gaps.gaps("stock_nudge") == pytest.approx({1: 1.0, 2: -1.0, 3: 0.0})
    assert gaps.gaps("fp8_fwd_fp4sr_grad") == pytest.approx({1: 2.0, 2: 0.0, 3: -2.0})
    # deviations about each mean: (1, -1, 0) and (2, 0, -2): 10 over 6 runs - 2 variants
    std, groups, values = seed_scatter.pooled_std([list(gaps.gaps(v).values())
                                                   for v in ("stock_nudge", "fp8_fwd_fp4sr_grad", "fp8_fwd_fp4_grad")])
    assert (groups, values) == (2, 6) and std == pytest.approx(math.sqrt(10 / 4))
    assert gaps.distance("fp8_fwd_fp4sr_grad", "stock_nudge") == pytest.approx(
        {1: 100 * abs(3.06 / 3.03 - 1), 2: 100 * abs(3.1 / 3.069 - 1), 3: 100 * abs(2.842 / 2.9 - 1)})
    text = seed_scatter.table(gaps, ["stock_nudge", "fp8_fwd_fp4sr_grad", "fp8_fwd_fp4_grad"],
                              [("fp8_fwd_fp4sr_grad", "stock_nudge")])
    # 2 standard errors of a 3-seed mean of gaps (1, -1, 0): 2 * 1 / sqrt(3)
    assert "| stock_nudge | 1, 2, 3 | +1.00%, -1.00%, +0.00% | +0.00% ± 1.00% | +0.00% ± 1.15% |" in text
    assert "| fp8_fwd_fp4_grad | 1 | +1.00% | +1.00% | +1.00% |" in text
    assert "two draws" not in text
    assert f"±{math.sqrt(10 / 4):.2f}% (2 variants, 6 runs)" in text
    assert "stock's own seeds (1, 2, 3), final: 3.0000 ± 0.1000, a seed spread of 3.33%." in text
    assert "Same-seed distance, fp8_fwd_fp4sr_grad against stock_nudge: seed 1 0.99%, seed 2 1.01%, seed 3 2.00%." \
        in text


def test_gaps_against_two_draws_of_stock(root):
    """With a null control the reference of each seed is the mean of stock's and the null's run: the codec's seed 1
    (3.06) against (3.0 + 3.03) / 2, and so on; the null itself and the baseline get no row."""
    gaps = seed_scatter.collect(root, "gpt", "stock", ["stock_nudge", "fp8_fwd_fp4sr_grad", "fp8_fwd_fp4_grad"])
    expected = {1: 100 * (3.06 / 3.015 - 1), 2: 100 * (3.1 / 3.0845 - 1), 3: 100 * (2.842 / 2.9 - 1)}
    assert gaps.gaps_two_draws("fp8_fwd_fp4sr_grad", "stock_nudge") == pytest.approx(expected)
    assert gaps.gaps_two_draws("fp8_fwd_fp4_grad", "stock_nudge") == pytest.approx({1: 100 * (3.03 / 3.015 - 1)})
    text = seed_scatter.table(gaps, ["stock_nudge", "fp8_fwd_fp4sr_grad", "fp8_fwd_fp4_grad"], null="stock_nudge")
    two_draws = text[text.index("Against two draws of stock per seed"):]
    values = [expected[s] for s in (1, 2, 3)]
    mean, std = sum(values) / 3, math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    assert (f"| fp8_fwd_fp4sr_grad | 1, 2, 3 | {values[0]:+.2f}%, {values[1]:+.2f}%, {values[2]:+.2f}% | "
            f"{mean:+.2f}% ± {std:.2f}% | {mean:+.2f}% ± {2 * std / math.sqrt(3):.2f}% |") in two_draws
    assert "| fp8_fwd_fp4_grad | 1 | +0.50% | +0.50% | +0.50% |" in two_draws
    assert "| stock_nudge |" not in two_draws and "| stock |" not in two_draws
    with pytest.raises(study.StudyError, match="--null fp6_both"):
        seed_scatter.table(gaps, ["fp8_fwd_fp4sr_grad"], null="fp6_both")


def test_pooled_scatter_needs_a_degree_of_freedom():
    assert seed_scatter.pooled_std([[1.0], [2.0]]) is None
    assert seed_scatter.pooled_std([[1.0, 3.0]]) == pytest.approx((math.sqrt(2.0), 1, 2))


def test_unknown_or_missing_variants_are_refused_by_name(root):
    with pytest.raises(study.StudyError, match="'no_such'"):
        seed_scatter.collect(root, "gpt", "stock", ["no_such"])
    with pytest.raises(study.StudyError, match="no finished runs of 'fp6_both'"):
        seed_scatter.collect(root, "gpt", "stock", ["fp6_both"])


def test_the_command_prints_the_table(root):
    result = subprocess.run([sys.executable, "scripts/compare_quality.py", "scatter", "--root", root, "--variants",
                             "stock_nudge", "fp8_fwd_fp4sr_grad", "--pair", "fp8_fwd_fp4sr_grad", "stock_nudge",
                             "--null", "stock_nudge"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fp8_fwd_fp4sr_grad | 1, 2, 3 | +2.00%, +0.00%, -2.00% | +0.00% ± 2.00% |" in result.stdout
    assert "(2 variants, 6 runs)" in result.stdout
    assert "| fp8_fwd_fp4sr_grad | 1, 2, 3 | +1.49%, +0.50%, -2.00% |" in result.stdout


def write_evaluated_run(root, variant, seed, losses, steps_done, train_steps=20):
    """A run's records as training.py writes them, stopped after `steps_done` steps: validation at the steps of
    `losses` it reached."""
    run_dir = os.path.join(root, "gpt", variant, f"seed{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"train_steps": train_steps, "data_sha256": "abc", "device": "NVIDIA H100 80GB HBM3"}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps_done + 1):
            record = {"step": step, "loss": 4.0, "step_time_s": 0.1}
            if step in losses:
                record["valid_loss"] = losses[step]
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def cut_roots(tmp_path):
    """Finished runs under one root (stock seeds 1-3, the codec seeds 1-2) and, under a second, the runs a lease cut:
    the null's seeds 1-2 after step 10's evaluation, its seed 3 and the codec's seed 3 before it."""
    done, cut = str(tmp_path / "done"), str(tmp_path / "cut")
    for seed, (early, final) in {1: (3.0, 2.5), 2: (3.2, 2.6), 3: (3.1, 2.7)}.items():
        write_evaluated_run(done, "stock", seed, {10: early, 20: final}, 20)
    write_evaluated_run(done, "fp8_fwd_fp4sr_grad", 1, {10: 3.03, 20: 2.55}, 20)   # +1% early, +2% final
    write_evaluated_run(done, "fp8_fwd_fp4sr_grad", 2, {10: 3.2, 20: 2.6}, 20)     # 0%, 0%
    write_evaluated_run(cut, "fp8_fwd_fp4sr_grad", 3, {10: 3.0}, 8)
    write_evaluated_run(cut, "stock_nudge", 1, {10: 3.06}, 15)                      # +2%
    write_evaluated_run(cut, "stock_nudge", 2, {10: 3.168}, 12)                     # -1%
    write_evaluated_run(cut, "stock_nudge", 3, {10: 3.1}, 9)
    write_evaluated_run(done, "stock_nudge", 2, {10: 9.9, 20: 9.9}, 20)            # the first root's seed wins
    return done, cut


def test_an_early_reading_counts_the_runs_a_lease_cut(cut_roots):
    done, cut = cut_roots
    gaps = seed_scatter.collect(done, "gpt", "stock", ["stock_nudge", "fp8_fwd_fp4sr_grad"], [cut], at_step=10)
    assert gaps.gaps("fp8_fwd_fp4sr_grad") == pytest.approx({1: 1.0, 2: 0.0})
    assert gaps.gaps("stock_nudge") == pytest.approx({1: 2.0, 2: 100 * (9.9 / 3.2 - 1)})
    assert gaps.short == {"stock_nudge": [3], "fp8_fwd_fp4sr_grad": [3]}
    assert gaps.drift("fp8_fwd_fp4sr_grad") == pytest.approx({1: 1.0, 2: 0.0})   # final minus early, both finished
    assert gaps.drift("stock_nudge") == pytest.approx({2: 100 * (9.9 / 2.6 - 1) - 100 * (9.9 / 3.2 - 1)})
    text = seed_scatter.table(gaps, ["fp8_fwd_fp4sr_grad"])
    assert "| fp8_fwd_fp4sr_grad | 1, 2 | +1.00%, +0.00% | +0.50% ± 0.71% |" in text
    assert "gap vs stock per seed (at step 10)" in text
    assert "Where both runs finished (2 runs), the gap moved from step 10 to the final by +1.00 points at most" in text
    assert "Not evaluated at step 10 (stopped before it): fp8_fwd_fp4sr_grad seed 3." in text
    assert "stock's own seeds (1, 2, 3), at step 10: 3.1000 ± 0.1000, a seed spread of 3.23%." in text
    # without at_step only finished runs count, whatever the second root holds
    final = seed_scatter.collect(done, "gpt", "stock", ["stock_nudge", "fp8_fwd_fp4sr_grad"], [cut])
    assert final.gaps("fp8_fwd_fp4sr_grad") == pytest.approx({1: 2.0, 2: 0.0}) and final.short == {}
    assert "| fp8_fwd_fp4sr_grad | 1, 2 | +2.00%, +0.00% |" in seed_scatter.table(final, ["fp8_fwd_fp4sr_grad"])
    with pytest.raises(study.StudyError, match="no runs evaluated at step 11 of 'stock'"):
        seed_scatter.collect(done, "gpt", "stock", ["stock_nudge"], [cut], at_step=11)
    with pytest.raises(study.StudyError, match="--at_step 0"):
        seed_scatter.collect(done, "gpt", "stock", ["stock_nudge"], [cut], at_step=0)


def test_an_early_reading_refuses_runs_of_two_corpora(cut_roots):
    done, cut = cut_roots
    info = os.path.join(cut, "gpt", "stock_nudge", "seed1", "run.json")
    with open(info, "w") as f:
        json.dump({"train_steps": 20, "data_sha256": "other"}, f)
    with pytest.raises(study.StudyError, match="different corpora"):
        seed_scatter.collect(done, "gpt", "stock", ["stock_nudge"], [cut], at_step=10)


def test_the_command_writes_an_early_reading_as_a_section(cut_roots, tmp_path):
    done, cut = cut_roots
    output = tmp_path / "quality.md"
    result = subprocess.run([sys.executable, "scripts/compare_quality.py", "scatter", "--root", done, "--also_root",
                             cut, "--at_step", "10", "--variants", "stock_nudge", "fp8_fwd_fp4sr_grad",
                             "--section", "testbed_gpt_25m_1pass_null_early_x1", "--run_command", "the calls",
                             "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = output.read_text()
    assert "<!-- BEGIN testbed_gpt_25m_1pass_null_early_x1 -->" in text
    assert "## Testbed `gpt-25m-1pass` (1 H100 under MPS) at the study's peak learning rate, read at step 3,355" in text
    assert "- runs: `the calls`" in text and "- report: `python scripts/compare_quality.py scatter" in text
    assert "by its validation loss at step 10, read before the end of the schedule" in text
    assert "runs on NVIDIA H100 80GB HBM3." in text
    assert "| stock_nudge | 1, 2 | +2.00%, +209.38% |" in text
