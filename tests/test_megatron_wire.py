"""The wire formats on Megatron-core's all-to-all dispatcher (1 and 2 real gloo processes): the model's dtype without
clustering is stock, bit for bit; FP8 (float32 or e8m0 scales) and FP4 give a layer of identity experts exactly the
format's rounding of its tokens, weighted by their routing probabilities, and an input gradient whose routed rows
come back rounded in the backward's format; every crossing, forward and backward, moves uint8 buffers of values and
scales along its own (backward: the transposed) split sizes, and the telemetry counts those bytes."""
import megatron.core  # noqa: F401  (installed by the README's [test] extra)
import pytest
import torch
from distributed import run_distributed
from megatron_helpers import BATCH, HIDDEN, SEQ, ScaledIdentityExperts, bit_identical, build_layer, enabled, fwd_bwd
from wire_helpers import BLOCK, CASES, DISPATCH_CASES, RoundTrip, TokenCrossings, crossing, row_bytes, with_blocks

from lshmoe_plugin.patches import megatron_dispatcher

FP8_ROW_BYTES = row_bytes("fp8", HIDDEN)


def scenarios(rank, world_size):
    from megatron.core import parallel_state

    from lshmoe_plugin.patches import megatron_compat
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    try:
        return _scenarios(rank, world_size, torch.device("cpu"))
    finally:
        megatron_dispatcher.revert()
        parallel_state.destroy_model_parallel()


def _scenarios(rank, world_size, device):
    from lshmoe_plugin.telemetry import TELEMETRY
    torch.manual_seed(100 + rank)
    x = (torch.randn(SEQ, BATCH, HIDDEN) * torch.exp(torch.randn(SEQ, BATCH, 1))).to(device)
    layer = build_layer(world_size).to(device)
    with TokenCrossings(torch.distributed) as stock_calls:
        stock = fwd_bwd(layer, x)
    out = {}
    megatron_dispatcher.apply(enabled(clustering="none"), layer)
    with TokenCrossings(torch.distributed) as calls:
        out["none_model_identical"] = bit_identical(stock, fwd_bwd(layer, x))
    out["none_model_same_crossings"] = calls.calls == stock_calls.calls
    for name, (keys, _) in CASES.items():
        megatron_dispatcher.apply(enabled(clustering="none", **with_blocks(keys)))
        TELEMETRY.clear()
        with TokenCrossings(torch.distributed) as calls:
            got = fwd_bwd(layer, x)
        out[name] = {"differs": not bit_identical(stock, got), "calls": calls.calls,
                     "telemetry_sent": sum(s.bytes_sent for s in TELEMETRY.latest.values()),
                     "grads_finite": all(bool(torch.isfinite(g).all()) for g in got[2])}
    megatron_dispatcher.apply(enabled(compression_rate=0.25, dispatch_dtype="fp8_e4m3", combine_dtype="fp8_e4m3",
                                      fp8_block_size=BLOCK))
    TELEMETRY.clear()
    with TokenCrossings(torch.distributed) as calls:
        fwd_bwd(layer, x)
    [stats] = TELEMETRY.latest.values()
    out["lsh_fp8"] = {"calls": calls.calls, "telemetry_sent": stats.bytes_sent, "clusters": int(stats.clusters)}
    megatron_dispatcher.revert()
    out["identity_layer"] = {name: identity_layer_is_the_rounding_of_its_tokens(world_size, device, x, *case)
                             for name, case in DISPATCH_CASES.items()}
    return out


