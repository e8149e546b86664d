"""What the tracked records keep of a run's metrics.jsonl (lshmoe_pretrain.run_records): the losses exactly, the
wall clock and the learning rate on the evaluation lines and the last line only, and scripts/plot_runs.py's wall
clock filled back between them from the step times."""
import json
import os
import sys

import pytest

from lshmoe_pretrain.run_records import round_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot_runs  # noqa: E402


def lines(steps, valid_at):
    out, elapsed = [], 0.0
    for step in range(1, steps + 1):
        elapsed += 0.125
        record = {"step": step, "loss": 4.0 + step / 7, "aux_loss": 4.1, "lr": 1e-3 / step, "step_time_s": 0.125,
                  "elapsed_s": elapsed}
        if step in valid_at:
            record["valid_loss"] = 3.0 + step / 3
        out.append(json.dumps(record))
    return ("\n".join(out) + "\n").encode()


def test_wall_clock_and_rate_stay_on_evaluations_and_the_last_line():
    data = lines(6, valid_at={3})
    kept = [json.loads(line) for line in round_metrics(data).decode().splitlines()]
    original = [json.loads(line) for line in data.decode().splitlines()]
    assert [("elapsed_s" in r, "lr" in r) for r in kept] == [(False, False), (False, False), (True, True),
                                                            (False, False), (False, False), (True, True)]
    for before, after in zip(original, kept):   # everything else as it was, the losses to the last digit
        assert after["loss"] == before["loss"] and after["step_time_s"] == before["step_time_s"]
        assert after.get("valid_loss") == before.get("valid_loss")
        assert list(after) == [k for k in before if k in after]
    assert kept[2]["lr"] == pytest.approx(1e-3 / 3, rel=1e-6) and kept[-1]["elapsed_s"] == 0.75
    assert round_metrics(round_metrics(data)) == round_metrics(data)   # idempotent


def test_plot_runs_fills_the_wall_clock_between_evaluations():
    kept = [json.loads(line) for line in round_metrics(lines(6, valid_at={3})).decode().splitlines()]
    filled = plot_runs.with_wall_clock(kept)
    assert [r["elapsed_s"] for r in filled] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.625, 0.75])
