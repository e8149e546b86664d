"""The long-schedule testbed: its presets, the plans `compare_quality.py run --testbed` makes of them, the order
the runs start in, the guard against two study calls training one run, the gap-against-length report and the
throughput table's arithmetic."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
from test_quality_study import TOKENS_PER_STEP, write_run

from lshmoe_pretrain import length_study, study_throughput
from lshmoe_pretrain import quality_study as study
from lshmoe_pretrain import testbed as beds
from lshmoe_pretrain.models.config import PRESETS, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare_quality():
    spec = importlib.util.spec_from_file_location("compare_quality", os.path.join(REPO, "scripts",
                                                                                  "compare_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv):
    module, saved = compare_quality(), sys.argv
    sys.argv = ["compare_quality.py", *argv]
    try:
        return module, module.parse_args()
    finally:
        sys.argv = saved


@pytest.mark.parametrize("name", sorted(beds.TESTBEDS))
def test_every_testbed_trains_a_long_schedule_of_a_real_preset(name):
    bed = beds.TESTBEDS[name]
    assert bed.steps >= 3500 and bed.preset in PRESETS and bed.name == name
    assert bed.tokens_at(1.0) == bed.steps * bed.micro_batch * PRESETS[bed.preset].seq_len
    assert bed.steps_at(0.125) == round(bed.steps / 8)


@pytest.mark.parametrize("name", [n for n, b in sorted(beds.TESTBEDS.items()) if b.single_pass_of])
def test_a_single_pass_shape_halves_its_long_shapes_batch_and_stays_within_one_pass(name):
    """The same model and steps as the long shape it names, half the batch: its long schedule reads fewer tokens
    than the pinned train split holds (T5 counts its targets too: 284 tokens of text a sequence), where the long
    shape goes over it more than once."""
    bed = beds.TESTBEDS[name]
    long = beds.TESTBEDS[bed.single_pass_of]
    assert (bed.model_kind, bed.preset, bed.steps, bed.lr) == (long.model_kind, long.preset, long.steps, long.lr)
    assert bed.micro_batch * 2 == long.micro_batch and long.single_pass_of is None and not bed.proxy_of
    text_per_sequence = 284 if bed.model_kind == "t5" else PRESETS[bed.preset].seq_len
    read = bed.steps * bed.micro_batch * text_per_sequence
    assert read < beds.PINNED_TRAIN_TOKENS < 2 * read


@pytest.mark.parametrize("name", [n for n, b in sorted(beds.TESTBEDS.items()) if b.widens])
def test_a_width_check_widens_a_single_pass_shape_and_sets_no_default(name):
    """The same kind, batch, steps and rate as the single-pass shape it widens, a wider model, within one pass; in
    neither family, so neither the long nor the single-pass shapes' default reads it."""
    bed = beds.TESTBEDS[name]
    narrower = beds.TESTBEDS[bed.widens]
    assert beds.family(narrower) == "single-pass" and not bed.proxy_of and bed.single_pass_of is None
    assert (bed.model_kind, bed.micro_batch, bed.steps, bed.lr) == (narrower.model_kind, narrower.micro_batch,
                                                                    narrower.steps, narrower.lr)
    assert PRESETS[bed.preset].d_model > PRESETS[narrower.preset].d_model
    assert PRESETS[bed.preset].seq_len == PRESETS[narrower.preset].seq_len
    assert bed.tokens_at(1.0) < beds.PINNED_TRAIN_TOKENS
    assert beds.family(bed) == beds.WIDTH_CHECK
    assert all(bed not in beds.shapes(family) for family in beds.FAMILIES)
    assert [b.name for b in beds.shapes("single-pass")] == ["gpt-25m-1pass", "gpt-72m-1pass", "t5-26m-1pass"]


