"""The EP=1 link stand-in on DeepSpeed's real MoE layer (one real gloo process): values and gradients stay bit for
bit those of the layer without it, for stock and LSH-MoE; forward and backward each take the modelled time longer;
each of the four crossings is priced at its wire format's bytes (FP8 values and scales, or the model's dtype);
`decide_by_cost` meets the modelled exchange; bad installs are refused by name."""
import statistics
import time

import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block
from test_deepspeed_patch import D_MODEL, build_moe, fwd_bwd, same

import lshmoe_plugin
from lshmoe_plugin import wire
from lshmoe_plugin.compressor import fixed_slots
from lshmoe_pretrain.link_model import LINKS, LinkModel, parse_link
from lshmoe_pretrain.link_standin import ModelledAllToAll, dense_gradient_bytes

TOKENS, EXPERTS, EP = 48, 4, 4
CAPACITY = 15  # DeepSpeed's top-1 capacity: ceil(48 tokens / 4 experts x 1.25)
STOCK_BYTES = EXPERTS * CAPACITY * D_MODEL * 4  # fp32 dispatch buffer
LSH_BYTES = EXPERTS * fixed_slots(CAPACITY, 0.25) * D_MODEL * 4
# Slow enough that one crossing of the stock buffer lasts 0.1 s: far above the tiny layer's compute noise.
SLOW = LinkModel(parse_link(f"custom:{STOCK_BYTES * (EP - 1) / EP / 0.1 / 1e9:.12f}:0"))
LSH = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25, "telemetry_interval": 0}}


def timed_fwd_bwd(moe, x, reps=3):
    """Median seconds of the forward and of the backward."""
    forward, backward = [], []
    for _ in range(reps):
        inp = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out, l_aux, _ = moe(inp)
        t1 = time.perf_counter()
        (out.square().mean() + l_aux).backward()
        t2 = time.perf_counter()
        forward.append(t1 - t0)
        backward.append(t2 - t1)
    return statistics.median(forward), statistics.median(backward)


