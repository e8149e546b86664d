"""Patched vs stock DeepSpeed `MoE` on the same seed, in 1 and 2 real gloo processes."""
import csv
import glob
import os

import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block

import lshmoe_plugin
from lshmoe_plugin.patches import deepspeed_moe

D_MODEL = 16


class Shift(torch.nn.Module):
    """An expert that adds a vector of its own: E(x) = x + b. With error compensation every token comes back as
    E(c) + x - c = x + b, whatever its centroid c: the compressed layer equals stock at any rate if, and only if,
    every centroid went through the expert its tokens were routed to."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(D_MODEL))

    def forward(self, x):
        return x + self.shift


def build_moe(ep_size, k, identity=False, num_experts=4, seed=0, make_groups=True, expert=None):
    from deepspeed.moe.layer import MoE
    torch.manual_seed(seed)
    if expert is None:
        expert = torch.nn.Identity() if identity else torch.nn.Sequential(
            torch.nn.Linear(D_MODEL, 32), torch.nn.GELU(), torch.nn.Linear(32, D_MODEL))
    moe = MoE(D_MODEL, expert, num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=1.25, min_capacity=4)
    if make_groups:  # deepspeed.initialize does this itself
        moe.set_deepspeed_parallelism()
    return moe


def build_distinct_shift_experts(rank, ep_size, k):
    """DeepSpeed copies one expert module into every slot, and every rank builds it from the same seed: all
    experts are alike, so a layer that sent a centroid to the wrong expert would still match stock. Here each
    expert shifts by its own vector, drawn from its global index (rank r holds experts r * local ...)."""
    moe = build_moe(ep_size, k, expert=Shift())
    local = moe.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        for i, expert in enumerate(local):
            index = rank * len(local) + i
            expert.shift.copy_(3 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(index)))
    return moe


def fwd_bwd(moe, x, dtype=torch.float32):
    """Output, input gradient and parameter gradients of one forward+backward on a fixed seed."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).requires_grad_(True)
    torch.manual_seed(1234)  # the gate's random token selection draws from the global generator
    out, l_aux, _ = moe(x)
    (out.float().square().mean() + l_aux).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in moe.parameters()]
    return out.detach(), x.grad.detach(), grads


def failed(report):
    """The names of the checks that did not hold (all of a report's values are booleans)."""
    return [name for name, ok in report.items() if not ok]


def same(a, b):
    out_a, gx_a, gp_a = a
    out_b, gx_b, gp_b = b
    params = all((p is None and q is None) or torch.equal(p, q) for p, q in zip(gp_a, gp_b))
    return torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b) and params


class AllToAllBytes:
    """Counts the bytes handed to the real all-to-all (the call itself still runs)."""

    def __init__(self):
        import deepspeed.comm as dist
        self.dist, self.original, self.sent = dist, dist.all_to_all_single, []

    def __enter__(self):
        def counting(output, tensor, *args, **kwargs):
            self.sent.append(tensor.numel() * tensor.element_size())
            return self.original(output, tensor, *args, **kwargs)
        self.dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_to_all_single = self.original


def check_patch_against_stock(rank, world_size, k):
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 24, D_MODEL)
    report = {}
    for identity in (False, True):
        moe = build_moe(world_size, k, identity=identity)
        stock = fwd_bwd(moe, x)
        with AllToAllBytes() as stock_bytes:
            fwd_bwd(moe, x)

        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 1.0}}, moe)
        report[f"rate1_exact_identity={identity}"] = same(stock, fwd_bwd(moe, x))

        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}, moe)
        with AllToAllBytes() as lsh_bytes:
            compressed = fwd_bwd(moe, x)
        if identity:  # identity expert + error compensation: every token comes back exactly
            report["identity_exact_at_rate_0.25"] = torch.equal(compressed[0], stock[0])
        else:
            report["compressed_differs"] = not torch.equal(compressed[0], stock[0])
            report["compressed_grads_finite"] = all(torch.isfinite(g).all() for g in compressed[2] if g is not None)
            report["bytes"] = (sum(stock_bytes.sent), sum(lsh_bytes.sent), len(lsh_bytes.sent))

        moe.eval()
        torch.manual_seed(7)
        patched_eval = moe(x)[0]
        torch.manual_seed(7)
        report[f"eval_exact_identity={identity}"] = torch.equal(patched_eval, _stock_eval(moe, x))
        moe.train()

        lshmoe_plugin.disable()
        lshmoe_plugin.disable()  # idempotent
        report[f"reverted_exact_identity={identity}"] = same(stock, fwd_bwd(moe, x))
        lshmoe_plugin.enable({"lsh_moe": {"enabled": False, "compression_rate": 0.25}}, moe)
        report[f"disabled_unpatched_identity={identity}"] = (not deepspeed_moe.is_applied()
                                                             and same(stock, fwd_bwd(moe, x)))
    report.update(check_experts_that_differ(rank, world_size, k, x))
    return report


