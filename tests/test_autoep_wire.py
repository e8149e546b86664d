"""The wire formats on DeepSpeed AutoEP's variable-size all-to-all (a tiny HF Mixtral, 1 and 2 real gloo processes):
the model's dtype without clustering is the stock exchange; FP8 gives a layer with identity experts exactly the
e4m3 rounding of its routed rows (rounding per row commutes with the all-to-all, which only moves rows); every
crossing, forward and backward, moves uint8 buffers of values and scales along its own (or, backward, the
transposed) split sizes, and the telemetry counts those bytes."""
import deepspeed.comm
import pytest
import torch
from distributed import run_distributed
from test_autoep_patch import HIDDEN, IdentityExperts, autoep_layers, bit_identical, build_model, enabled, fwd_bwd
from test_wire import reference_round_trip
from wire_helpers import BLOCK, CASES, TokenCrossings, row_bytes

from lshmoe_plugin.patches import deepspeed_autoep

FP8_ROW_BYTES, FP32_ROW_BYTES = row_bytes(HIDDEN)


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
        deepspeed_autoep.apply(enabled(clustering="none", fp8_block_size=BLOCK, **keys))
        TELEMETRY.clear()
        with TokenCrossings(deepspeed.comm) as calls:
            got = fwd_bwd(model, ids)
        out[name] = {"differs": not bit_identical(stock, got), "calls": calls.calls,
                     "telemetry_sent": sum(s.bytes_sent for s in TELEMETRY.latest.values()),
                     "telemetry_full": sum(s.bytes_uncompressed for s in TELEMETRY.latest.values())}
    out["lsh_fp8"] = lsh_with_fp8(model, ids)
    out["identity_layer"] = identity_layer_is_the_rounding_of_its_rows(model, rank, device)
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


def identity_layer_is_the_rounding_of_its_rows(model, rank, device):
    """One AutoEP layer with identity experts, FP8 dispatch: each route's row comes back as the e4m3 rounding of
    what was sent (the token, or the token times its score with score_apply 'pre'), weighted as stock weighs it."""
    from deepspeed.module_inject.auto_ep_layer import RouterOutput
    layer = autoep_layers(model)[0]
    experts, layer.experts = layer.experts, IdentityExperts()
    try:
        hidden = (torch.randn(2, 16, HIDDEN, generator=torch.Generator().manual_seed(50 + rank)) * 3).to(device)
        deepspeed_autoep.apply(enabled(clustering="none", dispatch_dtype="fp8_e4m3", fp8_block_size=BLOCK))
        got = layer(hidden)
        got = (got[0] if isinstance(got, tuple) else got).reshape(-1, HIDDEN)
        x = hidden.reshape(-1, HIDDEN)
        scores = RouterOutput(*layer.router(x, layer.expert_bias)).top_scores.float()  # (T, k)
        if layer.score_apply == "pre":
            expected = sum(reference_round_trip(x * scores[:, k:k + 1], BLOCK) for k in range(scores.shape[1]))
        else:
            expected = reference_round_trip(x, BLOCK) * scores.sum(1, keepdim=True)
        return {"matches": torch.allclose(got.float(), expected, rtol=1e-6, atol=0),  # rounding order of the sum
                "not_the_unrounded_rows": not torch.allclose(got.float(), x * scores.sum(1, keepdim=True),
                                                             rtol=1e-3, atol=0),
                "score_apply": layer.score_apply}
    finally:
        layer.experts = experts
        deepspeed_autoep.revert()


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_model_dtype_without_clustering_is_the_stock_exchange(results):
    check_model_dtype_without_clustering_is_the_stock_exchange(*results)


def test_fp8_layer_returns_the_e4m3_rounding_of_its_rows(results):
    check_fp8_layer_returns_the_e4m3_rounding_of_its_rows(*results)


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


def check_fp8_layer_returns_the_e4m3_rounding_of_its_rows(world_size, per_rank):
    for r in per_rank:
        assert r["identity_layer"]["matches"] and r["identity_layer"]["not_the_unrounded_rows"], r["identity_layer"]


def check_every_crossing_moves_its_format_along_its_splits_and_is_counted(world_size, per_rank, case):
    fp8 = CASES[case][1]
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
            for (dtype, rows, nbytes), is_fp8 in zip((dispatch, combine, combine_grad, dispatch_grad), fp8):
                assert (dtype, nbytes) == (("torch.uint8", rows * FP8_ROW_BYTES) if is_fp8 else
                                           ("torch.float32", rows * FP32_ROW_BYTES)), (case, layer, calls)
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
    check_fp8_layer_returns_the_e4m3_rounding_of_its_rows(world_size, per_rank)
    for case in CASES:
        check_every_crossing_moves_its_format_along_its_splits_and_is_counted(world_size, per_rank, case)
    check_lsh_centroids_cross_in_fp8(world_size, per_rank)
