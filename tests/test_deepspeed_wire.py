"""The wire formats (lsh_moe dispatch/combine dtypes) on DeepSpeed's real MoE layer, in 1 and 2 real gloo processes:
the model's dtype changes nothing; FP8 (float32 or e8m0 scales) and FP4 equal a hand-built reference (DeepSpeed's
stages with every crossing rounded to the format's grid), gradients pass straight through and cross back in their
own format, and the all-to-all really moves uint8 buffers of values and scales whose bytes the telemetry counts."""
import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import D_MODEL, build_distinct_shift_experts, build_moe, failed, fwd_bwd, same
from wire_helpers import BLOCK, CASES, Draws, GradRound, RoundTrip, row_bytes, with_blocks

import lshmoe_plugin
from lshmoe_plugin import LSHMoEConfig, wire
from lshmoe_plugin.compressor import fixed_slots

FP8_ROW_BYTES = row_bytes("fp8", D_MODEL)
FP32_ROW_BYTES = row_bytes(None, D_MODEL)


class AllToAlls:
    """(dtype, bytes) of every buffer handed to the real all-to-all, in call order (the call itself still runs)."""

    def __init__(self):
        import deepspeed.comm as dist
        self.dist, self.original, self.calls = dist, dist.all_to_all_single, []

    def __enter__(self):
        def counting(output, tensor, *args, **kwargs):
            self.calls.append((tensor.dtype, tensor.numel() * tensor.element_size()))
            return self.original(output, tensor, *args, **kwargs)
        self.dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_to_all_single = self.original


def reference_fwd_bwd(moe, x, dispatch=(None, None), combine=(None, None), draws=None):
    """`fwd_bwd` of DeepSpeed's MOELayer rebuilt from its own stages (gate, _sparse_encode, _AllToAll, experts,
    _sparse_decode) with the crossings coded by `RoundTrip` (forward kind) and `GradRound` (backward kind, after
    the all-to-all: on the rank that sends the gradient back, in its buffer), a stochastic backward kind drawing
    from `draws` (a wire_helpers.Draws); also the capacity."""
    from deepspeed.moe import sharded_moe as sm
    layer = moe.deepspeed_moe
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1234)
    tokens = x.reshape(-1, D_MODEL)
    l_aux, C, E, indices, locations, gates, _ = layer.gate(tokens, None, True, False)
    C = int(C)
    slots = sm._route_slots(indices, locations, E, C)

    def all_to_all(t):
        return sm._AllToAll.apply(layer.ep_group, t) if layer.ep_size > 1 else t.contiguous()
    def crossing(rows, kinds):
        return GradRound.apply(all_to_all(RoundTrip.apply(rows, kinds[0], None)), kinds[1], draws)
    received = crossing(sm._sparse_encode(tokens, slots, E, C), dispatch)
    out = layer.experts(received.reshape(layer.ep_size, layer.num_local_experts, -1, D_MODEL))
    out = crossing(out.reshape(E, -1, D_MODEL), combine)
    y = sm._sparse_decode(out.view(E * C, D_MODEL), slots, gates, tokens.shape[0]).reshape(x.shape)
    (y.float().square().mean() + l_aux).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in moe.parameters()]
    return (y.detach(), x.grad.detach(), grads), E, C


def crossing_bytes(kinds, rows):
    """Expected (dtype, bytes) of the four crossings (dispatch, combine, combine's grad, dispatch's grad)."""
    return [(torch.float32 if kind is None else torch.uint8, rows * row_bytes(kind, D_MODEL)) for kind in kinds]


# wire_helpers.CASES, and two that only DeepSpeed's layer runs: lsh_moe keys, and what each of the four crossings
# (dispatch, combine, combine's grad, dispatch's grad) carries (None: the model's dtype)
DS_CASES = {**CASES,
            "fp8_dispatch_model_grad": ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model"},
                                        ("fp8", None, None, None)),
            "fp8_combine_grad_only": ({"combine_grad_dtype": "fp8_e4m3"}, (None, None, "fp8", None))}
