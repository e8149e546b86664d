"""The wire formats on DeepSpeed AutoEP's variable-size all-to-all (a tiny HF Mixtral, 1 and 2 real gloo processes):
the model's dtype without clustering is the stock exchange; FP8 (float32 or e8m0 scales) and FP4 give a layer with
identity experts exactly the format's rounding of its routed rows, and an input gradient whose routed rows come
back rounded in the backward's format (rounding per row commutes with the all-to-all, which only moves rows); every
crossing, forward and backward, moves uint8 buffers of values and scales along its own (or, backward, the
transposed) split sizes, and the telemetry counts those bytes."""
import deepspeed.comm
import pytest
import torch
from distributed import run_distributed
from test_autoep_patch import HIDDEN, IdentityExperts, autoep_layers, bit_identical, build_model, enabled, fwd_bwd
from wire_helpers import BLOCK, CASES, DISPATCH_CASES, RoundTrip, TokenCrossings, crossing, row_bytes, with_blocks

from lshmoe_plugin.patches import deepspeed_autoep

FP8_ROW_BYTES = row_bytes("fp8", HIDDEN)


def scenarios(rank, world_size):
    try:
        return _scenarios(rank, world_size)
    finally:
        deepspeed_autoep.revert()


def _scenarios(rank, world_size):
    from lshmoe_plugin.telemetry import TELEMETRY
    model = build_model(world_size)
    device = next(model.parameters()).device
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank)).to(device)
    deepspeed_autoep.revert()
    with TokenCrossings(deepspeed.comm) as stock_calls:
        stock = fwd_bwd(model, ids)
    out = {}
    deepspeed_autoep.apply(enabled(clustering="none"), model)
    with TokenCrossings(deepspeed.comm) as calls:
        none = fwd_bwd(model, ids)
    out["none_model_diff"] = max((a - b).abs().max().item() for a, b in [(stock[0], none[0])] + list(zip(stock[1],
                                                                                                      none[1])))
    out["none_model_same_crossings"] = calls.calls == stock_calls.calls
    deepspeed_autoep.apply(enabled(clustering="none", dispatch_dtype="model", combine_dtype="model"))
    out["none_model_keys_change_nothing"] = bit_identical(none, fwd_bwd(model, ids))
    for name, (keys, _) in CASES.items():
        deepspeed_autoep.apply(enabled(clustering="none", **with_blocks(keys)))
        TELEMETRY.clear()
        with TokenCrossings(deepspeed.comm) as calls:
            got = fwd_bwd(model, ids)
        out[name] = {"differs": not bit_identical(stock, got), "calls": calls.calls,
                     "telemetry_sent": sum(s.bytes_sent for s in TELEMETRY.latest.values()),
                     "telemetry_full": sum(s.bytes_uncompressed for s in TELEMETRY.latest.values())}
    out["lsh_fp8"] = lsh_with_fp8(model, ids)
    out["identity_layer"] = {name: identity_layer_is_the_rounding_of_its_rows(model, rank, device, *case)
                             for name, case in DISPATCH_CASES.items()}
    return out


def lsh_with_fp8(model, ids):
    """LSH's centroids in FP8: what crosses is the centroids' uint8 buffer, and the telemetry counts it."""
    from lshmoe_plugin.telemetry import TELEMETRY
    deepspeed_autoep.apply(enabled(compression_rate=0.25, dispatch_dtype="fp8_e4m3", combine_dtype="fp8_e4m3",
                                   fp8_block_size=BLOCK))
    TELEMETRY.clear()
    with TokenCrossings(deepspeed.comm) as calls:
        fwd_bwd(model, ids)
    return {"calls": calls.calls, "telemetry_sent": sum(s.bytes_sent for s in TELEMETRY.latest.values()),
            "clusters": sum(int(s.clusters) for s in TELEMETRY.latest.values())}


def identity_layer_is_the_rounding_of_its_rows(model, rank, device, keys, kinds):
    """One AutoEP layer with identity experts, the dispatch coded per `keys` (its forward and backward `kinds`):
    each route's row comes back as the rounding of what was sent (the token, or the token times its score with
    score_apply 'pre'), weighted as stock weighs it; its gradient reaches the input rounded in the backward's format,
    route by route. Compared with the layer rebuilt around the same router (`reference`), and with the unrounded
    rows and gradients, which it must not be."""
    layer = autoep_layers(model)[0]
    experts, layer.experts = layer.experts, IdentityExperts()
    try:
        generator = torch.Generator().manual_seed(50 + rank)
        hidden = (torch.randn(2, 16, HIDDEN, generator=generator) * 3).to(device).requires_grad_()
        probe = torch.randn(2 * 16, HIDDEN, generator=generator).to(device)  # a loss whose gradient differs per row
        deepspeed_autoep.apply(enabled(clustering="none", **with_blocks(keys)))
        got = layer(hidden)
        got = (got[0] if isinstance(got, tuple) else got).reshape(-1, HIDDEN)
        (got * probe).sum().backward()
        deepspeed_autoep.revert()
        got, grad = got.detach().float(), hidden.grad.reshape(-1, HIDDEN)
        expected, expected_grad = reference(layer, hidden, probe, *kinds)
        unrounded, unrounded_grad = reference(layer, hidden, probe, None, None)
        atol = 1e-6 * expected_grad.abs().max()  # the sums' order
        return {"score_apply": layer.score_apply,
                "matches": torch.allclose(got, expected, rtol=1e-6, atol=0),
                "not_the_unrounded_rows": not torch.allclose(got, unrounded, rtol=1e-3, atol=0),
                "grad_matches": torch.allclose(grad, expected_grad, rtol=1e-5, atol=atol),
                "grad_not_unrounded": not torch.allclose(grad, unrounded_grad, rtol=1e-3, atol=100 * atol)}
    finally:
        layer.experts = experts
        deepspeed_autoep.revert()


