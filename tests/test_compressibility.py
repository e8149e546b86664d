"""The compressibility measurement (lshmoe_pretrain.compressibility, scripts/compressibility.py): its error metric on
hand-built experts, and the script end to end on captures of a short CPU run of the real training entry point."""
import json
import os
import subprocess
import sys

import torch
from test_pretrain import ROOT, pretrain

from lshmoe_pretrain import compressibility


class Shift(torch.nn.Module):
    """E(x) = x + b: the paper's compensation E(c) + (x - c) gives E(x) back exactly, whatever c."""

    def __init__(self, b):
        super().__init__()
        self.b = b

    def forward(self, x):
        return x + self.b


def test_expert_errors_weigh_experts_by_their_tokens_and_compensate_exactly_for_a_shift():
    tokens = torch.randn(2, 4, 3)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    experts = [Shift(torch.ones(3)), Shift(-torch.ones(3))]
    reference = [experts[e](tokens[e][valid[e]]) for e in range(2)]
    centroid = tokens.mean(1, keepdim=True).expand_as(tokens)
    assert compressibility.expert_errors(experts, tokens, valid, reference, tokens, compensate=False) == (0.0, None)
    weighted, compensated = compressibility.expert_errors(experts, tokens, valid, reference, centroid, True)
    assert abs(compensated) < 1e-6
    per_expert = [float((centroid[e][valid[e]] - tokens[e][valid[e]]).norm() / reference[e].norm()) for e in range(2)]
    assert abs(weighted - (3 * per_expert[0] + per_expert[1]) / 4) < 1e-6


def test_the_script_reports_every_codec_on_captures_of_a_real_run(tmp_path):
    run = tmp_path / "run"
    pretrain("pretrain_gpt_moe.py", run, str(tmp_path / "cache"), "--preset", "mini-moe", "--train_steps", "4",
             "--eval_interval", "0", "--capture_at", "0.5", "1.0", "--capture_slots", "96", nprocs=0,
             config="configs/gpt_moe_cpu.json")
    report, records = tmp_path / "docs" / "compressibility.md", tmp_path / "records.json"
    command = [sys.executable, "scripts/compressibility.py", str(run / "captures"), "--report", str(report),
               "--section", "cpu_check", "--records", str(records), "--max_slots", "64", "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(records.read_text())
    assert [(r["step"], r["layer"]) for r in saved] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    labels = [s.label for s in compressibility.settings(0)]
    for r in saved:
        assert [m["label"] for m in r["rows"]] == labels
        assert r["measured_slots"] == 64 and r["captured_slots"] == 96
        rows = {m["label"]: m for m in r["rows"]}
        assert rows["LSH rate 0.9"]["bytes_fraction"] > rows["LSH rate 0.1"]["bytes_fraction"]
        assert rows["per token int8"]["error"] < rows["per token int4"]["error"]
        assert rows["merge tau 0.01"]["error_compensated"] is not None and rows["per token fp8"][
            "error_compensated"] is None
        assert abs(rows["per token fp8"]["bytes_fraction"] - (128 + 4) / (128 * 2)) < 1e-9
    text = report.read_text()
    assert "<!-- BEGIN cpu_check -->" in text and "![rate against error](compressibility_cpu_check.png)" in text
    for stage in ("step 2 of 4 (50%)", "step 4 of 4 (100%)"):
        for layer in ("MoE layer 0 (first captured)", "MoE layer 1 (last captured)"):
            assert f"### {stage}, {layer}" in text
    assert "(first 64 of 96)" in text and str(run) in text   # the subsample and the provenance are stated
    assert (tmp_path / "docs" / "compressibility_cpu_check.png").stat().st_size > 10_000
