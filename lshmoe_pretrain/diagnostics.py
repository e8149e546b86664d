"""Study-only variants of DeepSpeed's compressed MoE layer that separate what compression changes in training.

They exist to locate the cause of a quality gap (docs/quality.md), not to train with: each replaces the plugin's
compressed forward (patches/deepspeed_moe.py) for the whole process, and the hybrid ones run the experts on the
tokens as well as on the centroids, which only a single rank can do (EP=1, where the all-to-all is the identity).

Each hybrid declares, for the layer's value and for each gradient (to the tokens, to the gate, to the experts'
weights), whether it is stock's or the compressed layer's. The gate weights the layer's value: its gradient is
<output gradient, the value it weighted>, so where value and gradient come from different layers the gates are
detached on the value and live on the declared path.

- ``forward``: the compressed layer's value; every gradient stock's (tokens, gate and experts, taken through the
  experts on the tokens themselves).
- ``backward``: stock's value; every gradient the compressed layer's (tokens, gate and experts).
- ``expert_grads``: stock's value, token and gate gradients; only the experts' weight gradients compressed.
- ``token_grads``: stock's value, gate and expert weight gradients; only the gradient that reaches the tokens
  through the experts is the compressed layer's (the part through the gate stays stock's).
- ``residual_grad``: no compression: stock's value and gradients, plus, in the backward only, the path that the
  paper's compensation E(c) + (x - c) adds. For token i in a cluster of n > 1 tokens that path gives
  g_i - mean(g) (its output gradient's deviation from its cluster's mean, the clusters LSH forms at the
  configured rate); a token alone in its cluster gets nothing.
- ``identity_grad``: no compression: stock's value and gradients, plus each routed token's full output gradient
  g_i in the backward only (as if each expert's Jacobian were J(x) + I). Not the compensation's path (that is
  ``residual_grad``): a stronger one, added to every token.
- ``skip``: no compression either: each expert returns x + E(x), in value and gradient alike: a residual
  connection around every expert. It is not what random clusters give: with them the compensated layer returns
  x + (E(c) - c) with c near the expert's mean token, the token plus a shift shared by its cluster, without the
  token's own E(x).
- ``random_clusters``: the budget and the layout of LSH, but every token's bucket drawn at random (does LSH beat
  chance?); needs ``kernel: torch`` and ``cuda_graphs: false`` (it replaces the reference hash).
- ``probe``: trains as configured; with ``output_error_interval`` it also measures, on the same sample, the output
  error of other compensations: a scalar, per-dimension or linear map fitted per expert to the (centroid, expert
  output) pairs the sender already holds, and the expert's own Jacobian at the centroid (first-order Taylor). At
  EP>1 the exact outputs and the Jacobian products are taken by the rank that holds each expert.

`summary()` hands over the probe's numbers once, which the training loop writes with the record of their step.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

HYBRIDS = ("forward", "backward", "expert_grads", "token_grads", "residual_grad", "identity_grad", "skip")
MODES = HYBRIDS + ("random_clusters", "probe")
_PROBES: Dict[str, float] = {}
_RANDOM_CODES = {}


class DiagnosticError(ValueError):
    """A diagnostic that cannot run here; the message names it and what is allowed."""


def parse(value: str) -> Sequence[str]:
    modes = [m for m in value.split(",") if m] if value else []
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise DiagnosticError(f"--diagnostic {value!r}: unknown {unknown}; allowed (comma-separated): {list(MODES)}")
    if sum(m in HYBRIDS for m in modes) > 1:
        raise DiagnosticError(f"--diagnostic {value!r}: at most one of {list(HYBRIDS)}")
    return modes


def install(modes: Sequence[str], lsh) -> None:
    """Patch the plugin's DeepSpeed layer for `modes` (from `parse`); `lsh` is the run's LSHMoEConfig."""
    from lshmoe_plugin import clustering
    from lshmoe_plugin.patches import deepspeed_moe
    for mode in modes:
        if mode in HYBRIDS:
            if mode == "residual_grad" and (not lsh.error_compensation or lsh.residual_map != "identity"):
                raise DiagnosticError("--diagnostic residual_grad adds the backward path of the paper's compensation "
                                      "E(c) + (x - c): set lsh_moe.error_compensation true and lsh_moe.residual_map "
                                      "'identity'")
            deepspeed_moe._compressed_forward = _hybrid_forward(mode)
        elif mode == "random_clusters":
            if lsh.kernel != "torch" or lsh.cuda_graphs is not False:
                raise DiagnosticError("--diagnostic random_clusters replaces the reference hash: set lsh_moe.kernel "
                                      "'torch' and lsh_moe.cuda_graphs false")
            clustering.lsh_codes = _random_codes
        elif mode == "probe":
            if not lsh.output_error_interval:
                raise DiagnosticError("--diagnostic probe measures with the output-error sample: set "
                                      "lsh_moe.output_error_interval >= 1")
            measured = deepspeed_moe.record_output_error
            deepspeed_moe.record_output_error = lambda *args: (measured(*args), _probe(*args))


def summary() -> Dict[str, float]:
    """The probe's numbers measured since the last call (empty on steps it did not measure)."""
    taken = dict(_PROBES)
    _PROBES.clear()
    return taken


