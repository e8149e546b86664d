"""Output-error telemetry (`output_error_interval`) on DeepSpeed's real MoE layer, in 1 and 2 gloo processes: a sample
of the dispatch buffer goes through the stock exchange too, and the telemetry says how far the compressed outputs
are from it, with and without error compensation."""
import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import D_MODEL, build_moe, fwd_bwd

import lshmoe_plugin
from lshmoe_plugin import TELEMETRY
from lshmoe_plugin.config import LSHMoEConfigError
from lshmoe_plugin.patches import deepspeed_moe


def errors():
    stats = TELEMETRY.latest[0]
    return {name: None if getattr(stats, name) is None else float(getattr(stats, name))
            for name in ("output_error", "output_error_compensated", "output_error_uncompensated")}


class Spy:
    """Keeps the arguments of the last `record_output_error` call (the real one still runs)."""

    def __init__(self):
        self.original, self.seen = deepspeed_moe.record_output_error, {}

    def __enter__(self):
        def spy(layer, compressor, dispatched, valid, centroid_outputs, state, returned):
            self.seen = dict(layer=layer, dispatched=dispatched.detach().clone(), valid=valid.clone(), state=state,
                             returned=returned.detach().clone())
            return self.original(layer, compressor, dispatched, valid, centroid_outputs, state, returned)
        deepspeed_moe.record_output_error = spy
        return self

    def __exit__(self, *exc):
        deepspeed_moe.record_output_error = self.original


def errors_by_hand(expert, dispatched, valid, state):
    """The sampled errors computed directly through `expert`: each sampled token's exact output E(x) against its
    centroid's E(c), and against E(c) + x - c where its cluster has other members (E(c) where it is alone)."""
    num_experts, capacity, d = dispatched.shape
    rows = torch.arange(0, capacity, deepspeed_moe.OUTPUT_ERROR_STRIDE)
    x = dispatched[:, rows].reshape(-1, d)
    keep = valid[:, rows].reshape(-1, 1)
    slot = state.slot[(torch.arange(num_experts)[:, None] * capacity + rows).reshape(-1)]
    slot = slot.clamp(max=state.centroids.shape[0] - 1)  # padding's scratch row: masked by `keep` below
    with torch.no_grad():
        exact, centroid = expert(x), state.centroids.detach()[slot]
        centroid_output = expert(centroid)
        alone = (state.counts[slot] <= 1).unsqueeze(-1)
        compensated = torch.where(alone, centroid_output, x + centroid_output - centroid)

    def error(approx):
        return float(((approx - exact) * keep).norm() / (exact * keep).norm())
    return {"output_error_compensated": error(compensated), "output_error_uncompensated": error(centroid_output)}


