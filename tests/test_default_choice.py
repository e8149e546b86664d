"""The default across a family of testbed shapes (lshmoe_pretrain.default_choice), on run records written as
training.py writes them (test_frontier's writer): the rule on every shape first, else the smallest worst-shape gap
over candidates with 3 seeds everywhere within the bytes limit, else none and why; and what DEFAULT_METHOD needs."""
import pytest
from test_frontier import FLAT, write_study

from lshmoe_pretrain import default_choice as choice
from lshmoe_pretrain import testbed as beds

NARROW, WIDE = beds.TESTBEDS["gpt-25m-1pass"], beds.TESTBEDS["gpt-72m-1pass"]


def test_each_family_holds_its_gpu_shapes_and_no_proxy():
    assert [b.name for b in choice.shapes("single-pass")] == ["gpt-25m-1pass", "gpt-72m-1pass", "t5-26m-1pass"]
    assert [b.name for b in choice.shapes("long")] == ["gpt-25m-long", "gpt-72m-long", "t5-26m-long"]
    with pytest.raises(Exception, match=r"--shapes 'proxy': allowed \['long', 'single-pass'\]"):
        choice.shapes("proxy")


def test_the_cheapest_candidate_that_passes_on_every_shape_is_the_default(tmp_path):
    root = str(tmp_path)
    for bed in (NARROW, WIDE):
        write_study(root, {"fp4_both": (0.1, [1, 2, 3], 0.27, FLAT), "fp8_both": (0.0, [1, 2, 3], 0.45, FLAT)},
                    bed=bed)
    found = choice.collect(root, [NARROW, WIDE])
    decision = choice.decide(found, "fp4")
    assert decision.by == "rule" and decision.chosen.name == "fp4_both"
    assert decision.text.startswith("`fp4_both` (method `fp4`) passes the rule on every shape (`gpt-25m-1pass` "
                                    "+0.10% ± 0.00% (3 seeds); `gpt-72m-1pass` +0.10% ± 0.00% (3 seeds)) and sends "
                                    "at most 0.270 of stock's bytes; of the 2 that pass everywhere, the fewest.")
    assert decision.text.endswith("`DEFAULT_METHOD` is `fp4` already.")
    assert choice.decide(found, "paper").text.endswith("Set `DEFAULT_METHOD` to `fp4` (now `paper`).")
    table = choice.table(found)
    assert ("| `fp4_both` | +0.10% (3 seeds), passes | +0.10% (3 seeds), passes | yes | 0.270 | +0.10% "
            "(`gpt-25m-1pass`) | +0.10% ± 0.00% (6 seeds) |") in table


def test_a_bytes_tie_among_those_that_pass_goes_to_the_smaller_worst_gap_and_says_so(tmp_path):
    """Three candidates pass everywhere at the same bytes (as on 2026-12-06): the one whose worst shape ends nearest
    stock is chosen, and the text names the two it tied with and their worst gaps. A family that does not set
    DEFAULT_METHOD (the long shapes) says so instead of asking for a change."""
    root = str(tmp_path)
    write_study(root, {"fp8_fwd_fp4_grad": (0.0, [1, 2, 3], 0.39, FLAT), "fp8_fwd_fp4sr_grad": (0.1, [1, 2, 3], 0.39,
                FLAT), "fp6_both": (-0.05, [1, 2, 3], 0.39, FLAT)}, bed=NARROW)
    write_study(root, {"fp8_fwd_fp4_grad": (0.2, [1, 2, 3], 0.39, FLAT), "fp8_fwd_fp4sr_grad": (0.05, [1, 2, 3], 0.39,
                FLAT), "fp6_both": (0.25, [1, 2, 3], 0.39, FLAT)}, bed=WIDE)
    found = choice.collect(root, [NARROW, WIDE])
    decision = choice.decide(found, "fp8_fwd_fp4_grad")
    assert decision.by == "rule" and decision.chosen.name == "fp8_fwd_fp4sr_grad"
    assert ("; of the 3 that pass everywhere, the fewest, tied with `fp6_both`, `fp8_fwd_fp4_grad` and ahead on its "
            "worst shape's gap (+0.10% against +0.25% on `gpt-72m-1pass`, +0.20% on `gpt-72m-1pass`).") in decision.text
    assert decision.text.endswith("Set `DEFAULT_METHOD` to `fp8_fwd_fp4sr_grad` (now `fp8_fwd_fp4_grad`).")
    assert choice.decide(found, "fp8_fwd_fp4_grad", deciding=False).text.endswith(
        "These shapes do not set `DEFAULT_METHOD` (the single-pass shapes do; it is `fp8_fwd_fp4_grad`).")
    assert choice.decide(found, "fp8_fwd_fp4sr_grad", deciding=False).text.endswith(
        "These shapes do not set `DEFAULT_METHOD` (the single-pass shapes do; it is `fp8_fwd_fp4sr_grad`): the same.")

