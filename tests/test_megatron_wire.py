"""The wire formats on Megatron-core's all-to-all dispatcher (1 and 2 real gloo processes): the model's dtype without
clustering is stock, bit for bit; FP8 gives a layer of identity experts exactly the e4m3 rounding of its tokens,
weighted by their routing probabilities; every crossing, forward and backward, moves uint8 buffers of values and
scales along its own (backward: the transposed) split sizes, and the telemetry counts those bytes."""
import megatron.core  # noqa: F401  (installed by the README's [test] extra)
import pytest
import torch
from distributed import run_distributed
from megatron_helpers import BATCH, HIDDEN, SEQ, ScaledIdentityExperts, bit_identical, build_layer, enabled, fwd_bwd
from test_wire import reference_round_trip
from wire_helpers import BLOCK, CASES, TokenCrossings, row_bytes

from lshmoe_plugin.patches import megatron_dispatcher

FP8_ROW_BYTES, FP32_ROW_BYTES = row_bytes(HIDDEN)


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
        megatron_dispatcher.apply(enabled(clustering="none", fp8_block_size=BLOCK, **keys))
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
    out["identity_layer"] = identity_layer_is_the_rounding_of_its_tokens(world_size, device, x)
    return out


def identity_layer_is_the_rounding_of_its_tokens(world_size, device, x):
    """Identity experts (output = probability * row), FP8 dispatch: each token comes back as the e4m3 rounding of
    itself times the sum of its routing probabilities (rounding per row commutes with the all-to-all)."""
    layer = build_layer(world_size).to(device)
    layer.experts = ScaledIdentityExperts()
    megatron_dispatcher.apply(enabled(clustering="none", dispatch_dtype="fp8_e4m3", fp8_block_size=BLOCK), layer)
    got = layer(x)[0].reshape(-1, HIDDEN)
    megatron_dispatcher.revert()
    probs, _ = layer.router(x)
    weight = probs.reshape(-1, probs.shape[-1]).float().sum(-1, keepdim=True)
    expected = reference_round_trip(x.reshape(-1, HIDDEN), BLOCK) * weight
    return {"matches": torch.allclose(got.float(), expected, rtol=1e-6, atol=0),  # rounding order of the sum
            "not_the_unrounded_tokens": not torch.allclose(got.float(), x.reshape(-1, HIDDEN) * weight, rtol=1e-3,
                                                           atol=0)}


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_model_dtype_without_clustering_is_stock(results):
    for r in results[1]:
        assert r["none_model_identical"] and r["none_model_same_crossings"], r


def test_fp8_layer_returns_the_e4m3_rounding_of_its_tokens(results):
    for r in results[1]:
        assert r["identity_layer"]["matches"] and r["identity_layer"]["not_the_unrounded_tokens"], r["identity_layer"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_crossing_moves_its_format_along_its_splits_and_is_counted(results, case):
    world_size, per_rank = results
    fp8 = CASES[case][1]
    for r in per_rank:
        assert r[case]["differs"] and r[case]["grads_finite"]
        if world_size == 1:  # one rank: nothing crosses the network, and the rounding applies all the same
            assert r[case]["calls"] == []
            continue
        dispatch, combine, combine_grad, dispatch_grad = calls = r[case]["calls"]
        for (dtype, rows, nbytes), is_fp8 in zip(calls, fp8):
            assert (dtype, nbytes) == (("torch.uint8", rows * FP8_ROW_BYTES) if is_fp8 else
                                       ("torch.float32", rows * FP32_ROW_BYTES)), (case, calls)
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
