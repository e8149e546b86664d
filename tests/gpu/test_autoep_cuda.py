"""The AutoEP scenarios of tests/test_autoep_patch.py on CUDA with NCCL (DeepSpeed's CUDA accelerator, its Triton
permutation kernels). Runs on min(2, GPUs) ranks; needs transformers.
    python -m pytest -q tests/gpu/test_autoep_cuda.py
"""
import os
import traceback

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import test_autoep_patch as autoep  # noqa: E402
from distributed import free_port  # noqa: E402


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
    import torch.multiprocessing as mp
    world_size = min(2, torch.cuda.device_count())
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "error":
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} failed:\n{payload}")
        results[rank] = payload
    for p in procs:
        p.join(120)
    for check in autoep.ALL_CHECKS:
        check(world_size, results[0])
