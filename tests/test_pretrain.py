"""The pretraining scripts end to end, through the real `deepspeed` launcher with 2 CPU ranks (gloo, EP=2):
loss falls on real text, metrics reach metrics.jsonl and DeepSpeed's csv monitor, a resumed run continues
exactly, and bad inputs fail with messages that name the problem."""
import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest
from distributed import build_deepspeed_cpu_comm_op, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def pretrain(script, output_dir, cache_dir, *args, nprocs=2, config="configs/gpt_moe_cpu_lsh.json", check=True):
    """Run scripts/<script> through `deepspeed --num_gpus N` (N=0: plain python, one rank)."""
    build_deepspeed_cpu_comm_op()
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("LSHMOE_ENABLED", None)
    port = str(free_port())
    launcher = ["deepspeed", "--num_gpus", str(nprocs), "--master_port", port] if nprocs else [sys.executable]
    command = launcher + [f"scripts/{script}", "--deepspeed_config", config, "--preset", "tiny", "--output_dir",
                          str(output_dir), "--cache_dir", cache_dir, "--log_interval", "1000", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_gpt_pretraining_with_lsh_loss_falls(tmp_path, cache_dir):
    result = pretrain("pretrain_gpt_moe.py", tmp_path, cache_dir, "--train_steps", "40", "--eval_interval", "20",
                      "--eval_compressed")
    assert "LSH-MoE on (method paper, rate 0.2) |" in result.stdout + result.stderr
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.5, (first, last)
    assert records[39]["valid_loss"] < records[19]["valid_loss"]
    for record in (records[19], records[39]):  # the same batches evaluated through the compressor
        assert math.isfinite(record["valid_loss_compressed"]) and record["valid_loss_compressed"] != \
            record["valid_loss"], record
    assert 0.0 < records[-1]["lsh_moe/mean/bytes_ratio"] <= 0.25
    monitor = tmp_path / "monitor" / "gpt_moe"
    for name in ("Train_lm_loss", "Valid_lm_loss", "Train_tokens_per_s", "lsh_moe_mean_compression_rate"):
        assert (monitor / f"{name}.csv").is_file(), sorted(os.listdir(monitor))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step40"


def test_compressed_evaluation_keeps_the_decide_by_cost_decisions(tmp_path, cache_dir):
    """--eval_compressed with decide_by_cost: evaluation never measures (it runs without gradients), so the run
    gets through it, and every layer keeps the decision of its first training step."""
    with open(os.path.join(ROOT, "configs", "gpt_moe_cpu_lsh.json")) as f:
        config = json.load(f)
    config["lsh_moe"]["decide_by_cost"] = True
    path = tmp_path / "decide_by_cost.json"
    path.write_text(json.dumps(config))
    result = pretrain("pretrain_gpt_moe.py", tmp_path / "run", cache_dir, "--train_steps", "4", "--eval_interval", "2",
                      "--eval_compressed", config=str(path))
    records = metrics(tmp_path / "run")
    decisions = [{k: v for k, v in r.items() if k.endswith("/compressed")} for r in records]
    assert sorted(decisions[0]) == ["lsh_moe/layer0/compressed", "lsh_moe/layer1/compressed"], decisions[0]
    assert all(d == decisions[0] for d in decisions), decisions  # decided once, kept through both evaluations
    runs_stock = [v == 0.0 for v in decisions[0].values()]
    for record in (records[1], records[3]):
        assert math.isfinite(record["valid_loss_compressed"])
        # a stock layer evaluates stock under compressed eval too: all stock gives exactly the exact-dispatch loss
        assert (record["valid_loss_compressed"] == record["valid_loss"]) == all(runs_stock), record
    # one line from rank 0, after the step that decided, whenever a layer runs stock (hidden at INFO otherwise)
    warnings = (result.stdout + result.stderr).count("layer(s) run stock, where compressing measured slower")
    assert warnings == (1 if any(runs_stock) else 0), result.stderr[-3000:]


def test_the_start_up_line_names_the_method_and_a_rate_only_where_tokens_are_clustered():
    from lshmoe_plugin import LSHMoEConfig
    from lshmoe_pretrain.training import compression_summary
    assert compression_summary(LSHMoEConfig.from_dict({"enabled": False}, env={})) == "off"
    assert compression_summary(LSHMoEConfig.from_dict({"enabled": True}, env={})) == "on (method fp6_fwd_fp4sr_grad)"
    paper = LSHMoEConfig.from_dict({"enabled": True, "method": "paper", "compression_rate": 0.25}, env={})
    assert compression_summary(paper) == "on (method paper, rate 0.25)"
    assert compression_summary(LSHMoEConfig.from_dict({"enabled": True, "method": "bounded"}, env={})) == \
        "on (method bounded)"  # error-bounded merging: the rate is the data's


def test_t5_pretraining_with_lsh_switched_off_from_the_command_line(tmp_path, cache_dir):
    pretrain("pretrain_t5_moe.py", tmp_path, cache_dir, "--train_steps", "20", "--eval_interval", "0",
             "--lsh_moe", "off", config="configs/t5_moe_cpu_lsh.json")
    records = metrics(tmp_path)
    assert len(records) == 20 and records[-1]["loss"] < records[0]["loss"] - 1.0
    assert not any(key.startswith("lsh_moe/") for key in records[-1])
    with open(os.path.join(ROOT, "configs", "t5_moe_cpu_lsh.json")) as f:
        assert json.load(f)["lsh_moe"]["enabled"] is True
    with open(tmp_path / "run.json") as f:
        info = json.load(f)
    assert info["lsh_moe"]["enabled"] is False  # the override won over the JSON
    assert isinstance(info["cpu_threads"], int) and info["cpu_threads"] >= 1  # a CPU pair is bitwise at equal counts
    # the corpus the run read, by content: the digest of one of the tokenized corpora in the cache
    from lshmoe_pretrain.data import corpus_digest
    cached = []
    for entry in glob.glob(os.path.join(str(cache_dir), "*.json")):
        if entry.endswith(".tokenizer.json"):
            continue
        with open(entry) as f:
            prepared = json.load(f)
        cached.append(corpus_digest(prepared["prefix"], prepared["tokenizer_path"]))
    assert info["data_sha256"] in cached, (info["data_sha256"], cached)


def checkpoint_tensors(run_dir):
    """Every tensor of the latest checkpoint (model, experts, optimizer states), by file and key path."""
    import torch
    tag_dir = os.path.join(run_dir, "checkpoints", (run_dir / "checkpoints" / "latest").read_text().strip())
    tensors = {}

    def collect(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                collect(item, f"{path}/{i}")
    for name in sorted(os.listdir(tag_dir)):
        if name.endswith(".pt"):
            collect(torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=False), name)
    return tensors


# What a resume must carry besides DeepSpeed's own state (the plugin's per-layer state, in the checkpoint's
# client_state): each layer's forward count places the output-error and residual-norm samples (every 2nd and 4th
# forward from the first: 1, 3, 5 and 1, 5, where counts restarted at the resume after step 3 would sample at 4, 6
# and 4); under clustering "bounded" the slots each step sends follow the last step's need (coarse hashes and a
# loose tolerance merge enough of the tiny model's tokens that the need is below the capacity).
# The default method (`{"enabled": true}`, the whole block: FP6 forward, FP4 gradients rounded stochastically) draws
# its uniforms from a counter per stochastic format that every backward encode advances: the state carries them too
# (no probe there: it measures with the output-error sample, which needs the paper's clustering).
RESUMED_SETTINGS = {
    "paper": {"output_error_interval": 2, "telemetry_interval": 4},
    "bounded": {"output_error_interval": 2, "telemetry_interval": 4, "method": "bounded", "merge_tolerance": 0.9,
                "num_hashes": 1, "hash_dim": 2},
    "default": {"enabled": True},
}


@pytest.mark.parametrize("settings", sorted(RESUMED_SETTINGS))
def test_resume_continues_the_uninterrupted_run_bit_for_bit(tmp_path, cache_dir, settings):
    """Straight to step 6 vs 3 steps, checkpoint, resume to 6, with LSH-MoE on at EP=2 and, under the paper's
    clustering, the testbed's output-error sample and probe (their extra exchanges run outside training's random
    draws): every loss, LR, telemetry value (which steps sample, the slots sent) and checkpointed tensor identical.
    Under the default method the gradients round stochastically, so every step after the resume depends on the
    checkpointed draw counters."""
    with open(os.path.join(ROOT, "configs", "gpt_moe_cpu_lsh.json")) as f:
        config = json.load(f)
    if settings == "default":
        config["lsh_moe"] = RESUMED_SETTINGS[settings]
    else:
        config["lsh_moe"].update(RESUMED_SETTINGS[settings])
    path = tmp_path / "lsh_resumed.json"
    path.write_text(json.dumps(config))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--eval_interval", "0") + (("--diagnostic", "probe") if settings != "default" else ())
    pretrain("pretrain_gpt_moe.py", straight, cache_dir, "--train_steps", "6", *common, config=str(path))
    pretrain("pretrain_gpt_moe.py", resumed, cache_dir, "--train_steps", "3", *common, config=str(path))
    result = pretrain("pretrain_gpt_moe.py", resumed, cache_dir, "--train_steps", "6", "--resume", *common,
                      config=str(path))
    assert "starts fresh" not in result.stdout + result.stderr
    expected, got = metrics(straight), metrics(resumed)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(expected, got):
        assert (b["loss"], b["aux_loss"], b["lr"]) == (a["loss"], a["aux_loss"], a["lr"]), a["step"]
        assert telemetry(b) == telemetry(a), a["step"]
    if settings != "default":
        assert [r["step"] for r in got if "lsh_moe/layer0/output_error" in r] == [1, 3, 5]
        assert [r["step"] for r in got if "lsh_moe/layer0/relative_residual_norm" in r] == [1, 5]
    if settings == "bounded":
        slots = [r["lsh_moe/layer1/slots_per_expert"] for r in got]
        assert max(slots[1:]) < slots[0], slots  # the first step sends every token, the later ones what was needed
    want, have = checkpoint_tensors(straight), checkpoint_tensors(resumed)
    assert sorted(have) == sorted(want) and len(want) > 40
    differ = [key for key in want if not torch_equal(want[key], have[key])]
    assert not differ, differ[:5]
    assert plugin_state(resumed) == plugin_state(straight) is not None
    if settings == "default":  # the draw counts are in each rank's state: alike, 6 steps' worth
        draws = [rank["deepspeed"].get("draws") for rank in plugin_state(resumed)["ranks"]]
        assert len(draws) == 2 and draws[0] == draws[1] and draws[0]["fp4_e2m1"]["cpu"] > 0, draws


def plugin_state(run_dir):
    import torch
    tag_dir = os.path.join(run_dir, "checkpoints", (run_dir / "checkpoints" / "latest").read_text().strip())
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return states.get("lsh_moe_state")


def telemetry(record):
    return {key: value for key, value in record.items() if key.startswith(("lsh_moe/", "probe/"))}


def torch_equal(a, b) -> bool:
    import torch
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_bad_inputs_fail_with_clear_messages(tmp_path, cache_dir):
    missing = pretrain("pretrain_gpt_moe.py", tmp_path, cache_dir, "--data", str(tmp_path / "nope.jsonl"),
                       nprocs=0, check=False)
    assert missing.returncode != 0 and "nope.jsonl' does not exist" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "lsh_moe": {"compression_rate": 2}}))
    wrong = pretrain("pretrain_gpt_moe.py", tmp_path, cache_dir, nprocs=0, config=str(bad), check=False)
    assert wrong.returncode != 0 and "lsh_moe.compression_rate must be a number in (0, 1]" in wrong.stderr
    absent = pretrain("pretrain_gpt_moe.py", tmp_path, cache_dir, nprocs=0, config="configs/none.json", check=False)
    assert absent.returncode != 0 and "DeepSpeed config 'configs/none.json' does not exist" in absent.stderr
    no_checkpoint = pretrain("pretrain_gpt_moe.py", tmp_path / "fresh", cache_dir, "--resume", nprocs=0,
                             config="configs/gpt_moe_cpu.json", check=False)
    assert no_checkpoint.returncode != 0 and "no DeepSpeed checkpoint found" in no_checkpoint.stderr


