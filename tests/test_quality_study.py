"""The quality study's aggregation on run records written the way training.py writes them: finished and
deadline-stopped runs, equal-token comparison, the gap table, tokens to a target and the time-to-target table."""
import json
import os

import pytest

from lshmoe_pretrain import benchmarking as bench
from lshmoe_pretrain import quality_study as study

TOKENS_PER_STEP = 1000


def write_run(root, variant, seed, losses, train_steps, eval_every=10, data_sha256=None, device="cpu"):
    run_dir = os.path.join(root, "gpt", variant, f"seed{seed}")
    os.makedirs(run_dir)
    info = {"model_kind": "gpt", "preset": "tiny", "train_steps": train_steps, "tokens_per_step": TOKENS_PER_STEP,
            "parameters": 3e6, "train_tokens": 10**6, "valid_tokens": 10**4, "data": "synthetic", "vocab_size": 64,
            "ep_size": 1, "world_size": 1, "device": device, "torch": "x",
            "lsh_moe": {"compression_rate": 0.2, "num_hashes": 6, "hash_type": "cross_polytope", "hash_dim": 8,
                        "error_compensation": True}}
    if data_sha256 is not None:
        info["data_sha256"] = data_sha256
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses):
            step = (i + 1) * eval_every
            f.write(json.dumps({"step": step, "step_time_s": 0.1, "valid_loss": loss}) + "\n")


def test_partial_runs_are_compared_at_the_evaluations_all_of_them_reached(tmp_path):
    root = str(tmp_path)
    write_run(root, "stock", 1, [5.0, 4.0, 3.0], train_steps=40)
    write_run(root, "stock", 2, [5.2, 4.2, 3.2, 2.2], train_steps=40)
    write_run(root, "lsh", 1, [5.0, 3.9], train_steps=40)
    write_run(root, "lsh", 2, [5.1, 4.1, 3.1], train_steps=40)
    finished = study.aggregate(root, "gpt", ["stock", "lsh"])  # only stock seed 2 reached its last step
    assert [(r.name, r.seeds) for r in finished] == [("stock", [2])]
    with pytest.raises(study.StudyError, match="no finished runs"):
        study.aggregate(root, "gpt", ["lsh"])
    results = study.aggregate(root, "gpt", ["stock", "lsh"], partial=True)
    assert [r.tokens for r in results] == [[10000, 20000], [10000, 20000]]
    stock, lsh = results
    assert stock.valid == {1: [5.0, 4.0], 2: [5.2, 4.2]} and lsh.valid == {1: [5.0, 3.9], 2: [5.1, 4.1]}
    table = study.gap_table(results)
    # means 4.1 vs 4.0: -2.44%; per seed -2.5% and -2.38%
    assert "| lsh | 2 | 4.0000 ± 0.1414 | -2.44% | -2.44% ± 0.08% |" in table
    assert study.tokens_to_reach(lsh, 4.1) == pytest.approx(10000 + 10000 * (5.05 - 4.1) / (5.05 - 4.0))


def test_runs_of_two_corpora_are_never_compared(tmp_path):
    root = str(tmp_path)
    write_run(root, "stock", 1, [5.0, 4.0], train_steps=20, data_sha256="a" * 64)
    write_run(root, "lsh", 1, [5.0, 4.1], train_steps=20, data_sha256="a" * 64)
    assert [r.name for r in study.aggregate(root, "gpt", ["stock", "lsh"])] == ["stock", "lsh"]
    write_run(root, "fp8_both", 1, [5.0, 4.0], train_steps=20, data_sha256="b" * 64)
    write_run(root, "rate_1.0", 1, [5.0, 4.0], train_steps=20)  # from before runs recorded their corpus
    with pytest.raises(study.StudyError, match="different corpora .* aaaaaaaaaaaa: stock, lsh; bbbbbbbbbbbb: "
                                               "fp8_both"):
        study.aggregate(root, "gpt", ["stock", "lsh", "fp8_both"])
    with pytest.raises(study.StudyError, match="aaaaaaaaaaaa: stock; not recorded: rate_1.0"):
        study.aggregate(root, "gpt", ["stock", "rate_1.0"])
    write_run(root, "lsh_no_ec", 1, [5.0, 4.0], train_steps=20, data_sha256="a" * 64)
    write_run(root, "lsh_no_ec", 2, [5.0, 4.0], train_steps=20, data_sha256="b" * 64)
    with pytest.raises(study.StudyError, match="lsh_no_ec/seed1.*bbbbbbbbbbbb: lsh_no_ec/seed2"):
        study.load_variant(root, "gpt", "lsh_no_ec")


