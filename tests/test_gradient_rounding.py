"""What the wire formats do to the experts' gradients (lshmoe_pretrain.gradient_rounding): FP4 to nearest flushes a
block's small entries and its error is bias (it does not fall with draws), stochastic FP4 keeps them in expectation
(the mean of K draws converges), an exact format gives zero error, and a capture file goes through end to end."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from lshmoe_pretrain import capture, gradient_rounding
from lshmoe_pretrain.models.config import ModelConfig
from lshmoe_pretrain.models.layers import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def codec(label):
    return next(c for c in gradient_rounding.wire_codecs(torch.float32) if c.label == label)


def small_entries_gradient(rows=64, d=32, small=0.1):
    """Every row one block of FP4's 32: one entry 6 (the block's e8m0 scale is 1), the rest +-`small`. FP4 E2M1's
    smallest step is 0.5, so nearest sends anything below 0.25 to 0; stochastic sends 0.1 to 0.5 one time in five."""
    signs = torch.where(torch.rand(rows, d, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    grads = signs * small
    grads[:, 0] = 6.0
    return grads.unsqueeze(0)  # (1 expert, rows, d)


def linear_backward(rows=64, d=32):
    torch.manual_seed(1)
    expert = torch.nn.Linear(d, d)
    tokens = torch.randn(1, rows, d)
    return gradient_rounding.ExpertBackward([expert], tokens, torch.ones(1, rows, dtype=torch.bool))


def measured(label, grads, backward, draws=(1, 4, 16, 64)):
    weights, inputs = backward.grads(grads.float())
    return gradient_rounding.measure_format(codec(label), backward, grads, grads.float(), weights, inputs, draws)


def test_nearest_fp4_flushes_small_entries_and_its_error_is_bias():
    grads, backward = small_entries_gradient(), linear_backward()
    nearest = measured("fp4_e2m1 nearest", grads, backward)
    assert nearest.zeroed == pytest.approx(31 / 32)  # every small entry, none of the 6s
    # What is lost is exactly the small entries: sqrt(31 x 0.1^2 / (36 + 31 x 0.1^2)) of G's norm.
    assert nearest.crossing_error == pytest.approx((0.31 / 36.31) ** 0.5, rel=1e-3)
    assert set(nearest.mean_error.values()) == {nearest.weight_error}  # K draws of nearest are one draw


def test_stochastic_fp4_is_unbiased_its_mean_over_draws_converges():
    grads, backward = small_entries_gradient(), linear_backward()
    stochastic = measured("fp4_e2m1 stochastic", grads, backward)
    nearest = measured("fp4_e2m1 nearest", grads, backward)
    assert 0.7 < stochastic.zeroed < 0.9  # 0.1 / 0.5: one in five goes up to 0.5 (expected zeroed 31/32 x 0.8)
    errors = [stochastic.mean_error[k] for k in (1, 4, 16, 64)]
    assert errors == sorted(errors, reverse=True), errors
    # Noise alone falls like 1/sqrt(K): 64 draws leave about 1/8 of one draw's error (allow 1/4), far below the
    # bias of nearest, which no number of draws removes.
    assert errors[-1] < errors[0] / 4 and errors[-1] < nearest.mean_error[64] / 4, (errors, nearest.mean_error)


def test_an_exact_format_gives_zero_error():
    backward = linear_backward()
    grads = torch.randn(1, 64, 32).to(torch.bfloat16).float()  # bf16 values: a bf16 wire carries them exactly
    exact = measured("bf16", grads, backward)
    assert exact.crossing_error == 0 and exact.zeroed == 0 and exact.weight_error == 0
    assert all(v == 0 for v in exact.weight_error_by_param.values()) and exact.mean_error[64] == 0
    assert exact.input_error < 2 ** -8  # dX itself is rounded to bf16 on its way out, and only that
    assert [c.label for c in gradient_rounding.wire_codecs(torch.bfloat16)] == [
        "fp8_e4m3", "fp6_e2m3", "fp4_e2m1 nearest", "fp4_e2m1 stochastic"]  # a bf16 model's wire is bf16 already


def fake_capture(path, with_grads=True):
    """A capture file as capture.Capturer writes it (format 2), two experts of a tiny MLP, the second half-filled."""
    torch.manual_seed(2)
    config = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2, d_ff=48, num_experts=2)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 8:] = False
    tokens = (torch.randn(2, 16, 32) * valid.unsqueeze(-1)).to(torch.bfloat16)
    grads = (torch.randn(2, 16, 32) * 1e-3 * valid.unsqueeze(-1)).to(torch.bfloat16)
    saved = {"format": capture.CAPTURE_FORMAT if with_grads else 1, "layer": 1, "experts": [0, 1], "tokens": tokens,
             "valid": valid, "slot": torch.arange(16).expand(2, 16).int(), "filled": valid.sum(1),
             "routed": valid.sum(1), "capacity": 16, "num_experts": 2,
             "expert_config": dataclasses.asdict(config),
             "expert_state": [MLP(config).to(torch.bfloat16).state_dict() for _ in range(2)],
             "provenance": {"model_kind": "gpt", "preset": "test", "seed": 5, "step": 3, "train_steps": 10,
                            "run_dir": "runs/x", "git_commit": "abc", "device": "cpu"}}
    if with_grads:
        saved["output_grads"] = grads
    torch.save(saved, path)
    return str(path)


def test_a_capture_file_is_measured_and_reported(tmp_path):
    path = fake_capture(tmp_path / "step3_layer1.pt")
    result = gradient_rounding.measure(path, draws=(1, 4), log=lambda line: None)
    assert result.tokens_per_expert == [16, 8] and result.model_dtype == "bfloat16"
    labels = [row.label for row in result.rows]
    assert labels == ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1 nearest", "fp4_e2m1 stochastic"]
    by_label = {row.label: row for row in result.rows}
    assert 0 < by_label["fp8_e4m3"].weight_error < by_label["fp4_e2m1 nearest"].weight_error
    assert set(by_label["fp8_e4m3"].weight_error_by_param) == {"up.weight", "up.bias", "down.weight", "down.bias"}
    text = gradient_rounding.report([result], "T", "cmd", ["proxy, not the testbed"])
    assert "### step 3 of 10 (30%), MoE layer 1 (first captured)" in text and "proxy, not the testbed" in text
    assert "| fp4_e2m1 stochastic |" in text and "dW up" in text and "mean of 4" in text
    old = fake_capture(tmp_path / "step3_layer0.pt", with_grads=False)
    assert capture.load(old)["output_grads"] is None  # format 1 still loads ...
    with pytest.raises(ValueError, match="no output_grads"):  # ... but holds nothing to measure here
        gradient_rounding.measure(old)


def test_the_script_writes_its_section_and_records(tmp_path):
    fake_capture(tmp_path / "step3_layer1.pt")
    report, records = tmp_path / "report.md", tmp_path / "records.json"
    done = subprocess.run([sys.executable, "scripts/gradient_rounding.py", str(tmp_path), "--report", str(report),
                           "--section", "grads", "--records", str(records), "--draws", "1", "4", "--note", "a note"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert "<!-- BEGIN grads -->" in report.read_text() and "- a note" in report.read_text()
    assert '"fp4_e2m1 stochastic"' in records.read_text()
