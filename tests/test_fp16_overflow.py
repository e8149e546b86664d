"""fp16 overflows inside the compressor reach DeepSpeed's dynamic loss scaler like any other overflow.

Two levels. The compressor alone: centroid sums accumulate in fp32 (a cluster of large tokens does not overflow),
output - centroid is formed in fp32 (no overflow where the token's result fits), and a result that does not fit
fp16 comes out as inf, never clamped. The whole path: `deepspeed.initialize` with ``"fp16"`` and a dynamic loss
scale, LSH on, a batch whose compressed MoE output overflows (the stock layer's does not): the step is skipped,
the scale lowered, no weight changes or turns NaN, and the next step trains. With two ranks the overflow happens
on rank 1 only and rank 0 must skip too.

DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fast fp16 kernels (``is_fp16_supported`` is falsy on
CPUs without AVX512-FP16/AMX-FP16, as on this project's CI machine); torch computes fp16 on any CPU, so the CPU run
opens that one gate and keeps the rest real (engine, FP16_UnfusedOptimizer, DynamicLossScaler, overflow checks).
tests/gpu/test_fp16_loss_scaler_cuda.py runs the same scenario on CUDA, where DeepSpeed supports fp16 itself, with the
fused Triton kernels.
"""
import pytest
import torch
from distributed import run_distributed

import lshmoe_plugin
from lshmoe_plugin import LSHCompressor, LSHMoEConfig

D = 16
FP16_MAX = torch.finfo(torch.float16).max


def _pattern(device):
    return torch.where(torch.arange(D, device=device) % 3 == 0, -1.0, 1.0)


def _one_cluster(compressor, tokens, expert):
    """Eight tokens, one expert, one centroid slot (rate 0.01 of capacity 8): all eight share one centroid."""
    dispatched = tokens.view(1, 8, D)
    valid = torch.ones(1, 8, dtype=torch.bool, device=tokens.device)
    centroids, state = compressor.compress_fixed(dispatched, valid)
    assert centroids.shape == (1, 1, D)
    return centroids.view(1, D), compressor.decompress_fixed(expert(centroids), state).view(8, D)


def overflow_compressor():
    return LSHCompressor(LSHMoEConfig(enabled=True, method="paper", compression_rate=0.01, telemetry_interval=0), 0)


def compressor_overflow_checks(device, compressor=None):
    """Results of the three fp16 edge cases on `device` (kernel "auto": the reference on the CPU, Triton on CUDA)."""
    compressor = compressor or overflow_compressor()
    u = _pattern(device)
    result = {}

    # 1. Eight tokens of 60000: their sum (480000) does not fit fp16, their mean does.
    tokens = (60000 * u).expand(8, D).to(torch.float16)
    centroid, out = _one_cluster(compressor, tokens, lambda c: c)
    result["fp16_sum_would_overflow"] = bool(torch.isinf(tokens.sum(0)).all())
    result["centroid_is_the_mean"] = torch.equal(centroid[0], tokens[0])
    result["identity_round_trip_exact"] = torch.equal(out, tokens)

    # 2. An expert that negates 40000: output - centroid = -80000 does not fit fp16, token + that = -40000 does.
    tokens = (40000 * u).expand(8, D).to(torch.float16)
    _, out = _one_cluster(compressor, tokens, lambda c: -c)
    result["intermediate_overflow_avoided"] = torch.equal(out, -tokens)

    # 3. A result that does not fit: tokens +-60000 with mean -30000, expert halves: +60000 + 15000 = 75000.
    sign = torch.tensor([1, -1, -1, -1, 1, -1, -1, -1], device=device, dtype=torch.float16).unsqueeze(1)
    tokens = (sign * 60000 * u).to(torch.float16)
    centroid, out = _one_cluster(compressor, tokens, lambda c: 0.5 * c)
    exact = tokens.double() + (0.5 * centroid.double() - centroid.double())
    positive = sign.squeeze(1) > 0
    result["overflow_is_inf_not_clamped"] = (bool(torch.isinf(out[positive]).all())
                                             and torch.equal(out[positive], (exact[positive] * float("inf")).half())
                                             and bool(exact[positive].abs().min() > FP16_MAX))
    result["rest_exact_to_rounding"] = torch.equal(out[~positive], exact[~positive].half())
    return result


def test_compressor_overflows_in_fp16_only_where_the_result_does_not_fit():
    result = compressor_overflow_checks(torch.device("cpu"))
    assert all(result.values()), result


# -- the whole path: DeepSpeed's engine and dynamic loss scaler ---------------------------------------------------
FP16_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    # hysteresis 1: the first overflow lowers the scale; a long window: no raise during the test
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 1000,
             "hysteresis": 1, "min_loss_scale": 1},
    "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    "lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.01, "telemetry_interval": 0},
}


