"""scripts/land_device_results.py: what a GPU call brings back lands in the checkout: the latest testbed snapshot
replaces the runs and the archives, and only the benchmark sections a call wrote or changed reach docs/."""
import os
import sys
import tarfile

import pytest

from lshmoe_pretrain.benchmarking import read_section_text, write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import land_device_results as land  # noqa: E402


def snapshot(folder, runs):
    """A testbed_runs.tgz as gpu_session.sh writes it: the study folder `testbed/` with finished runs."""
    src = folder / "src" / "testbed"
    for run in runs:
        (src / run).mkdir(parents=True)
        (src / run / "run.json").write_text("{}")
    with tarfile.open(folder / "testbed_runs.tgz", "w:gz") as tar:
        tar.add(src, arcname="testbed")


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
    snapshot(first, ["gpt/stock/seed1"])
    snapshot(second, ["gpt/stock/seed1", "gpt/fp4_both/seed1"])
    runs, record, state = tmp_path / "runs" / "tb", tmp_path / "rec.tgz", tmp_path / "state" / "tb.tgz"
    land.main([str(first), str(second), "--runs", str(runs), "--record", str(record), "--state", str(state),
               "--docs", str(docs)])
    assert (runs / "gpt" / "fp4_both" / "seed1" / "run.json").exists()  # the later call's snapshot
    assert open(record, "rb").read() == open(state, "rb").read() == open(second / "testbed_runs.tgz", "rb").read()
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
    with pytest.raises(SystemExit, match="not a testbed snapshot"):
        land.main([str(bad), "--runs", str(tmp_path / "r"), "--docs", str(tmp_path)])
    with pytest.raises(SystemExit):
        land.main([str(tmp_path / "missing")])