def test_testbed_plans_one_complete_schedule_per_length(tmp_path):
    module, args = parse(["run", "--testbed", "gpt-25m-long", "--lengths", "1", "0.125", "--variants", "stock",
                          "lsh", "--seeds", "1", "2", "--root", str(tmp_path)])
    long, short = module.study_plans(args)
    assert (long.train_steps(), short.train_steps()) == (3663, 458)
    assert long.output_root == os.path.join(str(tmp_path), "gpt-25m-long", "x1")
    assert short.output_root == os.path.join(str(tmp_path), "gpt-25m-long", "x0.125")
    assert (long.preset, long.micro_batch, long.lr, long.concurrency) == ("gpt-moe-25m", 32, 6e-4, 6)
    # every length anneals over its own schedule: the scheduler ends at that length's last step
    config = study.deepspeed_config(short, "lsh")
    assert config["scheduler"]["params"]["total_num_steps"] == 458
    assert config["scheduler"]["params"]["warmup_num_steps"] == int(0.05 * 458)


@pytest.mark.parametrize("name, kind", [("gpt-mini-long-cpu", "gpt"), ("t5-mini-long-cpu", "t5")])
def test_the_cpu_proxy_trains_in_bf16_from_its_own_config_and_names_a_gpu_testbed(tmp_path, name, kind):
    proxy = beds.TESTBEDS[name]
    assert proxy.proxy_of in beds.TESTBEDS and beds.TESTBEDS[proxy.proxy_of].proxy_of is None
    assert proxy.steps == beds.TESTBEDS[proxy.proxy_of].steps
    assert proxy.model_kind == beds.TESTBEDS[proxy.proxy_of].model_kind == kind
    module, args = parse(["run", "--testbed", name, "--variants", "stock", "--seeds", "1",
                          "--root", str(tmp_path)])
    (plan,) = module.study_plans(args)
    assert plan.base_config == f"configs/{kind}_moe_cpu_bf16.json" and plan.concurrency == 2
    assert plan.model_kind == kind
    config = study.deepspeed_config(plan, "stock")
    assert config["bf16"] == {"enabled": True} and config["scheduler"]["params"]["total_num_steps"] == 3663
    # a GPU testbed keeps the GPU config, and --base_config still overrides either
    module, args = parse(["run", "--testbed", "gpt-25m-long", "--base_config", "configs/gpt_moe_cpu.json"])
    assert module.study_plans(args)[0].base_config == "configs/gpt_moe_cpu.json"
    module, args = parse(["run", "--testbed", "gpt-25m-long"])
    assert module.study_plans(args)[0].base_config == "configs/gpt_moe_gpu.json"


def test_testbed_refuses_the_flags_it_sets_and_lengths_need_a_testbed(tmp_path):
    module, args = parse(["run", "--testbed", "gpt-25m-long", "--preset", "tiny", "--lr", "1e-3"])
    with pytest.raises(study.StudyError, match="--preset, --lr with --testbed gpt-25m-long"):
        module.study_plans(args)
    module, args = parse(["run", "--lengths", "0.5"])
    with pytest.raises(study.StudyError, match="--lengths needs --testbed"):
        module.study_plans(args)
    module, args = parse(["run", "--testbed", "gpt-25m-long", "--lengths", "1.5"])
    with pytest.raises(beds.TestbedError, match=r"--lengths \[1.5\]"):
        module.study_plans(args)
    module, args = parse(["run", "--testbed", "gpt-1t-long"])
    with pytest.raises(beds.TestbedError, match="allowed"):
        module.study_plans(args)


def test_the_longest_schedules_start_first_and_finished_runs_are_skipped(tmp_path):
    module, args = parse(["run", "--testbed", "gpt-25m-long", "--lengths", "0.125", "1", "0.5", "--variants",
                          "stock", "lsh", "--seeds", "1", "--root", str(tmp_path)])
    plans = module.study_plans(args)
    order = [(job[0].train_steps(), job[1]) for job in study.pending_jobs(plans)]
    assert order == [(3663, "stock"), (3663, "lsh"), (1832, "stock"), (1832, "lsh"), (458, "stock"), (458, "lsh")]
    short = plans[0]
    os.makedirs(short.run_dir("stock", 1))
    with open(os.path.join(short.run_dir("stock", 1), "metrics.jsonl"), "w") as f:
        f.write('{"step": 458, "valid_loss": 4.0}\n')
    assert (458, "stock") not in [(job[0].train_steps(), job[1]) for job in study.pending_jobs(plans)]