# What `"enabled": true` alone sends (lshmoe_plugin.methods.DEFAULT_METHOD, fp6_fwd_fp4sr_grad): this case's keys,
# its FP4 gradients rounded stochastically.
DEFAULT_CASE = "fp6_forward_fp4_grads"
DEFAULT_KINDS = ("fp6", "fp6", "fp4_sr", "fp4_sr")


def draws_before(block, kinds, device):
    """A `Draws` started at the plugin's counters (on `device`) of the stochastic backward formats that `block`
    trains with, as the plugin's next encodes will draw from them; {} where none rounds stochastically."""
    config = LSHMoEConfig.from_dict(block, env={})
    start = {}
    for crossing, kind in (("dispatch", kinds[3]), ("combine", kinds[2])):
        backward = wire.formats(config, crossing)[1]
        if kind is not None and kind.endswith("_sr") and backward.draws is not None:
            start[kind] = int(backward.draws.counter(device).item())
    return Draws(start)


def counters_after(block, kinds, device):
    """{kind: the plugin's counter now} of `block`'s stochastic backward formats."""
    config = LSHMoEConfig.from_dict(block, env={})
    return {kind: int(wire.formats(config, crossing)[1].draws.counter(device).item())
            for crossing, kind in (("dispatch", kinds[3]), ("combine", kinds[2]))
            if kind is not None and kind.endswith("_sr") and wire.formats(config, crossing)[1].draws is not None}


def check_wire_formats(rank, world_size, device="cpu"):
    torch.manual_seed(100 + rank)
    x = (torch.randn(2, 24, D_MODEL) * torch.exp(torch.randn(2, 24, 1))).to(device)  # rows of different magnitudes
    report = {}
    for k in (1, 2):
        moe = build_moe(world_size, k).to(device)
        with AllToAlls() as stock_calls:
            stock = fwd_bwd(moe, x)
        # clustering none in the model's dtype: the patched path with nothing changed is stock, bit for bit
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "clustering": "none"}}, moe)
        with AllToAlls() as calls:
            report[f"top{k}_none_model_is_stock"] = same(stock, fwd_bwd(moe, x))
        report[f"top{k}_none_model_same_all_to_alls"] = calls.calls == stock_calls.calls
        # the model's dtype spelled out changes nothing in the compressed layer either
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}, moe)
        lsh = fwd_bwd(moe, x)
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "dispatch_dtype": "model",
                                          "combine_dtype": "model", "dispatch_grad_dtype": "model",
                                          "combine_grad_dtype": "model"}}, moe)
        report[f"top{k}_lsh_model_keys_change_nothing"] = same(lsh, fwd_bwd(moe, x))
        lshmoe_plugin.disable()

        blocks = {name: ({"enabled": True, "clustering": "none", **with_blocks(keys)}, kinds)
                  for name, (keys, kinds) in DS_CASES.items()}
        # the default method: no stage key given, only the block sizes of the formats it sends; its gradients
        # round stochastically, so the reference draws the bits the plugin's counters draw next
        keys, _ = DS_CASES[DEFAULT_CASE]
        sizes = {key: value for key, value in with_blocks(keys).items() if key not in keys}
        blocks["default"] = ({"enabled": True, **sizes}, DEFAULT_KINDS)
        # grad_rounding nearest alone adjusts the default: its crossings, its gradients rounded to nearest
        blocks["default_nearest_grads"] = ({"enabled": True, "grad_rounding": "nearest", **sizes},
                                           DS_CASES[DEFAULT_CASE][1])
        # a backward stage key alone adjusts the default: the dispatch gradient back in FP8, the combine's in FP4,
        # both rounded stochastically (two formats, a counter each)
        blocks["default_fp8_dispatch_grad"] = ({"enabled": True, "dispatch_grad_dtype": "fp8_e4m3", **sizes,
                                                "fp8_block_size": BLOCK}, ("fp6", "fp6", "fp4_sr", "fp8_sr"))
        for name, (block, kinds) in blocks.items():
            dispatch, combine = (kinds[0], kinds[3]), (kinds[1], kinds[2])  # (forward, backward) of each crossing
            draws = draws_before(block, kinds, x.device)
            expected, E, C = reference_fwd_bwd(moe, x, dispatch, combine, draws)
            lshmoe_plugin.enable({"lsh_moe": block}, moe)
            with AllToAlls() as calls:
                got = fwd_bwd(moe, x)
            stats = lshmoe_plugin.TELEMETRY.latest[0]
            lshmoe_plugin.disable()
            report[f"top{k}_{name}_equals_reference"] = same(expected, got)
            # each stochastic format drew once per gradient it sent back, as the reference did
            report[f"top{k}_{name}_draws"] = counters_after(block, kinds, x.device) == draws.next and \
                len(draws.next) == len({kind for kind in kinds[2:] if kind and kind.endswith("_sr")})
            report[f"top{k}_{name}_differs_from_stock"] = not same(stock, got)
            crossings = crossing_bytes(kinds, E * C)
            # EP=1 crosses no network (DeepSpeed makes no all-to-all), and the wire format applies all the same
            report[f"top{k}_{name}_all_to_alls"] = calls.calls == (crossings if world_size > 1 else [])
            report[f"top{k}_{name}_telemetry_bytes"] = (
                stats.bytes_sent == sum(b for _, b in crossings) / 4
                and stats.bytes_uncompressed == E * C * FP32_ROW_BYTES
                and stats.as_floats()["compression_rate"] == 1.0)
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_wire_formats_without_clustering_equal_the_reference_and_send_uint8(world_size):
    for rank, report in enumerate(run_distributed(check_wire_formats, world_size)):
        assert all(report.values()), (rank, failed(report))


