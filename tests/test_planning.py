"""The planning arithmetic (per-rank bytes, predicted layer and step times, break-even bandwidth) on numbers worked
by hand, and scripts/plan_lsh_moe.py run on this CPU: it measures, and its predictions hang together."""
import os
import re
import subprocess
import sys

import pytest
from distributed import build_deepspeed_cpu_comm_op

from lshmoe_pretrain import planning
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
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plan_lsh_moe.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_plan_command_on_the_cpu():
    build_deepspeed_cpu_comm_op()  # into the session's extensions directory, which the command inherits
    # Experts that cost almost nothing (FFN width 4): on this CPU the compressor is then pure extra compute.
    result = run_plan("--d-model", "64", "--d-ff", "4", "--tokens-per-rank", "2048", "--experts", "8", "--top-k",
                      "2", "--ep", "4", "--link", "custom:0.01:50", "infinite", "--reps", "3", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| custom") or line.startswith("| infinite"):
            rows[cells[0]] = cells
    slow, free = rows["custom:0.01:50"], rows["infinite"]
    stock_ep1, lsh_ep1 = float(slow[1]), float(slow[2])
    assert (float(free[1]), float(free[2])) == (stock_ep1, lsh_ep1)  # one measurement, two links
    assert float(slow[7]) > 1.5 and slow[12] == "yes"  # 10 MB/s: the bytes compression saves dominate
    assert float(free[3]) == float(free[4]) == 0 and free[12] == "no"
    assert float(free[7]) == pytest.approx(stock_ep1 / lsh_ep1, rel=0.02) and float(free[7]) < 1
    assert "modelled" in result.stdout and "docs/link_model.md" in result.stdout
    assert re.search(r"custom:0.01:50: LSH-MoE predicted [\d.]+x per MoE layer", result.stdout)


def test_plan_command_refuses_bad_flags_by_name():
    for args, message in ((["--link", "10gbps"], "--link: unknown link '10gbps'; allowed: 100gbps"),
                          (["--experts", "6"], "experts=6 must be a multiple of ep=4"),
                          (["--ep", "0"], "--ep must be >= 1, got 0")):
        base = {"--d-model": "64", "--tokens-per-rank": "512", "--experts": "8", "--ep": "4"}
        flags = dict(base, **{args[0]: args[1]})
        result = run_plan(*[x for kv in flags.items() for x in kv])
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