def test_a_run_that_a_live_launcher_trains_is_not_started_again(tmp_path):
    plan = study.StudyPlan("gpt", "tiny", ["stock"], [1], 10**4, str(tmp_path), "configs/gpt_moe_cpu.json",
                           data_prefix=os.path.join(str(tmp_path), "corpus"))
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        open(os.path.join(str(tmp_path), "corpus" + suffix), "w").close()
    run_dir = plan.run_dir("stock", 1)
    os.makedirs(run_dir)
    owner = os.path.join(run_dir, study.OWNER_FILE)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(owner, "w") as f:
            f.write(f"{socket.gethostname()} {sleeper.pid}\n")
        assert study.trained_elsewhere(run_dir) == sleeper.pid
        launched = []
        with pytest.raises(RuntimeError, match=f"being trained by launcher pid {sleeper.pid}"):
            study.run_studies([plan], 1, log=launched.append)
        assert not os.path.exists(os.path.join(run_dir, "train.log"))  # nothing was launched
    finally:
        sleeper.kill()
        sleeper.wait()
    assert study.trained_elsewhere(run_dir) is None  # the launcher is gone: the run may resume
    with open(owner, "w") as f:
        f.write(f"another-host {os.getpid()}\n")
    assert study.trained_elsewhere(run_dir) is None


def test_cpu_runs_at_once_share_the_cores_unless_the_caller_set_the_threads(monkeypatch):
    plan = study.StudyPlan("gpt", "tiny", ["stock"], [1], 10**4, "unused", "configs/gpt_moe_cpu.json")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert study.shared_cpu_threads([plan], 2, {"DS_ACCELERATOR": "cpu"}) == 8
    assert study.shared_cpu_threads([plan], 3, {"DS_ACCELERATOR": "cpu"}) == 5
    assert study.shared_cpu_threads([plan], 32, {"DS_ACCELERATOR": "cpu"}) == 1  # never 0
    two_ranks = study.StudyPlan("gpt", "tiny", ["stock"], [1], 10**4, "unused", "configs/gpt_moe_cpu.json",
                                num_gpus=2)
    assert study.shared_cpu_threads([plan, two_ranks], 2, {"DS_ACCELERATOR": "cpu"}) == 4  # 2 runs x 2 ranks
    assert study.shared_cpu_threads([plan], 2, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "3"}) is None
    assert study.shared_cpu_threads([plan], 2, {"DS_ACCELERATOR": "cuda"}) is None
    on_gpu = study.StudyPlan("gpt", "tiny", ["stock"], [1], 10**4, "unused", "configs/gpt_moe_cpu.json",
                             accelerator_env={"DS_ACCELERATOR": "cuda"})
    assert study.shared_cpu_threads([plan, on_gpu], 2, {"DS_ACCELERATOR": "cpu"}) is None