def check_output_error(rank, world_size):
    torch.manual_seed(20 + rank)
    x = torch.randn(2, 48, D_MODEL)
    report = {}
    for identity in (True, False):
        moe = build_moe(world_size, 2, identity=identity)
        # DeepSpeed copies one expert into every slot and every rank builds it from the same seed: any local expert
        # is every expert, so the hand reference can run the remote ones' rows through it.
        local = list(moe.deepspeed_moe.experts.deepspeed_experts)
        alike = all(torch.equal(p, q) for e in local for p, q in zip(e.parameters(), local[0].parameters()))
        for rate in (1.0, 0.25):
            for compensate in (True, False):
                lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": rate,
                                                  "telemetry_interval": 1,
                                                  "output_error_interval": 2, "error_compensation": compensate}}, moe)
                with Spy() as spy:
                    fwd_bwd(moe, x)
                first = errors()
                seen = spy.seen
                by_hand = errors_by_hand(local[0], seen["dispatched"], seen["valid"], seen["state"])
                fwd_bwd(moe, x)
                second = errors()
                report[(identity, rate, compensate)] = (first, second, by_hand, alike)
        lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_output_error_is_measured_every_interval_against_the_stock_exchange(world_size):
    reports = run_distributed(check_output_error, world_size)
    assert len(reports) == world_size
    for (identity, rate, compensate), (first, second, by_hand, alike) in [item for report in reports
                                                                          for item in report.items()]:
        assert second == {name: None for name in second}  # the 2nd forward is not due (interval 2)
        assert first["output_error"] == pytest.approx(first["output_error_compensated" if compensate else
                                                         "output_error_uncompensated"], rel=1e-5, abs=1e-7)
        assert alike
        for name, value in by_hand.items():
            assert first[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (identity, rate, compensate, name)
        if rate == 1.0:
            assert first["output_error_compensated"] == first["output_error_uncompensated"] == 0.0, first
        elif identity:  # E(c) + x - c is x exactly; E(c) alone is off by the residual
            assert first["output_error_compensated"] < 1e-6 < 0.05 < first["output_error_uncompensated"], first
        else:  # real experts: both far from zero, and (at initialisation) the paper's compensation is the worse
            assert 0.05 < first["output_error_uncompensated"] < first["output_error_compensated"], first


def check_sampled_error_matches_a_direct_computation(rank, world_size):
    torch.manual_seed(3)
    x = torch.randn(2, 64, D_MODEL)
    moe = build_moe(world_size, 1)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "output_error_interval": 1}}, moe)
    with Spy() as spy:
        fwd_bwd(moe, x)
    seen = spy.seen
    measured = errors()["output_error"]
    lshmoe_plugin.disable()
    rows = slice(0, None, deepspeed_moe.OUTPUT_ERROR_STRIDE)
    with torch.no_grad():
        exact = deepspeed_moe._experts(seen["layer"], seen["dispatched"], D_MODEL)[:, rows]
    keep = seen["valid"][:, rows].unsqueeze(-1)
    direct = ((seen["returned"][:, rows] - exact) * keep).norm() / (exact * keep).norm()
    return measured, float(direct)


def test_the_sampled_error_is_the_relative_error_of_the_returned_rows():
    [(measured, direct)] = run_distributed(check_sampled_error_matches_a_direct_computation, 1)
    assert measured == pytest.approx(direct, rel=1e-5) and direct > 0


@pytest.mark.parametrize("framework", ["megatron", "autoep"])
@pytest.mark.parametrize("key, value", [("output_error_interval", 3), ("refine_iterations", 3),
                                        ("residual_map", "linear"), ("exact_token_stride", 4)])
def test_fixed_layout_only_keys_are_refused_by_name_elsewhere(framework, key, value):
    with pytest.raises(LSHMoEConfigError, match=f"lsh_moe.{key}={value} is not supported with "
                                                f"framework='{framework}'"):
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", key: value}}, framework=framework)


def check_every_byte_sent_is_counted(rank, world_size):
    """Telemetry's bytes_sent against the bytes handed to the real all-to-all, forward only: centroids, exact
    tokens, and the output-error sample on the forward that takes it (interval 2: the first of two)."""
    import math

    from test_deepspeed_patch import AllToAllBytes
    torch.manual_seed(40 + rank)
    x = torch.randn(2, 48, D_MODEL)
    moe = build_moe(world_size, 2)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "output_error_interval": 2,
                                      "exact_token_stride": 4}}, moe)
    forwards = []
    for _ in range(2):
        torch.manual_seed(1234)
        with AllToAllBytes() as wire, torch.no_grad():
            moe(x)
        stats = TELEMETRY.latest[0]
        capacity = stats.bytes_uncompressed // (4 * D_MODEL * 4)  # 4 experts of fp32 rows
        forwards.append({"wire": sum(wire.sent), "calls": len(wire.sent), "sent": stats.bytes_sent,
                         "sample": 4 * math.ceil(capacity / deepspeed_moe.OUTPUT_ERROR_STRIDE) * D_MODEL * 4})
    lshmoe_plugin.disable()
    return forwards


def test_bytes_sent_counts_the_output_error_sample():
    for sampled, plain in run_distributed(check_every_byte_sent_is_counted, 2):
        # each all-to-all pair (there and back) moves the same bytes: the telemetry counts one direction
        assert sampled["calls"] == 6 and plain["calls"] == 4  # centroids, exact tokens (+ the sample)
        assert sampled["wire"] == 2 * sampled["sent"] and plain["wire"] == 2 * plain["sent"], (sampled, plain)
        assert sampled["sent"] - plain["sent"] == sampled["sample"] > 0
