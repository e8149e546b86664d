"""Run a test function in N real processes with a real gloo process group (DeepSpeed on the CPU).

Modelled on DeepSpeed's own `DistributedTest`: no fake process groups, no mocked all-to-all. The function
runs in every rank as ``fn(rank, world_size, *args)``; what every rank returns comes back to the test, as a list
in rank order, and an exception in any rank fails the test with that rank's traceback. A test asserts on every
rank's result: a rank that computed something wrong while rank 0 was right must fail it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's CPU communication backend (csrc/cpu/comm/shm.cpp) maps a 69 MB file per rank, named by master
# address and port, into /dev/shm at every init_distributed whose ranks are all local (LOCAL_SIZE, set by the
# deepspeed launcher) and never unlinks it. Tests pick a fresh port each,
# so a full run would leave gigabytes of RAM behind; once /dev/shm is full a rank dies on its mapping. The
# test session removes, after each test, the buffers that appeared while it ran (tests/conftest.py).
DEEPSPEED_SHM_BUFFERS = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"


def deepspeed_shm_buffers() -> set[str]:
    return set(glob.glob(DEEPSPEED_SHM_BUFFERS))


def remove_deepspeed_shm_buffers_since(before: set[str]) -> None:
    """Unlink the buffers that are not in `before`: only call it once the ranks that made them have exited."""
    for path in deepspeed_shm_buffers() - before:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


_cpu_comm_op_built = False


def build_deepspeed_cpu_comm_op() -> None:
    """JIT-build DeepSpeed's CPU shared-memory comm op once, in the test process, before any rank starts.

    Every `deepspeed.init_distributed` on the CPU loads this op through torch's JIT builder, which guards its
    build directory with a lock file (torch.utils.file_baton). Two ranks compiling at once take turns on it
    (44 s on a 2-core machine), and a rank killed while it holds the lock leaves the file behind: from then on
    every init on the machine waits for it forever. Built here first, the ranks only load it; and the session
    builds into its own directory (TORCH_EXTENSIONS_DIR, set in tests/conftest.py), so no lock left by an
    earlier run on this machine can stall it.
    """
    global _cpu_comm_op_built
    if _cpu_comm_op_built or os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
    _cpu_comm_op_built = True


def _deepspeed_worker(rank: int, world_size: int, port: int, queue, backend: str, fn: Callable,
                      args: tuple) -> None:
    """One rank: DeepSpeed's process group on `backend` (gloo: its CPU accelerator; nccl: its CUDA accelerator, one
    GPU per rank), then ``fn``, whose result it sends back."""
    on_gpu = backend == "nccl"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      DS_ACCELERATOR="cuda" if on_gpu else "cpu")
    import torch
    try:
        import deepspeed
        if on_gpu:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)  # N ranks on a 2-core CI machine: more threads only oversubscribe it
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(worker: Callable, world_size: int, *args: Any, timeout: float = 600) -> dict:
    """Start ``worker(rank, world_size, port, queue, *args)`` in `world_size` spawned processes.

    Each rank puts ``(rank, "ok" | "error", payload)`` on the queue; returns ``{rank: payload}`` and fails the
    test with the rank's traceback on the first error. A rank that dies without reporting (killed, out of
    memory, a crash in native code) or a run past `timeout` seconds fails the test too, naming the rank:
    waiting on the queue alone would hang the whole test session. Workers with a setup of their own (Megatron on
    NCCL, tests/gpu/test_megatron_cuda.py) reuse this collection.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world_size, port, queue, *args)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    exited_silently: dict[int, float] = {}
    results = {}
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                _check_ranks(procs, results, exited_silently, deadline, timeout)
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join(max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _check_ranks(procs: list, results: dict, exited_silently: dict, deadline: float, timeout: float) -> None:
    """Fail the test for a rank that exited without a report, or for a run past its deadline."""
    now = time.monotonic()
    for rank, p in enumerate(procs):
        if rank in results or p.exitcode is None:
            continue
        # A rank that reported may exit before its message is read: give the message a few seconds to arrive.
        first_seen = exited_silently.setdefault(rank, now)
        if now - first_seen > 5.0:
            raise AssertionError(f"rank {rank} exited with code {p.exitcode} without reporting a result")
    if now > deadline:
        missing = sorted(set(range(len(procs))) - set(results))
        raise AssertionError(f"ranks {missing} did not finish within {timeout:.0f} s")


def in_rank_order(results: dict) -> list:
    return [results[rank] for rank in range(len(results))]


@contextlib.contextmanager
def accelerator_for_spawned_ranks(name: str):
    """DS_ACCELERATOR=`name` in the environment the spawned ranks start with. A rank unpickles `fn` first, which
    imports fn's test module: one that imports deepspeed at module level fixes DeepSpeed's accelerator there,
    before `_deepspeed_worker` can set it (tests/conftest.py sets "cpu" for the whole session), and its engine
    would then keep the model on the CPU under NCCL."""
    before = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DS_ACCELERATOR")
        else:
            os.environ["DS_ACCELERATOR"] = before


def run_deepspeed_nccl(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes on CUDA with NCCL; every rank's
    result, in rank order."""
    with accelerator_for_spawned_ranks("cuda"):
        return in_rank_order(spawn_ranks(_deepspeed_worker, world_size, "nccl", fn, args, timeout=timeout))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned gloo processes; every rank's result, in rank
    order."""
    build_deepspeed_cpu_comm_op()
    return in_rank_order(spawn_ranks(_deepspeed_worker, world_size, "gloo", fn, args, timeout=timeout))
