"""The wire formats on CUDA: the codec gives the CPU's bits, runs without a host synchronisation and replays from a
CUDA graph; DeepSpeed's layer with FP8 crossings equals the hand-built reference over NCCL (the checks of
tests/test_deepspeed_wire.py on min(2, GPUs) ranks). Not run on the CPU machine this was written on.
    python -m pytest -q tests/gpu/test_wire_cuda.py
"""
import pytest
import test_deepspeed_wire as ds_wire  # noqa: E402
import torch
from distributed import run_deepspeed_nccl  # noqa: E402
from test_deepspeed_patch import failed  # noqa: E402
from test_wire import heavy_tailed  # noqa: E402

from lshmoe_plugin import wire

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("block", [None, 128, 100])
def test_cuda_codec_gives_the_cpus_bits(block, dtype):
    fmt = wire.FP8E4M3(block)
    x = (heavy_tailed(8, 64, 1024, seed=4) / 64).to(dtype)  # within fp16's range
    on_cpu, on_gpu = fmt.encode(x), fmt.encode(x.cuda())
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(fmt.decode(on_gpu, 1024, dtype).cpu(), fmt.decode(on_cpu, 1024, dtype))


def check_sync_free_and_replayable(fmt, static, fresh, expected_format=None):
    """`fmt` sends `static` (CUDA rows) without a device-to-host synchronisation, and a CUDA graph captured on it
    returns what eager sending gives, then, after `fresh` is copied in and the graph replayed, what
    `expected_format` (default `fmt`) gives for `fresh`."""
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        eager = wire.send(fmt, static, lambda buffer: buffer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        wire.send(fmt, static, lambda buffer: buffer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = wire.send(fmt, static, lambda buffer: buffer)
    graph.replay()
    assert torch.equal(captured, eager)
    static.copy_(fresh)
    graph.replay()
    assert torch.equal(captured, wire.send(expected_format or fmt, fresh, lambda buffer: buffer))


def test_codec_never_synchronises_and_replays_from_a_cuda_graph():
    static = heavy_tailed(8, 64, 1024, seed=5).to(torch.bfloat16).cuda()
    fresh = heavy_tailed(8, 64, 1024, seed=6).to(torch.bfloat16).cuda()
    check_sync_free_and_replayable(wire.FP8E4M3(128), static, fresh)


@pytest.mark.parametrize("check", [ds_wire.check_wire_formats, ds_wire.check_lsh_with_fp8,
                                   ds_wire.check_fp8_decides_by_cost_and_evaluates_stock])
def test_deepspeed_layer_with_fp8_crossings_over_nccl(check):
    for rank, report in enumerate(run_deepspeed_nccl(check, min(2, torch.cuda.device_count()), "cuda")):
        assert all(report.values()), (rank, failed(report))
