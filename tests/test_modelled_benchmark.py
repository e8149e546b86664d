"""benchmark_gpt_moe.py --modelled-link/--modelled-ep on this CPU: one EP=1 process times every (EP, link) pair
with the link stand-in, labels the section modelled with its topology (8 GPUs per node unless told otherwise) and
its methods and study variants, prices each one's crossings at its wire bytes, and refuses bad flags and variants by
name before building anything."""
import os
import subprocess
import sys

import pytest
from distributed import build_deepspeed_cpu_comm_op

from lshmoe_pretrain import bench_variants, quality_study
from lshmoe_pretrain import benchmarking as bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_benchmark(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}  # one process unless a test says otherwise
    full.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_gpt_moe.py"), *args], env=full,
                          capture_output=True, text=True, timeout=900)


def test_modelled_links_on_the_cpu(tmp_path):
    """8 GPUs per node (the default): at EP=2 every peer is on the node, so the slow custom NIC is never used; at
    EP=16, 8 of 15 peers sit behind it."""
    build_deepspeed_cpu_comm_op()
    report = str(tmp_path / "bench.md")
    result = run_benchmark("--preset", "tiny", "--dtype", "fp32", "--micro-batch", "2", "--steps", "3",
                           "--timed-from", "1", "--variants", "stock", "lsh", "lsh_decide", "--modelled-ep", "2",
                           "16", "--modelled-link", "infinite", "custom:0.002:0", "--report", report,
                           "--section-suffix", "_mb2")
    assert result.returncode == 0, result.stderr[-3000:]
    section = "gpt_moe_tiny_modelled_ep2-16_g8_mb2"  # the topology is in the name, and the suffix asked for
    rows = bench.read_section_table(report, section)
    links = ("infinite", "custom:0.002:0")
    labels = [f"{v} @ {link} EP{k}" for k in (2, 16) for link in links for v in ("stock", "lsh", "lsh_decide")]
    assert sorted(rows) == sorted(labels)
    # each engine steps once per row: losses of two rows follow different numbers of updates, so none is shown
    assert not [column for column in next(iter(rows.values())) if "loss" in column]
    text = open(report).read()
    assert "modelled EP=2/16" in text and "**modelled**, not measured" in text and "- run, link modelled: " in text
    assert "**8 GPU(s) per node**" in text and "at EP=2 every peer is on the node, so no byte crosses a NIC" in text
    assert "both of a token's picks go to that expert" in text
    assert "- measured:" not in text
    a2a, all_reduce = "modelled all-to-all ms per step", "modelled dense all-reduce ms per step"
    split = "EP peers over NVLink / over the NIC"
    assert {label: row[split] for label, row in rows.items() if row[split] != "1 / 0"} == {
        label: "7 / 8" for label in labels if label.endswith("EP16")}
    free = {(v, k): rows[f"{v} @ infinite EP{k}"] for v in ("stock", "lsh") for k in (2, 16)}
    assert all(float(r[a2a]) == 0 and float(r[all_reduce]) == 0 for r in free.values())
    on_node = {v: rows[f"{v} @ custom:0.002:0 EP2"] for v in ("stock", "lsh")}
    slow = {v: rows[f"{v} @ custom:0.002:0 EP16"] for v in ("stock", "lsh")}
    # EP=2 on one node: NVLink's microseconds, not the 2 MB/s NIC's tenths of a second
    assert all(0 < float(r[a2a]) < 1 for r in on_node.values())
    assert float(slow["stock"][a2a]) > 1000 * float(on_node["stock"][a2a])
    # 2 MB/s: LSH-MoE sends about a fifth of stock's rows; the dense all-reduce is the same for both
    assert 0.1 < float(slow["lsh"][a2a]) / float(slow["stock"][a2a]) < 0.35
    assert float(slow["lsh"][all_reduce]) == float(slow["stock"][all_reduce]) > 0
    assert float(slow["lsh"]["speed-up vs stock (modelled)"]) > 1
    # the stand-in's delays are in the step: at least the modelled time above the unmodelled step
    assert float(slow["stock"]["step ms (modelled)"]) > float(free[("stock", 16)]["step ms (modelled)"]) + 0.9 * (
        float(slow["stock"][a2a]) + float(slow["stock"][all_reduce]))
    # decide_by_cost decides under each row's own link: at 2 MB/s and EP=16 the stock exchange waits ~0.1 s per
    # crossing for the modelled link and the compressed one a fifth of that, so every layer compresses and sends
    # lsh's bytes. (Over the free link and on one node the two differ by CPU noise: no decision is asserted there.)
    decided = "layers compressing (decide_by_cost)"
    assert rows["lsh_decide @ custom:0.002:0 EP16"][decided] == "2/2"
    assert float(rows["lsh_decide @ custom:0.002:0 EP16"][a2a]) == float(rows["lsh @ custom:0.002:0 EP16"][a2a])
    assert rows["lsh @ infinite EP2"][decided] == "–"


