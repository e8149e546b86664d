"""The study's hybrid layers (lshmoe_pretrain.diagnostics) on DeepSpeed's real MoE layer: each returns the value and
passes the token, gate and expert gradients it declares, checked against references built by hand from DeepSpeed's
own gate, encode, experts and decode and the plugin's compressor (and those references against the stock and the
patched layer)."""
from dataclasses import dataclass
from typing import Dict

import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import D_MODEL, build_moe

import lshmoe_plugin
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.patches import deepspeed_moe
from lshmoe_plugin.telemetry import TELEMETRY, Telemetry
from lshmoe_pretrain import diagnostics

LSH = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25}}
GATE_SEED = 1234  # DeepSpeed's top-2 gate draws its second expert from the global generator


@dataclass
class Pass:
    """One forward+backward of a layer under the loss sum(out * weight), whose output gradient does not depend on
    the output's value, so the backward of two layers can be compared on equal terms. The token gradient in two
    parts: through the experts (and the compensation) with the gates held, and through the gate with the
    per-slot outputs held."""
    value: torch.Tensor
    through_experts: torch.Tensor
    through_gate: torch.Tensor
    gate: Dict[str, torch.Tensor]
    experts: Dict[str, torch.Tensor]


def deviation(a, b) -> float:
    """The largest difference, in units of the tolerance: 1e-5 of the reference's largest entry, float32 rounding
    at the tensor's scale (the same terms summed in another order). At most 1 passes; the report carries the
    number, so a failure elsewhere says by how much."""
    return float((a - b).abs().max()) / (1e-5 * float(b.abs().max()) + 1e-12)


def close(a, b) -> bool:
    return deviation(a, b) <= 1


def far(a, b) -> bool:
    """Different by far more than rounding: a test telling them apart cannot pass by accident."""
    return float((a - b).abs().max()) > 1e-2 * float(b.abs().max())


def same_pass(got: Pass, want: Pass) -> Dict[str, float]:
    """Each part's `deviation` from the reference."""
    return {"value": deviation(got.value, want.value),
            "through_experts": deviation(got.through_experts, want.through_experts),
            "through_gate": deviation(got.through_gate, want.through_gate),
            "gate": max(deviation(got.gate[n], want.gate[n]) for n in want.gate),
            "experts": max(deviation(got.experts[n], want.experts[n]) for n in want.experts)}


# -- the layer as it runs ----------------------------------------------------------------------------------------------
def run_layer(moe, x, weight) -> Pass:
    """The real layer (stock, patched or a hybrid), run three times: the token gradient whole, with the gate
    fed a detached copy of the tokens (through the experts), and with only the gate fed the tokens (through the
    gate)."""
    def backward(feed):
        moe.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_(True)
        hook = moe.deepspeed_moe.gate.register_forward_pre_hook(lambda _, args: (feed(leaf, args[0]), *args[1:]))
        try:
            torch.manual_seed(GATE_SEED)
            out, _, _ = moe(leaf.detach() if feed is only_gate else leaf)
            (out * weight).sum().backward()
        finally:
            hook.remove()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
        return out.detach(), leaf.grad.detach().clone(), grads

    def only_gate(leaf, tokens):
        return leaf.reshape(tokens.shape)

    value, whole, grads = backward(lambda leaf, tokens: tokens)
    _, through_experts, _ = backward(lambda leaf, tokens: tokens.detach())
    _, through_gate, _ = backward(only_gate)
    assert close(through_experts + through_gate, whole)
    return Pass(value, through_experts, through_gate, {n: g for n, g in grads.items() if ".gate." in n},
                {n: g for n, g in grads.items() if ".experts." in n})


