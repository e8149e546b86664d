"""Locality-sensitive hash functions: turn tokens into bucket codes with one matrix product.

Every family (`hash_families.HASH_FAMILIES`) projects each token onto ``num_hashes * width`` directions at once
and takes an argmax per hash. Argmax is scale-invariant, so normalising the tokens first would change no code and
is skipped.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from .config import LSHMoEConfig, LSHMoEConfigError


def layer_generator(seed: int, layer_index: int, draw: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, layer, draw): the same projections on every rank, device and run.
    Draw 0 is the one fixed draw of a run without `redraw_interval`."""
    name = f"lshmoe:{seed}:{layer_index}" + (f":{draw}" if draw else "")
    digest = hashlib.sha256(name.encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def projection_width(config: LSHMoEConfig) -> int:
    return config.family.width(config.hash_dim)


def hash_projections(config: LSHMoEConfig, d_model: int, layer_index: int, draw: int = 0) -> torch.Tensor:
    """The (d_model, num_hashes * width) float32 matrix of all hash directions of one layer (its `draw`-th)."""
    gen = layer_generator(config.seed, layer_index, draw)
    family, width = config.family, projection_width(config)
    # A rotation has at most d_model orthonormal directions; spherical points need no such bound.
    if family.orthonormal and width > d_model:
        raise LSHMoEConfigError(f"lsh_moe.hash_dim={config.hash_dim} exceeds d_model={d_model} of MoE layer "
                                f"{layer_index}; allowed: 1 <= hash_dim <= d_model for {family.name} (or "
                                f"hash_type 'spherical', which takes any hash_dim)")
    blocks = []
    for _ in range(config.num_hashes):
        gauss = torch.randn(d_model, width, generator=gen, dtype=torch.float64)
        if family.orthonormal:
            q, r = torch.linalg.qr(gauss)
            # Fix the signs so the rotation is uniformly distributed (QR alone biases them).
            block = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        else:
            block = gauss / gauss.norm(dim=0, keepdim=True)
        blocks.append(block)
    return torch.cat(blocks, dim=1).to(torch.float32)


def codes_from_projections(projected: torch.Tensor, config: LSHMoEConfig) -> torch.Tensor:
    """Combine per-hash argmax codes of projected tokens (N, num_hashes * width) into one int64 code (N,).

    The first hash is the most significant digit, so sorting by code groups tokens that agree on the
    first hashes: merging neighbouring buckets in that order merges similar ones.
    """
    n = projected.shape[0]
    per_hash = projected.view(n, config.num_hashes, projection_width(config))
    if config.family.signed_digit:
        index = per_hash.abs().argmax(dim=-1)
        negative = torch.gather(per_hash, -1, index.unsqueeze(-1)).squeeze(-1) < 0
        digits = index * 2 + negative.long()
    else:
        digits = per_hash.argmax(dim=-1)
    shifts = torch.arange(config.num_hashes - 1, -1, -1, device=projected.device) * config.code_bits_per_hash
    return (digits << shifts).sum(dim=-1)


def lsh_codes(tokens: torch.Tensor, projections: torch.Tensor, config: LSHMoEConfig,
              groups: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
              num_groups: int = 1) -> torch.Tensor:
    """Bucket codes (N,) of tokens (N, d), hashed relative to the mean of their group.

    Tokens routed to one expert share a large common component (the gate picked them for it); hashing them
    around their group's mean lets the hash split that cluster instead of sending all of it to one bucket.
    The mean is taken in the projected space (linearity), so it costs nothing over the token matrix.
    """
    projected = tokens.matmul(projections.to(tokens.dtype)).float()
    if groups is not None:
        weight = valid.float().unsqueeze(-1) if valid is not None else torch.ones_like(projected[:, :1])
        sums = torch.zeros(num_groups, projected.shape[1], device=projected.device)
        sums.index_add_(0, groups, projected * weight)
        counts = torch.zeros(num_groups, device=projected.device).index_add_(0, groups, weight.squeeze(-1))
        projected = projected - (sums / counts.clamp(min=1).unsqueeze(-1))[groups]
    return codes_from_projections(projected, config)
