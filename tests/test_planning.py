"""The planning arithmetic (per-rank bytes per crossing and method, predicted layer and step times, break-even
bandwidth, time to stock's loss) on numbers worked by hand; the published quality records looked up by layer shape
and method; and scripts/plan_lsh_moe.py on this CPU: it refuses CPU timings unless asked, and then marks every figure
as such; another method than the paper's is priced at its wire bytes and never shown the paper's record."""
import os
import re
import subprocess
import sys

import pytest
import torch
from distributed import build_deepspeed_cpu_comm_op

from lshmoe_plugin import wire
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_pretrain import planning, quality_records
from lshmoe_pretrain.link_model import GB, LINKS, LinkModel, parse_link

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPE = planning.LayerShape(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4, element_size=4)


def test_per_rank_bytes():
    assert SHAPE.capacity == 160  # ceil(512 / 8 x 1.25 x 2)
    assert SHAPE.local_experts == 2 and SHAPE.ffn == 256
    assert SHAPE.stock_bytes == 8 * 160 * 64 * 4
    assert SHAPE.lsh_bytes == 8 * 32 * 64 * 4  # ceil(0.2 x 160) centroid slots
    tiny = planning.LayerShape(d_model=8, tokens_per_rank=4, experts=4, top_k=1, ep=1)
    assert tiny.capacity == 4  # DeepSpeed's min_capacity


def test_bytes_per_crossing_of_each_method_worked_by_hand():
    """SHAPE: 8 experts x 160 slots of d 64 in fp32 (256 bytes a row); FP8 with a float32 scale per 128 elements
    sends 64 + 4 bytes a row, per 32 elements 64 + 8; the paper's centroids 32 slots per expert."""
    def shape(method, **kw):
        return planning.LayerShape(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4, element_size=4,
                                   method=method, **kw)
    rows, centroids = 8 * 160, 8 * 32
    assert shape("paper").crossing_bytes("lsh") == (centroids * 256,) * 4 == (SHAPE.lsh_bytes,) * 4
    assert shape("paper").crossing_bytes("stock") == (rows * 256,) * 4 == (SHAPE.stock_bytes,) * 4
    assert shape("fp8").crossing_bytes("lsh") == (rows * 68,) * 4
    assert shape("fp8", fp8_block_size=32).crossing_bytes("lsh") == (rows * 72,) * 4
    assert shape("fp8_dispatch").crossing_bytes("lsh") == (rows * 68, rows * 68, rows * 256, rows * 256)
    assert shape("paper_fp8", rate=0.5).crossing_bytes("lsh") == (8 * 80 * 68,) * 4
    for method in ("paper", "fp8", "fp8_dispatch", "paper_fp8"):  # the plugin's own count, the four's mean
        s = shape(method)
        assert s.method_bytes == wire.bytes_per_crossing(s.config(), s.method_rows, 64, torch.float32)
        assert s.method_bytes == sum(s.crossing_bytes("lsh")) / 4
        assert s.config().method == method
    assert shape("fp8_dispatch").method_bytes == rows * (68 + 256) / 2


def test_each_crossing_is_priced_at_its_own_bytes():
    """fp8_dispatch: FP8 to the experts, fp32 back: the layer's 4 all-to-alls are the sum of each crossing's own
    time, at its own message size."""
    shape = planning.LayerShape(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4, element_size=4,
                                method="fp8_dispatch")
    link = LinkModel(parse_link("custom:0.1:100:64"))  # 100 MB/s, 100 us, half the bandwidth at 64 KiB per peer
    p = planning.predict(shape, {"stock": 10.0, "lsh": 11.0}, link)
    fp8, fp32 = 1280 * 68, 1280 * 256
    per_crossing = [1e3 * link.all_to_all_s(b, 4) for b in (fp8, fp8, fp32, fp32)]
    assert p.layer_ms["lsh"] == pytest.approx(11.0 + sum(per_crossing), rel=1e-12)
    assert 4 * p.a2a_ms["lsh"] == pytest.approx(sum(per_crossing), rel=1e-12)
    # break-even: 1 ms more compute against the bytes saved over the 3 peers behind the link
    assert p.break_even_gbps == pytest.approx(2 * (fp32 - fp8) * 3 / 4 / 1e-3 / GB, rel=1e-12)