# -- the references, by hand -------------------------------------------------------------------------------------------
class ByHand:
    """DeepSpeed's routing of `x` (the draws of the gate's run in the layer), and layers built on it from per-slot
    outputs (E, C, d)."""

    def __init__(self, moe, x, weight):
        from deepspeed.moe import sharded_moe as sm
        self.sm, self.moe, self.layer = sm, moe, moe.deepspeed_moe
        self.shape = x.shape
        self.tokens, self.weight = x.reshape(-1, D_MODEL), weight.reshape(-1, D_MODEL)
        with torch.no_grad():
            self.slots, self.gates, self.E, self.C = self.route(self.tokens)
        self.dispatched = self.encode(self.tokens)
        self.valid = deepspeed_moe.occupied_slots(self.slots, self.E, self.C)
        # Each slot's output gradient: its token's output gradient times the gate of that route (0 if empty).
        z = torch.zeros(self.E, self.C, D_MODEL, requires_grad=True)
        [self.slot_grad] = torch.autograd.grad((self.decode(z, self.gates) * self.weight).sum(), z)

    def route(self, tokens):
        torch.manual_seed(GATE_SEED)
        _, C, E, indices, locations, gates, _ = self.layer.gate(tokens, None, True, False)
        return self.sm._route_slots(indices, locations, E, int(C)), gates, E, int(C)

    def encode(self, tokens):
        return self.sm._sparse_encode(tokens, self.slots, self.E, self.C)

    def decode(self, per_slot, gates):
        return self.sm._sparse_decode(per_slot.reshape(-1, D_MODEL), self.slots, gates, self.tokens.shape[0])

    def to_tokens(self, per_slot):
        """encode's transpose: each token gets the sum of its slots' rows."""
        leaf = self.tokens.detach().requires_grad_(True)
        return torch.autograd.grad((self.encode(leaf) * per_slot).sum(), leaf)[0].view(self.shape)

    def experts(self, rows):
        """DeepSpeed's experts on rows (E, n, d) of every expert (one rank: all experts are local)."""
        return self.layer.experts(rows.reshape(1, self.E, -1, D_MODEL)).reshape(self.E, -1, D_MODEL)

    def layer_of(self, per_slot) -> Pass:
        """The layer decode(per_slot(encode(x), valid), gates(x)): value and every gradient."""
        leaf = self.tokens.detach().requires_grad_(True)
        out = per_slot(self.encode(leaf), self.valid)
        experts = dict((n, p) for n, p in self.moe.named_parameters() if ".experts." in n)
        value = self.decode(out, self.gates)
        loss = (value * self.weight).sum()
        through_experts, *expert_grads = torch.autograd.grad(loss, [leaf, *experts.values()], allow_unused=True)
        gate_leaf = self.tokens.detach().requires_grad_(True)
        gate = dict((n, p) for n, p in self.moe.named_parameters() if ".gate." in n)
        _, live_gates, _, _ = self.route(gate_leaf)
        gate_loss = (self.decode(out.detach(), live_gates) * self.weight).sum()
        through_gate, *gate_grads = torch.autograd.grad(gate_loss, [gate_leaf, *gate.values()])
        zero = torch.zeros_like
        return Pass(value.detach().view(self.shape), through_experts.view(self.shape), through_gate.view(self.shape),
                    dict(zip(gate, gate_grads)),
                    {n: g if g is not None else zero(p) for (n, p), g in zip(experts.items(), expert_grads)})


def compressed_slots(compressor, hand):
    """The compressed layer's per-slot outputs, E(c) + (x - c) (E(x) for a token alone in its cluster)."""
    def per_slot(dispatched, valid):
        centroids, state = compressor.compress_fixed(dispatched, valid, record=False)
        return compressor.decompress_fixed(hand.experts(centroids), state)
    return per_slot


def clusters(compressor, hand):
    """Each slot's cluster (the compressor's, on these tokens), its centroid, and the cluster sizes."""
    with torch.no_grad():
        centroids, state = compressor.compress_fixed(hand.dispatched, hand.valid, record=False)
    return state.slot, centroids.reshape(-1, D_MODEL), state.counts


def cluster_mean(rows, slot, counts):
    """Per cluster: the mean of its slots' rows (num_slots, d)."""
    sums = rows.new_zeros(counts.shape[0] + 1, D_MODEL).index_add(0, slot, rows)
    return sums[:-1] / counts.clamp(min=1).unsqueeze(-1)


def compensation_path(compressor, hand):
    """Per slot, what the compensation adds to the token gradient: g_i - mean(g) over a cluster of n > 1, 0 alone."""
    slot, _, counts = clusters(compressor, hand)
    g = hand.slot_grad.reshape(-1, D_MODEL)
    mean = torch.cat([cluster_mean(g, slot, counts), g.new_zeros(1, D_MODEL)])[slot]
    shared = torch.cat([counts > 1, torch.zeros(1, dtype=torch.bool)])[slot].unsqueeze(-1)
    return torch.where(shared, g - mean, torch.zeros_like(g)).view_as(hand.slot_grad)


