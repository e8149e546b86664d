"""Edge inputs through the fused Triton kernels: the fp16 cases of tests/test_fp16_overflow.py (fp32 sums, no
intermediate overflow, inf never clamped) and empty dispatches (tests/test_edge_inputs.py's empty batches).
    python -m pytest -q tests/gpu/test_edge_kernels.py      (TRITON_INTERPRET=1 on a CPU)
"""
import test_edge_inputs as edges  # noqa: E402
import test_fp16_overflow as fp16  # noqa: E402
import torch

from lshmoe_plugin import LSHCompressor, LSHMoEConfig
from lshmoe_plugin.kernels import triton_ops

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # cpu: TRITON_INTERPRET=1


def _fused(compressor):
    compressor._ops = triton_ops.OPS  # the fused kernels on any device: kernel="triton" refuses the interpreter's CPU
    return compressor


def test_compressor_fp16_edges_through_the_fused_kernels():
    result = fp16.compressor_overflow_checks(DEVICE, _fused(fp16.overflow_compressor()))
    assert all(result.values()), result


def test_empty_dispatch_through_the_fused_kernels():
    compressor = _fused(LSHCompressor(LSHMoEConfig(enabled=True, method="paper", compression_rate=0.2), 0))
    results = edges.empty_dispatch_checks(compressor, DEVICE)
    assert all(results.values()), results