def check_experts_that_differ(rank, world_size, k, x):
    """At rate 0.25, experts that differ from one another: the compressed layer matches stock (outputs, input and
    parameter gradients, to rounding) only if each centroid is processed by its own expert and returns to its
    own tokens."""
    moe = build_distinct_shift_experts(rank, world_size, k)
    stock = fwd_bwd(moe, x)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}, moe)
    compressed = fwd_bwd(moe, x)
    stats = lshmoe_plugin.TELEMETRY.latest[0]
    lshmoe_plugin.disable()
    pairs = [(compressed[0], stock[0]), (compressed[1], stock[1])] + list(zip(compressed[2], stock[2]))
    return {"distinct_experts_match_stock": all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in pairs),
            "distinct_experts_merged_tokens": int(stats.clusters) < int(stats.valid_tokens),
            # the shifts dominate the output: an expert mix-up would move it by several units
            "distinct_experts_shift_the_output": bool((stock[0] - x).abs().max() > 1.0)}


def _stock_eval(moe, x):
    from deepspeed.moe.sharded_moe import MOELayer
    original = deepspeed_moe.LIFECYCLE.original(MOELayer, "forward")
    return original(moe.deepspeed_moe, x, None)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
def test_patched_layer_against_stock(world_size, k):
    for rank, report in enumerate(run_distributed(check_patch_against_stock, world_size, k)):
        bytes_stock, bytes_lsh, calls = report.pop("bytes")
        assert all(report.values()), (rank, failed(report))
        if world_size == 2:
            # fwd + bwd cross the network twice each; centroids are ceil(0.25 * C) of C slots per expert
            assert calls == 4 and bytes_lsh <= 0.3 * bytes_stock, (rank, bytes_lsh, bytes_stock)
        else:
            assert calls == 0 and bytes_stock == 0  # ep_size 1: DeepSpeed makes no all-to-all at all


def check_dtypes_and_layers(rank, world_size):
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in (1, 2):
            moe = build_moe(world_size, k).to(dtype)
            lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.2}}, moe)
            out, gx, grads = fwd_bwd(moe, torch.randn(2, 24, D_MODEL), dtype)
            results[f"{dtype}-top{k}"] = (out.dtype == dtype and torch.isfinite(gx.float()).all().item()
                                         and gx.abs().sum().item() > 0
                                         and all(torch.isfinite(g.float()).all() for g in grads if g is not None))
            lshmoe_plugin.disable()
    # `layers` picks MoE layers by their index in module order; others run the stock forward.
    model = torch.nn.ModuleList([build_moe(world_size, 2, seed=s) for s in (0, 1)])
    x = torch.randn(2, 24, D_MODEL)
    stock = [fwd_bwd(m, x) for m in model]
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.2, "layers": [1]}},
                         model)
    results["layer0_untouched"] = same(stock[0], fwd_bwd(model[0], x))
    results["layer1_compressed"] = not torch.equal(stock[1][0], fwd_bwd(model[1], x)[0])
    results["telemetry_only_layer1"] = sorted(lshmoe_plugin.TELEMETRY.latest) == [1]
    lshmoe_plugin.disable()
    return results


def test_gradients_flow_for_every_dtype_and_gating_on_two_ranks():
    for rank, results in enumerate(run_distributed(check_dtypes_and_layers, 2)):
        assert all(results.values()), (rank, failed(results))