def test_one_gpu_per_node_is_named_in_the_section(tmp_path):
    """--modelled-gpus-per-node 1 puts every peer behind the link, and the section's name and text say so."""
    build_deepspeed_cpu_comm_op()
    report = str(tmp_path / "bench.md")
    result = run_benchmark("--preset", "tiny", "--dtype", "fp32", "--micro-batch", "2", "--steps", "2",
                           "--timed-from", "1", "--variants", "stock", "--modelled-ep", "2", "8", "--modelled-link",
                           "custom:0.002:0", "--modelled-gpus-per-node", "1", "--report", report)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = bench.read_section_table(report, "gpt_moe_tiny_modelled_ep2-8_g1")
    assert "**1 GPU(s) per node**" in open(report).read()
    assert rows["stock @ custom:0.002:0 EP8"]["EP peers over NVLink / over the NIC"] == "0 / 7"
    # a larger EP group sends a larger share of the same buffer over the link: (k-1)/k
    a2a = "modelled all-to-all ms per step"
    assert float(rows["stock @ custom:0.002:0 EP8"][a2a]) / float(rows["stock @ custom:0.002:0 EP2"][a2a]) == \
        pytest.approx((7 / 8) / (1 / 2), rel=0.02)


def test_methods_are_priced_at_their_wire_bytes(tmp_path):
    """FP8 alone (`fp8`) and stacked under LSH (`paper_fp8`): rows, section and title name the methods and the
    topology, and over a link that is all bandwidth (2 MB/s, no fixed or per-peer cost) each method's modelled
    all-to-all is stock's times its bytes ratio: tiny's d_model 128 in fp32 sends 512 bytes a row, FP8 with one
    float32 scale per 128 elements 132; `paper_fp8` sends them for 64 of 320 capacity slots."""
    build_deepspeed_cpu_comm_op()
    report = str(tmp_path / "bench.md")
    result = run_benchmark("--preset", "tiny", "--dtype", "fp32", "--micro-batch", "2", "--steps", "2",
                           "--timed-from", "1", "--variants", "stock", "fp8", "paper_fp8", "--modelled-ep", "16",
                           "--modelled-link", "custom:0.002:0", "--report", report)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = bench.read_section_table(report, "gpt_moe_tiny_modelled_ep16_g8_fp8+paper_fp8")
    assert sorted(rows) == sorted(f"{v} @ custom:0.002:0 EP16" for v in ("stock", "fp8", "paper_fp8"))
    a2a = {v: float(rows[f"{v} @ custom:0.002:0 EP16"]["modelled all-to-all ms per step"])
           for v in ("stock", "fp8", "paper_fp8")}
    assert a2a["fp8"] / a2a["stock"] == pytest.approx(132 / 512, rel=0.01)
    assert a2a["paper_fp8"] / a2a["stock"] == pytest.approx(64 / 320 * 132 / 512, rel=0.01)
    text = open(report).read()
    assert "stock DeepSpeed vs `fp8`, `paper_fp8` (rate 0.2)" in text and "**8 GPU(s) per node**" in text
    assert "`fp8` (lsh_moe.method `fp8`, one FP8 scale per 128 elements): every token crosses as itself" in text
    assert "`paper_fp8` (lsh_moe.method `paper_fp8`, rate 0.2, one FP8 scale per 128 elements)" in text
    assert "in its wire format" in text


