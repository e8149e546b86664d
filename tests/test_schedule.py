"""The plugin's step-driven settings on DeepSpeed's real MoE layer: `redraw_interval` (new hash projections every N
optimizer steps) and `exact_from_step` (stock exchange from that step on); the clock they read."""
import math

import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block
from test_deepspeed_patch import D_MODEL, build_moe, fwd_bwd, same

import lshmoe_plugin
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError
from lshmoe_plugin.hashing import hash_projections
from lshmoe_plugin.schedule import micro_batch, rotation, set_training_step, training_step
from lshmoe_plugin.telemetry import Telemetry


def test_projections_are_redrawn_in_place_at_each_interval():
    set_training_step(0)
    comp = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", redraw_interval=3), layer_index=2,
                         telemetry=Telemetry())
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
    comp = LSHCompressor(LSHMoEConfig(enabled=True, method="paper"), layer_index=1, telemetry=Telemetry())
    assert torch.equal(comp.projections(16, torch.device("cpu")), hash_projections(comp.config, 16, 1))
    set_training_step(0)


def test_training_step_refuses_a_bad_value():
    with pytest.raises(ValueError, match="training step must be an integer >= 0"):
        set_training_step(-1)
    with pytest.raises(ValueError, match="micro-batch must be an integer >= 0, got 1.0"):
        set_training_step(2, 1.0)
    assert training_step() == 0 and micro_batch() == 0


def test_the_rotation_moves_with_steps_and_micro_batches_only():
    seen = []
    for step in range(4):
        for micro in range(2):
            set_training_step(step, micro)
            seen.append(rotation(4))
            assert rotation(4) == seen[-1]  # reading it moves nothing
    set_training_step(0)
    assert seen == [0, 1, 1, 2, 2, 3, 3, 0]
    # over 4 steps each micro-batch index meets every offset once
    assert sorted(seen[0::2]) == sorted(seen[1::2]) == [0, 1, 2, 3]


def test_a_new_enable_starts_the_clock_from_zero():
    """The clock is process-global: a second run in the same process must not start from the first one's step."""
    config = LSHMoEConfig(enabled=True, method="paper", exact_from_step=2)
    try:
        lshmoe_plugin.enable(config)
        set_training_step(5, 1)
        lshmoe_plugin.enable(config)  # already applied: the same run goes on
        assert (training_step(), micro_batch()) == (5, 1)
        lshmoe_plugin.disable()
        lshmoe_plugin.enable(config)
        assert (training_step(), micro_batch()) == (0, 0)
    finally:
        lshmoe_plugin.disable()
        set_training_step(0)


@pytest.mark.parametrize("block, message", [
    ({"exact_from_step": -1}, "lsh_moe.exact_from_step must be null or an integer >= 0"),
    ({"exact_from_step": 1.5}, "lsh_moe.exact_from_step must be null or an integer >= 0"),
    ({"redraw_interval": -2}, "lsh_moe.redraw_interval must be an integer >= 0"),
    ({"refine_iterations": True}, "lsh_moe.refine_iterations must be an integer >= 0"),
    ({"output_error_interval": "10"}, "lsh_moe.output_error_interval must be an integer >= 0"),
])
def test_schedule_keys_are_validated_by_name(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict(paper_block({"enabled": True, **block}))


def layer_and_stock(seed, tokens, world_size):
    """A DeepSpeed MoE layer, a batch for it and the stock layer's outputs and gradients on that batch."""
    torch.manual_seed(seed)
    x = torch.randn(2, tokens, D_MODEL)
    moe = build_moe(world_size, 2)
    return x, moe, fwd_bwd(moe, x)


def check_schedules_on_the_layer(rank, world_size):
    x, moe, stock = layer_and_stock(50 + rank, 32, world_size)
    report = {}
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "exact_from_step": 4}}, moe)
    set_training_step(3)
    report["compressed_before_the_step"] = not torch.equal(fwd_bwd(moe, x)[0], stock[0])
    set_training_step(4)
    report["stock_from_the_step"] = same(fwd_bwd(moe, x), stock)
    report["no_stale_stats_once_stock"] = 0 not in lshmoe_plugin.TELEMETRY.latest
    set_training_step(0)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "redraw_interval": 1}}, moe)
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
            self.seen = []  # the clock as each forward saw it

        def forward(self, x):
            self.seen.append((training_step(), micro_batch()))
            out, l_aux, _ = self.moe(x)
            return out.square().mean() + l_aux

    def engine_for(lsh_moe):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}, "lsh_moe": lsh_moe}
        net = Net()
        lshmoe_plugin.enable(config, net)
        return deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)[0], net

    engine, net = engine_for({"enabled": True, "method": "paper", "compression_rate": 0.25})
    after_step = []
    for _ in range(4):  # two optimizer steps of two micro-batches each
        engine.backward(engine(torch.randn(2, 16, D_MODEL)))
        engine.step()
        after_step.append(training_step())
    report = {"after_each_step": after_step, "seen_by_each_forward": net.seen}
    # A second engine in the same process (the patch stays applied) starts at its own step 0, not at the first
    # engine's 2, where exact_from_step=2 would already run stock; one resumed at step 5 (global_steps is what
    # load_checkpoint restores) runs stock from its first forward.
    second, net = engine_for({"enabled": True, "method": "paper", "compression_rate": 0.25, "exact_from_step": 2})
    for resumed_at in (None, 5):
        if resumed_at is not None:
            second.global_steps = resumed_at
        lshmoe_plugin.TELEMETRY.clear()
        second(torch.randn(2, 16, D_MODEL))
        report[f"second_engine_compressed_at_{resumed_at}"] = 0 in lshmoe_plugin.TELEMETRY.latest
    report["second_engine_seen"] = net.seen
    lshmoe_plugin.disable()
    set_training_step(0)
    return report


def test_the_deepspeed_engine_sets_the_training_clock_to_its_optimizer_step_and_micro_batch():
    [report] = run_distributed(check_engine_sets_the_clock, 1)
    assert report == {"after_each_step": [0, 1, 1, 2], "seen_by_each_forward": [(0, 0), (0, 1), (1, 0), (1, 1)],
                      "second_engine_compressed_at_None": True, "second_engine_compressed_at_5": False,
                      "second_engine_seen": [(0, 0), (5, 0)]}


def check_exact_tokens(rank, world_size):
    x, moe, stock = layer_and_stock(70 + rank, 40, world_size)
    report = {}
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "exact_token_stride": 1}}, moe)
    report["stride_1_is_stock"] = same(fwd_bwd(moe, x), stock)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "exact_token_stride": 4,
                                      "telemetry_interval": 1}}, moe)
    plain = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}
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


def checkpointed_fwd_bwd(moe, x, reentrant):
    """`fwd_bwd` with the layer under torch.utils.checkpoint: its activations are recomputed in the backward."""
    from torch.utils.checkpoint import checkpoint
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1234)  # as fwd_bwd; checkpoint restores this RNG state for the recomputation
    out, l_aux, _ = checkpoint(moe, x, use_reentrant=reentrant)
    (out.float().square().mean() + l_aux).backward()
    return out.detach(), x.grad.detach(), [p.grad.clone() if p.grad is not None else None for p in moe.parameters()]


def check_exact_tokens_under_recomputation(rank, world_size):
    x, moe, stock = layer_and_stock(90 + rank, 40, world_size)
    report = {}
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}, moe)
    set_training_step(3)
    without_stride = fwd_bwd(moe, x)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25,
                                      "exact_token_stride": 2}}, moe)
    plain = fwd_bwd(moe, x)
    for reentrant in (True, False):
        # the recomputation must send the slots the forward sent: the same outputs and gradients, bit for bit
        report[f"checkpointed_reentrant={reentrant}_is_plain"] = same(checkpointed_fwd_bwd(moe, x, reentrant), plain)
    # and the test can tell: the stride changes the result, and so does the next step's offset
    report["stride_changes_the_result"] = not torch.equal(plain[1], without_stride[1])
    set_training_step(4)
    report["next_offset_changes_the_result"] = not torch.equal(fwd_bwd(moe, x)[1], plain[1])
    set_training_step(0)
    lshmoe_plugin.disable()
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_tokens_are_the_same_under_activation_checkpointing(world_size):
    for rank, report in enumerate(run_distributed(check_exact_tokens_under_recomputation, world_size)):
        assert all(report.values()), (rank, report)


def check_evaluation_between_steps(rank, world_size):
    from test_deepspeed_patch import eval_output
    x, moe, _ = layer_and_stock(110 + rank, 40, world_size)
    x_eval = torch.randn(2, 24, D_MODEL)  # another size: its stats would differ from training's
    stock_eval = eval_output(moe, x_eval)
    block = {"enabled": True, "method": "paper", "compression_rate": 0.25, "exact_token_stride": 3,
             "telemetry_interval": 1,
             "output_error_interval": 1}
    runs = {}
    for evaluate in (False, True):
        moe = build_moe(world_size, 2)
        lshmoe_plugin.enable({"lsh_moe": block}, moe)
        set_training_step(0)
        fwd_bwd(moe, x)
        compressor = moe.deepspeed_moe._lshmoe_compressor
        stats, floats, forwards = lshmoe_plugin.TELEMETRY.latest[0], lshmoe_plugin.TELEMETRY.summary(), compressor.step
        if evaluate:
            with lshmoe_plugin.compressed_eval():
                runs["eval_compressed"] = not torch.equal(eval_output(moe, x_eval), stock_eval)
            runs["eval_left_the_telemetry"] = (lshmoe_plugin.TELEMETRY.latest[0] is stats
                                               and lshmoe_plugin.TELEMETRY.summary() == floats
                                               and compressor.step == forwards)
        set_training_step(1)
        runs[evaluate] = (fwd_bwd(moe, x), lshmoe_plugin.TELEMETRY.summary())
        lshmoe_plugin.disable()
    set_training_step(0)
    (with_eval, with_eval_stats), (without, without_stats) = runs.pop(True), runs.pop(False)
    runs["next_step_as_without_eval"] = same(with_eval, without) and with_eval_stats == without_stats
    return runs


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_evaluation_between_steps_moves_neither_the_rotation_nor_the_telemetry(world_size):
    for rank, report in enumerate(run_distributed(check_evaluation_between_steps, world_size)):
        assert all(report.values()), (rank, report)
