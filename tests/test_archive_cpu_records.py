"""scripts/archive_cpu_records.py: a CPU proxy's records archive keeps what earlier sessions put there, takes this
checkout's run records and named logs (replacing the archive's copies), leaves checkpoints out, and keeps every
metrics.jsonl's wall-clock fields to 6 significant digits, the other fields exact."""
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import archive_cpu_records as archive  # noqa: E402


def contents(record):
    with tarfile.open(record) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_the_archive_keeps_earlier_sessions_and_takes_this_checkouts_records(tmp_path):
    root, record = tmp_path / "cpu_testbed", tmp_path / "records" / "proxy.tar.xz"
    run = root / "t5-mini-long-cpu" / "x0.5" / "t5" / "stock" / "seed2"
    (run / "checkpoints").mkdir(parents=True)
    new = '{"step": 1, "loss": 9.714982032775879, "step_time_s": 0.12824547499999994}\n'
    for name, text in (("run.json", "{}"), ("metrics.jsonl", new), ("train.log", "log"), ("ds_config.json", "ds")):
        (run / name).write_text(text)
    (run / "checkpoints" / "model.pt").write_text("weights")
    log = tmp_path / "t5_lengths_seed2.log"
    log.write_text("study")
    record.parent.mkdir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "old.log").write_text("an earlier session's study")
    (earlier / "metrics.jsonl").write_text('{"step": 1, "elapsed_s": 3.7265280639999787}\n\n')
    (earlier / "replaced.jsonl").write_text('{"step": 1}\n')
    kept = "cpu_testbed/t5-mini-long-cpu/x0.5/t5/stock/seed1/metrics.jsonl"
    with tarfile.open(record, "w:xz") as tar:
        tar.add(earlier / "old.log", arcname="cpu_testbed/cpu_testbed_old.log")
        tar.add(earlier / "metrics.jsonl", arcname=kept)
        tar.add(earlier / "replaced.jsonl", arcname="cpu_testbed/t5-mini-long-cpu/x0.5/t5/stock/seed2/metrics.jsonl")
    files = archive.local_files(str(root), "t5-mini-long-cpu", [str(log)])
    assert archive.write(str(record), files) == 7
    prefix = "cpu_testbed/t5-mini-long-cpu/x0.5/t5/stock/seed2/"
    assert contents(record) == {"cpu_testbed/cpu_testbed_old.log": "an earlier session's study",
                                kept: '{"step": 1, "elapsed_s": 3.72653}\n',
                                prefix + "metrics.jsonl": new.replace("0.12824547499999994", "0.128245"),
                                prefix + "run.json": "{}",
                                prefix + "train.log": "log", prefix + "ds_config.json": "ds",
                                "cpu_testbed/t5_lengths_seed2.log": "study"}
    with pytest.raises(SystemExit, match="no such file"):
        archive.local_files(str(root), "t5-mini-long-cpu", [str(tmp_path / "missing.log")])
