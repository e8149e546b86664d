"""Run a test function in N real processes with a real gloo process group (DeepSpeed on the CPU).

Modelled on DeepSpeed's own `DistributedTest`: no fake process groups, no mocked all-to-all. The function
runs in every rank as ``fn(rank, world_size, *args)``; whatever rank 0 returns comes back to the test, and an
exception in any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, queue, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(1)  # N ranks on a 2-core CI machine: more threads only oversubscribe it
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(worker: Callable, world_size: int, *args: Any, timeout: float = 600) -> dict:
    """Start ``worker(rank, world_size, port, queue, *args)`` in `world_size` spawned processes.

    Each rank puts ``(rank, "ok" | "error", payload)`` on the queue; returns ``{rank: payload}`` and fails the
    test with the rank's traceback on the first error. Workers that need another backend (NCCL on GPUs) bring
    their own setup and reuse this collection.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world_size, port, queue, *args)) for r in range(world_size)]
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
        p.join(timeout)
    return results


def _nccl_worker(rank: int, world_size: int, port: int, queue, fn: Callable, args: tuple) -> None:
    """`_worker` on CUDA: DeepSpeed's CUDA accelerator, one GPU per rank, NCCL; every rank's result comes back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cuda")
    import torch
    try:
        import deepspeed
        torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_deepspeed_nccl(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> dict:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes on CUDA with NCCL; {rank: result}."""
    return spawn_ranks(_nccl_worker, world_size, fn, args, timeout=timeout)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> Any:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes; return rank 0's result."""
    return spawn_ranks(_worker, world_size, fn, args, timeout=timeout)[0]
