"""The benchmark scripts on the CPU: a run prints its tables and writes a report only into the file --report names
(never into the checkout's docs by default), and the break-even table counts only the rows that leave a rank at
the expert-parallel degree it states."""
import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest
from distributed import build_deepspeed_cpu_comm_op, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_REPORT = os.path.join(ROOT, "docs", "benchmarks.md")
COMPRESSOR = ("--quick", "--device", "cpu", "--rates", "0.2")
SMALL_RUNS = {
    "benchmark_compressor.py": COMPRESSOR,
    "benchmark_moe_layer.py": ("--d-models", "16", "--tokens", "64", "--seq-len", "16", "--rates", "0.5",
                               "--warmup", "0", "--reps", "1", "--dtype", "fp32"),
    "benchmark_gpt_moe.py": ("--preset", "tiny", "--steps", "2", "--timed-from", "0", "--micro-batch", "2",
                             "--dtype", "fp32", "--variants", "stock", "lsh"),
}


def run_script(script, cwd, *args):
    build_deepspeed_cpu_comm_op()  # the layer and GPT scripts init DeepSpeed's process group on the CPU
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    env.pop("LSHMOE_ENABLED", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def files_under(path):
    return sorted(os.path.relpath(os.path.join(folder, name), path)
                  for folder, _, names in os.walk(path) for name in names)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("script", sorted(SMALL_RUNS))
def test_a_benchmark_run_writes_nothing_unless_asked(tmp_path, script):
    """Run from an empty directory, where the old default (docs/benchmarks.md, relative) would have appeared."""
    before = digest(DOCS_REPORT)
    result = run_script(script, tmp_path, *SMALL_RUNS[script])
    assert "| --- |" in result.stdout  # the table is printed
    assert "not written (pass --report PATH to write it" in result.stdout
    assert files_under(tmp_path) == []
    assert digest(DOCS_REPORT) == before


def test_report_writes_the_section_where_asked_and_names_the_ep(tmp_path):
    report = tmp_path / "out" / "report.md"
    result = run_script("benchmark_compressor.py", tmp_path, *COMPRESSOR, "--ep", "4", "--report", str(report))
    assert f"wrote {report} [compressor]" in result.stdout
    assert files_under(tmp_path) == [os.path.join("out", "report.md")]
    text = report.read_text()
    assert "<!-- BEGIN compressor -->" in text and "<!-- END compressor -->" in text
    assert "Break-even link bandwidth at expert-parallel degree EP=4" in text
    assert "| break-even GB/s (EP=4) |" in text


def load_compressor_script():
    path = os.path.join(ROOT, "scripts", "benchmark_compressor.py")
    spec = importlib.util.spec_from_file_location("benchmark_compressor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_break_even_counts_only_the_rows_that_leave_the_rank():
    script = load_compressor_script()
    tokens, slots, d, elem, ms = 16384, 3280, 1024, 2, 1.0
    every_row = 4 * (tokens - slots) * d * elem  # dispatch and combine, forward and backward

    def row(ep):
        return script.break_even_row(d, tokens, 0.2, "triton", ms, tokens, slots, elem, ep)
    for ep in (2, 8):
        leaving = every_row * (ep - 1) / ep  # the rows for the rank's own experts never cross a link
        assert row(ep)[5] == pytest.approx(leaving / 2**20)
        assert row(ep)[6] == pytest.approx(leaving / (ms * 1e-3) / 1e9)
    assert row(1)[5] == row(1)[6] == 0 and set(row(1)[7:]) == {"no"}  # EP=1: nothing to save on any link


def test_ep_below_one_is_refused_by_name(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_compressor.py"), *COMPRESSOR,
                             "--ep", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--ep must be an integer >= 1, got 0" in result.stderr
    assert files_under(tmp_path) == []
