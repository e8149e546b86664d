"""Which implementation ops.select picks: the reference on the CPU, the fused kernels on CUDA, and loud errors."""
import sys
from types import SimpleNamespace

import pytest
import torch

from lshmoe_plugin import ops, wire
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError

FAKE_KERNELS = SimpleNamespace(name="triton", OPS=SimpleNamespace(name="triton"))


def _replace_kernels_module(monkeypatch, module):
    """Make `from .kernels import triton_ops` see `module` (None: fail as if triton were not installed)."""
    import lshmoe_plugin.kernels
    monkeypatch.delattr(lshmoe_plugin.kernels, "triton_ops", raising=False)
    monkeypatch.setitem(sys.modules, "lshmoe_plugin.kernels.triton_ops", module)


def test_reference_exposes_the_stages():
    for name in ("lsh_codes", "cluster_fixed", "cluster_variable", "centroids_by_slot", "expand_with_residual"):
        assert callable(getattr(ops.REFERENCE, name))


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_cpu_runs_the_reference(kernel):
    assert ops.select(kernel, torch.device("cpu")) is ops.REFERENCE


def test_torch_is_the_reference_on_cuda_too():
    assert ops.select("torch", torch.device("cuda")) is ops.REFERENCE


def test_triton_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="kernel='triton' needs a CUDA device.*'auto' or 'torch'"):
        ops.select("triton", torch.device("cpu"))


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="allowed values"):
        ops.select("cuda", torch.device("cpu"))
    with pytest.raises(LSHMoEConfigError, match="kernel"):
        LSHMoEConfig(kernel="cuda")


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_cuda_picks_the_fused_kernels(kernel, monkeypatch):
    _replace_kernels_module(monkeypatch, FAKE_KERNELS)
    assert ops.select(kernel, torch.device("cuda")) is FAKE_KERNELS.OPS


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_cuda_without_triton_raises_instead_of_falling_back(kernel, monkeypatch):
    _replace_kernels_module(monkeypatch, None)
    with pytest.raises(RuntimeError, match="needs triton.*kernel='torch'"):
        ops.select(kernel, torch.device("cuda"))


def test_compressor_on_cpu_uses_the_reference():
    compressor = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", compression_rate=0.5), layer_index=0)
    compressor.compress_fixed(torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool))
    assert compressor._ops is ops.REFERENCE


@pytest.mark.parametrize("name, kernels", [("fp8_e4m3", "wire_triton"), ("fp4_e2m1", "wire_fp4_triton")])
def test_the_wire_format_takes_the_kernel_key_and_the_cpu_runs_its_reference(name, kernels, monkeypatch):
    """lsh_moe.kernel reaches each scaled format through wire_format's cache key: 'torch' is the reference
    everywhere, 'auto' the reference off CUDA (without importing the fused kernels), 'triton' off CUDA an error; the
    fused kernels on CUDA are tests/gpu/test_wire_triton.py's and test_wire_fp4_triton.py's."""
    assert [f.kernel for f in wire.formats(LSHMoEConfig(dispatch_dtype=name, kernel="torch"), "dispatch")] == [
        "torch", "torch"]
    assert wire.wire_format(name, 16).kernel == "auto"
    monkeypatch.setitem(sys.modules, f"lshmoe_plugin.kernels.{kernels}", None)  # importing it would raise
    x = torch.randn(3, 32)
    auto, reference = (wire.wire_format(name, 16, kernel=kernel) for kernel in ("auto", "torch"))
    assert torch.equal(auto.encode(x), reference.encode(x))
    assert torch.equal(auto.decode(auto.encode(x), 32, x.dtype), reference.decode(reference.encode(x), 32, x.dtype))
    with pytest.raises(RuntimeError, match="kernel='triton' needs a CUDA device.*'auto' or 'torch'"):
        wire.wire_format(name, 16, kernel="triton").encode(x)