def identity_layer_is_the_rounding_of_its_tokens(world_size, device, x, keys, kinds):
    """Identity experts (output = probability * row), the dispatch coded per `keys` (its forward and backward
    `kinds`): each token comes back as the rounding of itself times the sum of its routing probabilities, and its
    gradient reaches the input rounded in the backward's format, route by route. Compared with the layer rebuilt
    around the same router (`reference`), and with the unrounded rows and gradients, which it must not be."""
    layer = build_layer(world_size).to(device)
    layer.experts = ScaledIdentityExperts()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(60)).to(device)  # gradients differ per row
    hidden = x.detach().requires_grad_()
    megatron_dispatcher.apply(enabled(clustering="none", **with_blocks(keys)), layer)
    got = layer(hidden)[0]
    (got * probe).sum().backward()
    megatron_dispatcher.revert()
    got, grad = got.detach().reshape(-1, HIDDEN).float(), hidden.grad.reshape(-1, HIDDEN)
    expected, expected_grad = reference(layer, x, probe, *kinds)
    unrounded, unrounded_grad = reference(layer, x, probe, None, None)
    atol = 1e-6 * expected_grad.abs().max()  # the sums' order
    return {"matches": torch.allclose(got, expected, rtol=1e-6, atol=0),
            "not_the_unrounded_tokens": not torch.allclose(got, unrounded, rtol=1e-3, atol=0),
            "grad_matches": torch.allclose(grad, expected_grad, rtol=1e-5, atol=atol),
            "grad_not_unrounded": not torch.allclose(grad, unrounded_grad, rtol=1e-3, atol=100 * atol)}


def reference(layer, x, probe, forward, backward):
    """(output, input gradient), (tokens, HIDDEN), of an identity-expert layer whose routed rows cross rounded in
    `forward`, their gradients in `backward` (wire_helpers.RoundTrip; None: as they are), one route at a time."""
    x = x.detach().requires_grad_()
    probs, routing_map = layer.router(x)
    probs, routing_map = probs.reshape(-1, probs.shape[-1]), routing_map.reshape(-1, probs.shape[-1])
    tokens = x.reshape(-1, HIDDEN)
    out = sum(torch.where(routing_map[:, e:e + 1], probs[:, e:e + 1] * RoundTrip.apply(tokens, forward, backward), 0)
              for e in range(probs.shape[-1]))
    (out * probe.reshape(-1, HIDDEN)).sum().backward()
    return out.detach(), x.grad.reshape(-1, HIDDEN)


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_model_dtype_without_clustering_is_stock(results):
    for r in results[1]:
        assert r["none_model_identical"] and r["none_model_same_crossings"], r


@pytest.mark.parametrize("case", sorted(DISPATCH_CASES))
def test_identity_layer_returns_the_rounding_of_its_tokens_and_gradients(results, case):
    for r in results[1]:
        result = r["identity_layer"][case]
        assert result["matches"] and result["not_the_unrounded_tokens"], result
        assert result["grad_matches"] and result["grad_not_unrounded"], result


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_crossing_moves_its_format_along_its_splits_and_is_counted(results, case):
    world_size, per_rank = results
    kinds = CASES[case][1]
    for r in per_rank:
        assert r[case]["differs"] and r[case]["grads_finite"]
        if world_size == 1:  # one rank: nothing crosses the network, and the rounding applies all the same
            assert r[case]["calls"] == []
            continue
        dispatch, combine, combine_grad, dispatch_grad = calls = r[case]["calls"]
        for (dtype, rows, nbytes), kind in zip(calls, kinds):
            assert (dtype, nbytes) == crossing(kind, rows, HIDDEN), (case, calls)
        # the gradient crosses back along the transposed splits: as many rows as its forward received
        assert combine_grad[1] == dispatch[1] and dispatch_grad[1] == combine[1]
    if world_size == 2:  # every row a rank sends, another receives: over the ranks the four crossings add up
        total = sum(nbytes for r in per_rank for _, _, nbytes in r[case]["calls"])
        assert total == 4 * sum(r[case]["telemetry_sent"] for r in per_rank)


def test_lsh_centroids_cross_in_fp8(results):
    world_size, per_rank = results
    for r in per_rank:
        lsh = r["lsh_fp8"]
        assert lsh["telemetry_sent"] == lsh["clusters"] * FP8_ROW_BYTES
        assert all(dtype == "torch.uint8" and nbytes == rows * FP8_ROW_BYTES for dtype, rows, nbytes in lsh["calls"])
        assert len(lsh["calls"]) == (4 if world_size == 2 else 0)
    if world_size == 2:
        assert sum(n for r in per_rank for _, _, n in r["lsh_fp8"]["calls"]) == \
            4 * sum(r["lsh_fp8"]["telemetry_sent"] for r in per_rank)
