"""The seed-by-seed floor under the rule's gaps (lshmoe_pretrain.seed_scatter, `compare_quality.py scatter`), on run
records written the way training.py writes them: per-seed gaps against a baseline, their scatter pooled about each
variant's own mean, same-seed distances, and refusals by name."""
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
    assert "| stock_nudge | 1, 2, 3 | +1.00%, -1.00%, +0.00% | +0.00% ± 1.00% |" in text
    assert "| fp8_fwd_fp4_grad | 1 | +1.00% | +1.00% |" in text
    assert f"±{math.sqrt(10 / 4):.2f}% (2 variants, 6 runs)" in text
    assert "Same-seed distance, fp8_fwd_fp4sr_grad against stock_nudge: seed 1 0.99%, seed 2 1.01%, seed 3 2.00%." \
        in text


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
                             "stock_nudge", "fp8_fwd_fp4sr_grad", "--pair", "fp8_fwd_fp4sr_grad", "stock_nudge"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fp8_fwd_fp4sr_grad | 1, 2, 3 | +2.00%, +0.00%, -2.00% | +0.00% ± 2.00% |" in result.stdout
    assert "(2 variants, 6 runs)" in result.stdout