def guarded(tmp_path, cheaper_gap, default_gap):
    """The default (`fp8_fwd_fp4sr_grad`, 0.39 of the bytes) and a cheaper candidate (`fp6_fwd_fp4sr_grad`, 0.33),
    both passing the rule on both shapes, with the given gaps on each."""
    root = str(tmp_path)
    for bed in (NARROW, WIDE):
        write_study(root, {"fp6_fwd_fp4sr_grad": (cheaper_gap, [1, 2, 3], 0.33, FLAT),
                           "fp8_fwd_fp4sr_grad": (default_gap, [1, 2, 3], 0.39, FLAT)}, bed=bed)
    found = choice.collect(root, [NARROW, WIDE])
    assert all(c.passes for f in found.values() for c in f.candidates)
    return found


def test_the_guard_lets_a_cheaper_candidate_through_when_it_is_shown_not_worse(tmp_path):
    decision = choice.decide(guarded(tmp_path, 0.1, -0.1), "fp8_fwd_fp4sr_grad")
    assert decision.chosen.name == "fp6_fwd_fp4sr_grad"
    assert ("The guard lets it through: `fp6_fwd_fp4sr_grad` against the present default `fp8_fwd_fp4sr_grad`, seed "
            "by seed on every shape: +0.20 points, +0.20 at two standard errors (6 seeds), below the guard's +0.5."
            ) in decision.text


def test_the_guard_holds_back_a_cheaper_candidate_that_ends_further_from_stock(tmp_path):
    """Both pass the rule, but the cheaper one ends 0.53 points above the default on every seed."""
    decision = choice.decide(guarded(tmp_path, 0.28, -0.25), "fp8_fwd_fp4sr_grad")
    assert decision.by == "rule" and decision.chosen.name == "fp8_fwd_fp4sr_grad"
    assert ("; of the 2 that pass everywhere, the fewest once the guard against the present default is read. The "
            "guard holds back `fp6_fwd_fp4sr_grad` against the present default `fp8_fwd_fp4sr_grad`, seed by seed on "
            "every shape: +0.53 points, +0.53 at two standard errors (6 seeds), not below the guard's +0.5.") \
        in decision.text
    assert decision.text.endswith("`DEFAULT_METHOD` is `fp8_fwd_fp4sr_grad` already.")


def test_the_guard_reads_the_seeds_scatter_not_only_the_mean(tmp_path):
    """The cheaper candidate's mean is near the default's (+0.08 points), but its seeds scatter by ±0.9 points:
    6 paired seeds leave the bound at mean + 2 * 0.815 / sqrt(6), above the margin."""
    found = guarded(tmp_path, {1: 0.9, 2: -0.9, 3: 0.25}, 0.0)
    guard = choice.Guard("fp6_fwd_fp4sr_grad", "fp8_fwd_fp4sr_grad", choice.paired_differences(
        *[{shape: next(c for c in f.candidates if c.name == name) for shape, f in found.items()}
          for name in ("fp6_fwd_fp4sr_grad", "fp8_fwd_fp4sr_grad")]))
    assert guard.differences == pytest.approx([0.9, -0.9, 0.25] * 2, abs=1e-9)
    differences = [0.9, -0.9, 0.25] * 2
    mean = sum(differences) / 6
    std = (sum((d - mean) ** 2 for d in differences) / 5) ** 0.5
    assert guard.bound == pytest.approx(mean + 2 * std / 6 ** 0.5) and not guard.holds
    assert choice.decide(found, "fp8_fwd_fp4sr_grad").chosen.name == "fp8_fwd_fp4sr_grad"
    assert choice.Guard("a", "b", [0.1]).bound is None and not choice.Guard("a", "b", [0.1]).holds


def test_the_guard_does_not_apply_where_the_present_default_is_not_measured_or_fails(tmp_path):
    found = guarded(tmp_path, 0.28, -0.25)
    text = choice.decide(found, "paper").text
    assert ("of the 2 that pass everywhere, the fewest. The guard against the present default (`paper`) does not "
            "apply: it is not measured on every shape. Set `DEFAULT_METHOD` to `fp6_fwd_fp4sr_grad` (now "
            "`paper`).") in text
    assert "The guard holds back" not in text and "lets it through" not in text
    root = str(tmp_path / "failing")
    for bed, default_gap in ((NARROW, -0.25), (WIDE, 0.45)):   # the default outside stock's spread on one shape
        write_study(root, {"fp6_fwd_fp4sr_grad": (0.28, [1, 2, 3], 0.33, FLAT),
                           "fp8_fwd_fp4sr_grad": (default_gap, [1, 2, 3], 0.39, FLAT)}, bed=bed)
    decision = choice.decide(choice.collect(root, [NARROW, WIDE]), "fp8_fwd_fp4sr_grad")
    assert decision.chosen.name == "fp6_fwd_fp4sr_grad"
    assert ("The guard against the present default (`fp8_fwd_fp4sr_grad`) does not apply: it does not pass the rule "
            "on every shape.") in decision.text


