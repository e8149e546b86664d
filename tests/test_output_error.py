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


def check_output_error(rank, world_size):
    torch.manual_seed(20 + rank)
    x = torch.randn(2, 48, D_MODEL)
    report = {}
    for identity in (True, False):
        moe = build_moe(world_size, 2, identity=identity)
        for rate in (1.0, 0.25):
            for compensate in (True, False):
                lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": rate, "telemetry_interval": 1,
                                                  "output_error_interval": 2, "error_compensation": compensate}}, moe)
                fwd_bwd(moe, x)
                first = errors()
                fwd_bwd(moe, x)
                second = errors()
                report[(identity, rate, compensate)] = (first, second)
        lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_output_error_is_measured_every_interval_against_the_stock_exchange(world_size):
    reports = run_distributed(check_output_error, world_size)
    assert len(reports) == world_size
    for (identity, rate, compensate), (first, second) in [item for report in reports for item in report.items()]:
        assert second == {name: None for name in second}  # the 2nd forward is not due (interval 2)
        assert first["output_error"] == pytest.approx(first["output_error_compensated" if compensate else
                                                         "output_error_uncompensated"], rel=1e-5, abs=1e-7)
        if rate == 1.0:
            assert first["output_error_compensated"] == first["output_error_uncompensated"] == 0.0, first
        elif identity:  # E(c) + x - c is x exactly; E(c) alone is off by the residual
            assert first["output_error_compensated"] < 1e-6 < 0.05 < first["output_error_uncompensated"], first
        else:
            assert first["output_error_compensated"] > 0 and first["output_error_uncompensated"] > 0, first


def check_sampled_error_matches_a_direct_computation(rank, world_size):
    torch.manual_seed(3)
    x = torch.randn(2, 64, D_MODEL)
    moe = build_moe(world_size, 1)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "output_error_interval": 1}}, moe)
    seen = {}
    original = deepspeed_moe.record_output_error

    def spy(layer, compressor, dispatched, valid, centroid_outputs, state, returned):
        seen.update(dispatched=dispatched.detach().clone(), valid=valid.clone(), returned=returned.detach().clone(),
                    layer=layer)
        return original(layer, compressor, dispatched, valid, centroid_outputs, state, returned)

    deepspeed_moe.record_output_error = spy
    try:
        fwd_bwd(moe, x)
    finally:
        deepspeed_moe.record_output_error = original
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
                                        ("residual_map", "linear")])
def test_fixed_layout_only_keys_are_refused_by_name_elsewhere(framework, key, value):
    with pytest.raises(LSHMoEConfigError, match=f"lsh_moe.{key}={value} is not supported with "
                                                f"framework='{framework}'"):
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, key: value}}, framework=framework)