def test_methods_settings_are_refused_by_name():
    base = dict(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4)
    for change, message in (({"method": "lsh"}, r"method must be one of \['paper', "),
                            ({"method": "fp8", "rate": 0.5}, "rate=0.5 is LSH clustering's compression rate, which "
                                                             "method 'fp8' does not use"),
                            ({"fp8_block_size": 64}, "lsh_moe.fp8_block_size=64 sets the scales of fp8_e4m3"),
                            ({"element_size": 3}, r"element_size must be one of \[2, 4\]")):
        with pytest.raises(ValueError, match=message):
            planning.LayerShape(**dict(base, **change))
    # a method without clustering at the default rate is what the config takes
    assert planning.LayerShape(**dict(base, method="fp8", rate=LSHMoEConfig.compression_rate)).clustered is False


def test_predicted_times_worked_by_hand():
    link = LinkModel(parse_link("custom:0.1:100"))  # 100 MB/s, 100 us
    step = planning.StepShape(moe_layers=3, other_ms=50.0, dense_params=10**7, grad_element_size=2)
    p = planning.predict(SHAPE, {"stock": 10.0, "lsh": 12.0}, link, step)
    a2a = {"stock": 0.1 + SHAPE.stock_bytes * 3 / 4 / 1e8 * 1e3, "lsh": 0.1 + SHAPE.lsh_bytes * 3 / 4 / 1e8 * 1e3}
    assert p.a2a_ms == pytest.approx(a2a, rel=1e-12)
    assert p.layer_ms == pytest.approx({"stock": 10 + 4 * a2a["stock"], "lsh": 12 + 4 * a2a["lsh"]}, rel=1e-12)
    all_reduce = 0.1 + 2 * 3 / 4 * 2e7 / 1e8 * 1e3  # ring over dp = ep = 4 ranks
    assert p.all_reduce_ms == pytest.approx(all_reduce, rel=1e-12)
    assert p.step_ms["lsh"] == pytest.approx(50 + 3 * p.layer_ms["lsh"] + all_reduce, rel=1e-12)
    assert p.pays and p.layer_speedup > p.step_speedup > 1  # the same all-reduce and rest dilute the gain
    # break-even: 2 ms more compute against 4 x (stock - lsh) x 3/4 bytes less on the wire
    even = 4 * (SHAPE.stock_bytes - SHAPE.lsh_bytes) * 3 / 4 / 2e-3 / GB
    assert p.break_even_gbps == pytest.approx(even, rel=1e-12)
    at_even = planning.predict(SHAPE, {"stock": 10.0, "lsh": 12.0}, LinkModel(parse_link(f"custom:{even!r}:100")))
    assert at_even.layer_speedup == pytest.approx(1.0, rel=1e-9)  # the latencies cancel
    slower = planning.predict(SHAPE, {"stock": 10.0, "lsh": 12.0}, LinkModel(parse_link("custom:1:100")), step)
    assert not slower.pays and slower.step_speedup < 1  # above break-even (0.39 GB/s)
    # LSH no slower at EP=1: it pays at any bandwidth; every peer on the node: the network never decides
    assert planning.predict(SHAPE, {"stock": 10.0, "lsh": 9.0}, link).break_even_gbps is None
    on_node = LinkModel(LINKS["100gbps"], gpus_per_node=8)
    assert planning.predict(SHAPE, {"stock": 10.0, "lsh": 12.0}, on_node).break_even_gbps == 0
    # infinite bandwidth: the EP=1 compute alone decides
    free = planning.predict(SHAPE, {"stock": 10.0, "lsh": 12.0}, LinkModel(LINKS["infinite"]))
    assert free.layer_ms == {"stock": 10.0, "lsh": 12.0} and not free.pays