def check_lsh_with_fp8(rank, world_size, device="cpu"):
    """LSH at rate 0.25 with FP8 centroids. Experts E(x) = x + b of their own, error compensation on: a token
    gets E(Q(c)) + x - c = x + b + (Q(c) - c), the layer without FP8 x + b, so the two differ by the gate-weighted
    rounding of the centroids, at most 2^-4 of the largest centroid magnitude of a block, which no token exceeds."""
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 24, D_MODEL).to(device)
    report = {}
    for k in (1, 2):
        moe = build_distinct_shift_experts(rank, world_size, k).to(device)
        # spread beside a stage key below, so no method: the stage keys left out take the paper's values
        lsh_keys = {"enabled": True, "compression_rate": 0.25, "fp8_block_size": BLOCK}
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}, moe)
        exact = fwd_bwd(moe, x)
        lshmoe_plugin.enable({"lsh_moe": {**lsh_keys, "dispatch_dtype": "fp8_e4m3"}}, moe)
        with AllToAlls() as calls:
            fp8 = fwd_bwd(moe, x)
        stats = lshmoe_plugin.TELEMETRY.latest[0]
        difference = (fp8[0] - exact[0]).abs()
        report[f"top{k}_fp8_centroids_move_the_output"] = bool(difference.max() > 0)
        report[f"top{k}_within_the_rounding_of_the_centroids"] = bool(
            (difference <= 2.0**-4 * x.abs().max() * (1 + 1e-5)).all())
        report[f"top{k}_grads_finite"] = all(torch.isfinite(g).all() for g in fp8[2] if g is not None)
        rows = 4 * fixed_slots(int(stats.bytes_uncompressed) // (4 * FP32_ROW_BYTES), 0.25)  # 4 experts
        crossings = crossing_bytes(("fp8", None, None, "fp8"), rows)
        report[f"top{k}_centroids_cross_as_uint8"] = calls.calls == (crossings if world_size > 1 else [])
        report[f"top{k}_telemetry_bytes"] = stats.bytes_sent == sum(b for _, b in crossings) / 4

        lshmoe_plugin.enable({"lsh_moe": {**lsh_keys, "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                                          "exact_token_stride": 4}}, moe)
        with AllToAlls() as calls:
            fwd_bwd(moe, x)
        stats = lshmoe_plugin.TELEMETRY.latest[0]
        capacity = int(stats.bytes_uncompressed) // (4 * FP32_ROW_BYTES)
        sample_rows = 4 * len(range(0, capacity, 4)) if capacity else 0  # the rotation starts at slot 0
        report[f"top{k}_exact_tokens_cross_in_fp8_too"] = (
            all(dtype == torch.uint8 for dtype, _ in calls.calls) and len(calls.calls) == (8 if world_size > 1 else 0)
            and stats.bytes_sent == (rows + sample_rows) * FP8_ROW_BYTES)

        # a bf16 layer: values and gradients keep the model's dtype
        bf16 = build_moe(world_size, k).to(device, torch.bfloat16)
        lshmoe_plugin.enable({"lsh_moe": {**lsh_keys, "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}},
                             bf16)
        out, gx, grads = fwd_bwd(bf16, x, torch.bfloat16)
        report[f"top{k}_bf16_layer"] = (out.dtype == gx.dtype == torch.bfloat16 and bool(torch.isfinite(gx).all())
                                        and all(torch.isfinite(g.float()).all() for g in grads if g is not None))
        lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_lsh_with_fp8_centroids(world_size):
    for rank, report in enumerate(run_distributed(check_lsh_with_fp8, world_size)):
        assert all(report.values()), (rank, failed(report))


def check_fp8_decides_by_cost_and_evaluates_stock(rank, world_size, device="cpu"):
    moe = build_moe(world_size, 2).to(device)
    x = torch.randn(2, 24, D_MODEL).to(device)
    moe.eval()
    torch.manual_seed(7)
    stock_eval = moe(x)[0]
    moe.train()
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "clustering": "none", "dispatch_dtype": "fp8_e4m3",
                                      "decide_by_cost": True}}, moe)
    fwd_bwd(moe, x)
    decision = lshmoe_plugin.TELEMETRY.decisions.get(0)
    moe.eval()
    torch.manual_seed(7)
    evaluated = moe(x)[0]
    lshmoe_plugin.disable()
    return {"decided": decision is not None and decision.stock_ms > 0 and decision.compressed_ms > 0,
            "eval_is_stock": torch.equal(evaluated, stock_eval)}


def test_fp8_alone_decides_by_cost_and_evaluates_stock():
    for rank, report in enumerate(run_distributed(check_fp8_decides_by_cost_and_evaluates_stock, 2)):
        assert all(report.values()), (rank, failed(report))


def check_stochastic_grad_rounding(rank, world_size, device="cpu"):
    """FP4 both ways with grad_rounding stochastic: the forward is nearest's bit for bit, the gradients are finite
    and differ from nearest's (and from one step to the next: fresh draws), and the same uint8 buffers cross."""
    torch.manual_seed(100 + rank)
    x = (torch.randn(2, 24, D_MODEL) * torch.exp(torch.randn(2, 24, 1))).to(device)
    moe = build_moe(world_size, 2).to(device)
    keys = {"enabled": True, "clustering": "none", **with_blocks(CASES["fp4_both"][0])}
    lshmoe_plugin.enable({"lsh_moe": keys}, moe)
    with AllToAlls() as nearest_calls:
        nearest = fwd_bwd(moe, x)
    lshmoe_plugin.enable({"lsh_moe": {**keys, "grad_rounding": "stochastic"}}, moe)
    with AllToAlls() as calls:
        first = fwd_bwd(moe, x)
    second = fwd_bwd(moe, x)
    lshmoe_plugin.disable()
    grads = [g for g in first[2] if g is not None]
    return {"forward_is_nearests": torch.equal(first[0], nearest[0]),
            "grads_finite": bool(torch.isfinite(first[1]).all()) and all(torch.isfinite(g).all() for g in grads),
            "input_grad_differs_from_nearests": not torch.equal(first[1], nearest[1]),
            "expert_grads_differ_from_nearests": not same(nearest, (nearest[0], nearest[1], first[2])),
            "fresh_draws_each_step": not torch.equal(first[1], second[1]),
            "same_buffers_cross": calls.calls == nearest_calls.calls}


def test_stochastic_grad_rounding_trains_through_deepspeeds_layer():
    for rank, report in enumerate(run_distributed(check_stochastic_grad_rounding, 2)):
        assert all(report.values()), (rank, failed(report))
