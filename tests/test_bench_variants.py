"""benchmark_gpt_moe.py's variants, without running a model: a quality-study variant gets exactly the lsh_moe block
the study trains it with (the study's own builder, its output-error probe aside), the benchmark's own names keep
their meaning, what cannot be timed is refused by name before anything is built, a schedule's row is the
step-weighted mix of its compressed steps' and stock's, and the block a section records reads back as written."""
import dataclasses
import importlib.util
import os
import sys

import pytest

import lshmoe_plugin
from lshmoe_pretrain import bench_variants
from lshmoe_pretrain import quality_study as study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("benchmark_gpt_moe",
                                              os.path.join(ROOT, "scripts", "benchmark_gpt_moe.py"))
SCRIPT = importlib.util.module_from_spec(spec)
spec.loader.exec_module(SCRIPT)
BENCHMARK_KEYS = ("kernel", "telemetry_interval")   # what every row of a run sets beside the variant's block


def parse(monkeypatch, *argv):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["benchmark_gpt_moe.py", *argv])
    return SCRIPT.parse_args()


def refusal(monkeypatch, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exited:
        parse(monkeypatch, *argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def the_study_config(name):
    """What the study's run of `name` is given, loaded (configs/gpt_moe_gpu.json, the study's base)."""
    plan = study.StudyPlan("gpt", "tiny", [name], [1], 10**5, "unused",
                           os.path.join(ROOT, "configs", "gpt_moe_gpu.json"))
    return lshmoe_plugin.load_config(study.deepspeed_config(plan, name))


@pytest.mark.parametrize("name", bench_variants.timeable_study_variants())
def test_a_study_variant_runs_the_block_the_study_trains(monkeypatch, name):
    args = parse(monkeypatch, "--variants", name, "--rate", "0.3", "--fp8-block-size", "row")
    engine = SCRIPT.engine_names(args)[-1]
    block = SCRIPT.ds_config(args, engine)["lsh_moe"]
    # the study's builder's output, and only the benchmark's own keys beside it (--rate, --fp8-block-size: not)
    assert {k: v for k, v in block.items() if k not in BENCHMARK_KEYS} == study.lsh_moe_block(name)
    assert block["telemetry_interval"] == 0 and block["kernel"] == "auto"
    # loaded, the same configuration as the study's run but for the study's probe, telemetry and schedule step
    ours, theirs = lshmoe_plugin.load_config({"lsh_moe": block}), the_study_config(name)
    aside = dict(telemetry_interval=0, output_error_interval=0, exact_from_step=None)
    assert dataclasses.replace(ours, **aside) == dataclasses.replace(theirs, **aside)
    assert ours.output_error_interval == 0 and ours.exact_from_step is None
    tail = study.VARIANTS[name].get("exact_tail")
    assert engine == (name if tail is None else f"{name} (compressed steps)")
    if tail is not None:  # the study's run switches to exact dispatch; the benchmark times the steps before
        assert theirs.exact_from_step is not None and args.timed[engine].exact_tail == tail


def test_the_benchmarks_own_names_keep_their_meaning(monkeypatch):
    """`lsh` is the paper's at --rate (the study's `lsh` is at 0.2), `fp8_dispatch` the method at --fp8-block-size."""
    args = parse(monkeypatch, "--variants", "lsh", "fp8_dispatch", "--rate", "0.3", "--fp8-block-size", "row")
    assert args.timed == {} and SCRIPT.engine_names(args) == ["lsh", "fp8_dispatch"]
    assert SCRIPT.ds_config(args, "lsh")["lsh_moe"]["compression_rate"] == 0.3
    assert SCRIPT.ds_config(args, "fp8_dispatch")["lsh_moe"]["method"] == "fp8_dispatch"
    assert SCRIPT.ds_config(args, "fp8_dispatch")["lsh_moe"]["fp8_block_size"] == "row"


@pytest.mark.parametrize("name,message", [
    ("diag_forward", "--variants diag_forward: a study-only diagnostic layer (lshmoe_pretrain.diagnostics "
                     "'forward') that locates a quality gap; it is no configuration a user trains"),
    ("random_clusters", "--variants random_clusters: a study-only diagnostic layer"),
    ("diag_backward_random", "--variants diag_backward_random: a study-only diagnostic layer"),
    ("fp9", "--variants fp9: unknown; allowed: ['stock', 'lsh', 'lsh_eager', 'lsh_decide', "),
])
def test_what_is_no_trained_configuration_is_refused_by_name(monkeypatch, capsys, name, message):
    assert message in refusal(monkeypatch, capsys, "--variants", "stock", name)


def test_an_absolute_step_schedule_is_refused_by_name(monkeypatch, capsys):
    monkeypatch.setitem(study.VARIANTS, "exact_from_100", {"enabled": True, "method": "paper", "exact_from_step": 100})
    assert ("--variants exact_from_100: a schedule at an absolute step (lsh_moe.exact_from_step 100); what share of "
            "a schedule runs compressed depends on the schedule's length") in \
        refusal(monkeypatch, capsys, "--variants", "exact_from_100")


def test_what_the_stand_in_cannot_price_is_refused_by_name_under_a_modelled_link_only(monkeypatch, capsys):
    monkeypatch.setitem(study.VARIANTS, "fp8_probed", {"enabled": True, "dispatch_dtype": "fp8_e4m3",
                                                        "output_error_interval": 8})
    monkeypatch.setitem(study.VARIANTS, "lsh_probed", {"enabled": True, "method": "paper", "output_error_interval": 8})
    modelled = ("--modelled-ep", "16", "--modelled-link", "200gbps")
    assert ("--variants fp8_probed with --modelled-link: the link stand-in cannot price "
            "lsh_moe.output_error_interval=8 with wire formats other than the model's") in \
        refusal(monkeypatch, capsys, "--variants", "lsh_probed", "fp8_probed", *modelled)
    assert SCRIPT.engine_names(parse(monkeypatch, "--variants", "lsh_probed", *modelled)) == ["lsh_probed"]
    assert SCRIPT.engine_names(parse(monkeypatch, "--variants", "fp8_probed")) == ["fp8_probed"]  # no stand-in


def test_a_schedules_row_is_the_step_weighted_mix_with_stocks(monkeypatch):
    """0.15 of the steps exact: every per-step figure 0.85 of the compressed steps' plus 0.15 of stock's, the
    speed-up stock's step over that; the measured table gets no loss for it."""
    args = parse(monkeypatch, "--variants", "exact_tail_0.15")
    pair = (16, "200gbps")
    compressed = "exact_tail_0.15 (compressed steps)"
    runs = [("stock", pair), (compressed, pair)]
    rows = [("stock @ 200gbps EP16", 100.0, 1000.0, 1.0, 40.0, 5.0, "7 / 8"),
            (f"{compressed} @ 200gbps EP16", 80.0, 1250.0, 1.25, 10.0, 5.0, "7 / 8")]
    out = SCRIPT.with_schedules(args, rows, runs, 100, modelled=True)
    assert out[:2] == rows
    label, ms, tokens_per_s, speedup, a2a, all_reduce, peers = out[2]
    assert label == "exact_tail_0.15 @ 200gbps EP16" and len(out) == 3
    assert ms == pytest.approx(0.85 * 80 + 0.15 * 100) and speedup == pytest.approx(100 / 83)
    assert tokens_per_s == pytest.approx(100 / 83 * 1e3)
    assert a2a == pytest.approx(0.85 * 10 + 0.15 * 40) and all_reduce == pytest.approx(5.0) and peers == "7 / 8"
    measured = [("stock", 100.0, 1000.0, 1.0, 3.0, 3.1, 1.0), (compressed, 90.0, 1111.0, 1.11, 3.2, 3.3, 1.06)]
    mixed = SCRIPT.with_schedules(args, measured, [("stock", None), (compressed, None)], 100, modelled=False)[2]
    assert mixed[0] == "exact_tail_0.15" and mixed[3] == pytest.approx(100 / 91.5) and mixed[4:] == ("–",) * 3


def test_a_sections_record_of_each_study_variant_reads_back_as_timed():
    names = bench_variants.timeable_study_variants()
    text = " ".join(bench_variants.study_variant(name).describe() for name in names)
    assert bench_variants.recorded_study_variants(text) == {
        name: (study.lsh_moe_block(name), study.VARIANTS[name].get("exact_tail")) for name in names}


@pytest.mark.parametrize("name, reason", [("stock_lr2x", "a learning-rate control of the quality study"),
                                          ("stock_nudge", "a null control of the quality study"),
                                          ("diag_forward", "a study-only diagnostic layer")])
def test_the_studys_controls_have_no_step_time_of_their_own(name, reason):
    """A control trains stock's or another block's step: the benchmark refuses it by name and says why, and never
    lists it among the variants it times."""
    with pytest.raises(bench_variants.VariantError, match=f"--variants {name}: {reason}"):
        bench_variants.study_variant(name)
    assert name not in bench_variants.timeable_study_variants()
