"""scripts/benchmark_wire.py on the CPU: its arguments, which (format, block) pairs it times, its table from given
timings (bytes, floors and ratios worked out by hand here), and its refusal to measure anything without a GPU."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lshmoe_pretrain import benchmarking as bench
from lshmoe_pretrain import wire_benchmark
from lshmoe_pretrain.wire_benchmark import HEADERS, Timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_wire", os.path.join(ROOT, "scripts", "benchmark_wire.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_arguments_pick_formats_and_blocks():
    script = load_script()
    args = script.parse_args([])
    assert args.formats == ["fp8_e4m3/float32", "fp8_e4m3/e8m0", "fp4_e2m1/e8m0", "fp4_e2m1/float32",
                            "fp6_e2m3/e8m0", "fp6_e2m3/float32", "fp4_e2m1/e8m0/stochastic"]
    assert wire_benchmark.plan(args.formats, args.blocks) == [
        ("fp8_e4m3/float32", 128), ("fp8_e4m3/float32", None), ("fp8_e4m3/e8m0", 128), ("fp8_e4m3/e8m0", None),
        ("fp4_e2m1/e8m0", 32), ("fp4_e2m1/e8m0", None), ("fp4_e2m1/float32", 32), ("fp4_e2m1/float32", None),
        ("fp6_e2m3/e8m0", 32), ("fp6_e2m3/e8m0", None), ("fp6_e2m3/float32", 32), ("fp6_e2m3/float32", None),
        ("fp4_e2m1/e8m0/stochastic", 32), ("fp4_e2m1/e8m0/stochastic", None)]
    args = script.parse_args(["--formats", "fp4_e2m1/e8m0", "--blocks", "row", "16", "--kernels", "triton"])
    assert wire_benchmark.plan(args.formats, args.blocks) == [("fp4_e2m1/e8m0", None), ("fp4_e2m1/e8m0", 16)]
    assert args.kernels == ["triton"]
    assert script.parse_args([]).section == "wire_codec"
    assert script.parse_args(["--section", "wire_codec_fp6_sr"]).section == "wire_codec_fp6_sr"
    assert script.parse_args([]).tile is None and script.parse_args(["--tile", "8192"]).tile == 8192
    for wrong in (["--blocks", "0"], ["--blocks", "-3"], ["--formats", "fp4_e2m1"], ["--formats", "fp8_e5m2/e8m0"],
                  ["--tile", "6000"], ["--tile", "256"], ["--tile", "32768"]):
        with pytest.raises(SystemExit):
            script.parse_args(wrong)
    with pytest.raises(ValueError, match="allowed"):
        wire_benchmark.plan(["fp4_e2m1"], None)


def test_pass_bytes_count_rows_values_and_scales():
    rows = 8192 * 1024 * 2  # bf16
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp8_e4m3/float32", 128) == rows + 8192 * (
        1024 + 4 * 8)
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp8_e4m3/e8m0", 128) == rows + 8192 * (1024 + 8)
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp4_e2m1/e8m0", 32) == rows + 8192 * (512 + 32)
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp4_e2m1/float32", None) == rows + 8192 * (512 + 4)
    assert wire_benchmark.pass_bytes(10, 301, torch.float32, "fp4_e2m1/e8m0", 32) == 10 * 301 * 4 + 10 * (151 + 10)
    # FP6: four codes in three bytes (301 -> 76 groups of 4: 228 bytes), a scale per 32; stochastic moves FP4's bytes
    assert wire_benchmark.pass_bytes(10, 301, torch.float32, "fp6_e2m3/e8m0", 32) == 10 * 301 * 4 + 10 * (228 + 10)
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp6_e2m3/float32", None) == rows + 8192 * (768 + 4)
    assert wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp4_e2m1/e8m0/stochastic", 32) == \
        wire_benchmark.pass_bytes(8192, 1024, torch.bfloat16, "fp4_e2m1/e8m0", 32)


def test_codec_builds_each_format_with_its_rounding():
    for fmt in wire_benchmark.FORMATS:
        codec = wire_benchmark.codec(fmt, 32)
        name, scale, *rounding = fmt.split("/")
        assert (codec.name, codec.scale.name, codec.block) == (name, scale, 32)
        assert codec.rounding == (rounding[0] if rounding else "nearest")
    assert wire_benchmark.codec("fp6_e2m3/e8m0", None).block is None


def test_table_rows_give_bytes_floors_and_ratios_from_the_timings():
    timings = [Timing(1024, 8192, "fp8_e4m3/float32", 128, "triton", encode_ms=0.030, decode_ms=0.025,
                      eager_encode_ms=0.050, eager_decode_ms=0.040),
               Timing(4096, 16384, "fp8_e4m3/float32", None, "torch", encode_ms=0.500, decode_ms=0.300,
                      eager_encode_ms=0.600, eager_decode_ms=0.400),
               Timing(1024, 8192, "fp4_e2m1/e8m0", 32, "triton", encode_ms=0.020, decode_ms=0.020,
                      eager_encode_ms=0.030, eager_decode_ms=0.030)]
    fast, slow, fp4 = (dict(zip(HEADERS, row)) for row in wire_benchmark.table_rows(timings, 1000.0, torch.bfloat16))
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
    assert (fast["format"], fast["block"], fast["kernel"], fast["within 1.5x"]) == (
        "fp8_e4m3 float32", 128, "triton", "yes")
    one_pass = 16384 * 4096 * 2 + 16384 * (4096 + 4)  # one scale per row
    assert slow["per layer / floor"] == pytest.approx(800.0 / (2 * one_pass / 1000e9 * 1e6))  # 3.18
    assert (slow["block"], slow["within 1.5x"]) == ("row", "no")
    one_pass = 8192 * 1024 * 2 + 8192 * (512 + 32)  # 512 bytes of codes and 32 e8m0 scales per row
    assert fp4["floor µs"] == pytest.approx(2 * one_pass / 1000e9 * 1e6)  # 42.47 µs
    assert fp4["per layer / floor"] == pytest.approx(40.0 / (2 * one_pass / 1000e9 * 1e6))  # 0.94
    assert (fp4["format"], fp4["block"], fp4["within 1.5x"]) == ("fp4_e2m1 e8m0", 32, "yes")
    table = bench.markdown_table(HEADERS, wire_benchmark.table_rows(timings, 1000.0, torch.bfloat16))
    assert len(table.splitlines()) == 5 and table.splitlines()[2].count("|") == len(HEADERS) + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_script_refuses_and_writes_nothing(tmp_path):
    report = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_wire.py"), "--report",
                             str(report)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stderr and "Nothing was measured or written" in result.stderr
    assert list(tmp_path.iterdir()) == []
