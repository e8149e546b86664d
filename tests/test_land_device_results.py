"""scripts/land_device_results.py: what a GPU call brings back lands in the checkout: each call's testbed snapshot
(the files its lease wrote) is merged into the runs, in call order, the record is written again from them in xz,
and only the benchmark sections a call wrote or changed reach docs/."""
import json
import os
import sys
import tarfile

import pytest

from lshmoe_pretrain.benchmarking import read_section_text, write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import land_device_results as land  # noqa: E402


def snapshot(folder, runs, text="{}"):
    """A testbed_runs.tgz as gpu_session.sh writes it: the files under `testbed/` that the lease wrote."""
    src = folder / "src" / "testbed"
    for run in runs:
        (src / run).mkdir(parents=True, exist_ok=True)
        (src / run / "run.json").write_text(text)
    with tarfile.open(folder / "testbed_runs.tgz", "w:gz") as tar:
        tar.add(src, arcname="testbed")


def record_files(record):
    with tarfile.open(record) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_latest_snapshot_and_changed_sections_land(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_section(str(docs / "benchmarks.md"), "kept", "## kept\n\nthe checkout's")
    write_section(str(docs / "benchmarks.md"), "rerun", "## rerun\n\nold figures")
    first, second = tmp_path / "call1", tmp_path / "call2"
    for call in (first, second):
        call.mkdir()
        (call / "benchmarks.md").write_text(open(docs / "benchmarks.md").read())
    write_section(str(first / "benchmarks.md"), "rerun", "## rerun\n\nnew figures")
    write_section(str(second / "benchmarks.md"), "added", "## added\n\na new stage")
    # the record holds a run from an earlier session; this checkout has no runs folder (a fresh clone)
    record = tmp_path / "records" / "runs.tar.xz"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    snapshot(earlier, ["t5/stock/seed1"], "earlier session")
    land.land_testbed([str(earlier / "testbed_runs.tgz")], str(tmp_path / "scratch"), str(record))
    # call 1 writes seed 1 of stock; call 2 (a later snapshot of the same lease) rewrites it and adds FP4
    snapshot(first, ["gpt/stock/seed1"], "call 1")
    snapshot(second, ["gpt/stock/seed1", "gpt/fp4_both/seed1"], "call 2")
    runs = tmp_path / "runs" / "tb"
    land.main([str(first), str(second), "--runs", str(runs), "--record", str(record), "--docs", str(docs)])
    assert (runs / "t5" / "stock" / "seed1" / "run.json").read_text() == "earlier session"  # from the record
    assert (runs / "gpt" / "stock" / "seed1" / "run.json").read_text() == "call 2"  # the later call wins
    assert (runs / "gpt" / "fp4_both" / "seed1" / "run.json").exists()
    with open(record, "rb") as f:
        assert f.read(6) == b"\xfd7zXZ\x00"  # xz
    assert record_files(record) == {"testbed/t5/stock/seed1/run.json": "earlier session",
                                    "testbed/gpt/stock/seed1/run.json": "call 2",
                                    "testbed/gpt/fp4_both/seed1/run.json": "call 2"}
    target = str(docs / "benchmarks.md")
    assert "new figures" in read_section_text(target, "rerun")
    assert "a new stage" in read_section_text(target, "added")
    assert "the checkout's" in read_section_text(target, "kept")
    # the first call's sections are all docs/'s now: landing it again writes nothing
    assert land.land_sections(str(first / "benchmarks.md"), target, land.sections(target)) == []


def test_refuses_what_is_not_a_snapshot_or_a_folder(tmp_path):
    bad = tmp_path / "call"
    bad.mkdir()
    (bad / "other").write_text("x")
    with tarfile.open(bad / "testbed_runs.tgz", "w:gz") as tar:
        tar.add(bad / "other", arcname="other")
    record = tmp_path / "rec.tar.xz"
    with pytest.raises(SystemExit, match="not a testbed snapshot"):
        land.main([str(bad), "--runs", str(tmp_path / "r"), "--record", str(record), "--docs", str(tmp_path)])
    assert not record.exists() and not (tmp_path / "r").exists()  # nothing written
    with pytest.raises(SystemExit):
        land.main([str(tmp_path / "missing")])


def test_captures_land_beside_the_runs_and_never_in_the_record(tmp_path):
    """A call's capture tars (one file each) land under --captures with their run's path; a captures/ folder that
    is in the runs anyway stays out of the tracked record."""
    call = tmp_path / "call"
    call.mkdir()
    snapshot(call, ["gpt/stock/seed4"], "the run")
    src = tmp_path / "src"
    for layer in (0, 1):
        path = src / "testbed" / "gpt" / "stock" / "seed4" / "captures" / f"step366_layer{layer}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"layer {layer}")
        with tarfile.open(call / f"captures_step366_layer{layer}.tar", "w") as tar:
            tar.add(path, arcname=f"testbed/gpt/stock/seed4/captures/step366_layer{layer}.pt")
    runs, captures, record = tmp_path / "runs", tmp_path / "caps", tmp_path / "rec.tar.xz"
    (runs / "t5" / "stock" / "seed1" / "captures").mkdir(parents=True)
    (runs / "t5" / "stock" / "seed1" / "captures" / "step1_layer0.pt").write_text("stray")
    land.main([str(call), "--runs", str(runs), "--record", str(record), "--captures", str(captures),
               "--docs", str(tmp_path)])
    assert (captures / "gpt/stock/seed4/captures/step366_layer1.pt").read_text() == "layer 1"
    assert not (runs / "gpt" / "stock" / "seed4" / "captures").exists()
    assert record_files(record) == {"testbed/gpt/stock/seed4/run.json": "the run"}


def test_the_record_rounds_what_no_report_reads_to_six_digits(tmp_path):
    """The tracked record keeps the losses exactly; the per-step wall-clock fields, the learning rate, the
    auxiliary loss and the telemetry's non-integral values go to 6 significant digits (a bytes count stays whole);
    tokens_per_s (tokens per step over step time) is left out; captures stay out; extracting the record and writing
    it again changes nothing."""
    runs = tmp_path / "runs"
    run = runs / "gpt" / "stock" / "seed1"
    (run / "captures").mkdir(parents=True)
    (run / "captures" / "step1.pt").write_bytes(b"tokens")
    line = ('{"step": 7, "loss": 9.714982032775879, "aux_loss": 4.156502723693848, "lr": 1.9672131147540982e-05, '
            '"step_time_s": 0.12824547499999994, "tokens_per_s": 31938.74871608532, '
            '"elapsed_s": 3.7265280639999787, "lsh_moe/layer0/bytes_ratio": 0.26346153846153847, '
            '"lsh_moe/layer0/bytes_sent": 10485761.0, "probe/layer0/output_error_none": 0.7186524868011475, '
            '"valid_loss": 3.298012505869759, "valid_loss_compressed": 3.310012345678901, "valid_samples": 256}')
    (run / "metrics.jsonl").write_text(line + "\n")
    (run / "run.json").write_text('{"elapsed_s": 3.7265280639999787}')
    record = tmp_path / "record.tar.xz"
    land.write_record(str(runs), str(record))
    files = record_files(record)
    assert set(files) == {"testbed/gpt/stock/seed1/metrics.jsonl", "testbed/gpt/stock/seed1/run.json"}
    assert files["testbed/gpt/stock/seed1/run.json"] == '{"elapsed_s": 3.7265280639999787}'  # only metrics.jsonl
    assert files["testbed/gpt/stock/seed1/metrics.jsonl"] == (
        '{"step": 7, "loss": 9.714982032775879, "aux_loss": 4.1565, "lr": 1.96721e-05, "step_time_s": 0.128245, '
        '"elapsed_s": 3.72653, "lsh_moe/layer0/bytes_ratio": 0.263462, "lsh_moe/layer0/bytes_sent": 10485761.0, '
        '"probe/layer0/output_error_none": 0.718652, "valid_loss": 3.298012505869759, '
        '"valid_loss_compressed": 3.310012345678901, "valid_samples": 256}\n')
    again = tmp_path / "again"
    land.extract_into(str(record), str(again))
    land.write_record(str(again), str(tmp_path / "again.tar.xz"))
    assert record_files(tmp_path / "again.tar.xz") == files


def test_rewrite_rounds_an_older_record_in_place(tmp_path):
    """--rewrite writes a record made before the rounding (the CPU proxies') again as a landing writes one: under
    the folder its members share, the digits no report reads rounded, everything else as it was; a record whose
    members lie under several folders is refused."""
    source = tmp_path / "cpu_testbed" / "gpt" / "stock" / "seed1"
    source.mkdir(parents=True)
    line = '{"step": 1, "loss": 9.714982032775879, "step_time_s": 0.12824547499999994, "tokens_per_s": 31938.7487}\n'
    (source / "metrics.jsonl").write_text(line)
    (source / "train.log").write_text("log")
    record = tmp_path / "proxy.tar.xz"
    with tarfile.open(record, "w:xz") as tar:
        tar.add(tmp_path / "cpu_testbed", arcname="cpu_testbed")
    land.main(["--rewrite", str(record)])
    assert record_files(record) == {
        "cpu_testbed/gpt/stock/seed1/metrics.jsonl": line.replace("0.12824547499999994", "0.128245").replace(
            ', "tokens_per_s": 31938.7487', ""),
        "cpu_testbed/gpt/stock/seed1/train.log": "log"}
    mixed = tmp_path / "mixed.tar.xz"
    with tarfile.open(mixed, "w:xz") as tar:
        tar.add(source / "train.log", arcname="a/train.log")
        tar.add(source / "train.log", arcname="b/train.log")
    with pytest.raises(SystemExit, match="not under one folder"):
        land.main(["--rewrite", str(mixed)])


def trained_run(folder, run, steps_done, train_steps=20):
    """A run's records as training.py writes them: run.json, and metrics.jsonl up to `steps_done` with a
    validation at every tenth step."""
    run_dir = folder / "src" / "testbed" / run
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"train_steps": train_steps}))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps_done + 1):
            f.write(json.dumps({"step": step, "loss": 4.0, **({"valid_loss": 4.1} if step % 10 == 0 else {})}) + "\n")