def test_a_stale_jit_build_lock_is_an_error_not_a_hang(tmp_path, cache_dir, monkeypatch):
    """A build killed mid-way leaves torch's lock file: init_distributed would wait for it forever."""
    build_deepspeed_cpu_comm_op()  # this session's own build first, before the environment points elsewhere
    extensions = tmp_path / "extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    stale = pretrain("pretrain_gpt_moe.py", tmp_path / "stale", cache_dir, "--train_steps", "1", nprocs=0,
                     check=False)
    assert stale.returncode != 0 and f"{lock} is 60 minutes old" in stale.stderr, stale.stderr[-3000:]
    assert "Delete that file if no build is running" in stale.stderr


def test_study_fp8_variant_trains_through_the_launcher(tmp_path, cache_dir):
    """The quality study's `fp8_dispatch` variant as the study configures it (its lsh_moe block and --diagnostic),
    at EP=2: every token's dispatch crosses as FP8 values and scales, the loss falls, and the telemetry counts the
    four crossings' bytes (tiny: d_model 128, one scale per row, fp32 on the CPU)."""
    from lshmoe_pretrain import quality_study as study
    steps = 20
    plan = study.StudyPlan("gpt", "tiny", ["fp8_dispatch"], [1], steps * 8 * 128 * 2, str(tmp_path),
                           os.path.join(ROOT, "configs", "gpt_moe_cpu.json"), micro_batch=8, lr=3e-3, num_gpus=2)
    config = study.deepspeed_config(plan, "fp8_dispatch")
    assert plan.train_steps() == steps and config["lsh_moe"]["dispatch_dtype"] == "fp8_e4m3"
    path = tmp_path / "fp8_dispatch.json"
    path.write_text(json.dumps(config))
    pretrain("pretrain_gpt_moe.py", tmp_path / "run", cache_dir, "--train_steps", str(steps), "--eval_interval", "0",
             "--diagnostic", study.diagnostic("fp8_dispatch"), config=str(path))
    records = metrics(tmp_path / "run")
    assert len(records) == steps and records[-1]["loss"] < records[0]["loss"] - 1.0
    fp8, fp32 = 128 + 4, 128 * 4  # bytes per row: dispatch and its gradient in FP8, combine both ways in fp32
    assert records[-1]["lsh_moe/mean/bytes_ratio"] == pytest.approx((2 * fp8 + 2 * fp32) / (4 * fp32), rel=1e-12)
    assert records[-1]["lsh_moe/mean/compression_rate"] == 1.0


@pytest.mark.parametrize("script", ["pretrain_gpt_moe.py", "pretrain_t5_moe.py"])
def test_the_null_control_nudges_the_initial_weights_and_says_so(tmp_path, cache_dir, script):
    """--init_nudge reaches the model both scripts build: the first step's loss moves a little from the same seed's
    plain run (same data, same draws), and run.json records the nudge; a plain run's run.json has no such key."""
    config = "configs/gpt_moe_cpu.json" if "gpt" in script else "configs/t5_moe_cpu.json"
    runs = {}
    for name, extra in (("plain", []), ("nudged", ["--init_nudge", "1e-3"])):
        pretrain(script, tmp_path / name, cache_dir, "--train_steps", "2", "--eval_interval", "0", *extra, nprocs=0,
                 config=config)
        with open(tmp_path / name / "run.json") as f:
            runs[name] = (metrics(tmp_path / name)[0]["loss"], json.load(f))
    (plain, plain_info), (nudged, nudged_info) = runs["plain"], runs["nudged"]
    assert "init_nudge" not in plain_info and nudged_info["init_nudge"] == 1e-3
    assert nudged != plain and abs(nudged - plain) < 1e-2 * plain, (plain, nudged)