def test_without_a_pass_everywhere_the_smallest_worst_gap_decides(tmp_path):
    """FP4 passes on the narrow shape and ends +0.70% on the wide one; FP8/FP4 ends +0.45% on both (within ±0.5%,
    outside stock's 0.30% spread: it fails everywhere) and is chosen by its worst shape; FP8 both ways would be
    better still but sends more than half the bytes, and `lsh` has one seed."""
    root = str(tmp_path)
    write_study(root, {"fp4_both": (0.1, [1, 2, 3], 0.27, FLAT), "fp8_fwd_fp4_grad": (0.45, [1, 2, 3], 0.39, FLAT),
                       "fp8_both": (0.0, [1, 2, 3], 0.52, FLAT), "lsh": (-0.5, [1], 0.2, FLAT)}, bed=NARROW)
    write_study(root, {"fp4_both": (0.7, [1, 2, 3], 0.27, FLAT), "fp8_fwd_fp4_grad": (0.45, [1, 2, 3], 0.39, FLAT),
                       "fp8_both": (0.0, [1, 2, 3], 0.52, FLAT), "lsh": (-0.5, [1], 0.2, FLAT)}, bed=WIDE)
    decision = choice.decide(choice.collect(root, [NARROW, WIDE]), "fp4")
    assert decision.by == "worst shape" and decision.chosen.name == "fp8_fwd_fp4_grad"
    assert decision.text.startswith(
        "No candidate passes the rule on every shape. By its worst shape the default is `fp8_fwd_fp4_grad` (method "
        "`fp8_fwd_fp4_grad`): it ends at most +0.45% from stock's final loss (on ")
    assert "fails the rule on `gpt-25m-1pass`: is outside stock's seed spread (±0.30%)" in decision.text
    assert ("The others within the bytes limit with 3 seeds everywhere, at their worst: `fp4_both` +0.70% on "
            "`gpt-72m-1pass`.") in decision.text
    assert decision.text.endswith("Set `DEFAULT_METHOD` to `fp8_fwd_fp4_grad` (now `fp4`).")


def test_a_chosen_configuration_that_is_no_named_method_says_to_name_it(tmp_path):
    """FP4 with an e8m0 scale per 16 elements is method fp4 with a knob beside it: DEFAULT_METHOD cannot be set to
    it before it has a name."""
    root = str(tmp_path)
    for bed in (NARROW, WIDE):
        write_study(root, {"fp4_both_b16": (0.1, [1, 2, 3], 0.28, FLAT)}, bed=bed)
    decision = choice.decide(choice.collect(root, [NARROW, WIDE]), "fp4")
    assert decision.by == "rule" and decision.chosen.name == "fp4_both_b16"
    assert decision.text.endswith("Its configuration (method `fp4`, fp4_block_size 16) is not a named method: name "
                                  "it in lshmoe_plugin/methods.py, then set `DEFAULT_METHOD` to it (now `fp4`).")


def test_no_default_while_a_shape_is_unmeasured_or_no_candidate_has_its_seeds(tmp_path):
    root = str(tmp_path)
    write_study(root, {"fp4_both": (0.1, [1, 2, 3], 0.27, FLAT)}, bed=NARROW)
    t5 = beds.TESTBEDS["t5-26m-1pass"]
    found = choice.collect(root, [NARROW, t5])
    assert found["t5-26m-1pass"] is None
    decision = choice.decide(found, "fp4")
    assert (decision.by, decision.chosen) == ("none", None)
    assert decision.text == ("No default yet: `t5-26m-1pass` has no finished stock and candidate runs at the long "
                             "schedule.")
    assert "| `fp4_both` | +0.10% (3 seeds), passes | not measured | no |" in choice.table(found)
    write_study(root, {"fp4_both": (0.7, [1, 2], 0.27, FLAT)}, bed=WIDE)
    decision = choice.decide(choice.collect(root, [NARROW, WIDE]), "fp4")
    assert decision.by == "none" and decision.text.endswith(
        "has 3 seeds on every shape to be chosen by its worst shape: `fp4_both` (gpt-25m-1pass 3, gpt-72m-1pass 2).")


def test_the_table_pools_every_seed_of_every_shape_with_its_standard_error(tmp_path):
    """FP4 ends +0.10% on each seed of the narrow shape and +0.70% on each of the wide one: pooled, the six gaps have
    mean +0.40% and standard deviation sqrt(6 * 0.3^2 / 5) = 0.329, so a standard error of 0.134; `lsh` has one
    seed on one shape and is printed as that seed."""
    root = str(tmp_path)
    write_study(root, {"fp4_both": (0.1, [1, 2, 3], 0.27, FLAT), "lsh": (-0.5, [1], 0.2, FLAT)}, bed=NARROW)
    write_study(root, {"fp4_both": (0.7, [1, 2, 3], 0.27, FLAT)}, bed=WIDE)
    table = choice.table(choice.collect(root, [NARROW, WIDE]))
    assert "| +0.70% (`gpt-72m-1pass`) | +0.40% ± 0.13% (6 seeds) |" in table
    assert ("| `lsh` | -0.50% (1 seed), fails | not trained | no | 0.200 | -0.50% (`gpt-25m-1pass`) "
            "| -0.50% (1 seed) |") in table