def test_break_even_holds_with_the_per_peer_cost():
    """Both variants make 4 calls to the same peers: the fixed and the per-peer costs cancel at break-even, with
    the calibrated half-bandwidth size and the NVLink share of 8-GPU nodes (EP=16: 8 of 15 peers over the NIC)."""
    shape = planning.LayerShape(d_model=64, tokens_per_rank=2048, experts=16, top_k=2, ep=16, element_size=2)
    ep1 = {"stock": 10.0, "lsh": 12.0}
    even = planning.break_even_gbps(shape, ep1, LinkModel(LINKS["100gbps"], gpus_per_node=8))
    assert even == pytest.approx(4 * (shape.stock_bytes - shape.lsh_bytes) * 8 / 16 / 2e-3 / GB, rel=1e-12)
    at_even = planning.predict(shape, ep1, LinkModel(parse_link(f"custom:{even!r}:20:128"), gpus_per_node=8))
    assert at_even.layer_speedup == pytest.approx(1.0, rel=1e-9)
    # the per-peer cost is paid by both: LSH-MoE's exchange is more than a fifth of stock's
    assert at_even.a2a_ms["lsh"] / at_even.a2a_ms["stock"] > shape.lsh_bytes / shape.stock_bytes


QUALITY = os.path.join(ROOT, "docs", "quality.md")


def test_published_quality_records_by_layer_shape():
    records = quality_records.read_records(QUALITY)
    # gpt-moe-135m: d_model 512, FFN 2048, 8 experts top-2, 32 x 512 tokens per step; never reached stock's loss
    record, _ = quality_records.find_record(records, 512, 2048, 8, 2, 1.25, 16384, 0.2)
    assert (record.section, record.variant, record.seeds, record.token_ratio) == ("gpu_gpt_135m_mechanism", "lsh",
                                                                                    2, None)
    assert record.final_gap == pytest.approx(0.0151) and not record.reached
    # mini-moe: the token ratio measured over LSH-MoE's own longer schedules comes first
    record, matches = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.2)
    assert (record.section, record.token_ratio, record.reached) == ("cpu_gpt_tokens", 1.105, True) and matches > 1
    record, _ = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.3)  # the rate_0.3 variant
    assert (record.section, record.variant) == ("cpu_gpt_rates", "rate_0.3")
    assert record.final_gap == pytest.approx(0.0321)
    # the example shape (16 experts, 4096 tokens per rank) was never measured; nor other tokens per rank
    assert quality_records.find_record(records, 512, 2048, 16, 2, 1.25, 4096, 0.2) == (None, 0)
    assert quality_records.find_record(records, 512, 2048, 8, 2, 1.25, 2048, 0.2) == (None, 0)
    # gpt-moe-72m's layers (8192 tokens per step) since the paper's two seeds on `gpt-72m-long` (2026-12-06)
    record, _ = quality_records.find_record(records, 512, 2048, 8, 2, 1.25, 8192, 0.2)
    assert (record.section, record.variant, record.seeds) == ("testbed_gpt_72m_pinned_x1", "lsh", 2)
    assert record.final_gap == pytest.approx(0.0975) and not record.reached
    # no study-only diagnostic layer or ablation passes for LSH-MoE; of the other methods only the study variants
    # that are a method with nothing set beside it: FP4 both ways (fp4), FP6 both ways (fp6), FP8 both ways (fp8),
    # FP8 to the experts (fp8_dispatch), the paper's with FP8 centroids (lsh_fp8: paper_fp8), FP8 forward with FP4
    # gradients (fp8_fwd_fp4_grad) and the three with stochastic FP4 gradients (fp4_both_sr: fp4_sr,
    # fp8_fwd_fp4sr_grad, fp6_fwd_fp4sr_grad); fp8_both_e8m0 (fp8 with e8m0 scales) and fp6_fwd_fp4_grad are no
    # method's own
    assert {r.variant for r in records} <= {"lsh", "rate_0.3", "rate_0.5", "rate_1.0", "fp4_both", "fp6_both",
                                            "fp8_both", "fp8_dispatch", "lsh_fp8", "fp8_fwd_fp4_grad", "fp4_both_sr",
                                            "fp8_fwd_fp4sr_grad", "fp6_fwd_fp4sr_grad"}
    assert {r.method for r in records} == {"paper", "fp4", "fp6", "fp8", "fp8_dispatch", "paper_fp8",
                                           "fp8_fwd_fp4_grad", "fp4_sr", "fp8_fwd_fp4sr_grad", "fp6_fwd_fp4sr_grad"}
    record, _ = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 1024, 0.2, "fp6")
    assert (record.section, record.variant, record.seeds, record.reached) == ("proxy_gpt_mini_x1", "fp6_both", 3, True)
    assert record.final_gap == pytest.approx(-0.0008)
    record, _ = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 1024, 0.2, "paper_fp8")
    assert (record.section, record.variant, record.seeds, record.reached) == \
        ("proxy_gpt_mini_x1", "lsh_fp8", 2, False)
    assert record.final_gap == pytest.approx(0.0192)
    record, matches = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 1024, 0.2, "fp4")
    assert (record.section, record.variant, record.seeds, record.reached, matches) == \
        ("proxy_gpt_mini_x1", "fp4_both", 3, False, 1)
    assert record.final_gap == pytest.approx(0.0013)
    record, _ = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 1024, 0.2, "fp8")
    assert (record.section, record.variant, record.seeds) == ("proxy_gpt_mini_x1", "fp8_both", 2)
    # the H200 testbed's shape (gpt-moe-25m: d_model 256, FFN 1024, 8 experts top-2, 8,192 tokens per rank)
    record, _ = quality_records.find_record(records, 256, 1024, 8, 2, 1.25, 8192, 0.2, "fp4")
    assert (record.section, record.variant, record.seeds) == ("testbed_gpt_25m_pinned_x1", "fp4_both", 3)
    assert record.final_gap == pytest.approx(0.0001)
    # those records are of their tokens per rank only; and no other method is given one
    assert quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.2, "fp4") == (None, 0)
    for method in ("fp8", "fp8_dispatch", "paper_fp8"):
        assert quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.2, method) == (None, 0)