def test_runs_the_lease_cut_are_left_out_of_the_runs_and_the_record(tmp_path, capsys):
    """A run that stopped short of its schedule (or before its final validation) is dropped from the runs and the
    record and named; a finished one lands. Without its checkpoints a later lease trains it from the start."""
    call = tmp_path / "call"
    call.mkdir()
    trained_run(call, "gpt-72m-1pass/x1/gpt/stock/seed1", 20)
    trained_run(call, "gpt-72m-1pass/x1/gpt/fp6_fwd_fp4sr_grad/seed2", 13)      # cut mid-schedule
    trained_run(call, "gpt-72m-1pass/x0.5/gpt/fp6_fwd_fp4sr_grad/seed1", 19)    # cut before its last step
    with tarfile.open(call / "testbed_runs.tgz", "w:gz") as tar:
        tar.add(call / "src" / "testbed", arcname="testbed")
    runs, record = tmp_path / "runs", tmp_path / "rec.tar.xz"
    land.main([str(call), "--runs", str(runs), "--record", str(record), "--docs", str(tmp_path)])
    kept = "testbed/gpt-72m-1pass/x1/gpt/stock/seed1/"
    assert sorted(record_files(record)) == [kept + "metrics.jsonl", kept + "run.json"]
    assert (runs / "gpt-72m-1pass/x1/gpt/stock/seed1").is_dir()
    assert not (runs / "gpt-72m-1pass/x1/gpt/fp6_fwd_fp4sr_grad").exists()   # no empty folder of a variant left
    assert not (runs / "gpt-72m-1pass/x0.5").exists()
    with tarfile.open(record) as tar:
        assert not any("fp6_fwd_fp4sr_grad" in name or "x0.5" in name for name in tar.getnames())
    printed = capsys.readouterr().out
    assert printed.count("left out, unfinished") == 2 and "fp6_fwd_fp4sr_grad/seed2" in printed


