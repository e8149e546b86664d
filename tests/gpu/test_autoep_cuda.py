"""The AutoEP scenarios of tests/test_autoep_patch.py on CUDA with NCCL (DeepSpeed's CUDA accelerator, its Triton
permutation kernels). Runs on min(2, GPUs) ranks; needs transformers.
    python -m pytest -q tests/gpu/test_autoep_cuda.py
"""
import os
import traceback

import test_autoep_patch as autoep  # noqa: E402
import torch
import transformers  # noqa: E402,F401  (installed by the README's [test] extra)
from distributed import spawn_ranks  # noqa: E402


def _worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cuda")
    try:
        import deepspeed
        torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
        queue.put((rank, "ok", autoep.scenarios(rank, world_size)))
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))


def test_autoep_patch_on_cuda():
    world_size = min(2, torch.cuda.device_count())
    results = spawn_ranks(_worker, world_size)
    for check in autoep.ALL_CHECKS:
        check(world_size, results[0])
