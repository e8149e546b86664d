"""The Megatron scenarios of tests/test_megatron_patch.py on CUDA with NCCL: the stock CUDA-stream DtoH path.

Runs on as many GPUs as there are, up to 2 (expert parallel size = that number); collected only where CUDA is
present (tests/gpu/conftest.py).
    python -m pytest -q tests/gpu/test_megatron_cuda.py
"""
import os
import traceback

import megatron.core  # noqa: E402,F401  (installed by the README's [test] extra)
import megatron_helpers as helpers  # noqa: E402
import torch
from distributed import spawn_ranks  # noqa: E402


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
    world_size = min(2, torch.cuda.device_count())
    results = spawn_ranks(_worker, world_size)
    per_rank = [results[rank] for rank in range(world_size)]
    for check in helpers.ALL_CHECKS:
        check(world_size, per_rank)