def kept_metrics(record, run):
    """The kept record's metrics of `run`: the steps of its lines and whether each has a validation."""
    text = record_files(record)[f"testbed/{run}/metrics.jsonl"]
    return [(r["step"], "valid_loss" in r) for r in map(json.loads, text.splitlines())]


def test_runs_the_lease_cut_keep_their_evaluations_apart_until_they_finish(tmp_path):
    """A cut run's run.json and evaluated lines (and its last line: where it stopped) go to the record beside the
    main one (`_unfinished` for `_runs`), never into the main one. A later lease's copy that got less far does not
    replace it; once a later lease finishes the run, it lands in the main record and leaves the kept one."""
    cut = "gpt-25m-1pass/x1/gpt/stock_nudge/seed1"
    runs, record = tmp_path / "runs", tmp_path / "records" / "tb_runs.tar.xz"
    kept = tmp_path / "records" / "tb_unfinished.tar.xz"
    assert land.unfinished_record_of(str(record)) == str(kept)

    def lease(name, steps_done):
        call = tmp_path / name
        call.mkdir()
        trained_run(call, "gpt-25m-1pass/x1/gpt/stock/seed1", 20)
        trained_run(call, cut, steps_done)
        with tarfile.open(call / "testbed_runs.tgz", "w:gz") as tar:
            tar.add(call / "src" / "testbed", arcname="testbed")
        land.main([str(call), "--runs", str(runs), "--record", str(record), "--docs", str(tmp_path)])

    lease("call1", 17)
    assert kept_metrics(kept, cut) == [(10, True), (17, False)]
    assert json.loads(record_files(kept)[f"testbed/{cut}/run.json"]) == {"train_steps": 20}
    assert not any("stock_nudge" in name for name in record_files(record))
    assert (tmp_path / "runs_unfinished" / cut / "metrics.jsonl").exists()
    lease("call2", 12)                       # a later lease cut it earlier: the further copy stays
    assert kept_metrics(kept, cut) == [(10, True), (17, False)]
    lease("call3", 20)                       # and a later one finished it
    assert f"testbed/{cut}/metrics.jsonl" in record_files(record)
    assert record_files(kept) == {}
    assert not (tmp_path / "runs_unfinished" / "gpt-25m-1pass").exists()
