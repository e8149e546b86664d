"""scripts/benchmark_wire.py on the CPU: its table from given timings (bytes, floors and ratios worked out by hand
here), and its refusal to measure anything without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

from lshmoe_pretrain import benchmarking as bench
from lshmoe_pretrain import wire_benchmark
from lshmoe_pretrain.wire_benchmark import HEADERS, Timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_rows_give_bytes_floors_and_ratios_from_the_timings():
    timings = [Timing(1024, 8192, 128, "triton", encode_ms=0.030, decode_ms=0.025, eager_encode_ms=0.050,
                      eager_decode_ms=0.040),
               Timing(4096, 16384, None, "torch", encode_ms=0.500, decode_ms=0.300, eager_encode_ms=0.600,
                      eager_decode_ms=0.400)]
    fast, slow = (dict(zip(HEADERS, row)) for row in wire_benchmark.table_rows(timings, 1000.0, torch.bfloat16))
    # bf16 rows 8192 x 1024 (2 bytes each) and their buffer: 1024 e4m3 bytes + 8 float32 scales per row
    one_pass = 8192 * 1024 * 2 + 8192 * (1024 + 4 * 8)
    floor_us = one_pass / 1000e9 * 1e6  # 25.43 µs at 1000 GB/s
    assert fast["MiB read + written"] == 2 * one_pass / 2**20
    assert fast["floor µs"] == pytest.approx(2 * floor_us)
    assert fast["encode µs"] == pytest.approx(30.0) and fast["decode µs"] == pytest.approx(25.0)
    assert fast["encode / floor"] == pytest.approx(30.0 / floor_us)
    assert fast["decode / floor"] == pytest.approx(25.0 / floor_us)
    assert fast["per layer / floor"] == pytest.approx(55.0 / (2 * floor_us))  # 1.08
    assert fast["eager / floor"] == pytest.approx(90.0 / (2 * floor_us))
    assert (fast["scales"], fast["kernel"], fast["within 1.5x"]) == (128, "triton", "yes")
    one_pass = 16384 * 4096 * 2 + 16384 * (4096 + 4)  # one scale per row
    assert slow["per layer / floor"] == pytest.approx(800.0 / (2 * one_pass / 1000e9 * 1e6))  # 3.18
    assert (slow["scales"], slow["within 1.5x"]) == ("row", "no")
    table = bench.markdown_table(HEADERS, wire_benchmark.table_rows(timings, 1000.0, torch.bfloat16))
    assert len(table.splitlines()) == 4 and table.splitlines()[2].count("|") == len(HEADERS) + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_script_refuses_and_writes_nothing(tmp_path):
    report = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_wire.py"), "--report",
                             str(report)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stderr and "Nothing was measured or written" in result.stderr
    assert list(tmp_path.iterdir()) == []