def test_time_to_target_combines_measured_token_and_step_rates(tmp_path):
    root = str(tmp_path)
    write_run(root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(root, "lsh", 1, [5.5, 4.5], train_steps=20)
    results = study.aggregate(root, "gpt", ["stock", "lsh"])
    table = study.time_to_target(results, {"stock": {"tokens/s": "100"}, "lsh": {"tokens/s": "50"}},
                                 {"lsh": {"speed-up vs stock": "2.0"}}, "steps", "link")
    lsh_tokens = 10000 + 10000 * (5.5 - 5.0) / (5.5 - 4.5)  # reaches stock's 5.0 halfway: 15000
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert f"| {lsh_tokens / 20000:.3f} |" in rows["tokens to valid loss 5.0000 (stock's after 0.02M)"]
    assert "| 200.0 s | 300.0 s | 1.500 |" in rows["EP=1 time to that loss"]
    assert f"| {lsh_tokens / 20000 / 2.0:.3f} | **projected**" in rows["time to that loss on the slow link"]


def test_read_section_table(tmp_path):
    path = str(tmp_path / "b.md")
    bench.write_section(path, "s", "## t\n\n" + bench.markdown_table(["variant", "tokens/s"], [("stock", 10.0),
                                                                                             ("lsh", 20.0)]))
    assert bench.read_section_table(path, "s") == {"stock": {"variant": "stock", "tokens/s": "10"},
                                                   "lsh": {"variant": "lsh", "tokens/s": "20"}}
    with pytest.raises(KeyError, match="no section 'x'"):
        bench.read_section_table(path, "x")
    # only the first table: a later one whose first cells repeat its rows (a report's loss curve) leaves them be
    bench.write_section(path, "two", "## t\n\n" + bench.markdown_table(["variant", "loss"], [("stock", 3.0)])
                        + "\n\nLater:\n\n" + bench.markdown_table(["variant", "step ms"], [("stock", 99.0)]))
    assert bench.read_section_table(path, "two") == {"stock": {"variant": "stock", "loss": "3"}}


def test_output_errors_average_the_second_half_over_layers_and_runs():
    early = {"step": 1, "lsh_moe/mean/output_error": 9.0, "probe/layer0/output_error_jacobian": 9.0}
    run_a = [early, {"step": 2, "lsh_moe/mean/output_error": 0.4, "probe/layer0/output_error_jacobian": 0.1,
                     "probe/layer1/output_error_jacobian": 0.3}]
    run_b = [early, {"step": 2, "lsh_moe/mean/output_error": 0.2}]
    errors = study.output_errors([run_a, run_b])
    assert errors == pytest.approx({"lsh_moe/mean/output_error": 0.3, "probe/output_error_jacobian": 0.2})
    result = study.VariantResult("lsh", [1], [10], {1: [1.0]}, {}, 0.2, 0.2, 0.1, 1.0, {}, errors)
    table = study.error_table([result])
    assert "| variant | as trained | E(c) + J(c)(x - c) |" in table and "| lsh | 0.300 | 0.200 |" in table
    formats_only = study.VariantResult("fp4_both", [1], [10], {1: [1.0]}, {}, 1.0, 0.27, None, 1.0, {}, {})
    assert study.error_table([formats_only]) == ""
    assert "| fp4_both |" not in study.error_table([result, formats_only])


def test_time_to_target_per_modelled_link(tmp_path):
    root = str(tmp_path)
    write_run(root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(root, "lsh", 1, [5.5, 4.5], train_steps=20)
    results = study.aggregate(root, "gpt", ["stock", "lsh"])
    speedup = "speed-up vs stock (modelled)"
    modelled = {"stock @ 200gbps EP16": {speedup: "1"}, "lsh @ 200gbps EP16": {speedup: "1.5"},
                "stock @ nvlink4 EP8": {speedup: "1"}, "lsh @ nvlink4 EP8": {speedup: "0.9"}}
    table = study.time_to_target(results, {"stock": {"tokens/s": "100"}, "lsh": {"tokens/s": "50"}}, None, "steps",
                                 None, [("gpt_modelled", modelled)])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    token_ratio = 15000 / 20000
    assert "time to that loss on the slow link" not in rows  # no measured-link section given
    assert f"| {token_ratio / 1.5:.3f} | **modelled**" in rows["time to that loss at 200gbps, EP=16"]
    assert f"| {token_ratio / 0.9:.3f} | **modelled**" in rows["time to that loss at nvlink4, EP=8"]
    assert "`gpt_modelled`" in rows["time to that loss at nvlink4, EP=8"]
    assert "measured" in rows["EP=1 time to that loss"]
    with pytest.raises(study.StudyError, match="no `stock @ nvlink4 EP8` row"):
        study.time_to_target(results, {"stock": {"tokens/s": "1"}, "lsh": {"tokens/s": "1"}}, None, "s", None,
                             [("m", {"lsh @ nvlink4 EP8": {"speed-up vs stock (modelled)": "1"}})])
    with pytest.raises(study.StudyError, match="holds no `lsh @ <link> EP<k>` rows"):
        study.time_to_target(results, {"stock": {"tokens/s": "1"}, "lsh": {"tokens/s": "1"}}, None, "s", None,
                             [("m", {"stock": {"speed-up vs stock (modelled)": "1"}})])


def test_bytes_ratio_counts_stock_steps_as_one():
    records = [{"step": s, "lsh_moe/mean/bytes_ratio": 0.2} for s in range(1, 11)]
    assert study.bytes_ratio(records, {"lsh_moe": {"enabled": True, "method": "paper"}}) == pytest.approx(0.2)
    # the exact tail from step 8 on: steps 9 and 10 ran stock, whatever their (stale) record says
    assert study.bytes_ratio(records, {"lsh_moe": {"enabled": True, "method": "paper",
                                                   "exact_from_step": 8}}) == pytest.approx(0.36)
    assert study.bytes_ratio(records, {"lsh_moe": {"enabled": False}}) == 1.0


def test_time_to_target_when_lsh_never_reaches_stock(tmp_path):
    """LSH-MoE ending above stock gives no time to target: the table says so, and gives each link's break-even
    token ratio (its step speed-up) instead of a number that was never measured."""
    root = str(tmp_path)
    write_run(root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(root, "lsh", 1, [6.1, 5.2], train_steps=20)
    results = study.aggregate(root, "gpt", ["stock", "lsh"])
    speedup = "speed-up vs stock (modelled)"
    modelled = {"stock @ 200gbps EP16": {speedup: "1"}, "lsh @ 200gbps EP16": {speedup: "1.5"}}
    table = study.time_to_target(results, {"stock": {"tokens/s": "100"}, "lsh": {"tokens/s": "50"}},
                                 {"lsh": {"speed-up vs stock": "2.0"}}, "steps", "link", [("m", modelled)])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    first = rows["tokens to valid loss 5.0000 (stock's after 0.02M)"]
    assert "not reached in 0.02M (ends at 5.2000)" in first and "> 1.000" in first and "+4.00% above" in first
    assert "| 1.500 | **modelled**" in rows["break-even token ratio at 200gbps, EP=16"]
    assert "| 2.000 | measured" in rows["break-even token ratio on the slow link"]
    assert not [name for name in rows if name.startswith("time to that loss")]


def test_time_to_target_from_lsh_schedules_of_its_own(tmp_path):
    """compare_quality.py time-to-target --lsh_root: the tokens LSH-MoE needs to reach stock's final loss, linear
    between the final losses of finished schedules of different lengths, never from inside a longer schedule."""
    import subprocess
    import sys
    stock_root, lsh_root = str(tmp_path / "a"), str(tmp_path / "b")
    write_run(stock_root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(stock_root, "lsh", 1, [6.1, 5.2], train_steps=20)  # never reaches 5.0 on stock's schedule
    # its own 30k-token schedule passes 5.0 inside it (4.9 at 20k tokens) but that point has not decayed yet
    write_run(lsh_root, "lsh", 1, [6.1, 4.9, 4.8], train_steps=30)
    benchmarks = str(tmp_path / "bench.md")
    bench.write_section(benchmarks, "steps", "## s\n\n" + bench.markdown_table(
        ["variant", "tokens/s"], [("stock", 100.0), ("lsh", 100.0)]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, os.path.join(root, "scripts", "compare_quality.py"), "time-to-target", "--root",
            stock_root, "--benchmarks", benchmarks, "--step_section", "steps"]
    env = dict(os.environ, PYTHONPATH=root)
    alone = subprocess.run(base, capture_output=True, text=True, env=env)
    assert alone.returncode == 0, alone.stderr
    assert "not reached in 0.02M" in alone.stdout
    longer = subprocess.run(base + ["--lsh_root", lsh_root], capture_output=True, text=True, env=env)
    assert longer.returncode == 0, longer.stderr
    tokens = 20000 + 10000 * (5.2 - 5.0) / (5.2 - 4.8)  # between the two schedules' final losses: 25k
    rows = {line.split(" | ")[0].strip("| "): line for line in longer.stdout.splitlines() if line.startswith("|")}
    first = rows["tokens to valid loss 5.0000 (stock's after 0.02M)"]
    assert f"| {tokens / 20000:.3f} | measured" in first and "schedules of 0.02M, 0.03M tokens" in first
    assert f"LSH-MoE also from `{lsh_root}`, on a schedule of its own of 0.03M tokens" in longer.stdout
    lsh_results = study.aggregate(lsh_root, "gpt", ["lsh"])
    assert study.tokens_over_schedules(lsh_results, 4.7) is None  # even the longest ends above
    with pytest.raises(study.StudyError, match="lie below every schedule run"):
        study.tokens_over_schedules(lsh_results, 4.85)


def test_gap_of_the_means_uses_the_seeds_both_ran(tmp_path):
    """A variant run on seed 1 only is compared with stock's seed 1, not with stock's mean over seeds 1 and 2
    (which would report stock's seed-to-seed spread as the variant's gap)."""
    root = str(tmp_path)
    write_run(root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(root, "stock", 2, [6.0, 4.0], train_steps=20)
    write_run(root, "rate_1.0", 1, [6.0, 5.0], train_steps=20)
    table = study.gap_table(study.aggregate(root, "gpt", ["stock", "rate_1.0"]))
    assert "| rate_1.0 | 1 | 5.0000 | +0.00% | +0.00% |" in table


def test_pairs_across_cards_are_named_with_the_controls_difference(tmp_path):
    """Seeds of a variant that trained on another card than stock's run of the same seed are named in the gap
    cell and in the cards note, with what the rate 1.0 control measured across cards and each crossing pair's gap
    against that control on its own card; one card: no note."""
    root = str(tmp_path)
    for seed, loss in ((1, 4.0), (2, 4.1)):
        write_run(root, "stock", seed, [6.0, loss], train_steps=20, device="H200")
    write_run(root, "fp4_both", 1, [6.0, 4.0], train_steps=20, device="H200")
    write_run(root, "fp4_both", 2, [6.0, 4.1], train_steps=20, device="H100")
    write_run(root, "rate_1.0", 2, [6.0, 4.141], train_steps=20, device="H100")
    results = study.aggregate(root, "gpt", ["stock", "fp4_both", "rate_1.0"])
    stock, fp4, control = results
    assert study.cross_card_seeds(fp4, stock) == [2] and study.cross_card_seeds(stock, stock) == []
    table = study.gap_table(results)
    assert "| fp4_both | 2 | 4.0500 ± 0.0707 | +0.00% | +0.00% ± 0.00% (seed 2 across cards) |" in table
    note = study.cards_note(results)
    assert "stock seeds 1, 2 on H200; fp4_both seed 1 on H200, seed 2 on H100; rate_1.0 seed 2 on H100" in note
    assert "carries that difference too: fp4_both seed 2; rate_1.0 seed 2." in note
    assert "ends across cards at +1.00% (seed 2) from stock's run of the same seed" in note
    # the control on the candidate's own card stands in for stock there: the pair with no card difference in it
    assert note.endswith("Against rate_1.0 of the same seed on the same card, in stock's place: fp4_both -0.99% "
                         "(seed 2).")
    assert study.cards_note(study.aggregate(root, "gpt", ["stock"])) == ""


def test_a_layer_that_changes_the_model_is_read_as_trained(tmp_path):
    """diag_skip (x + E(x) around every expert) evaluated through stock's layer loses the skip it trained with: the
    note gives its gap in the 'compressed eval' column (the layer on, as trained), per seed against stock's; a
    study layer that keeps stock's forward (diag_residual_grad) gets no such note."""
    root = str(tmp_path)
    for seed, loss in ((1, 4.0), (2, 4.2)):
        write_run(root, "stock", seed, [6.0, loss], train_steps=20)
        write_run(root, "diag_skip", seed, [6.0, 4.6], train_steps=20)
        path = os.path.join(root, "gpt", "diag_skip", f"seed{seed}", "metrics.jsonl")
        records = [json.loads(line) for line in open(path)]
        records[-1]["valid_loss_compressed"] = loss * (0.97 if seed == 1 else 0.99)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    note = study.as_trained_note(study.aggregate(root, "gpt", ["stock", "diag_skip"]))
    assert note.endswith("Gap as trained against stock's run of the same seed: diag_skip -2.00% ± 1.41% (seeds 1, "
                         "2).")
    write_run(root, "diag_residual_grad", 1, [6.0, 3.9], train_steps=20)
    assert study.as_trained_note(study.aggregate(root, "gpt", ["stock", "diag_residual_grad"])) == ""


def test_a_study_layer_shows_no_bytes_figure(tmp_path):
    """A hybrid's telemetry holds the ratio of the clusters it formed (0.2 here), but it sends nothing a user's
    configuration would: the table says so instead of printing the ratio; random clusters keep theirs."""
    root = str(tmp_path)
    for variant in ("stock", "diag_residual_grad", "random_clusters"):
        write_run(root, variant, 1, [6.0, 5.0], train_steps=20)
        if variant != "stock":
            with open(os.path.join(root, "gpt", variant, "seed1", "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": 20, "step_time_s": 0.1, "valid_loss": 5.0,
                                    "lsh_moe/mean/bytes_ratio": 0.2}) + "\n")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")
            for line in study.gap_table(study.aggregate(root, "gpt", ["stock", "diag_residual_grad",
                                                                      "random_clusters"])).splitlines()[2:]}
    assert rows["diag_residual_grad"][6] == "– (study layer)"
    assert rows["random_clusters"][6] == "0.600" and rows["stock"][6] == "1.000"  # (1 + 0.2) / 2 steps


def test_every_variant_has_a_valid_config_and_diagnostic():
    """Each study variant's lsh_moe block loads, and its --diagnostic parses (a typo would only show on a GPU)."""
    import lshmoe_plugin
    from lshmoe_pretrain import diagnostics
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = study.StudyPlan("gpt", "tiny", list(study.VARIANTS), [1], 10**5, "unused",
                           os.path.join(root, "configs", "gpt_moe_cpu.json"))
    for name, settings in study.VARIANTS.items():
        config = lshmoe_plugin.load_config(study.deepspeed_config(plan, name))  # what the run is given
        assert config.enabled == settings["enabled"], name
        modes = diagnostics.parse(study.diagnostic(name))
        if "random_clusters" in modes:
            assert config.kernel == "torch" and config.cuda_graphs is False, name


def test_only_the_capturing_run_captures_and_it_takes_the_expert_count():
    """--capture_at (and --capture_experts where set) reach the one run named by capture_run, no other."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = study.StudyPlan("gpt", "tiny", ["stock", "fp4_both"], [1, 4], 10**5, "unused",
                           os.path.join(root, "configs", "gpt_moe_cpu.json"), capture_at=(0.1, 1.0),
                           capture_run="stock/4", capture_experts=2)
    def flags(variant, seed):
        command = study.launch_command(plan, variant, seed, "ds.json", 29500)
        return [arg for arg in command if arg.startswith("--capture")], command
    captured, command = flags("stock", 4)
    assert captured == ["--capture_at", "--capture_experts"]
    assert command[command.index("--capture_at") + 1:command.index("--capture_at") + 3] == ["0.1", "1.0"]
    assert command[command.index("--capture_experts") + 1] == "2"
    assert flags("stock", 1)[0] == [] and flags("fp4_both", 4)[0] == []
    plan.capture_experts = 0  # left out: the capture's own default, no flag
    assert flags("stock", 4)[0] == ["--capture_at"]


def test_a_learning_rate_control_scales_the_peak_and_keeps_its_base_block():
    """stock_lr2x trains stock's lsh_moe block (the plugin off) at twice the study's peak rate, warm-up and decay
    scaled with it; lr_scale never reaches the plugin, and every other variant keeps the study's rate."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = study.StudyPlan("gpt", "tiny", ["stock", "stock_lr2x", "lsh_lr1.5x"], [1], 10**5, "unused",
                           os.path.join(root, "configs", "gpt_moe_cpu.json"), lr=1e-3)
    base, doubled = study.deepspeed_config(plan, "stock"), study.deepspeed_config(plan, "stock_lr2x")
    assert base["optimizer"]["params"]["lr"] == 1e-3 and base["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    assert doubled["optimizer"]["params"]["lr"] == 2e-3 and doubled["scheduler"]["params"]["warmup_max_lr"] == 2e-3
    assert doubled["lsh_moe"] == base["lsh_moe"]
    assert {k: v for k, v in doubled["scheduler"]["params"].items() if k != "warmup_max_lr"} == \
        {k: v for k, v in base["scheduler"]["params"].items() if k != "warmup_max_lr"}
    scaled = study.deepspeed_config(plan, "lsh_lr1.5x")
    assert "lr_scale" not in scaled["lsh_moe"] and scaled["lsh_moe"] == study.deepspeed_config(plan, "lsh")["lsh_moe"]
    assert scaled["optimizer"]["params"]["lr"] == pytest.approx(1.5e-3)
    assert [n for n in study.VARIANTS if study.lr_scale(n) != 1.0] == ["stock_lr1.5x", "stock_lr2x", "lsh_lr1.5x",
                                                                       "fp8_fwd_fp4sr_grad_lr1.5x",
                                                                       "fp8_fwd_fp4sr_grad_lr2x",
                                                                       "fp8_fwd_fp4_grad_lr1.5x",
                                                                       "fp8_both_e8m0_lr1.5x",
                                                                       "fp8_fwd_fp6_grad_lr1.5x",
                                                                       "fp8_fwd_fp4_grad_lr2x",
                                                                       "fp6_fwd_fp4sr_grad_lr1.5x",
                                                                       "fp6_fwd_fp4sr_grad_lr2x",
                                                                       "stock_lr1.5x_nudge", "stock_lr2x_nudge"]


@pytest.mark.parametrize("scaled_name, base_name, stock_name, lr", [
    ("fp8_fwd_fp4sr_grad_lr1.5x", "fp8_fwd_fp4sr_grad", "stock_lr1.5x", 1.5e-3),
    ("fp8_fwd_fp4sr_grad_lr2x", "fp8_fwd_fp4sr_grad", "stock_lr2x", 2e-3),
    ("fp8_fwd_fp4_grad_lr1.5x", "fp8_fwd_fp4_grad", "stock_lr1.5x", 1.5e-3),
    ("fp8_both_e8m0_lr1.5x", "fp8_both_e8m0", "stock_lr1.5x", 1.5e-3),
    ("fp8_fwd_fp6_grad_lr1.5x", "fp8_fwd_fp6_grad", "stock_lr1.5x", 1.5e-3),
    ("fp6_fwd_fp4sr_grad_lr1.5x", "fp6_fwd_fp4sr_grad", "stock_lr1.5x", 1.5e-3),
    ("fp6_fwd_fp4sr_grad_lr2x", "fp6_fwd_fp4sr_grad", "stock_lr2x", 2e-3)])
def test_a_candidate_at_a_scaled_rate_trains_its_block_at_that_rate(scaled_name, base_name, stock_name, lr):
    """fp8_fwd_fp4sr_grad_lr1.5x is fp8_fwd_fp4sr_grad's lsh_moe block, to the key, at stock_lr1.5x's rate (and so
    for each scaled candidate): each differs from its unscaled variant in the rate alone, so its gap against stock
    at that rate is the codec's at that rate."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = study.StudyPlan("gpt", "tiny", [stock_name, scaled_name], [1], 10**5, "unused",
                           os.path.join(root, "configs", "gpt_moe_cpu.json"), lr=1e-3)
    scaled, base = (study.deepspeed_config(plan, v) for v in (scaled_name, base_name))
    assert scaled["lsh_moe"] == base["lsh_moe"] and base["lsh_moe"]["enabled"] is True
    assert scaled["optimizer"]["params"]["lr"] == pytest.approx(lr)
    assert scaled["optimizer"] == study.deepspeed_config(plan, stock_name)["optimizer"]
    assert study.is_study_only(scaled_name)


def test_the_gap_table_takes_its_gaps_against_the_baseline_it_is_given(tmp_path):
    """With --baseline stock_lr1.5x every gap is against that variant's run of the same seed, and the header says
    so; against stock the same runs give other gaps."""
    root = str(tmp_path)
    write_run(root, "stock", 1, [5.0, 4.0], train_steps=20)
    write_run(root, "stock_lr1.5x", 1, [4.9, 3.8], train_steps=20)
    write_run(root, "fp8_fwd_fp4sr_grad_lr1.5x", 1, [4.9, 3.838], train_steps=20)
    results = study.aggregate(root, "gpt", ["stock", "stock_lr1.5x", "fp8_fwd_fp4sr_grad_lr1.5x"])
    scaled = study.gap_table(results, "stock_lr1.5x")
    assert "| gap vs stock_lr1.5x (means) | gap vs stock_lr1.5x per seed (mean ± std) |" in scaled
    assert "| fp8_fwd_fp4sr_grad_lr1.5x | 1 | 3.8380 | +1.00% | +1.00% |" in scaled
    assert "| stock_lr1.5x | 1 | 3.8000 | – | – |" in scaled
    assert "| stock | 1 | 4.0000 | +5.26% | +5.26% |" in scaled
    assert "| fp8_fwd_fp4sr_grad_lr1.5x | 1 | 3.8380 | -4.05% | -4.05% |" in study.gap_table(results)


def bench_text(preset, d_model, blocks, experts, modelled_gpus=None):
    """The model sentence benchmark_gpt_moe.py writes, and the topology of a modelled section."""
    text = (f"Preset `{preset}` (1M parameters per rank) with d_model {d_model}, {blocks} blocks (MoE every 2), "
            f"{experts} experts (top-2, capacity factor 1.25), vocab 64.")
    if modelled_gpus is not None:
        text += f" **{modelled_gpus} GPU(s) per node** (NVLink inside a node); links: 100gbps: half of it at 128 KiB"
    return text


@pytest.mark.parametrize("lsh_losses", [[5.5, 4.5], [6.1, 5.2]], ids=["reached", "not_reached"])
def test_time_to_target_labels_what_each_row_combines(tmp_path, lsh_losses):
    """Every row that joins the quality runs (preset `tiny`: d_model 128, 4 blocks, 4 experts) with a step time
    says where that time comes from: the same model in another run, another model, another expert count, the
    topology, or a section of the old link model; on the path where LSH-MoE reaches stock's loss and where not."""
    root = str(tmp_path)
    write_run(root, "stock", 1, [6.0, 5.0], train_steps=20)
    write_run(root, "lsh", 1, lsh_losses, train_steps=20)
    results = study.aggregate(root, "gpt", ["stock", "lsh"])
    speedup = "speed-up vs stock (modelled)"
    modelled = {f"{v} @ 100gbps EP{k}": {speedup: s} for k in (4, 16) for v, s in (("stock", "1"), ("lsh", "1.5"))}
    old = {"stock @ 100gbps EP16": {speedup: "1"}, "lsh @ 100gbps EP16": {speedup: "1.2"}}
    texts = {"steps": bench_text("tiny", 128, 4, 4), "link": bench_text("small", 256, 6, 8),
             "modelled": bench_text("tiny", 128, 4, 1, modelled_gpus=8),
             "old": bench_text("tiny", 128, 4, 1) + " `--modelled-gpus-per-node 1`"}
    table = study.time_to_target(results, {"stock": {"tokens/s": "100"}, "lsh": {"tokens/s": "50"}},
                                 {"lsh": {"speed-up vs stock": "2.0"}}, "steps", "link",
                                 [("modelled", modelled), ("old", old)], texts=texts)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "the same model (preset `tiny`: d_model 128, 4 blocks, 4 experts), another run (`steps`)" in \
        rows["EP=1 tokens/s"]
    link = [line for name, line in rows.items() if "slow link" in name]
    assert link and all("another model (preset `small`: d_model 256, 6 blocks, 8 experts; the quality runs': "
                        "preset `tiny`" in line for line in link)
    at = "time to that loss at" if lsh_losses[-1] < 5.0 else "break-even token ratio at"
    ep4, ep16 = rows[f"{at} 100gbps, EP=4"], rows[f"{at} 100gbps, EP=16"]
    assert "`modelled`, 8 GPUs per node: a job of 4 experts (1 per rank)" in ep4 and "different" not in ep4
    assert ("a job of 16 experts (1 per rank); the token ratio is of the quality runs' 4 experts: different expert "
            "counts") in ep16
    assert "`old`, 1 GPU per node, old link model: superseded until re-run" in \
        [line for name, line in rows.items() if name.startswith(at) and "`old`" in line][0]
    # without the sections' texts the rows still say the step times come from another run
    bare = study.time_to_target(results, {"stock": {"tokens/s": "100"}, "lsh": {"tokens/s": "50"}},
                                {"lsh": {"speed-up vs stock": "2.0"}}, "steps", "link", [("modelled", modelled)])
    assert "another run (`link`), whose model is not stated here" in bare
    assert "`modelled`, whose model and topology are not stated here" in bare


def test_a_baseline_outside_the_variants_is_refused_by_name(tmp_path):
    """compare_quality.py report --baseline names a variant of --variants, or the command stops naming both."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = str(tmp_path)
    write_run(root, "stock", 1, [5.0, 4.0], train_steps=20)
    command = [sys.executable, os.path.join(repo, "scripts", "compare_quality.py"), "report", "--root", root,
               "--variants", "stock", "--baseline", "stock_lr1.5x", "--section", "s",
               "--output", os.path.join(root, "q.md")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0
    assert "--baseline 'stock_lr1.5x': it must be one of --variants ['stock']" in done.stderr
    assert not os.path.exists(os.path.join(root, "q.md"))


def test_progress_says_when_the_deadline_would_cut_the_runs(tmp_path):
    """The study's minute line: the running runs' steps and when the slowest ends at its pace so far; past the
    deadline it says how many runs the deadline would stop (a lease's cut run is trained again from step 1)."""
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    for run_dir, step in ((fast, 300), (slow, 100)):
        run_dir.mkdir()
        with open(run_dir / "metrics.jsonl", "w") as f:
            for s in range(1, step + 1):
                f.write(json.dumps({"step": s, "loss": 4.0}) + "\n")
            f.write('{"step": ')                       # the line being written
    # both started at study second 10; at second 110 the fast run has 300 of 400 steps, the slow one 100
    runs = [(str(fast), 400, 10.0), (str(slow), 400, 10.0)]
    line = study.progress_line(runs, 110.0, deadline_s=600.0)
    assert line == "2 run(s) at steps 100-300 of 400; at their pace so far the last ends at about 410 s of the study"
    line = study.progress_line(runs, 110.0, deadline_s=300.0)
    assert line.endswith("past its 300 s deadline: 1 run(s) would be stopped there and trained again from step 1 on "
                         "a later lease")
    assert study.progress_line([(str(tmp_path / "none"), 400, 0.0)], 5.0, None) == "1 run(s) starting"
    assert study.last_record(str(fast)) == {"step": 300, "loss": 4.0}