# -- hybrids --------------------------------------------------------------------------------------------------------
def _hybrid_forward(mode: str):
    def forward(self, compressor, *input: torch.Tensor) -> torch.Tensor:
        from deepspeed.moe import sharded_moe as sm

        from lshmoe_plugin.patches.deepspeed_moe import _experts, occupied_slots
        if self.ep_size != 1:
            raise DiagnosticError(f"--diagnostic {mode} runs the experts on every token: EP=1 only, got "
                                  f"ep_size {self.ep_size}")
        d_model = input[0].shape[-1]
        tokens = input[0].reshape(-1, d_model)
        self.l_aux, C, E, indices_, locations_, gates_, self.exp_counts = self.gate(tokens, input[1], True, False)
        C = int(C)
        slots = sm._route_slots(indices_, locations_, E, C)
        dispatched = sm._sparse_encode(tokens, slots, E, C)
        valid = occupied_slots(slots, E, C)
        experts = lambda x: _experts(self, x, d_model)  # noqa: E731
        # The layer's output from per-slot outputs (E, C, d), weighted by the live gates.
        decode = lambda out: sm._sparse_decode(out.reshape(E * C, d_model), slots, gates_, tokens.shape[0])  # noqa: E731
        if mode in ("identity_grad", "skip"):
            passed = dispatched * valid.unsqueeze(-1)
            out = experts(dispatched) + (_grad_only(passed) if mode == "identity_grad" else passed)
            return decode(out).reshape(input[0].shape)
        centroids, state = compressor.compress_fixed(dispatched, valid)
        if mode == "residual_grad":
            out = experts(dispatched) + _grad_only(_compensation_residual(dispatched, valid, state))
            return decode(out).reshape(input[0].shape)
        compressed = lambda: compressor.decompress_fixed(experts(centroids), state)  # noqa: E731
        if mode == "forward":
            with torch.no_grad():
                value = decode(compressed())
            return _value_of(value, decode(experts(dispatched))).reshape(input[0].shape)
        if mode == "backward":
            with torch.no_grad():
                value = decode(experts(dispatched))
            return _value_of(value, decode(compressed())).reshape(input[0].shape)
        frozen = lambda x: _with_frozen_weights(self.experts, x, d_model, self)  # noqa: E731
        # Stock's per-slot values: the gates weight these, so the gate's gradient is stock's in both modes below.
        if mode == "expert_grads":
            detached_state = type(state)(state.tokens.detach(), state.slot, state.centroids.detach(), state.counts,
                                         state.out_shape, state.segments, state.graphed)
            value = experts(dispatched).detach()
            out = value + _grad_only(compressor.decompress_fixed(experts(centroids.detach()), detached_state)) \
                + _grad_only(frozen(dispatched))
        else:  # token_grads
            value = experts(dispatched.detach())
            out = value + _grad_only(compressor.decompress_fixed(frozen(centroids), state))
        return decode(out).reshape(input[0].shape)
    return forward


def _compensation_residual(dispatched: torch.Tensor, valid: torch.Tensor, state) -> torch.Tensor:
    """x - c per capacity slot (E, C, d), c the mean of the slot's cluster, live in both: its gradient is what the
    compensation adds to a token's, g_i - mean(g) over the cluster, and exactly zero for a token alone in its
    cluster (c = x), as the compensated layer returns E(x) for it. Empty slots give zero."""
    from lshmoe_plugin.clustering import centroids_by_slot
    d_model = dispatched.shape[-1]
    flat = dispatched.reshape(-1, d_model)
    num_slots = state.counts.shape[0]
    # A copy of the slots, means of our own: a CUDA-graphed state's buffers are reused by the next layer once its
    # round trip is released, and this hybrid never expands through it.
    slot = state.slot.clone()
    centroids, _ = centroids_by_slot(flat, slot, num_slots)
    per_token = torch.cat([centroids, centroids.new_zeros(1, d_model)])[slot]
    return ((flat - per_token) * valid.reshape(-1, 1)).view_as(dispatched)


def _value_of(value: torch.Tensor, gradient_path: torch.Tensor) -> torch.Tensor:
    """`value` in the forward, the gradient of `gradient_path` in the backward."""
    return value.detach() + _grad_only(gradient_path)


def _grad_only(t: torch.Tensor) -> torch.Tensor:
    return t - t.detach()


