"""The AutoEP scenarios of tests/test_autoep_patch.py on CUDA with NCCL (DeepSpeed's CUDA accelerator, its Triton
permutation kernels). Runs on min(2, GPUs) ranks; needs transformers.
    python -m pytest -q tests/gpu/test_autoep_cuda.py
"""
import test_autoep_patch as autoep  # noqa: E402
import test_autoep_wire as autoep_wire  # noqa: E402
import torch
import transformers  # noqa: E402,F401  (installed by the README's [test] extra)
from distributed import run_deepspeed_nccl  # noqa: E402


def test_autoep_patch_on_cuda():
    world_size = min(2, torch.cuda.device_count())
    results = run_deepspeed_nccl(autoep.scenarios, world_size)
    for check in autoep.ALL_CHECKS:
        check(world_size, results)


def test_autoep_wire_formats_on_cuda():
    """FP8 crossings over NCCL (tests/test_autoep_wire.py's scenarios; not run on the CPU machine they were written
    on)."""
    world_size = min(2, torch.cuda.device_count())
    autoep_wire.check_all(world_size, run_deepspeed_nccl(autoep_wire.scenarios, world_size))
