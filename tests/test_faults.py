"""Faults during GPT-MoE pretraining through the real `deepspeed` launcher (2 CPU ranks, gloo, EP=2): a rank
killed mid-run, a save that fails on one rank, and resumes under other lsh_moe settings. Nothing is mocked: the
faults are a SIGKILL and a file-size limit (RLIMIT_FSIZE) set on the running rank."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from distributed import build_deepspeed_cpu_comm_op, free_port

from lshmoe_pretrain import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVE_EVERY = 4
STEPS = 9       # the uninterrupted run: checkpoints at steps 4, 8 and 9
EXIT_BOUND_S = 120
# The launcher of this interpreter's environment, also when that environment is not on PATH (.venv/bin/pytest).
DEEPSPEED = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def command(output_dir, cache_dir, *args, nprocs=2, config="configs/gpt_moe_cpu_lsh.json"):
    build_deepspeed_cpu_comm_op()  # so that no rank this test kills can die holding the JIT build's lock
    launcher = ([DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port())] if nprocs
                else [sys.executable])
    return launcher + ["scripts/pretrain_gpt_moe.py", "--deepspeed_config", str(config), "--preset", "tiny",
                       "--output_dir", str(output_dir), "--cache_dir", cache_dir, "--log_interval", "1000",
                       "--eval_interval", "0", "--save_interval", str(SAVE_EVERY), *args]


def environment():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("LSHMOE_ENABLED", None)
    return env


def pretrain(output_dir, cache_dir, *args, check=True, **kwargs):
    cmd = command(output_dir, cache_dir, *args, **kwargs)
    result = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(output_dir, partial=False):
    """The records of metrics.jsonl; partial=True skips a last line rank 0 is still writing."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        lines = [line for line in f if line.strip()]
    if partial and lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def start_faulty_run(output_dir, cache_dir, *args, **kwargs):
    """A long run started in its own session, to inject a fault into once metrics.jsonl shows step SAVE_EVERY + 1
    (the first checkpoint is then complete: rank 0 logs a step only after the save before it returned)."""
    cmd = command(output_dir, cache_dir, "--train_steps", "40", *args, **kwargs)
    log = open(os.path.join(os.path.dirname(str(output_dir)), os.path.basename(str(output_dir)) + ".log"), "w")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 300
    path = os.path.join(output_dir, "metrics.jsonl")
    while time.time() < deadline and launcher.poll() is None:
        if os.path.exists(path) and any(r["step"] > SAVE_EVERY for r in metrics(output_dir, partial=True)):
            return launcher, log
        time.sleep(0.02)
    stop(launcher)
    raise AssertionError(f"{' '.join(cmd)} did not reach step {SAVE_EVERY + 1}; see {log.name}")


def rank_process(launcher, rank):
    """The training process of `rank` among the launcher's descendants (runner -> launch.py -> ranks)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "scripts/pretrain_gpt_moe.py" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} process under launcher {launcher.pid}")


def wait_bounded(launcher, what):
    try:
        return launcher.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job still ran {EXIT_BOUND_S} s after {what}: it hangs") from None


def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(launcher):
    """Whatever is left of the run's session (its own process group), so no rank outlives a failed test."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()


def resume_from(source, target, tag):
    """A copy of run `source` (metrics and checkpoints) whose `latest` names `tag`, to resume differently."""
    os.makedirs(target)
    shutil.copy(os.path.join(source, "metrics.jsonl"), target)
    shutil.copytree(os.path.join(source, "checkpoints"), os.path.join(target, "checkpoints"))
    with open(os.path.join(target, "checkpoints", "latest"), "w") as f:
        f.write(tag)