def test_a_methods_record_is_its_own(tmp_path):
    """A section with the study's FP8 variants: `fp8_both` is method fp8's record and `lsh_fp8` paper_fp8's; the
    paper's (`lsh`) stands in for neither, nor they for it; `fp8_to_experts` (its own gradient formats) is no
    method's."""
    text = ("<!-- BEGIN fp8 -->\n## fp8\n\n- GPT-MoE preset `mini-moe` (3.2M parameters), 4096 tokens per step, "
            "compared after 1M training tokens, never repeated; LSH defaults unless the variant says otherwise: "
            "rate 0.2, 6 hashes.\n\n| variant | seeds | valid loss (mean ± std) | gap vs stock (means) |\n"
            "| --- | --- | --- | --- |\n| stock | 1 | 5.0000 | – |\n| lsh | 1 | 5.5000 | +10.00% |\n"
            "| fp8_both | 1 | 5.0100 | +0.20% |\n| lsh_fp8 | 1 | 5.6000 | +12.00% |\n"
            "| fp8_to_experts | 1 | 5.0000 | +0.00% |\n<!-- END fp8 -->\n")
    path = tmp_path / "quality.md"
    path.write_text(text)
    records = quality_records.read_records(str(path))
    assert [(r.variant, r.method, r.rate) for r in records] == [("lsh", "paper", 0.2), ("fp8_both", "fp8", None),
                                                                ("lsh_fp8", "paper_fp8", 0.2)]
    found = {m: quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.2, m)[0]
             for m in ("paper", "fp8", "fp8_dispatch", "paper_fp8")}
    assert found["paper"].variant == "lsh" and found["paper_fp8"].variant == "lsh_fp8"
    assert found["fp8"].variant == "fp8_both" and found["fp8"].final_gap == pytest.approx(0.002)
    assert found["fp8_dispatch"] is None
    assert "method fp8, no clustering" in found["fp8"].where()
    assert "not reached: final gap +0.20% (method `fp8` ended above" in planning.quality_text(found["fp8"], 1, "fp8")


