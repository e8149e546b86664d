"""Picks the implementation of the compressor's hot stages: the PyTorch reference, or fused GPU kernels.

Every implementation exposes the same functions with the signatures of the reference modules:
``lsh_codes`` (hash), ``cluster_fixed`` and ``cluster_variable`` (hash + assign, per layout, returning
`clustering.Clusters`), ``centroids_by_slot`` (reduce) and ``expand_with_residual`` (expand + residual).
"""
from __future__ import annotations

import importlib
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
    """The ops for `kernel` ("auto", "torch", "triton") on `device` (which runs where: `runs_fused`)."""
    return fused_module("triton_ops", kernel).OPS if runs_fused(kernel, device) else REFERENCE


def runs_fused(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` ("auto", "torch", "triton") runs the fused kernels on `device`.

    "torch" is the reference anywhere. "auto" is the reference off CUDA and the fused kernels on CUDA, where a
    missing or broken triton raises (`fused_module`) instead of silently running the slow path. "triton" off CUDA
    is an error.
    """
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"lsh_moe.kernel={kernel!r}: allowed values are 'auto', 'torch', 'triton'")
    if kernel == "torch":
        return False
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "triton" and not on_cuda:
        raise RuntimeError(f"lsh_moe.kernel='triton' needs a CUDA device, got device {device}. "
                           f"Allowed here: 'auto' or 'torch'")
    return on_cuda


def fused_module(name: str, kernel: str):
    """lshmoe_plugin.kernels.<name>, imported for `kernel`; an import failure raises naming the way out."""
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}")
    except ImportError as error:
        raise RuntimeError(f"lsh_moe.kernel={kernel!r} on a CUDA device needs triton (it ships with PyTorch's CUDA "
                           f"wheels) but importing the fused kernels failed: {error}. Install triton, or set "
                           f"lsh_moe.kernel='torch' to run the PyTorch reference on the GPU") from error