def test_two_cpu_runs_at_once_each_train_on_half_the_cores(tmp_path, monkeypatch):
    """The real launcher, two runs at once with no OMP_NUM_THREADS set: each rank records the threads it had."""
    from lshmoe_pretrain.data import cached_preprocess
    prepared = cached_preprocess(vocab_size=2048, cache_dir=str(tmp_path / "cache"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    plan = study.StudyPlan("gpt", "tiny", ["stock"], [1, 2], 2 * 4 * PRESETS["tiny"].seq_len,
                           str(tmp_path / "runs"), "configs/gpt_moe_cpu.json", data_prefix=prepared.prefix,
                           vocab_size=prepared.vocab_size, micro_batch=4, evals=1, eval_tokens=256,
                           eval_compressed="off")
    lines = []
    assert study.run_studies([plan], 2, log=lines.append)
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert f"OMP_NUM_THREADS={expected}: 2 CPU run(s) at once share {os.cpu_count()} cores" in lines
    for seed in (1, 2):
        with open(os.path.join(plan.run_dir("stock", seed), "run.json")) as f:
            assert json.load(f)["cpu_threads"] == expected


def test_rendezvous_ports_lie_below_the_ephemeral_range_and_bind(tmp_path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t60999\n")
    assert study.rendezvous_ports(str(ranges)) == range(study.RENDEZVOUS_PORT_FLOOR, 40000)
    assert study.rendezvous_ports(str(tmp_path / "absent")) == range(study.RENDEZVOUS_PORT_FLOOR, 32768)
    with socket.socket() as held:  # a port in use is drawn again, not returned
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        draws = iter([taken, 23456])
        assert study.rendezvous_port(lambda ports: next(draws), str(ranges)) == 23456
        with pytest.raises(study.StudyError, match="no free rendezvous port"):
            study.rendezvous_port(lambda ports: taken, str(ranges))


def test_a_run_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    """The real launcher on a port another socket listens on dies with EADDRINUSE; the study starts it again."""
    from lshmoe_pretrain.data import cached_preprocess
    prepared = cached_preprocess(vocab_size=2048, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    plan = study.StudyPlan("gpt", "tiny", ["stock"], [1], 2 * 4 * PRESETS["tiny"].seq_len, str(tmp_path / "runs"),
                           "configs/gpt_moe_cpu.json", data_prefix=prepared.prefix, vocab_size=prepared.vocab_size,
                           micro_batch=4, evals=1, eval_tokens=256, eval_compressed="off")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = iter([taken, study.rendezvous_port()])
        monkeypatch.setattr(study, "rendezvous_port", lambda: next(ports))
        lines = []
        assert study.run_studies([plan], 1, log=lines.append)
    run_dir = plan.run_dir("stock", 1)
    assert f"retry {run_dir}: its rendezvous port was taken (EADDRINUSE), starting it again on another" in lines
    assert [line.split(" ")[0] for line in lines if run_dir in line] == ["start", "retry", "start", "done"]
    assert study.finished(run_dir, plan.train_steps())
    with open(os.path.join(run_dir, "train.log"), "rb") as f:
        after_the_last_mention = f.read().rindex(b"EADDRINUSE") + len(b"EADDRINUSE")
    assert study.lost_its_port(os.path.join(run_dir, "train.log"), 0)
    assert not study.lost_its_port(os.path.join(run_dir, "train.log"), after_the_last_mention)


def test_a_run_that_fails_for_another_reason_is_not_started_again(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("EADDRINUSE earlier attempt\nTraceback: ValueError\n")
    assert study.lost_its_port(str(log), 0)
    assert not study.lost_its_port(str(log), len("EADDRINUSE earlier attempt\n"))
    assert not study.lost_its_port(str(tmp_path / "absent.log"), 0)


def test_the_gap_against_length_pairs_seeds_and_shows_stocks_spread(tmp_path):
    bed = beds.TESTBEDS["gpt-25m-long"]
    root = str(tmp_path)
    short = os.path.join(root, bed.name, "x0.125")
    long = os.path.join(root, bed.name, "x1")
    write_run(short, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(short, "lsh", 1, [6.0, 5.1], train_steps=20)
    write_run(long, "stock", 1, [5.0, 3.0], train_steps=20)
    write_run(long, "stock", 2, [5.0, 3.2], train_steps=20)
    write_run(long, "lsh", 1, [5.0, 3.3], train_steps=20)
    write_run(long, "lsh", 2, [5.0, 3.68], train_steps=20)
    write_run(long, "lsh", 3, [5.0, 9.9], train_steps=20)  # no stock run of seed 3: not in the paired gap
    rows = length_study.collect(root, bed, ["stock", "lsh"])
    assert [row.length for row in rows] == [0.125, 1.0]
    assert rows[0].gap("lsh") == pytest.approx([2.0])
    assert rows[1].gap("lsh") == pytest.approx([10.0, 15.0])
    assert rows[1].stock_spread() == pytest.approx(100 * 0.1414214 / 3.1, rel=1e-5)
    table = length_study.table(rows, ["stock", "lsh"])
    assert "| 0.125x | 20 | 0.02M | 5.0000 (1) | – (1 seed) | 5.1000 (1) | +2.00% |" in table
    assert "| 1x | 20 | 0.02M | 3.1000 ± 0.1414 (2) | 4.56% | " in table
    assert "| +12.50% ± 3.54% (2 seeds) |" in table
    length_study.plot(rows, ["stock", "lsh"], os.path.join(root, "gap.png"), "gap")
    assert os.path.getsize(os.path.join(root, "gap.png")) > 0
    assert rows[0].tokens == 20 * TOKENS_PER_STEP


def test_the_gap_against_length_takes_the_baseline_it_is_given(tmp_path):
    """With baseline stock_lr1.5x every row, gap and spread is against stock at that rate: a length without its runs
    has no row, stock itself is a variant like any other, and the table's headers name the baseline. A baseline
    with the plugin on, or unknown, is refused by name."""
    bed = beds.TESTBEDS["gpt-25m-1pass"]
    root = str(tmp_path)
    short, long = (os.path.join(root, bed.name, length) for length in ("x0.125", "x1"))
    write_run(short, "stock", 1, [6.0, 5.0], train_steps=20)   # no stock_lr1.5x at 0.125x: no row there
    for seed, stock, scaled, default in ((1, 3.3, 3.0, 3.03), (2, 3.4, 3.2, 3.36)):
        write_run(long, "stock", seed, [5.0, stock], train_steps=20)
        write_run(long, "stock_lr1.5x", seed, [5.0, scaled], train_steps=20)
        write_run(long, "fp8_fwd_fp4sr_grad_lr1.5x", seed, [5.0, default], train_steps=20)
    variants = ["stock", "fp8_fwd_fp4sr_grad_lr1.5x"]
    rows = length_study.collect(root, bed, variants, baseline="stock_lr1.5x")
    assert [row.length for row in rows] == [1.0] and length_study.baseline_of(rows) == "stock_lr1.5x"
    assert rows[0].gap("fp8_fwd_fp4sr_grad_lr1.5x") == pytest.approx([1.0, 5.0])
    assert rows[0].gap("stock") == pytest.approx([10.0, 6.25])
    assert rows[0].stock_spread() == pytest.approx(100 * 0.1414214 / 3.1, rel=1e-5)
    table = length_study.table(rows, variants)
    assert "| stock_lr1.5x: final loss (seeds) | stock_lr1.5x seed spread (std) | stock: final loss (seeds) |" in table
    assert "| 1x | 20 | 0.02M | 3.1000 ± 0.1414 (2) | 4.56% | 3.3500 ± 0.0707 (2) | +8.12% ± 2.65% (2 seeds) |" \
        in table
    assert length_study.collect(root, bed, variants)[0].length == 0.125   # the default baseline: stock, as before
    for refused in ("fp8_fwd_fp4sr_grad_lr1.5x", "stock_lr3x"):
        with pytest.raises(study.StudyError, match=f"--baseline '{refused}'"):
            length_study.collect(root, bed, variants, baseline=refused)
    output = os.path.join(root, "quality.md")
    module, args = parse(["lengths", "--testbed", bed.name, "--root", root, "--baseline", "stock_lr1.5x",
                          "--variants", *variants, "--section", "scaled", "--output", output])
    module.lengths(args)
    with open(output) as f:
        written = f.read()
    assert "pairs a run with stock_lr1.5x's run of the same seed" in written and "| stock_lr1.5x: final loss" in written


def with_training_loss(root, variant, seed, losses):
    """Adds a training loss to each record of a written run, in step order."""
    path = os.path.join(root, "gpt", variant, f"seed{seed}", "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f]
    with open(path, "w") as f:
        for record, loss in zip(records, losses):
            f.write(json.dumps({**record, "loss": loss}) + "\n")


def test_training_and_validation_gaps_stand_side_by_side_with_the_passes(tmp_path):
    """A variant whose validation gap is below its training gap on a repeated corpus shows it: the training loss
    of the last 10% of steps only (step 20 of 20; step 10's is not in it), paired by seed."""
    bed = beds.TESTBEDS["gpt-25m-long"]
    root = str(tmp_path)
    long = os.path.join(root, bed.name, "x1")
    for seed, stock_train, fp4_train in ((1, 2.0, 2.02), (2, 2.5, 2.55)):
        write_run(long, "stock", seed, [5.0, 3.0], train_steps=20)
        write_run(long, "fp4_both", seed, [5.0, 3.0], train_steps=20)
        with_training_loss(long, "stock", seed, [9.0, stock_train])
        with_training_loss(long, "fp4_both", seed, [1.0, fp4_train])
    write_run(long, "lsh", 1, [5.0, 3.3], train_steps=20)  # no training loss recorded: no training gap
    rows = length_study.collect(root, bed, ["stock", "fp4_both", "lsh"])
    assert rows[0].gap("fp4_both") == pytest.approx([0.0, 0.0])
    assert rows[0].train_gap("fp4_both") == pytest.approx([1.0, 2.0])
    assert rows[0].train_gap("lsh") is None
    # write_run's split holds 10**6 tokens; 20 steps of TOKENS_PER_STEP each
    passes = 20 * TOKENS_PER_STEP / 10**6
    table = length_study.train_against_valid_table(rows, ["stock", "fp4_both", "lsh"])
    assert f"| 1x | {passes:.2f} | +0.00% (2 seeds) | +1.50% (2 seeds) | +10.00% | – |" in table


def test_what_the_second_pass_changes_within_the_long_schedule(tmp_path):
    """20 steps of 1,000 tokens over a 10,000-token split: the first pass ends at step 10. The table reads the
    validation gap at the evaluation of step 10 and at the end, and the training gap over steps 10 (the last 10% of
    the first pass) and 19-20 (of the schedule); within one pass it is empty."""
    bed = beds.TESTBEDS["gpt-25m-long"]
    root = str(tmp_path)
    long = os.path.join(root, bed.name, "x1")
    for variant, valid, training in (("stock", [5.0, 3.0], [4.0, 2.0]), ("fp4_both", [5.05, 3.0], [4.04, 2.04])):
        write_run(long, variant, 1, valid, train_steps=20)
        with_training_loss(long, variant, 1, training)
    rows = length_study.collect(root, bed, ["stock", "fp4_both"])
    assert length_study.repeats_table(rows, ["stock", "fp4_both"]) == ""  # 10**6 tokens in the split: one pass
    for variant in ("stock", "fp4_both"):
        info_path = os.path.join(long, "gpt", variant, "seed1", "run.json")
        with open(info_path) as f:
            info = json.load(f)
        with open(info_path, "w") as f:
            json.dump({**info, "train_tokens": 10 * TOKENS_PER_STEP}, f)
    rows = length_study.collect(root, bed, ["stock", "fp4_both"])
    assert rows[0].first_repeat_step() == 10
    table = length_study.repeats_table(rows, ["stock", "fp4_both"])
    assert ("| variant | validation gap, step 10 (first pass) | validation gap, final | training-loss gap, steps 9-10 "
            "| training-loss gap, steps 18-20 |") in table
    assert "| fp4_both | +1.00% | +0.00% | +1.00% | +2.00% |" in table


def test_active_parameters_count_the_top_k_experts_and_the_head():
    config = ModelConfig(vocab_size=100, seq_len=8, d_model=4, n_heads=2, n_layers=2, d_ff=8, num_experts=4,
                         top_k=2, moe_every=2)
    # block 0 dense: 4*16 + 2*4*8 = 128; block 1 MoE, two experts: 64 + 2*64 = 192; head 4*100
    assert study_throughput.active_parameters(config, "gpt") == 128 + 192 + 400
    # T5: the encoder's blocks as above, the decoder's with cross-attention (8 d^2)
    assert study_throughput.active_parameters(config, "t5") == 128 + 192 + (128 + 64) + (192 + 64) + 400


def test_the_throughput_table_sums_the_runs_of_a_batch():
    bed = beds.Testbed("t", "test", "gpt", "tiny", micro_batch=4, steps=100)
    one = study_throughput.BatchResult(1, [("stock", 1, 1000.0, 2.0)], 1000.0, 10.0, 20.0, 1.0)
    four = study_throughput.BatchResult(4, [("stock", 2, 700.0, 1.4), ("lsh", 2, 600.0, 1.2)], 2600.0, 30.0, None,
                                        2.6)
    rows = study_throughput.table(bed, [one, four])
    aggregate = rows[-1]
    assert aggregate[:7] == [4, "all runs", "", "", "2,600", "2.60x", "–"]
    # 4 runs x 100 steps x 4 x 128 tokens at 2,600 tokens/s
    assert aggregate[8] == f"{4 * 100 * 4 * 128 / 2600 / 60:.0f}"
    assert rows[0][:4] == [1, "stock x1", "1,000", "2.0"]