def test_runs_a_deadline_stopped_and_t5_runs_are_not_records(tmp_path):
    described = ("- {kind}-MoE preset `mini-moe` (3.2M parameters), 4096 tokens per step, compared after 1M training "
                 "tokens{cut}, never repeated; LSH defaults unless the variant says otherwise: rate 0.2, 6 hashes.")
    gaps = ("\n\n| variant | seeds | valid loss (mean ± std) | gap vs stock (means) |\n| --- | --- | --- | --- |\n"
            "| stock | 1 | 5.0000 | – |\n| lsh | 1 | 4.9000 | -2.00% |\n")
    text = "".join(f"<!-- BEGIN {name} -->\n## {name}\n\n" + described.format(kind=kind, cut=cut) + gaps
                   + f"<!-- END {name} -->\n\n"
                   for name, kind, cut in (("cut", "GPT", " (runs planned for 2M tokens were stopped by the "
                                                          "device-time deadline)"), ("t5", "T5", ""),
                                           ("done", "GPT", "")))
    path = tmp_path / "quality.md"
    path.write_text(text)
    records = quality_records.read_records(str(path))
    assert [(r.section, r.model_kind) for r in records] == [("t5", "t5"), ("done", "gpt")]
    record, matches = quality_records.find_record(records, 128, 512, 8, 2, 1.25, 4096, 0.2)
    assert (record.section, matches, record.reached, record.final_gap) == ("done", 1, True, pytest.approx(-0.02))


def test_time_to_target_text_worked_by_hand():
    ratio = quality_records.QualityRecord("s", "gpt", "mini-moe", 4096, "1M", 0.2, "lsh", 1, None, 1.105)
    assert planning.time_to_target_text(ratio, 2.0) == ("time to stock's loss 0.55x stock's (measured token ratio "
                                                        "1.105 / predicted step speed-up 2.00)")
    assert "needed 1.105x stock's tokens" in planning.quality_text(ratio, 1)
    above = quality_records.QualityRecord("s", "gpt", "gpt-moe-135m", 16384, "10M", 0.2, "lsh", 2, 0.0151)
    assert planning.time_to_target_text(above, 1.27) == ("time to stock's loss: not reached: final gap +1.51%; "
                                                         "LSH-MoE would be sooner only if it needed fewer than "
                                                         "1.27x stock's tokens")
    assert "not reached: final gap +1.51%" in planning.quality_text(above, 1)
    assert planning.time_to_target_text(None, 2.0) == ("time to stock's loss: no quality measurement for this "
                                                       "configuration")
    assert "no quality measurement for this configuration" in planning.quality_text(None, 0)
    assert planning.quality_text(None, 0, "fp8", recorded=False).startswith(
        "quality: no long-schedule record exists for method `fp8` yet")
    assert planning.time_to_target_text(None, 2.0, "fp8", recorded=False) == (
        "time to stock's loss: unknown until method `fp8` has a long-schedule record")


