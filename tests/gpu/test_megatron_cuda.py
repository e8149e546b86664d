"""The Megatron scenarios of tests/test_megatron_patch.py on CUDA with NCCL: the stock CUDA-stream DtoH path.

Runs on as many GPUs as there are, up to 2 (expert parallel size = that number); skipped without CUDA.
    python -m pytest -q tests/gpu/test_megatron_cuda.py
"""
import os
import traceback

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import megatron_helpers as helpers  # noqa: E402
from distributed import free_port  # noqa: E402


def _worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from lshmoe_plugin.patches import megatron_compat
        megatron_compat.apply()  # only the missing-name fix of megatron-core 0.16 without Transformer Engine
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
        parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
        result = helpers.compare_patched_and_stock(rank, world_size, torch.device("cuda", rank))
        queue.put((rank, "ok", result))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))


def test_megatron_patch_on_cuda():
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
    per_rank = results[0]
    for check in helpers.ALL_CHECKS:
        check(world_size, per_rank)