def test_study_variants_and_a_schedule_are_timed_as_the_study_trains_them(tmp_path):
    """Quality-study variants by their own names: `fp8_both` (every token in FP8 both ways, priced at its 132 bytes
    a row against fp32's 512) and the schedule `exact_tail_0.15`, whose compressed steps (the paper's, 64 of 320
    slots) are timed and whose own row is the step-weighted mix with stock's; the section records each study block
    as the study trains it, which reads back as written."""
    build_deepspeed_cpu_comm_op()
    report = str(tmp_path / "bench.md")
    result = run_benchmark("--preset", "tiny", "--dtype", "fp32", "--micro-batch", "2", "--steps", "2",
                           "--timed-from", "1", "--variants", "stock", "fp8_both", "exact_tail_0.15",
                           "--modelled-ep", "16", "--modelled-link", "custom:0.002:0", "--report", report)
    assert result.returncode == 0, result.stderr[-3000:]
    section = "gpt_moe_tiny_modelled_ep16_g8_fp8_both+exact_tail_0.15"
    rows = {label.replace(" @ custom:0.002:0 EP16", ""): row
            for label, row in bench.read_section_table(report, section).items()}
    assert list(rows) == ["stock", "fp8_both", "exact_tail_0.15 (compressed steps)", "exact_tail_0.15"]
    a2a, ms, speedup = "modelled all-to-all ms per step", "step ms (modelled)", "speed-up vs stock (modelled)"
    figure = {(name, column): float(row[column]) for name, row in rows.items() for column in (a2a, ms, speedup)}
    assert figure["fp8_both", a2a] / figure["stock", a2a] == pytest.approx(132 / 512, rel=0.01)
    assert figure["exact_tail_0.15 (compressed steps)", a2a] / figure["stock", a2a] == pytest.approx(64 / 320, rel=0.01)
    for column in (a2a, ms):  # 0.85 of the steps compressed, 0.15 exact
        assert figure["exact_tail_0.15", column] == pytest.approx(
            0.85 * figure["exact_tail_0.15 (compressed steps)", column] + 0.15 * figure["stock", column], rel=0.01)
    assert figure["exact_tail_0.15", speedup] == pytest.approx(
        figure["stock", ms] / figure["exact_tail_0.15", ms], rel=0.01)
    text = bench.read_section_text(report, section)
    assert "stock DeepSpeed vs `fp8_both`, `exact_tail_0.15`" in text
    assert bench_variants.recorded_study_variants(text) == {
        "fp8_both": (quality_study.lsh_moe_block("fp8_both"), None), "exact_tail_0.15": ({"enabled": True,
                                                                                          "method": "paper"}, 0.15)}


@pytest.mark.parametrize("flags,env,message", [
    (["--variants", "stock", "diag_forward"], {}, "--variants diag_forward: a study-only diagnostic layer"),
    (["--modelled-link", "200gbps"], {}, "--modelled-link and --modelled-ep go together"),
    (["--modelled-link", "10gbps", "--modelled-ep", "8"], {}, "--modelled-link: unknown link '10gbps'; allowed:"),
    (["--modelled-link", "200gbps", "--modelled-ep", "8", "0"], {}, "--modelled-ep must be >= 1, got 8 0"),
    (["--modelled-link", "200gbps", "--modelled-ep", "8"], {"WORLD_SIZE": "2"}, "launch one process"),
    (["--fp8-block-size", "0"], {}, "--fp8-block-size must be 'row' or an integer >= 1, got '0'"),
])
def test_bad_modelled_flags_are_refused_by_name(flags, env, message):
    result = run_benchmark(*flags, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