def test_bad_shapes_are_refused_by_name():
    base = dict(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4)
    for change, message in (({"experts": 6}, "experts=6 must be a multiple of ep=4"),
                            ({"ep": 0}, "ep must be an integer >= 1, got 0"),
                            ({"top_k": 3}, "top_k must be 1 or 2"),
                            ({"rate": 0.0}, r"rate must be in \(0, 1\]"),
                            ({"d_model": 0}, "d_model must be an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            planning.LayerShape(**dict(base, **change))


def run_plan(*args):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plan_lsh_moe.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| link") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_plan_command_refuses_cpu_timings_unless_asked():
    """The issue's example on a machine without a GPU: no speed-up from CPU timings (it used to print "2.74x per
    step; compression pays at any bandwidth")."""
    result = run_plan("--d-model", "512", "--tokens-per-rank", "4096", "--experts", "16", "--ep", "16", "--link",
                      "200gbps")
    assert result.returncode == 2 and "no GPU here" in result.stderr and "--cpu-timings" in result.stderr
    assert "per step" not in result.stdout


def test_plan_command_with_cpu_timings_marks_every_figure():
    build_deepspeed_cpu_comm_op()  # into the session's extensions directory, which the command inherits
    # Experts that cost almost nothing (FFN width 4): on this CPU the compressor is then pure extra compute. One GPU
    # per node (labelled): every peer behind the custom link.
    result = run_plan("--d-model", "64", "--d-ff", "4", "--tokens-per-rank", "2048", "--experts", "8", "--top-k",
                      "2", "--ep", "4", "--gpus-per-node", "1", "--link", "custom:0.01:50", "infinite", "--reps",
                      "3", "--warmup", "1", "--cpu-timings")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    slow, free = rows["custom:0.01:50"], rows["infinite"]
    stock_ep1, lsh_ep1 = float(slow[1]), float(slow[2])
    assert (float(free[1]), float(free[2])) == (stock_ep1, lsh_ep1)  # one measurement, two links
    assert float(slow[7]) > 1.5 and slow[12] == "yes"  # 10 MB/s: the bytes compression saves dominate
    assert float(free[3]) == float(free[4]) == 0 and free[12] == "no"
    assert float(free[7]) == pytest.approx(stock_ep1 / lsh_ep1, rel=0.02) and float(free[7]) < 1
    out = result.stdout
    assert "CPU TIMINGS" in out and "(measured on CPU)" in out and "(CPU + modelled)" in out
    assert re.search(r"custom:0.01:50: CPU timing, says nothing about a GPU cluster: LSH-MoE predicted [\d.]+x per "
                     r"MoE layer", out)
    assert "1 GPU per node: every EP peer over custom:0.01:50" in out and "at EP=4: 0 of 3 peers" in out
    assert "no quality measurement for this configuration" in out
    assert "modelled" in out and "docs/link_model.md" in out


def test_plan_command_on_8_gpu_nodes_with_a_published_quality_record():
    """The mini-moe layer shape (docs/quality.md has it): EP=8 on the default 8-GPU nodes crosses no NIC, so the
    NIC link does not matter; the measured token ratio and the time to stock's loss follow the step speed-up."""
    build_deepspeed_cpu_comm_op()
    result = run_plan("--d-model", "128", "--tokens-per-rank", "4096", "--experts", "8", "--top-k", "2", "--ep",
                      "8", "--link", "100gbps", "400gbps", "--reps", "2", "--warmup", "1", "--cpu-timings")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert rows["100gbps"][3:5] == rows["400gbps"][3:5]  # the same modelled all-to-all: all over NVLink
    out = result.stdout
    assert "8 GPUs per node" in out and "at EP=8: 7 of 7 peers over nvlink4, 0 over the NIC" in out
    assert "LSH-MoE needed 1.105x stock's tokens" in out and "`cpu_gpt_tokens`" in out
    found = re.search(r"100gbps: .*per step;.* time to stock's loss ([\d.]+)x stock's \(measured token ratio 1.105 / "
                      r"predicted step speed-up ([\d.]+)\)", out)
    time_ratio, step = float(found.group(1)), float(found.group(2))
    assert step == pytest.approx(float(rows["100gbps"][11]), abs=0.006)  # the table's step speed-up, rounded
    assert time_ratio == pytest.approx(1.105 / step, abs=0.006)


def test_plan_command_with_fp8_prices_its_bytes_and_shows_no_papers_record():
    """--method fp8 on the mini-moe layer shape at 4,096 tokens per rank, where docs/quality.md holds the paper's
    records and none of FP8's (its are at 1,024 tokens per rank and on the testbed's shape): the bytes are FP8's
    (d_model 128 in fp32 sends 512 bytes a row, FP8 with one float32 scale per 128 elements 132), the table names
    the method, and the quality line says no record of this configuration exists instead of showing the paper's."""
    build_deepspeed_cpu_comm_op()
    result = run_plan("--d-model", "128", "--tokens-per-rank", "4096", "--experts", "8", "--top-k", "2", "--ep",
                      "8", "--link", "custom:1:0", "--gpus-per-node", "1", "--method", "fp8", "--reps", "2",
                      "--warmup", "1", "--cpu-timings")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"{132 / 512:.3f} of stock's bytes, the mean of the four crossings, scales included" in out
    assert "all 8 x 1280 slots, no clustering; dispatch fp8_e4m3 forward / fp8_e4m3 backward" in out
    assert ("quality: no quality measurement for this configuration (docs/quality.md holds none at this d_model, "
            "FFN, experts, top-k, capacity factor, tokens per rank, method and rate)") in out
    assert "time to stock's loss: no quality measurement for this configuration" in out
    assert "1.105" not in out and "cpu_gpt_tokens" not in out  # the paper's record is not substituted
    assert "| fp8 EP=1 ms (measured on CPU) |" in out and "method `fp8` predicted" in out
    # a link that is all bandwidth (1 GB/s, no fixed or per-peer cost): the all-to-alls scale with the bytes
    stock_a2a, fp8_a2a = (float(cell) for cell in table_rows(out)["custom:1:0"][3:5])
    assert fp8_a2a / stock_a2a == pytest.approx(132 / 512, rel=0.01)


def test_the_bytes_line_names_the_scales_of_the_formats_the_method_sends():
    """FP4 both ways names its e8m0 scale per 32 elements and no FP8 block; FP8 names its float32 scale per 128
    elements and no FP4 one; the paper's, in the model's dtype, names none."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("plan_lsh_moe", os.path.join(ROOT, "scripts", "plan_lsh_moe.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    base = dict(d_model=64, tokens_per_rank=512, experts=8, top_k=2, ep=4, element_size=4)
    fp4 = plan.modelled_bytes_line(planning.LayerShape(**base, method="fp4"), "fp32")
    assert "combine fp4_e2m1 / fp4_e2m1; fp4_e2m1 with one e8m0 scale per 32 elements):" in fp4 and "fp8" not in fp4
    fp8 = plan.modelled_bytes_line(planning.LayerShape(**base, method="fp8"), "fp32")
    assert "combine fp8_e4m3 / fp8_e4m3; fp8_e4m3 with one float32 scale per 128 elements):" in fp8
    assert "fp4" not in fp8
    assert "scale per" not in plan.modelled_bytes_line(planning.LayerShape(**base), "fp32")


def test_plan_command_refuses_method_flags_by_name():
    base = ["--d-model", "64", "--tokens-per-rank", "512", "--experts", "8", "--ep", "4", "--cpu-timings"]
    for args, message in ((["--method", "fp8", "--rate", "0.5"], "--rate 0.5 sets lsh_moe.compression_rate, which "
                                                                 "--method fp8 does not use"),
                          (["--fp8-block-size", "64"], "--fp8-block-size 64 sets the scales of FP8, which --method "
                                                       "paper does not send"),
                          (["--method", "fp8", "--fp8-block-size", "0"], "--fp8-block-size must be 'row' or an "
                                                                         "integer >= 1, got '0'"),
                          (["--method", "fp9"], "argument --method: invalid choice: 'fp9'")):
        result = run_plan(*base, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_plan_flags_left_at_their_defaults_pass_for_every_method():
    import importlib.util
    spec = importlib.util.spec_from_file_location("plan_lsh_moe", os.path.join(ROOT, "scripts", "plan_lsh_moe.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    base = ["--d-model", "64", "--tokens-per-rank", "512", "--experts", "8", "--ep", "4", "--cpu-timings"]
    args = plan.parse_args(base + ["--method", "fp8", "--rate", "0.2", "--fp8-block-size", "row"])
    assert (args.shape.method, args.shape.fp8_block_size, args.shape.rate) == ("fp8", "row", 0.2)
    assert args.shape.crossing_bytes("lsh") == (8 * 160 * (64 + 4),) * 4  # one scale per row
    args = plan.parse_args(base + ["--method", "paper_fp8", "--rate", "0.5", "--fp8-block-size", "32"])
    assert args.shape.method_rows == 8 * 80 and args.shape.crossing_bytes("lsh") == (8 * 80 * (64 + 8),) * 4
    assert plan.parse_args(base).shape.method == "paper"


def test_plan_command_refuses_bad_flags_by_name():
    for args, message in ((["--link", "10gbps"], "--link: unknown link '10gbps'; allowed: 100gbps"),
                          (["--experts", "6"], "experts=6 must be a multiple of ep=4"),
                          (["--ep", "0"], "--ep must be >= 1, got 0"),
                          (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1, got 0")):
        base = {"--d-model": "64", "--tokens-per-rank": "512", "--experts": "8", "--ep": "4"}
        flags = dict(base, **{args[0]: args[1]})
        result = run_plan(*[x for kv in flags.items() for x in kv], "--cpu-timings")
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