def compensated_token_grad(compressor, hand):
    """The compensated layer's token gradient through the experts, from the formula: J(c)^T mean(g) + (g_i -
    mean(g)) for token i in a cluster of n > 1, J(x)^T g alone (c = x)."""
    slot, centroids, counts = clusters(compressor, hand)
    g = hand.slot_grad.reshape(-1, D_MODEL)
    c = centroids.detach().requires_grad_(True)
    [jacobian_t_mean] = torch.autograd.grad((hand.experts(c.view(hand.E, -1, D_MODEL)).reshape(-1, D_MODEL)
                                             * cluster_mean(g, slot, counts)).sum(), c)
    per_slot = torch.cat([jacobian_t_mean, g.new_zeros(1, D_MODEL)])[slot].view_as(hand.slot_grad)
    return hand.to_tokens(per_slot + compensation_path(compressor, hand))


def expected(mode, stock: Pass, compressed: Pass, hand, compressor) -> Pass:
    """What each hybrid declares (diagnostics' docstring), built from the references' parts."""
    def mix(value, through_experts, through_gate, gate, experts):
        return Pass(value.value, through_experts, through_gate.through_gate, gate.gate, experts.experts)
    if mode == "forward":
        return mix(compressed, stock.through_experts, stock, stock, stock)
    if mode == "backward":
        return mix(stock, compressed.through_experts, compressed, compressed, compressed)
    if mode == "expert_grads":
        return mix(stock, stock.through_experts, stock, stock, compressed)
    if mode == "token_grads":
        return mix(stock, compressed.through_experts, stock, stock, stock)
    if mode == "residual_grad":
        added = hand.to_tokens(compensation_path(compressor, hand))
        return mix(stock, stock.through_experts + added, stock, stock, stock)
    if mode == "identity_grad":
        return mix(stock, stock.through_experts + hand.to_tokens(hand.slot_grad), stock, stock, stock)
    assert mode == "skip"
    return hand.layer_of(lambda d, valid: hand.experts(d) + d * valid.unsqueeze(-1))


# -- the checks --------------------------------------------------------------------------------------------------------
def check_hybrids(rank, world_size):
    torch.manual_seed(5)
    x, weight = torch.randn(2, 40, D_MODEL), torch.randn(2, 40, D_MODEL)
    moe = build_moe(world_size, 2)
    compressor = LSHCompressor(lshmoe_plugin.load_config(LSH), 0, Telemetry())
    hand = ByHand(moe, x, weight)
    stock_by_hand = hand.layer_of(lambda d, valid: hand.experts(d))
    compressed_by_hand = hand.layer_of(compressed_slots(compressor, hand))
    counts = clusters(compressor, hand)[2]
    report = {"references": {
        "stock layer = stock by hand": same_pass(run_layer(moe, x, weight), stock_by_hand),
        "clusters of one token and of several": bool((counts == 1).any()) and bool((counts > 1).any()),
    }}
    lshmoe_plugin.enable(LSH, moe)
    patched = run_layer(moe, x, weight)
    report["references"]["patched layer = compressed by hand"] = same_pass(patched, compressed_by_hand)
    # M1 of the 2026-12-04 review: the compensation's token gradient, J(c)^T mean(g) + (g_i - mean(g)).
    report["references"]["compensated token gradient = its formula"] = deviation(
        patched.through_experts, compensated_token_grad(compressor, hand))
    report["references"]["stock and compressed differ in every part"] = {
        part: far(getattr(stock_by_hand, part), getattr(compressed_by_hand, part))
        for part in ("value", "through_experts", "through_gate")} | {
        "gate": all(far(stock_by_hand.gate[n], compressed_by_hand.gate[n]) for n in stock_by_hand.gate),
        "experts": any(far(stock_by_hand.experts[n], compressed_by_hand.experts[n]) for n in stock_by_hand.experts)}
    original = deepspeed_moe._compressed_forward
    for mode in diagnostics.HYBRIDS:
        diagnostics.install([mode], LSHMoEConfig(enabled=True, method="paper"))
        try:
            got = run_layer(moe, x, weight)
        finally:
            deepspeed_moe._compressed_forward = original
        want = expected(mode, stock_by_hand, compressed_by_hand, hand, compressor)
        report[mode] = same_pass(got, want)
        if mode in ("forward", "backward"):  # the value is the other layer's, to the last bit
            report[mode]["value bit for bit"] = torch.equal(got.value, want.value)
        if mode in ("residual_grad", "identity_grad", "skip"):  # the added path is there and not negligible
            report[mode]["adds a path"] = far(got.through_experts, stock_by_hand.through_experts)
    lshmoe_plugin.disable()
    return report