def check_unsupported(rank, world_size):
    import deepspeed
    from deepspeed.moe.layer import MoE
    messages = []
    moe = MoE(D_MODEL, torch.nn.Linear(D_MODEL, D_MODEL), num_experts=2, ep_size=1, use_tutel=True)
    moe.deepspeed_moe.use_tutel = True  # as if Tutel were installed
    for attempt in (lambda: lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper"}}, moe),):
        try:
            attempt()
        except Exception as err:  # noqa: BLE001
            messages.append(str(err))
    real_version = deepspeed.__version__
    deepspeed.__version__ = "0.18.4"
    try:
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper"}})
    except Exception as err:  # noqa: BLE001
        messages.append(str(err))
    finally:
        deepspeed.__version__ = real_version
    messages.append(str(deepspeed_moe.is_applied()))
    return messages


def test_unsupported_layouts_and_versions_fail_loudly():
    [messages] = run_distributed(check_unsupported, 1)
    assert "use_tutel=True" in messages[0] and "allowed: use_tutel=False" in messages[0]
    assert messages[1] == "lshmoe-plugin supports deepspeed 0.19.x; found deepspeed 0.18.4"
    assert messages[2] == "False"


class MoENet(torch.nn.Module):
    def __init__(self, world_size):
        super().__init__()
        self.moe = build_moe(world_size, 2, make_groups=False)
        self.head = torch.nn.Linear(D_MODEL, 1)

    def forward(self, x):
        out, l_aux, _ = self.moe(x)
        return self.head(out).square().mean() + l_aux


def train_with_csv_monitor(world_size, out_dir, lsh_moe, steps=3):
    """`steps` engine steps of a one-MoE-layer net, LSH on, DeepSpeed's csv monitor writing into `out_dir`/lsh."""
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": "lsh"},
              "lsh_moe": paper_block({"enabled": True, "compression_rate": 0.25, **lsh_moe})}
    net = MoENet(world_size)
    lshmoe_plugin.enable(config, net)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    for _ in range(steps):
        loss = engine(torch.randn(2, 24, D_MODEL))
        engine.backward(loss)
        engine.step()


def check_monitor(rank, world_size, out_dir):
    train_with_csv_monitor(world_size, out_dir, {"telemetry_interval": 1})
    lshmoe_plugin.disable()
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "lsh", "*.csv")))


def test_telemetry_is_written_through_deepspeeds_monitor(tmp_path):
    [files] = run_distributed(check_monitor, 1, str(tmp_path))
    assert "lsh_moe_layer0_bytes_ratio.csv" in files, files
    path = glob.glob(os.path.join(str(tmp_path), "lsh", "*layer0*bytes_ratio*.csv"))[0]
    rows = list(csv.reader(open(path)))
    assert len(rows) >= 3 and float(rows[-1][1]) == pytest.approx(0.25, abs=0.05)
    residual = glob.glob(os.path.join(str(tmp_path), "lsh", "*layer0*relative_residual_norm*.csv"))[0]
    assert 0 < float(list(csv.reader(open(residual)))[-1][1]) < 2


def check_decision_is_visible(rank, world_size, out_dir):
    """A layer that decides on stock says so: in TELEMETRY, in DeepSpeed's monitor, and in one WARNING."""
    import logging

    from lshmoe_plugin import cost

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append((record.levelno, record.getMessage()))

    handler, logger = Records(), logging.getLogger("lshmoe_plugin")
    logger.addHandler(handler)
    measure = cost.measure
    cost.measure = lambda *a, **k: (1.0, 2.0)  # stock measured faster, as on a fast link
    try:
        train_with_csv_monitor(world_size, out_dir, {"decide_by_cost": True})
        summary = lshmoe_plugin.TELEMETRY.summary()
    finally:
        cost.measure = measure
        logger.removeHandler(handler)
        lshmoe_plugin.disable()
    warnings = [message for level, message in handler.records if level == logging.WARNING]
    csv_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "lsh", "*.csv")))
    return summary, warnings, csv_files


