"""scripts/pretrain_megatron_gpt_moe.py end to end: torchrun, 2 CPU ranks (gloo, EP = 2), a tiny corpus, 3 steps."""
import json
import math
import os
import subprocess
import sys

import megatron.core  # noqa: E402,F401  (installed by the README's [test] extra)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pretrain_script_runs_with_lsh_on_and_keeps_the_step_clock(tmp_path):
    """Compressed steps until exact_from_step, stock from it on: the script tells the plugin its optimizer step
    (without a DeepSpeed engine nothing else does)."""
    with open(os.path.join(REPO, "configs", "gpt_moe_cpu_lsh.json")) as f:
        config = json.load(f)
    config["lsh_moe"]["exact_from_step"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Expert {i % 7} routes token {i} to the centroid of bucket {i % 11}." * 3
                                for i in range(400)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               os.path.join(REPO, "scripts", "pretrain_megatron_gpt_moe.py"),
               "--config", str(tmp_path / "config.json"), "--lsh_moe", "on",
               "--data", str(corpus), "--vocab_size", "320", "--cache_dir", str(tmp_path / "cache"),
               "--num_layers", "2", "--hidden_size", "32", "--ffn_hidden_size", "64", "--num_experts", "4",
               "--seq_len", "32", "--micro_batch", "4", "--train_steps", "3", "--log_interval", "1",
               "--eval_interval", "2", "--eval_iters", "1", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(0 < r["lsh_moe/mean/compression_rate"] <= 0.2 + 1e-6 for r in records[:2])
    assert not any(key.startswith("lsh_moe/") for key in records[2])  # step 2 ran the stock exchange
    assert "valid_loss" in records[-1]