def same_losses(expected, got):
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == pytest.approx(a["lr"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """The uninterrupted LSH-on run the faulty ones must reproduce, and the checkpoint at step 4 they branch from."""
    run = tmp_path_factory.mktemp("straight")
    pretrain(run, cache_dir, "--train_steps", str(STEPS))
    return run


@pytest.fixture(scope="module")
def failed_save(tmp_path_factory, cache_dir):
    """An LSH-off run whose rank 1 cannot write its step-8 optimizer shard (file-size limit: EFBIG midway)."""
    run = tmp_path_factory.mktemp("failed_save") / "run"
    launcher, log = start_faulty_run(run, cache_dir, config="configs/gpt_moe_cpu.json")
    try:
        # Rank 1 writes its expert shards (0.5 MB each) whole, then fails inside its optimizer shard (12.8 MB).
        rank_process(launcher, 1).rlimit(psutil.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        returncode = wait_bounded(launcher, "rank 1's save failed")
    finally:
        stop(launcher)
        log.close()
    with open(log.name) as f:
        output = f.read()
    return run, returncode, output


def test_killed_rank_ends_the_job_and_the_resume_replays_the_uninterrupted_run(tmp_path, cache_dir, straight):
    run = tmp_path / "killed"
    launcher, log = start_faulty_run(run, cache_dir)
    try:
        rank0, rank1 = rank_process(launcher, 0), rank_process(launcher, 1)
        killed_at = time.time()
        rank1.send_signal(signal.SIGKILL)
        # launch.py polls its ranks every second and tears the others down when one exits non-zero; rank 0 sees
        # gloo's "Connection closed by peer" in its next collective. Either way: no hang.
        returncode = wait_bounded(launcher, "rank 1 was killed")
        exit_s = time.time() - killed_at
        rank0_left = alive(rank0)
    finally:
        stop(launcher)
        log.close()
    assert returncode != 0, f"the launcher exited 0 after rank 1 was killed ({exit_s:.1f} s); see {log.name}"
    assert not rank0_left, "rank 0 outlived the launcher"
    print(f"the launcher exited {returncode} {exit_s:.1f} s after rank 1 was killed")
    logged = [r["step"] for r in metrics(run)]
    tag = checkpoints.latest_tag(run / "checkpoints")
    step = int(tag[len("step"):])
    assert step % SAVE_EVERY == 0 and SAVE_EVERY <= step < min(logged[-1] + 1, STEPS), (tag, logged)
    assert checkpoints.incompleteness(str(run / "checkpoints" / tag)) is None

    resumed = pretrain(run, cache_dir, "--train_steps", str(STEPS), "--resume")
    assert f"resume from {run / 'checkpoints' / tag}: lsh_moe settings unchanged" in resumed.stdout
    # The steps the killed run logged past its checkpoint are replaced, not repeated.
    same_losses(metrics(straight), metrics(run))


def test_a_save_failing_on_one_rank_never_becomes_latest(tmp_path, cache_dir, failed_save):
    run, returncode, output = failed_save
    # torch.save's zip writer fails on EFBIG ("unexpected pos ..."), inside DeepSpeed's save, on rank 1 only.
    assert returncode != 0 and "[rank1]: RuntimeError" in output and "[rank0]: RuntimeError" in output, output[-3000:]
    assert "[rank1]:     self._save_moe_checkpoint(" in output
    assert checkpoints.latest_tag(run / "checkpoints") == "step4"
    assert checkpoints.incompleteness(str(run / "checkpoints" / "step4")) is None
    broken = run / "checkpoints" / "step8"
    shard = broken / "expp_rank_1_mp_rank_00_optim_states.pt"
    # Stock DeepSpeed's rank 0 would have written latest=step8 here without waiting for rank 1's shards.
    assert shard.stat().st_size == 1 << 20 < (run / "checkpoints" / "step4" / shard.name).stat().st_size
    assert "has no manifest.json" in checkpoints.incompleteness(str(broken))

    # Pointed at the broken tag by hand, --resume refuses before any process group forms, naming the directory.
    copy = tmp_path / "copy"
    resume_from(run, copy, "step8")
    refused = pretrain(copy, cache_dir, "--train_steps", "10", "--resume", nprocs=0, check=False)
    assert refused.returncode != 0
    assert (f"checkpoint '{copy / 'checkpoints' / 'step8'}' (named by '{copy / 'checkpoints' / 'latest'}') is "
            f"incomplete: it has no manifest.json") in refused.stderr, refused.stderr[-3000:]
    assert "complete checkpoints there: step4" in refused.stderr

    # A background checkpoint writer would defeat that ordering: refused before any process group forms.
    config = json.load(open(os.path.join(ROOT, "configs/gpt_moe_cpu.json")))
    config["checkpoint"] = {"writer": {"decoupled": True}}
    (tmp_path / "decoupled.json").write_text(json.dumps(config))
    decoupled = pretrain(copy, cache_dir, nprocs=0, config=tmp_path / "decoupled.json", check=False)
    assert decoupled.returncode != 0
    assert (f"DeepSpeed config '{tmp_path / 'decoupled.json'}': checkpoint.writer.decoupled is not supported"
            in decoupled.stderr), decoupled.stderr[-3000:]

    # A file that shrank after its save (a partial copy, a full disk) is caught by the manifest's sizes.
    model_states = copy / "checkpoints" / "step4" / "mp_rank_00_model_states.pt"
    size = model_states.stat().st_size
    with open(model_states, "r+b") as f:
        f.truncate(1000)
    assert checkpoints.incompleteness(str(copy / "checkpoints" / "step4")) == (
        f"{model_states} holds 1000 bytes, its manifest says {size}")


def test_resume_with_lsh_switched_off(tmp_path, cache_dir, straight):
    run = tmp_path / "off"
    resume_from(straight, run, "step4")
    result = pretrain(run, cache_dir, "--train_steps", "5", "--resume", "--lsh_moe", "off")
    line = next(line for line in result.stdout.splitlines() if line.startswith("resume from"))
    assert line.startswith(f"resume from {run / 'checkpoints' / 'step4'}: lsh_moe settings changed: "
                           f"enabled true -> false (old {{\"enabled\": true,"), line
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert any(k.startswith("lsh_moe/") for k in records[3]) and not any(k.startswith("lsh_moe/") for k in records[4])
    assert records[4]["loss"] != pytest.approx(metrics(straight)[4]["loss"], rel=1e-5, abs=1e-6)


def test_resume_with_another_hash_seed_takes_its_projections_from_the_config(tmp_path, cache_dir, straight):
    config = json.load(open(os.path.join(ROOT, "configs/gpt_moe_cpu_lsh.json")))
    config["lsh_moe"]["seed"] = 99
    (tmp_path / "seed99.json").write_text(json.dumps(config))
    run = tmp_path / "seed99"
    resume_from(straight, run, "step4")
    result = pretrain(run, cache_dir, "--train_steps", "5", "--resume", config=tmp_path / "seed99.json")
    assert "lsh_moe settings changed: seed 1234 -> 99 (old" in result.stdout
    assert "the hash projections come from the new settings" in result.stdout
    # the plugin's per-layer state was saved under seed 1234: this is another run, whose state starts fresh
    assert ("lsh_moe: the checkpoint's plugin state was saved under other lsh_moe settings (seed 1234 -> 99), and a "
            "run that changes its settings goes on as another run; the plugin's per-layer state starts fresh") \
        in result.stderr, result.stderr[-3000:]
    # The same step from the same weights with seed 1234 gives the straight run's loss (the kill test shows a
    # resume replays exactly): another loss here means the compressor hashed with seed 99's projections.
    assert metrics(run)[4]["loss"] != pytest.approx(metrics(straight)[4]["loss"], rel=1e-5, abs=1e-6)
    assert "lsh_moe/mean/bytes_ratio" in metrics(run)[4]


def test_resume_with_lsh_switched_on_at_another_rate_after_a_failed_save(tmp_path, cache_dir, failed_save):
    source, _, _ = failed_save
    run = tmp_path / "on"
    shutil.copytree(source, run)
    config = json.load(open(os.path.join(ROOT, "configs/gpt_moe_cpu_lsh.json")))
    config["lsh_moe"]["compression_rate"] = 0.5
    (tmp_path / "rate05.json").write_text(json.dumps(config))
    result = pretrain(run, cache_dir, "--train_steps", "8", "--resume", config=tmp_path / "rate05.json")
    assert (f"resume from {run / 'checkpoints' / 'step4'}: lsh_moe settings changed: enabled false -> true, "
            f"compression_rate 0.2 -> 0.5 (old") in result.stdout
    # saved with LSH-MoE off: no plugin state in the checkpoint, one line from rank 0 says so
    assert result.stderr.count("lsh_moe: the checkpoint holds no lsh_moe plugin state") == 1, result.stderr[-3000:]
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not any(k.startswith("lsh_moe/") for k in records[3])
    # ceil(0.5 x capacity) centroid slots per expert: about half the bytes, where 0.2 sends at most a quarter.
    assert 0.4 < records[4]["lsh_moe/mean/bytes_ratio"] <= 0.55
    # The interrupted step-8 save was redone whole: it is complete and latest again.
    assert checkpoints.latest_tag(run / "checkpoints") == "step8"
    assert checkpoints.incompleteness(str(run / "checkpoints" / "step8")) is None