def reference(layer, hidden, probe, forward, backward):
    """(output, input gradient) of an identity-expert AutoEP layer whose routed rows cross rounded in `forward`,
    their gradients in `backward` (wire_helpers.RoundTrip; None: as they are)."""
    from deepspeed.module_inject.auto_ep_layer import RouterOutput
    x = hidden.detach().reshape(-1, HIDDEN).requires_grad_()
    scores = RouterOutput(*layer.router(x, layer.expert_bias)).top_scores.float()  # (T, k)
    if layer.score_apply == "pre":
        out = sum(RoundTrip.apply(x * scores[:, k:k + 1], forward, backward) for k in range(scores.shape[1]))
    else:
        out = sum(RoundTrip.apply(x, forward, backward) * scores[:, k:k + 1] for k in range(scores.shape[1]))
    (out * probe).sum().backward()
    return out.detach(), x.grad


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_model_dtype_without_clustering_is_the_stock_exchange(results):
    check_model_dtype_without_clustering_is_the_stock_exchange(*results)


@pytest.mark.parametrize("case", sorted(DISPATCH_CASES))
def test_identity_layer_returns_the_rounding_of_its_rows_and_gradients(results, case):
    check_identity_layer_returns_the_rounding_of_its_rows_and_gradients(*results, case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_crossing_moves_its_format_along_its_splits_and_is_counted(results, case):
    check_every_crossing_moves_its_format_along_its_splits_and_is_counted(*results, case)


def test_lsh_centroids_cross_in_fp8(results):
    check_lsh_centroids_cross_in_fp8(*results)


# -- checks on the per-rank results (also run by tests/gpu/test_autoep_cuda.py) ---------------------------------
def check_model_dtype_without_clustering_is_the_stock_exchange(world_size, per_rank):
    for r in per_rank:
        # the same tolerance as the rate-1.0 check (test_autoep_patch): the patched forward's own arithmetic
        assert r["none_model_diff"] < 1e-5 and r["none_model_same_crossings"], r
        assert r["none_model_keys_change_nothing"]


def check_identity_layer_returns_the_rounding_of_its_rows_and_gradients(world_size, per_rank, case):
    for r in per_rank:
        result = r["identity_layer"][case]
        assert result["matches"] and result["not_the_unrounded_rows"], result
        assert result["grad_matches"] and result["grad_not_unrounded"], result


def check_every_crossing_moves_its_format_along_its_splits_and_is_counted(world_size, per_rank, case):
    kinds = CASES[case][1]
    for r in per_rank:
        assert r[case]["differs"]
        if world_size == 1:  # one rank: AutoEP makes no all-to-all, and the rounding applies all the same
            assert r[case]["calls"] == []
            continue
        calls = r[case]["calls"]
        assert len(calls) == 8, calls  # two layers: dispatch and combine forward, then both backward, in reverse
        forward = calls[:4]
        backward = calls[4:]
        for layer in range(2):
            dispatch, combine = forward[2 * layer], forward[2 * layer + 1]
            combine_grad, dispatch_grad = backward[2 * (1 - layer)], backward[2 * (1 - layer) + 1]
            for (dtype, rows, nbytes), kind in zip((dispatch, combine, combine_grad, dispatch_grad), kinds):
                assert (dtype, nbytes) == crossing(kind, rows, HIDDEN), (case, layer, calls)
            # the gradient crosses back along the transposed splits: as many rows as its forward received
            assert combine_grad[1] == dispatch[1] and dispatch_grad[1] == combine[1]
    if world_size == 2:  # every row a rank sends, another receives: over the ranks the four crossings add up
        total = sum(nbytes for r in per_rank for _, _, nbytes in r[case]["calls"])
        assert total == 4 * sum(r[case]["telemetry_sent"] for r in per_rank)


def check_lsh_centroids_cross_in_fp8(world_size, per_rank):
    for r in per_rank:
        lsh = r["lsh_fp8"]
        assert lsh["telemetry_sent"] == lsh["clusters"] * FP8_ROW_BYTES
        assert all(dtype == "torch.uint8" and nbytes == rows * FP8_ROW_BYTES for dtype, rows, nbytes in lsh["calls"])
        assert len(lsh["calls"]) == (8 if world_size == 2 else 0)
    if world_size == 2:
        assert sum(n for r in per_rank for _, _, n in r["lsh_fp8"]["calls"]) == \
            4 * sum(r["lsh_fp8"]["telemetry_sent"] for r in per_rank)


def check_all(world_size, per_rank):
    check_model_dtype_without_clustering_is_the_stock_exchange(world_size, per_rank)
    for case in DISPATCH_CASES:
        check_identity_layer_returns_the_rounding_of_its_rows_and_gradients(world_size, per_rank, case)
    for case in CASES:
        check_every_crossing_moves_its_format_along_its_splits_and_is_counted(world_size, per_rank, case)
    check_lsh_centroids_cross_in_fp8(world_size, per_rank)