def check_standin(rank, world_size):
    torch.set_num_threads(1)
    x = torch.randn(2, TOKENS // 2, D_MODEL, generator=torch.Generator().manual_seed(3))
    report = {}
    for name, config in (("stock", None), ("lsh", LSH)):
        moe = build_moe(1, 1)
        if config:
            lshmoe_plugin.enable(config, moe)
        plain = fwd_bwd(moe, x)
        plain_times = timed_fwd_bwd(moe, x)
        standin = ModelledAllToAll(SLOW, EP, torch.device("cpu"))
        assert standin.install(moe) == 1
        with_link = fwd_bwd(moe, x)
        report[f"{name}_identical"] = same(plain, with_link)
        report[f"{name}_crossings"] = standin.crossings
        report[f"{name}_modelled_s"] = standin.modelled_s
        report[f"{name}_times"] = (plain_times, timed_fwd_bwd(moe, x))
        standin.remove()
        crossings = standin.crossings
        report[f"{name}_removed_identical"] = same(plain, fwd_bwd(moe, x)) and standin.crossings == crossings
        lshmoe_plugin.disable()
    return report


def check_all(rank, world_size):
    """Every check in one process: each spawned DeepSpeed rank costs tens of seconds on a loaded 2-core machine."""
    return {"standin": check_standin(rank, world_size), "decide": check_decide_by_cost(rank, world_size),
            "wire": check_wire_pricing(rank, world_size), "refusals": check_refusals(rank, world_size)}


@pytest.fixture(scope="module")
def reports():
    [report] = run_distributed(check_all, 1)
    return report


def test_standin_keeps_values_and_adds_the_modelled_time_forward_and_backward(reports):
    report = reports["standin"]
    for name, nbytes in (("stock", STOCK_BYTES), ("lsh", LSH_BYTES)):
        assert report[f"{name}_identical"] and report[f"{name}_removed_identical"], name
        # dispatch and combine, forward and backward; each one all-to-all of the buffer at EP=4
        assert report[f"{name}_crossings"] == 4
        assert report[f"{name}_modelled_s"] == pytest.approx(4 * SLOW.all_to_all_s(nbytes, EP), rel=1e-12)
        per_pass = 2 * SLOW.all_to_all_s(nbytes, EP)
        (plain_fwd, plain_bwd), (fwd, bwd) = report[f"{name}_times"]
        for added in (fwd - plain_fwd, bwd - plain_bwd):
            assert per_pass * 0.9 - 0.01 < added < per_pass * 1.15 + 0.03, (name, added, per_pass)
    assert report["lsh_modelled_s"] < 0.3 * report["stock_modelled_s"]  # 4 of 15 slots per expert cross


# FP8 e4m3 with 8-element blocks: a row of 16 sends 16 one-byte values and 2 float32 scales; fp32 sends 64 bytes.
FP8_ROW, FP32_ROW = D_MODEL + 4 * 2, D_MODEL * 4
ROWS, CENTROID_ROWS = EXPERTS * CAPACITY, EXPERTS * fixed_slots(CAPACITY, 0.25)
WIRE_CASES = {  # name: (lsh_moe block, rows that cross, bytes of each crossing worked by hand)
    "stock": (None, ROWS, dict(dispatch=(FP32_ROW, FP32_ROW), combine=(FP32_ROW, FP32_ROW))),
    "fp8": ({"method": "fp8", "fp8_block_size": 8}, ROWS, dict(dispatch=(FP8_ROW, FP8_ROW),
                                                               combine=(FP8_ROW, FP8_ROW))),
    "fp8_dispatch": ({"method": "fp8_dispatch", "fp8_block_size": 8}, ROWS,
                     dict(dispatch=(FP8_ROW, FP8_ROW), combine=(FP32_ROW, FP32_ROW))),
    # FP8 to the experts both ways, the model's dtype away from them (forward and backward crossings differ)
    "fp8_to_experts": ({"clustering": "none", "dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model",
                        "combine_dtype": "model", "combine_grad_dtype": "fp8_e4m3", "fp8_block_size": 8}, ROWS,
                       dict(dispatch=(FP8_ROW, FP32_ROW), combine=(FP32_ROW, FP8_ROW))),
    "paper_fp8": ({"method": "paper_fp8", "compression_rate": 0.25, "fp8_block_size": 8}, CENTROID_ROWS,
                  dict(dispatch=(FP8_ROW, FP8_ROW), combine=(FP8_ROW, FP8_ROW))),
}


def check_wire_pricing(rank, world_size):
    """One training step per wire case with the stand-in: the bytes it priced per crossing and direction, the
    plugin's own per-crossing count for the same rows, and whether values and gradients stayed as without it."""
    x = torch.randn(2, TOKENS // 2, D_MODEL, generator=torch.Generator().manual_seed(5))
    report = {}
    for name, (block, rows, _) in WIRE_CASES.items():
        moe = build_moe(1, 1)
        config = None
        if block is not None:
            config = lshmoe_plugin.enable({"lsh_moe": paper_block(dict(block, enabled=True, telemetry_interval=0))},
                                          moe)
        plain = fwd_bwd(moe, x)
        standin = ModelledAllToAll(SLOW, EP, torch.device("cpu"))
        standin.delay = lambda seconds: None  # the bytes are under test here, not the waiting
        standin.install(moe)
        with_link = fwd_bwd(moe, x)
        report[name] = {"priced": dict(standin.priced_bytes), "crossings": standin.crossings,
                        "modelled_s": standin.modelled_s, "identical": same(plain, with_link),
                        "plugin_mean": None if config is None else
                        wire.bytes_per_crossing(config, rows, D_MODEL, torch.float32)}
        if name == "fp8":  # eval runs DeepSpeed's own forward: the model's dtype crosses, whatever the config
            moe.eval()
            standin.priced_bytes.clear()
            with torch.no_grad():
                moe(x)
            report["fp8_eval"] = dict(standin.priced_bytes)
        standin.remove()
        lshmoe_plugin.disable()
    for key, extra in (("decide_by_cost", True), ("output_error_interval", 1)):
        moe = build_moe(1, 1)
        ModelledAllToAll(SLOW, EP, torch.device("cpu")).install(moe)
        method = "fp8_dispatch" if key == "decide_by_cost" else "paper_fp8"  # output errors need clustering
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": method, key: extra}}, moe)
        try:
            fwd_bwd(moe, x)
        except ValueError as error:
            report[f"refused_{key}"] = str(error)
        lshmoe_plugin.disable()
    return report


def test_each_crossing_is_priced_at_its_wire_format(reports):
    """The four delays' bytes are the crossings' own (FP8 values and block scales, or the model's dtype), forward
    and backward apart, and average to what the plugin counts per crossing (wire.bytes_per_crossing)."""
    report = reports["wire"]
    for name, (_, rows, per_row) in WIRE_CASES.items():
        case = report[name]
        expected = {(crossing, direction): rows * per_row[crossing][i] for crossing in ("dispatch", "combine")
                    for i, direction in enumerate(("forward", "backward"))}
        assert case["priced"] == expected, name
        assert case["crossings"] == 4 and case["identical"], name
        assert case["modelled_s"] == pytest.approx(sum(SLOW.all_to_all_s(b, EP) for b in expected.values()),
                                                   rel=1e-12), name
        if case["plugin_mean"] is not None:
            assert case["plugin_mean"] == sum(expected.values()) / 4, name
    # FP8 sends 24 of fp32's 64 bytes per row; the stock buffer is priced as before (its tensor's own bytes)
    assert report["fp8"]["modelled_s"] < 0.5 * report["stock"]["modelled_s"]
    assert report["stock"]["priced"][("dispatch", "forward")] == STOCK_BYTES
    eval_rows = EXPERTS * 12  # DeepSpeed's eval capacity: ceil(48 tokens / 4 experts x 1.0)
    assert report["fp8_eval"] == {("dispatch", "forward"): eval_rows * FP32_ROW,
                                  ("combine", "forward"): eval_rows * FP32_ROW}
    for key, value in (("decide_by_cost", "True"), ("output_error_interval", "1")):
        assert f"cannot price lsh_moe.{key}={value}" in report[f"refused_{key}"]
        assert "allowed with the stand-in" in report[f"refused_{key}"]


def check_decide_by_cost(rank, world_size):
    decided = {}
    for link in ("infinite", "slow"):
        moe = build_moe(1, 1, identity=True)  # experts that cost nothing: only the exchange and the compressor
        model = SLOW if link == "slow" else LinkModel(LINKS["infinite"])
        standin = ModelledAllToAll(model, EP, torch.device("cpu"))
        standin.install(moe)
        lshmoe_plugin.enable({"lsh_moe": dict(LSH["lsh_moe"], decide_by_cost=True)}, moe)
        fwd_bwd(moe, torch.randn(2, TOKENS // 2, D_MODEL))
        decided[link] = (moe.deepspeed_moe._lshmoe_compressor.pays, standin.crossings)
        lshmoe_plugin.disable()
        standin.remove()
    return decided


def test_decide_by_cost_meets_the_modelled_exchange(reports):
    decided = reports["decide"]
    # no link: the compressor is pure cost; a slow one: 11 of 15 rows per expert never cross
    assert decided["infinite"][0] is False and decided["slow"][0] is True, decided
    # the trials (1 warm-up + 3 timed, each way: 4 crossings forward + backward) went through the stand-in too
    assert decided["slow"][1] >= 2 * 4 * 4 + 4, decided


def check_refusals(rank, world_size):
    errors = {}
    moe = build_moe(2, 1, make_groups=False)  # an EP=2 layer: its all-to-all is real
    cpu = torch.device("cpu")
    for name, call in (("ep2", lambda: ModelledAllToAll(SLOW, 2, cpu).install(moe)),
                       ("no_moe", lambda: ModelledAllToAll(SLOW, 2, cpu).install(torch.nn.Linear(2, 2))),
                       ("ep0", lambda: ModelledAllToAll(SLOW, 0, cpu))):
        try:
            call()
        except ValueError as error:
            errors[name] = str(error)
    ep1 = build_moe(1, 1)
    ModelledAllToAll(SLOW, 2, torch.device("cpu")).install(ep1)
    try:
        ModelledAllToAll(SLOW, 2, torch.device("cpu")).install(ep1)
    except ValueError as error:
        errors["twice"] = str(error)
    dense = sum(p.numel() for n, p in ep1.named_parameters() if "deepspeed_experts" not in n) * 2
    errors["dense_bytes"] = (dense_gradient_bytes(ep1, 2), dense)
    return errors


def test_bad_installs_are_refused_by_name(reports):
    errors = reports["refusals"]
    assert "EP=1 layers only; this layer has ep_size=2" in errors["ep2"]
    assert "found no DeepSpeed MoE layer" in errors["no_moe"]
    assert errors["ep0"] == "modelled EP degree must be an integer >= 1, got 0"
    assert "already installed" in errors["twice"]
    measured, expected = errors.pop("dense_bytes")
    assert measured == expected > 0  # the gate's weights: everything but the experts


def test_all_reduce_waits_for_the_modelled_time():
    standin = ModelledAllToAll(LinkModel(parse_link("custom:0.001:0")), 2, torch.device("cpu"))
    t0 = time.perf_counter()
    seconds = standin.all_reduce(25e3, 4)  # 2 x 3/4 x 25 kB at 1 MB/s = 37.5 ms
    elapsed = time.perf_counter() - t0
    assert seconds == pytest.approx(0.0375, rel=1e-12)
    assert 0.0375 <= elapsed < 0.0375 + 0.05
