"""Every scaled format of test_wire.FORMATS on CUDA (the fused kernels of kernels/wire_triton.py,
wire_fp4_triton.py and wire_fp6_triton.py, wherever they run): the codec gives the CPU's bits, runs without a host
synchronisation and replays from a CUDA graph. Not run on the CPU machine this was written on.
    python -m pytest -q tests/gpu/test_wire_formats_cuda.py
"""
import pytest
import torch
from test_wire import FORMATS, heavy_tailed, scaled_format  # noqa: E402

from lshmoe_plugin import wire

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("block", [None, 32, 100])
@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_cuda_codec_gives_the_cpus_bits(fmt, scale, block, dtype):
    codec = scaled_format(fmt, block, scale)
    x = (heavy_tailed(8, 64, 1023, seed=4) / 64).to(dtype)  # within fp16's range; odd d: FP4's last half byte
    on_cpu, on_gpu = codec.encode(x), codec.encode(x.cuda())
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(codec.decode(on_gpu, 1023, dtype).cpu(), codec.decode(on_cpu, 1023, dtype))


@pytest.mark.parametrize("fmt, scale", FORMATS)
def test_codec_never_synchronises_and_replays_from_a_cuda_graph(fmt, scale):
    codec = scaled_format(fmt, 32, scale)
    static = heavy_tailed(8, 64, 1024, seed=5).to(torch.bfloat16).cuda()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        eager = wire.send(codec, static, lambda buffer: buffer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        wire.send(codec, static, lambda buffer: buffer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = wire.send(codec, static, lambda buffer: buffer)
    graph.replay()
    assert torch.equal(captured, eager)
    fresh = heavy_tailed(8, 64, 1024, seed=6).to(torch.bfloat16).cuda()
    static.copy_(fresh)
    graph.replay()
    assert torch.equal(captured, wire.send(codec, fresh, lambda buffer: buffer))
