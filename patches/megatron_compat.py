"""Lets Megatron-core's MoE layer run without Transformer Engine, and on a CPU-only PyTorch with gloo.

For tests, CPU smoke runs and GPU hosts without Transformer Engine; it changes no numerics. Megatron-core assumes
a CUDA device in places that the all-to-all MoE path reaches, each of which raises on a CPU-only torch before any
arithmetic happens, and 0.16 has one name missing without Transformer Engine:
- ``torch.cuda.current_device()`` is where Megatron places new buffers (the all-to-all output, the router weight);
  here it answers the CPU device.
- ``MoEAlltoAllTokenDispatcher`` copies its split sizes device-to-host on a side CUDA stream; here they are
  already on the host, so the copy becomes the plain numpy conversion the CUDA path ends with.
- Megatron's model-parallel RNG tracker forks CUDA generator states around attention dropout; here it is
  Megatron's own no-op tracker (the one it builds for inference), so dropout draws from the CPU generator.
- megatron-core 0.16 leaves ``moe_utils.te_general_gemm`` undefined when Transformer Engine is absent (0.19 sets
  it to None); the router then fails with a NameError, on CUDA too. Here it is set to None, which selects the
  torch matmul.
Where CUDA is available only that last fix is made: the stock CUDA path is the one to run there.
"""
from __future__ import annotations

import torch

_ORIGINAL = {}


def is_applied() -> bool:
    return bool(_ORIGINAL)


def apply() -> bool:
    """Install the fixes this host needs (idempotent). Returns whether the CPU shims are in place."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    if not is_applied():
        _ORIGINAL["had_te_gemm"] = hasattr(moe_utils, "te_general_gemm")
        if not _ORIGINAL["had_te_gemm"]:
            moe_utils.te_general_gemm = None
    if "current_device" in _ORIGINAL or torch.cuda.is_available():
        return "current_device" in _ORIGINAL
    _ORIGINAL["current_device"] = torch.cuda.current_device
    _ORIGINAL["dtoh"] = MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize
    _ORIGINAL["dtoh_stream"] = MoEAlltoAllTokenDispatcher.cuda_dtoh_stream
    torch.cuda.current_device = _cpu_device
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_splits
    from megatron.core.tensor_parallel import random
    _ORIGINAL["rng_tracker"] = (random._CUDA_RNG_STATE_TRACKER, random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    # A non-None class attribute stops __init__ from creating a CUDA stream.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
    return True


def revert() -> None:
    if not is_applied():
        return
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    if "current_device" in _ORIGINAL:
        torch.cuda.current_device = _ORIGINAL.pop("current_device")
        MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _ORIGINAL.pop("dtoh")
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _ORIGINAL.pop("dtoh_stream")
        from megatron.core.tensor_parallel import random
        random._CUDA_RNG_STATE_TRACKER, random._CUDA_RNG_STATE_TRACKER_INITIALIZED = _ORIGINAL.pop("rng_tracker")
    if not _ORIGINAL.pop("had_te_gemm"):
        del moe_utils.te_general_gemm


class _NoStream:
    """Placeholder for the dispatcher's DtoH stream on a host without CUDA."""


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _host_splits(self, point: str, tokens_per_expert=None):
    # The CUDA path hands the all-to-all its split sizes as numpy arrays; do the same so the gloo call sees the
    # same argument types.
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert
