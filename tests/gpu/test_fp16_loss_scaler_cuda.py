"""tests/test_fp16_overflow.py's loss-scaler scenario on CUDA: DeepSpeed's own fp16 support (no capability gate
opened), NCCL, and the fused Triton kernels in the compressor. Runs on min(2, GPUs) ranks; the overflow happens on
the last rank. The compressor-level fp16 checks through the kernels are in tests/gpu/test_edge_kernels.py.
    python -m pytest -q tests/gpu/test_fp16_loss_scaler_cuda.py
"""
import os
import re

import pytest
import test_fp16_overflow as fp16  # noqa: E402
import torch
from distributed import run_deepspeed_nccl  # noqa: E402


def _arch_list_deepspeed_parses(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST without arch-variant suffixes ('9.0a' -> '9.0').

    DeepSpeed 0.19.8's JIT builder (FusedAdam) parses each entry's minor version with int() and fails on the
    variants PyTorch accepts (DeepSpeed PR #8619, open); the H200 image sets such a list. The kernels built for
    the plain target run on the same GPU.
    """
    entries = [entry for entry in arch_list.replace(" ", ";").split(";") if entry]
    return ";".join(dict.fromkeys(re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", entry) for entry in entries))


def _scenario(rank, world_size, optimizer):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # read by FusedAdam's JIT build in deepspeed.initialize
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list_deepspeed_parses(os.environ["TORCH_CUDA_ARCH_LIST"])
    return fp16.loss_scaler_scenario(rank, world_size, optimizer)


# torch's Adam: DeepSpeed's FP16_UnfusedOptimizer; DeepSpeed's FusedAdam (its fused_adam op, built on first use):
# FP16_Optimizer. The two keep their own overflow checks.
@pytest.mark.parametrize("optimizer,expected", [
    ({"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}, "FP16_UnfusedOptimizer"),
    ({"type": "Adam", "params": {"lr": 1e-3}}, "FP16_Optimizer"),
], ids=["torch_adam", "fused_adam"])
def test_fp16_loss_scaler_skips_a_step_whose_compressed_output_overflows_on_cuda(optimizer, expected):
    world_size = min(2, torch.cuda.device_count())
    reports = run_deepspeed_nccl(_scenario, world_size, optimizer)
    assert reports[0]["optimizer"] == expected
    fp16.check_loss_scaler(reports)
