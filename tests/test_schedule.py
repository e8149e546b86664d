"""The plugin's step-driven settings on DeepSpeed's real MoE layer: `redraw_interval` (new hash projections every N
optimizer steps) and `exact_from_step` (stock exchange from that step on); the clock they read."""
import math

import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import D_MODEL, build_moe, fwd_bwd, same

import lshmoe_plugin
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError
from lshmoe_plugin.hashing import hash_projections
from lshmoe_plugin.schedule import set_training_step, training_step
from lshmoe_plugin.telemetry import Telemetry


def test_projections_are_redrawn_in_place_at_each_interval():
    set_training_step(0)
    comp = LSHCompressor(LSHMoEConfig(enabled=True, redraw_interval=3), layer_index=2, telemetry=Telemetry())
    first = comp.projections(32, torch.device("cpu"))
    kept = first.clone()
    set_training_step(2)
    assert comp.projections(32, torch.device("cpu")) is first and torch.equal(first, kept)
    set_training_step(3)
    second = comp.projections(32, torch.device("cpu"))
    assert second is first  # the same tensor (CUDA graphs read it), new directions
    assert not torch.equal(second, kept)
    assert torch.equal(second, hash_projections(comp.config, 32, 2, draw=1))
    # still orthonormal columns within each hash
    block = second[:, :comp.config.hash_dim]
    assert torch.allclose(block.T @ block, torch.eye(comp.config.hash_dim), atol=1e-5)
    set_training_step(0)


def test_without_redraw_the_projections_are_the_runs_one_draw():
    set_training_step(7)
    comp = LSHCompressor(LSHMoEConfig(enabled=True), layer_index=1, telemetry=Telemetry())
    assert torch.equal(comp.projections(16, torch.device("cpu")), hash_projections(comp.config, 16, 1))
    set_training_step(0)


def test_training_step_refuses_a_bad_value():
    with pytest.raises(ValueError, match="integer >= 0"):
        set_training_step(-1)
    assert training_step() == 0


@pytest.mark.parametrize("block, message", [
    ({"exact_from_step": -1}, "lsh_moe.exact_from_step must be null or an integer >= 0"),
    ({"exact_from_step": 1.5}, "lsh_moe.exact_from_step must be null or an integer >= 0"),
    ({"redraw_interval": -2}, "lsh_moe.redraw_interval must be an integer >= 0"),
    ({"refine_iterations": True}, "lsh_moe.refine_iterations must be an integer >= 0"),
    ({"output_error_interval": "10"}, "lsh_moe.output_error_interval must be an integer >= 0"),
])
def test_schedule_keys_are_validated_by_name(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict({"enabled": True, **block})


def layer_and_stock(seed, tokens, world_size):
    """A DeepSpeed MoE layer, a batch for it and the stock layer's outputs and gradients on that batch."""
    torch.manual_seed(seed)
    x = torch.randn(2, tokens, D_MODEL)
    moe = build_moe(world_size, 2)
    return x, moe, fwd_bwd(moe, x)


def check_schedules_on_the_layer(rank, world_size):
    x, moe, stock = layer_and_stock(50 + rank, 32, world_size)
    report = {}
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "exact_from_step": 4}}, moe)
    set_training_step(3)
    report["compressed_before_the_step"] = not torch.equal(fwd_bwd(moe, x)[0], stock[0])
    set_training_step(4)
    report["stock_from_the_step"] = same(fwd_bwd(moe, x), stock)
    report["no_stale_stats_once_stock"] = 0 not in lshmoe_plugin.TELEMETRY.latest
    set_training_step(0)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "redraw_interval": 1}}, moe)
    first = fwd_bwd(moe, x)
    report["same_draw_same_result"] = same(first, fwd_bwd(moe, x))
    set_training_step(1)
    report["new_draw_new_clusters"] = not torch.equal(first[0], fwd_bwd(moe, x)[0])
    set_training_step(0)
    lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_from_step_and_redraw_on_deepspeeds_layer(world_size):
    for rank, report in enumerate(run_distributed(check_schedules_on_the_layer, world_size)):
        assert all(report.values()), (rank, report)


def check_engine_sets_the_clock(rank, world_size):
    import deepspeed

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = build_moe(world_size, 2, make_groups=False)

        def forward(self, x):
            out, l_aux, _ = self.moe(x)
            return out.square().mean() + l_aux

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "lsh_moe": {"enabled": True, "compression_rate": 0.25}}
    net = Net()
    lshmoe_plugin.enable(config, net)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    steps = []
    for _ in range(4):  # two optimizer steps of two micro-batches each
        engine.backward(engine(torch.randn(2, 16, D_MODEL)))
        engine.step()
        steps.append(training_step())
    lshmoe_plugin.disable()
    set_training_step(0)
    return steps


def test_the_deepspeed_engine_sets_the_training_clock_to_its_optimizer_step():
    assert run_distributed(check_engine_sets_the_clock, 1) == [[0, 1, 1, 2]]


def check_exact_tokens(rank, world_size):
    x, moe, stock = layer_and_stock(70 + rank, 40, world_size)
    report = {}
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "exact_token_stride": 1}}, moe)
    report["stride_1_is_stock"] = same(fwd_bwd(moe, x), stock)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "compression_rate": 0.25, "exact_token_stride": 4,
                                      "telemetry_interval": 1}}, moe)
    plain = {"lsh_moe": {"enabled": True, "compression_rate": 0.25}}
    strided = fwd_bwd(moe, x)
    stats = lshmoe_plugin.TELEMETRY.latest[0]
    capacity = stats.bytes_uncompressed // (4 * D_MODEL * 4)  # 4 experts of fp32 rows
    # ceil(0.25 C) centroid slots, and every 4th of the C slots exactly
    report["bytes_add_every_4th_slot"] = (stats.bytes_sent * capacity
                                          == stats.bytes_uncompressed * (2 * math.ceil(capacity / 4)))
    lshmoe_plugin.enable(plain, moe)
    compressed = fwd_bwd(moe, x)
    report["between_stock_and_compressed"] = (
        (strided[0] - stock[0]).norm() < (compressed[0] - stock[0]).norm() and not torch.equal(strided[0], stock[0]))
    lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_token_stride_sends_every_nth_slot_exactly(world_size):
    for rank, report in enumerate(run_distributed(check_exact_tokens, world_size)):
        assert all(report.values()), (rank, report)
