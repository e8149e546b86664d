"""Picks the implementation of the compressor's hot stages: the PyTorch reference, or fused GPU kernels.

Every implementation exposes the same functions with the signatures of the reference modules:
``lsh_codes`` (hash), ``cluster_fixed`` and ``cluster_variable`` (hash + assign, per layout, returning
`clustering.Clusters`), ``centroids_by_slot`` (reduce) and ``expand_with_residual`` (expand + residual).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import clustering, hashing

REFERENCE = SimpleNamespace(
    name="torch",
    lsh_codes=hashing.lsh_codes,
    cluster_fixed=clustering.cluster_fixed,
    cluster_variable=clustering.cluster_variable,
    centroids_by_slot=clustering.centroids_by_slot,
    expand_with_residual=clustering.expand_with_residual,
)


def triton_available() -> bool:
    """True when a CUDA device is visible and triton imports (the fused kernels could run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def select(kernel: str, device: torch.device) -> SimpleNamespace:
    """The ops for `kernel` ("auto", "torch", "triton") on `device`.

    "torch" is the reference anywhere. "auto" is the reference off CUDA and the fused kernels on CUDA: a missing
    or broken triton there raises instead of silently running the slow path. "triton" off CUDA is an error.
    """
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"lsh_moe.kernel={kernel!r}: allowed values are 'auto', 'torch', 'triton'")
    if kernel == "torch":
        return REFERENCE
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "triton" and not on_cuda:
        raise RuntimeError(f"lsh_moe.kernel='triton' needs a CUDA device, got device {device}. "
                           f"Allowed here: 'auto' or 'torch'")
    if not on_cuda:
        return REFERENCE
    return _triton_ops(kernel)


def _triton_ops(kernel: str) -> SimpleNamespace:
    try:
        from .kernels import triton_ops
    except ImportError as error:
        raise RuntimeError(f"lsh_moe.kernel={kernel!r} on a CUDA device needs triton (it ships with PyTorch's CUDA "
                           f"wheels) but importing the fused kernels failed: {error}. Install triton, or set "
                           f"lsh_moe.kernel='torch' to run the PyTorch reference on the GPU") from error
    return triton_ops.OPS