def test_a_layer_that_decides_on_stock_is_visible_in_telemetry_monitor_and_log(tmp_path):
    [(summary, warnings, files)] = run_distributed(check_decision_is_visible, 1, str(tmp_path))
    assert summary["lsh_moe/layer0/compressed"] == 0.0
    assert summary["lsh_moe/layer0/stock_exchange_ms"] == 1.0
    assert summary["lsh_moe/layer0/compressed_exchange_ms"] == 2.0
    assert "lsh_moe/layer0/bytes_ratio" not in summary  # it runs stock: nothing compressed to report
    assert len(warnings) == 1, warnings  # once, after the first step, although three steps ran
    assert "1 of 1 layer(s) run stock, where compressing measured slower" in warnings[0]
    assert "layer 0 stock (stock 1.00 ms vs compressed 2.00 ms)" in warnings[0]
    assert {"lsh_moe_layer0_compressed.csv", "lsh_moe_layer0_stock_exchange_ms.csv"} <= set(files), files
    rows = list(csv.reader(open(os.path.join(str(tmp_path), "lsh", "lsh_moe_layer0_compressed.csv"))))
    assert len(rows) >= 3 and float(rows[-1][1]) == 0.0


def check_decide_by_cost(rank, world_size):
    """Real timing on every rank: one decision per layer, shared by the ranks, and each branch behaves."""
    from lshmoe_plugin import cost
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 24, D_MODEL)
    moe = build_moe(world_size, 2)
    stock = fwd_bwd(moe, x)
    config = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25, "decide_by_cost": True}}
    lshmoe_plugin.enable(config, moe)
    calls = []
    measure = cost.measure

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)
    cost.measure = counted
    try:
        first = fwd_bwd(moe, x)
        second = fwd_bwd(moe, x)
    finally:
        cost.measure = measure
    pays = moe.deepspeed_moe._lshmoe_compressor.pays
    decisions = [None] * world_size
    torch.distributed.all_gather_object(decisions, pays)
    result = {"measured_once": len(calls) == 1, "ranks_agree": len(set(decisions)) == 1,
              # the measurement leaves the step itself untouched: same result as a step without it
              "steps_consistent": same(first, second)}
    if pays:
        result["compressed_when_it_pays"] = not torch.equal(first[0], stock[0])
    else:
        result["stock_when_it_does_not"] = same(first, stock)
    # Each branch, with the decision fixed (as a measurement on a slow or a fast link would give).
    for forced in (False, True):
        lshmoe_plugin.enable({"lsh_moe": {**config["lsh_moe"], "seed": 2 + forced}}, moe)
        cost.measure = lambda *a, **k: (1.0, 2.0) if not forced else (2.0, 1.0)
        try:
            out = fwd_bwd(moe, x)
        finally:
            cost.measure = measure
        result[f"forced_{forced}"] = (not same(out, stock)) if forced else same(out, stock)
        result[f"forced_{forced}_recorded"] = lshmoe_plugin.TELEMETRY.summary()["lsh_moe/layer0/compressed"] == forced
    lshmoe_plugin.disable()
    return result


@pytest.mark.parametrize("world_size", [1, 2])
def test_decide_by_cost_measures_once_and_ranks_agree(world_size):
    for rank, result in enumerate(run_distributed(check_decide_by_cost, world_size)):
        assert all(result.values()), (rank, failed(result))


def eval_output(moe, x):
    """Output of one eval-mode forward without gradients, as `evaluate` runs it."""
    moe.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        out = moe(x)[0]
    moe.train()
    return out


def check_compressed_eval(rank, world_size):
    """`compress_in_eval` switched on and off (by `compressed_eval()` and by swapping the config) keeps every layer's
    compressor, projections and cost decision; evaluation never measures; an undecided layer evaluates stock."""
    import dataclasses

    from lshmoe_plugin import cost
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 24, D_MODEL)
    measure, calls, result = cost.measure, [], {}
    variants = {"without_decide_by_cost": None, "decided_compressed": (2.0, 1.0), "decided_stock": (1.0, 2.0)}
    try:
        for name, times in variants.items():
            moe = build_moe(world_size, 2)
            stock_eval = eval_output(moe, x)
            config = lshmoe_plugin.LSHMoEConfig(enabled=True, method="paper", compression_rate=0.25,
                                                decide_by_cost=times is not None)
            lshmoe_plugin.enable(config, moe)
            calls.clear()
            cost.measure = lambda *a, times=times, **k: calls.append(1) or times
            with lshmoe_plugin.compressed_eval():
                before_training = eval_output(moe, x)
            result[f"{name}_undecided_eval"] = (torch.equal(before_training, stock_eval) and not calls
                                                if times else not torch.equal(before_training, stock_eval))
            fwd_bwd(moe, x)  # the first training step decides
            compressor = moe.deepspeed_moe._lshmoe_compressor
            projections = dict(compressor._projections)
            with lshmoe_plugin.compressed_eval():
                by_context = eval_output(moe, x)
            lshmoe_plugin.enable(dataclasses.replace(config, compress_in_eval=True), moe)
            by_config = eval_output(moe, x)
            lshmoe_plugin.enable(config, moe)
            exact = eval_output(moe, x)
            fwd_bwd(moe, x)
            kept = moe.deepspeed_moe._lshmoe_compressor
            compresses = times != (1.0, 2.0)
            result[f"{name}_kept"] = (kept is compressor and kept.pays == (compresses if times else None)
                                      and all(kept._projections[k] is v for k, v in projections.items())
                                      and len(calls) == (1 if times else 0))
            result[f"{name}_compressed_eval"] = (torch.equal(by_context, by_config)
                                                 and torch.equal(by_context, stock_eval) != compresses)
            result[f"{name}_exact_eval_after"] = torch.equal(exact, stock_eval)
            recorded = lshmoe_plugin.TELEMETRY.decisions.get(0)  # switching did not clear it either
            result[f"{name}_decision_still_recorded"] = (recorded is not None and recorded.compressed == compresses
                                                         if times else recorded is None)
            lshmoe_plugin.disable()
    finally:
        cost.measure = measure
        lshmoe_plugin.disable()
    result.update(check_training_forward_without_grad_decides(world_size, x))
    return result


def check_training_forward_without_grad_decides(world_size, x):
    """A training-mode forward under no_grad (reentrant activation checkpointing's first pass) measures with
    autograd on for the trial, so its recomputation with gradients takes the same branch."""
    from lshmoe_plugin import cost
    moe = build_moe(world_size, 2)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "decide_by_cost": True}}, moe)
    measure, calls = cost.measure, []
    cost.measure = lambda *a, **k: calls.append(1) or measure(*a, **k)
    try:
        torch.manual_seed(7)
        with torch.no_grad():
            first = moe(x)[0]
        pays = moe.deepspeed_moe._lshmoe_compressor.pays
        torch.manual_seed(7)
        again = moe(x)[0]
    finally:
        cost.measure = measure
        lshmoe_plugin.disable()
    return {"no_grad_training_forward_decided": pays is not None and len(calls) == 1,
            "no_grad_training_forward_is_what_grad_recomputes": torch.equal(first, again)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_compressed_eval_keeps_each_layers_decision_and_never_measures(world_size):
    for rank, result in enumerate(run_distributed(check_compressed_eval, world_size)):
        assert all(result.values()), (rank, failed(result))


def test_monitor_hook_stays_while_any_deepspeed_patch_is_applied():
    from deepspeed.runtime.engine import DeepSpeedEngine

    from lshmoe_plugin.patches import deepspeed_autoep
    names = ("step", "forward", "save_checkpoint", "load_checkpoint")
    stock = [getattr(DeepSpeedEngine, name) for name in names]

    def hooked():
        return [getattr(DeepSpeedEngine, name) is not original for name, original in zip(names, stock)]
    config = lshmoe_plugin.LSHMoEConfig(enabled=True, method="paper")
    try:
        lshmoe_plugin.enable(config)
        lshmoe_plugin.enable(config, framework="autoep")
        assert all(hooked())
        lshmoe_plugin.disable()
        # AutoEP still writes its telemetry, keeps the clock and checkpoints its state
        assert all(hooked())
        assert deepspeed_autoep.is_applied() and not deepspeed_moe.is_applied()
    finally:
        lshmoe_plugin.disable()
        lshmoe_plugin.disable("autoep")
    assert not any(hooked())
