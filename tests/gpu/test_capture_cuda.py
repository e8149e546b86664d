"""Captures on CUDA with bf16 (configs/gpt_moe_gpu.json), through the real training entry point on one GPU: the
losses are the same to the bit with and without --capture_at, and the files hold bf16 tokens and the bf16 weights
the model trains with, which rebuild on the CPU, and the bf16 gradients the combine's backward brings back."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lshmoe_pretrain import capture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(output_dir, cache_dir, *args):
    # The checkout first, then whatever the machine installed the frameworks into (the GPU machine's /root/site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("DS_ACCELERATOR", None)
    env.pop("LSHMOE_ENABLED", None)
    command = [sys.executable, "scripts/pretrain_gpt_moe.py", "--deepspeed_config", "configs/gpt_moe_gpu.json",
               "--preset", "small", "--train_steps", "6", "--eval_interval", "0", "--lsh_moe", "off",
               "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_capture_on_cuda_bf16_leaves_training_unchanged(tmp_path):
    plain = train(tmp_path / "plain", tmp_path / "cache")
    captured = train(tmp_path / "captured", tmp_path / "cache", "--capture_at", "0.5", "1.0")
    assert captured == plain
    files = sorted(os.listdir(tmp_path / "captured" / "captures"))
    assert files == ["step3_layer0.pt", "step3_layer2.pt", "step6_layer0.pt", "step6_layer2.pt"]
    for name in files:
        path = tmp_path / "captured" / "captures" / name
        assert path.stat().st_size < 10e6  # the small shape (d_model 256) with the defaults
        saved = capture.load(str(path))
        assert saved["tokens"].dtype == torch.bfloat16 and saved["tokens"].shape[0] == capture.DEFAULT_EXPERTS
        assert all(v.dtype == torch.bfloat16 for state in saved["expert_state"] for v in state.values())
        assert saved["provenance"]["run_dtype"] == "bfloat16" and saved["provenance"]["device"] != "cpu"
        grads = saved["output_grads"]  # the combine's backward gradient, in the slots of `tokens`, bf16
        assert grads.dtype == torch.bfloat16 and grads.shape == saved["tokens"].shape
        assert not grads[~saved["valid"]].any() and grads[saved["valid"]].abs().sum(-1).gt(0).all()
        experts = capture.rebuild_experts(saved)
        tokens = saved["tokens"][0][saved["valid"][0]].float()
        assert torch.isfinite(experts[0](tokens)).all()
