"""Fitted error compensation: carry a token's residual into its output through a map fitted to the expert.

The paper's compensation, E(c) + (x - c), is exact only where the expert is the identity. An FFN expert is far
from it: at initialisation its output is a few percent of its input's norm, so the added residual can outweigh
the expert's own output many times over (docs/quality.md, output error). The first-order correction is
E(c) + J(c)(x - c), but the Jacobian lives with the expert, on another rank. What the sender does hold are the
(centroid, expert output) pairs of every cluster it sent: a least-squares fit of the outputs' deviations on the
centroids' deviations, per expert, is the expert's average Jacobian as far as those pairs show it, at no extra
communication. The fit is a constant of the step (no gradient flows through it), unless lsh_moe.residual_grad is
``through_map``: then the map is differentiated as the function of the centroids and their expert outputs it is,
so that the output a token gets and the gradient it sends back belong to one function.

Shapes: centroids and outputs (G, S, d) per group (expert) and slot, counts (G, S) members per slot.
"""
from __future__ import annotations

import torch

RESIDUAL_MAPS = ("identity", "diagonal", "linear")
# Whether the compensated residual carries a gradient (lsh_moe.residual_grad): "stop" makes it a constant.
RESIDUAL_GRADS = ("pass", "stop", "through_map")
# Ridge term of the linear fit, relative to the mean variance of a centroid coordinate: with fewer occupied
# slots than dimensions the plain normal equations are singular.
RIDGE = 1e-2


def _weighted_deviations(centroids: torch.Tensor, outputs: torch.Tensor, counts: torch.Tensor,
                         differentiable: bool = False):
    """Centroid and output deviations from their cluster-size-weighted means, scaled by sqrt(size) (float32)."""
    weight = counts.float().unsqueeze(-1)
    total = weight.sum(1, keepdim=True).clamp(min=1)
    # float32 at least (float64 stays float64: what a gradient check needs)
    c, y = centroids.to(torch.promote_types(centroids.dtype, torch.float32)), outputs.to(
        torch.promote_types(outputs.dtype, torch.float32))
    if not differentiable:
        c, y = c.detach(), y.detach()
    root = weight.sqrt()
    dc = (c - (weight * c).sum(1, keepdim=True) / total) * root
    dy = (y - (weight * y).sum(1, keepdim=True) / total) * root
    return dc, dy


def fit(kind: str, centroids: torch.Tensor, outputs: torch.Tensor, counts: torch.Tensor,
        differentiable: bool = False) -> torch.Tensor:
    """The map per group: (G, 1, d) per-dimension slopes for ``diagonal``, (G, d, d) with ``r @ map`` for
    ``linear``. No host sync (the solve reports no errors; a singular system is ruled out by the ridge).
    `differentiable`: the map is a function of the centroids and their outputs for autograd (residual_grad
    ``through_map``), not a constant of the step."""
    dc, dy = _weighted_deviations(centroids, outputs, counts, differentiable)
    if kind == "diagonal":
        return (dc * dy).sum(1, keepdim=True) / (dc * dc).sum(1, keepdim=True).clamp(min=1e-12)
    if kind != "linear":
        raise ValueError(f"residual map {kind!r}: allowed {RESIDUAL_MAPS[1:]}")
    gram = dc.transpose(1, 2) @ dc
    d = gram.shape[-1]
    ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    eye = torch.eye(d, device=gram.device, dtype=gram.dtype)
    solution, _ = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, dc.transpose(1, 2) @ dy)
    return solution


def apply(kind: str, residuals: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
    """The residuals (G, n, d) through each group's fitted map (float32 at least)."""
    r = residuals.to(torch.promote_types(residuals.dtype, fitted.dtype))
    return r * fitted if kind == "diagonal" else torch.bmm(r, fitted)