def all_true(report) -> bool:
    """Every check holds: a flag is True, a `deviation` at most 1."""
    if isinstance(report, dict):
        return all(all_true(v) for v in report.values())
    return report is True or (isinstance(report, float) and report <= 1)


def test_each_hybrid_returns_and_passes_what_it_claims():
    [report] = run_distributed(check_hybrids, 1)
    assert all_true(report), report


def check_hybrids_refuse_two_ranks(rank, world_size):
    moe = build_moe(world_size, 2)
    lshmoe_plugin.enable(LSH, moe)
    original = deepspeed_moe._compressed_forward
    diagnostics.install(["forward"], LSHMoEConfig(enabled=True, method="paper"))
    try:
        moe(torch.randn(2, 8, D_MODEL))
    except diagnostics.DiagnosticError as error:
        return str(error)
    finally:
        deepspeed_moe._compressed_forward = original
        lshmoe_plugin.disable()


def test_hybrids_refuse_expert_parallel_runs():
    for message in run_distributed(check_hybrids_refuse_two_ranks, 2):
        assert "EP=1 only, got ep_size 2" in message


@pytest.mark.parametrize("value, message", [
    ("forward,backward", "at most one of"),
    ("fwd", "unknown ['fwd']"),
])
def test_bad_diagnostics_are_refused_by_name(value, message):
    with pytest.raises(diagnostics.DiagnosticError, match=message.replace("[", r"\[").replace("]", r"\]")):
        diagnostics.parse(value)


def test_random_clusters_probe_and_residual_grad_need_their_settings():
    with pytest.raises(diagnostics.DiagnosticError, match="kernel 'torch'"):
        diagnostics.install(["random_clusters"], LSHMoEConfig(enabled=True, method="paper"))
    with pytest.raises(diagnostics.DiagnosticError, match="output_error_interval >= 1"):
        diagnostics.install(["probe"], LSHMoEConfig(enabled=True, method="paper"))
    for config in (LSHMoEConfig(enabled=True, method="paper", error_compensation=False),
                   LSHMoEConfig(enabled=True, method="paper", residual_map="linear")):
        with pytest.raises(diagnostics.DiagnosticError, match="residual_map 'identity'"):
            diagnostics.install(["residual_grad"], config)


PROBE = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25, "output_error_interval": 1}}


def check_probe(rank, world_size):
    """Affine experts, each its own (drawn from its global index): E(c) + J(c)(x - c) = E(x) exactly, so the
    probe's Jacobian candidate has no error at all, but only if every row went through the expert it was routed
    to; its identity candidate and E(c) alone are what the layer's own output-error sample measures."""
    moe = build_moe(world_size, 2, expert=torch.nn.Linear(D_MODEL, D_MODEL))
    local = moe.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        for i, expert in enumerate(local):
            draw = torch.Generator().manual_seed(rank * len(local) + i)
            expert.weight.copy_(torch.randn(D_MODEL, D_MODEL, generator=draw) / D_MODEL ** 0.5)
            expert.bias.copy_(torch.randn(D_MODEL, generator=draw))
    config = lshmoe_plugin.enable(PROBE, moe)
    measured = deepspeed_moe.record_output_error
    diagnostics.install(["probe"], config)
    try:
        torch.manual_seed(rank)
        moe(torch.randn(4, 64, D_MODEL))
        [stats] = TELEMETRY.latest.values()
    finally:
        deepspeed_moe.record_output_error = measured
        lshmoe_plugin.disable()
    probe = {key.split("/")[-1]: value for key, value in diagnostics.summary().items()}
    return {**{name: probe[f"output_error_{name}"] for name in ("identity", "none", "jacobian")},
            "compensated": float(stats.output_error_compensated),
            "uncompensated": float(stats.output_error_uncompensated)}


def test_probe_takes_each_expert_where_it_is_at_two_ranks():
    for errors in run_distributed(check_probe, 2):
        assert errors["jacobian"] < 1e-5, errors
        assert errors["identity"] == pytest.approx(errors["compensated"], abs=1e-5), errors
        assert errors["none"] == pytest.approx(errors["uncompensated"], abs=1e-5), errors
        assert errors["identity"] > 0.05 and errors["none"] > 0.05, errors  # the affine experts are no identity
