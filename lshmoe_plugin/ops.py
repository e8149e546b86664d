"""Picks the implementation of the compressor's hot stages: the PyTorch reference, or fused GPU kernels.

Every implementation exposes the same four functions with the signatures of the reference modules:
``lsh_codes``, ``assign_clusters``, ``centroids_by_slot`` and ``expand_with_residual``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import clustering, hashing

REFERENCE = SimpleNamespace(
    name="torch",
    lsh_codes=hashing.lsh_codes,
    assign_clusters=clustering.assign_clusters,
    centroids_by_slot=clustering.centroids_by_slot,
    expand_with_residual=clustering.expand_with_residual,
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def select(kernel: str, device: torch.device) -> SimpleNamespace:
    """The ops for `kernel` ("auto", "torch", "triton") on `device`; "triton" off CUDA is an error, not a fallback."""
    if kernel == "torch":
        return REFERENCE
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "triton":
        if not (on_cuda and triton_available()):
            raise RuntimeError(f"lsh_moe.kernel='triton' needs a CUDA device and an importable triton; got device "
                               f"{device}. Allowed here: 'auto' or 'torch'")
        return _triton_ops()
    if on_cuda and triton_available():
        return _triton_ops()
    return REFERENCE


def _triton_ops() -> SimpleNamespace:
    try:
        from .kernels import triton_ops
    except ImportError:
        return REFERENCE
    return triton_ops.OPS