class Net(torch.nn.Module):
    def __init__(self, world_size):
        from deepspeed.moe.layer import MoE
        super().__init__()
        torch.manual_seed(0)
        expert = torch.nn.Linear(D, D)
        with torch.no_grad():  # an expert that halves: finite on every token of the overflow batch
            expert.weight.copy_(0.5 * torch.eye(D))
            expert.bias.zero_()
        # capacity factor 2 with 2 experts: capacity = all 8 tokens; rate 0.01 gives expert 0 a single centroid
        self.moe = MoE(D, expert, num_experts=2, ep_size=world_size, k=1, capacity_factor=2.0, min_capacity=1)
        gate = self.moe.deepspeed_moe.gate.wg.weight
        with torch.no_grad():
            gate.zero_()  # all logits tie, every token goes to expert 0 and the overflow batch shares one cluster
        gate.requires_grad_(False)
        self.head = torch.nn.Linear(D, 1)

    def forward(self, x):
        out, l_aux, _ = self.moe(x)
        return self.head(out).float().square().mean() + l_aux


def overflow_batch(device):
    sign = torch.tensor([1, -1, -1, -1, 1, -1, -1, -1], dtype=torch.float32).unsqueeze(1)
    return (sign * 60000 * _pattern("cpu")).view(1, 8, D).to(device, torch.float16)


def loss_scaler_scenario(rank, world_size, optimizer=None):
    """Three steps: normal, overflow (on the last rank only), normal. Returns this rank's observations."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True  # see the module docstring: a speed gate, not a correctness one
    config = dict(FP16_CONFIG)
    if optimizer is not None:
        config["optimizer"] = optimizer
    device = torch.device(accelerator.device_name(), accelerator.current_device()) \
        if accelerator.device_name() != "cpu" else torch.device("cpu")
    net = Net(world_size)
    lshmoe_plugin.enable(config, net)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters() if p.requires_grad],
                                      config=config)
    torch.manual_seed(10 + rank)
    normal = [torch.randn(1, 8, D).to(device, torch.float16) for _ in range(3)]
    batches = [normal[0], overflow_batch(device) if rank == world_size - 1 else normal[1], normal[2]]
    report = {"optimizer": type(engine.optimizer).__name__}

    # The overflow comes from the compressor: on the same batch the stock layer's output is finite.
    with torch.no_grad():
        lshmoe_plugin.disable()
        stock = engine.module.moe(batches[1])[0]
        lshmoe_plugin.enable(config, net)
        compressed = engine.module.moe(batches[1])[0]
    report["stock_finite"] = bool(torch.isfinite(stock).all())
    report["compressed_overflows"] = bool(torch.isinf(compressed).any())

    for step, batch in enumerate(batches):
        before = [p.detach().clone() for p in engine.module.parameters()]
        scale = engine.optimizer.loss_scale
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        after = list(engine.module.parameters())
        report[step] = {
            "loss_finite": bool(torch.isfinite(loss)),
            "scale_before": scale, "scale_after": engine.optimizer.loss_scale,
            "skipped_steps": engine.skipped_steps,
            "weights_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "weights_finite": all(bool(torch.isfinite(p).all()) for p in after),
        }
    lshmoe_plugin.disable()
    return report


def check_loss_scaler(reports):
    """The assertions shared by the CPU and the GPU runs."""
    world_size = len(reports)
    overflowing = reports[-1]
    assert overflowing["stock_finite"] and overflowing["compressed_overflows"], overflowing
    for rank, report in enumerate(reports):
        first, overflow, last = report[0], report[1], report[2]
        assert first["skipped_steps"] == 0 and not first["weights_unchanged"] and first["weights_finite"], (rank, first)
        # the overflow step: skipped on every rank, scale halved, no weight touched
        assert overflow["skipped_steps"] == 1, (rank, overflow)
        assert overflow["scale_after"] == overflow["scale_before"] / 2, (rank, overflow)
        assert overflow["weights_unchanged"] and overflow["weights_finite"], (rank, overflow)
        if rank == world_size - 1:
            assert not overflow["loss_finite"]
        # training resumes at the lowered scale
        assert last["skipped_steps"] == 1 and last["scale_before"] == overflow["scale_after"], (rank, last)
        assert last["loss_finite"] and not last["weights_unchanged"] and last["weights_finite"], (rank, last)


@pytest.mark.parametrize("world_size", [1, 2])
def test_fp16_loss_scaler_skips_a_step_whose_compressed_output_overflows(world_size):
    reports = run_distributed(loss_scaler_scenario, world_size)
    assert reports[0]["optimizer"] == "FP16_UnfusedOptimizer"
    check_loss_scaler(reports)