def _with_frozen_weights(experts_module, x: torch.Tensor, d_model: int, layer) -> torch.Tensor:
    """The experts on `x` with their parameters cut from autograd: gradients reach `x` only."""
    params = {name: p.detach() for name, p in experts_module.named_parameters()}
    received = x.reshape(layer.ep_size, layer.num_local_experts, -1, d_model)
    out = torch.func.functional_call(experts_module, params, (received,))
    return out.reshape(layer.ep_size * layer.num_local_experts, -1, d_model)


# -- random clusters ------------------------------------------------------------------------------------------------
def _random_codes(tokens, projections, config, groups=None, valid=None, num_groups=1):
    """Uniform random bucket codes from a generator of this process (not the global one: the gates' draws stay
    paired with stock's)."""
    device = tokens.device
    if device not in _RANDOM_CODES:
        _RANDOM_CODES[device] = torch.Generator(device=device).manual_seed(config.seed)
    bits = config.code_bits_per_hash * config.num_hashes
    return torch.randint(0, 1 << bits, (tokens.shape[0],), generator=_RANDOM_CODES[device], device=device)


# -- probe ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _probe(self, compressor, dispatched, valid, centroid_outputs, state, returned) -> None:
    from lshmoe_plugin.patches.deepspeed_moe import OUTPUT_ERROR_STRIDE
    from lshmoe_plugin.telemetry import relative_error
    num_experts, capacity, d = dispatched.shape
    slots_per_expert = state.centroids.shape[0] // num_experts
    positions = torch.arange(0, capacity, OUTPUT_ERROR_STRIDE, device=dispatched.device)
    x = dispatched.detach()[:, positions].float()                                   # (E, m, d)
    keep = valid[:, positions]
    slot = state.slot.view(num_experts, capacity)[:, positions] % max(1, slots_per_expert)
    cen = state.centroids.detach().float().view(num_experts, slots_per_expert, d)
    out = centroid_outputs.detach().float().view(num_experts, slots_per_expert, d)
    weight = state.counts.float().view(num_experts, slots_per_expert, 1)
    c = torch.gather(cen, 1, slot.unsqueeze(-1).expand(-1, -1, d))
    y = torch.gather(out, 1, slot.unsqueeze(-1).expand(-1, -1, d))
    r = x - c
    exact, taylor = _through_owning_experts(self, x, c, r, dispatched.dtype)
    # Least-squares fits of output deviations on centroid deviations, per expert, weighted by cluster size.
    total = weight.sum(1, keepdim=True).clamp(min=1)
    dc = (cen - (weight * cen).sum(1, keepdim=True) / total) * weight.sqrt()
    dy = (out - (weight * out).sum(1, keepdim=True) / total) * weight.sqrt()
    scalar = (dc * dy).sum((1, 2), keepdim=True) / (dc * dc).sum((1, 2), keepdim=True).clamp(min=1e-12)
    diagonal = (dc * dy).sum(1, keepdim=True) / (dc * dc).sum(1, keepdim=True).clamp(min=1e-12)
    gram = dc.transpose(1, 2) @ dc
    ridge = 1e-2 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)[:, None, None]
    eye = torch.eye(d, device=x.device)
    linear = torch.linalg.solve(gram + ridge * eye, dc.transpose(1, 2) @ dy)      # (E, d, d): r @ linear
    candidates = {"identity": y + r, "none": y, "fitted_scalar": y + scalar * r, "fitted_diagonal": y + diagonal * r,
                  "fitted_linear": y + r @ linear, "jacobian": y + taylor}
    layer = compressor.layer_index
    for name, approx in candidates.items():
        _PROBES[f"probe/layer{layer}/output_error_{name}"] = float(relative_error(approx, exact, keep))
    _PROBES[f"probe/layer{layer}/fitted_scalar"] = float(scalar.mean())
    _PROBES[f"probe/layer{layer}/output_to_input_norm"] = float(
        (exact.norm(dim=-1) * keep).sum() / (x.norm(dim=-1) * keep).sum().clamp(min=1e-12))


def _through_owning_experts(self, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor, dtype: torch.dtype):
    """E(x) and J(c) r for rows (E, m, d) of every expert, each computed by the rank that holds the expert (the
    all-to-all there and back, as the output-error sample does), in float32."""
    from lshmoe_plugin.patches.deepspeed_moe import _all_to_all, _experts
    d = x.shape[-1]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # an expert with dropout must not shift the training draws
        exact = _all_to_all(self, _experts(self, _all_to_all(self, x.to(dtype)), d)).float()
        # Forward-mode AD does not go through the all-to-all: the centroid and the residual cross, the Jacobian
        # product is taken where the expert is, and only it comes back.
        _, taylor = torch.func.jvp(lambda z: _experts(self, z.to(dtype), d).float(),
                                   (_all_to_all(self, c.contiguous()),), (_all_to_all(self, r.contiguous()),))
    return exact, _all_to_all(self, taylor)
