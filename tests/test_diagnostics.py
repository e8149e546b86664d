"""The study's hybrid layers (lshmoe_pretrain.diagnostics) on DeepSpeed's real MoE layer: each returns the values and
passes the gradients it claims, checked against the stock and the compressed layer on the same tokens."""
import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import D_MODEL, build_moe

import lshmoe_plugin
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.patches import deepspeed_moe
from lshmoe_pretrain import diagnostics

LSH = {"lsh_moe": {"enabled": True, "compression_rate": 0.25}}


def run_layer(moe, x, weight):
    """Output and gradients of one forward+backward under a loss linear in the output (its gradient does not
    depend on the output's value, so the backward of two layers can be compared on equal terms)."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1234)
    out, _, _ = moe(x)
    (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def check_hybrids(rank, world_size):
    torch.manual_seed(5)
    x, weight = torch.randn(2, 40, D_MODEL), torch.randn(2, 40, D_MODEL)
    moe = build_moe(world_size, 2)
    stock = run_layer(moe, x, weight)
    lshmoe_plugin.enable(LSH, moe)
    compressed = run_layer(moe, x, weight)
    original = deepspeed_moe._compressed_forward
    experts = [n for n in stock[2] if ".experts." in n]
    gate = [n for n in stock[2] if ".gate." in n]
    report = {"compression_changes_expert_grads": not all(close(stock[2][n], compressed[2][n]) for n in experts)}
    for mode in diagnostics.HYBRIDS:
        diagnostics.install([mode], LSHMoEConfig(enabled=True))
        out, grad_x, grads = run_layer(moe, x, weight)
        deepspeed_moe._compressed_forward = original
        expert_like = {name: all(close(grads[n], ref[2][n]) for n in experts)
                       for name, ref in (("stock", stock), ("compressed", compressed))}
        gate_like_stock = all(close(grads[n], stock[2][n]) for n in gate)
        if mode == "forward":
            report[mode] = torch.equal(out, compressed[0]) and expert_like["stock"]
        elif mode == "backward":
            report[mode] = torch.equal(out, stock[0]) and expert_like["compressed"] and gate_like_stock
        elif mode == "expert_grads":
            report[mode] = (torch.equal(out, stock[0]) and expert_like["compressed"] and gate_like_stock
                            and close(grad_x, stock[1]))
        elif mode == "token_grads":
            report[mode] = (torch.equal(out, stock[0]) and expert_like["stock"] and gate_like_stock
                            and not close(grad_x, stock[1]))
        elif mode == "skip":  # x + E(x) in value and gradient: out - stock = (sum of the kept gates) x each
            # token, 1 here (top-2 gates are normalised and no route is dropped at this capacity); so the gate's
            # gradients stay stock's (x's share does not depend on them), and so do the experts' (x has no weights)
            gained = (out - stock[0]).reshape(-1, D_MODEL)
            tokens = x.reshape(-1, D_MODEL)
            share = (gained * tokens).sum(-1) / tokens.square().sum(-1)
            report[mode] = (close(gained, tokens) and torch.allclose(share, torch.ones_like(share), atol=1e-5)
                            and expert_like["stock"] and gate_like_stock
                            and close(grad_x - stock[1], weight))  # and the token's gradient gains the identity
        else:  # identity_grad: stock in value and parameters; each token's gradient gains (sum of its kept
            # gates) x its output gradient, the identity path
            extra = (grad_x - stock[1]).reshape(-1, D_MODEL)
            w = weight.reshape(-1, D_MODEL)
            share = (extra * w).sum(-1) / w.square().sum(-1)
            report[mode] = (torch.equal(out, stock[0]) and expert_like["stock"] and gate_like_stock
                            and close(extra, share.unsqueeze(-1) * w) and bool((share > -1e-5).all())
                            and bool((share < 1 + 1e-5).all()) and float(share.max()) > 0.5)
    lshmoe_plugin.disable()
    return report


def test_each_hybrid_returns_and_passes_what_it_claims():
    [report] = run_distributed(check_hybrids, 1)
    assert all(report.values()), report


def check_hybrids_refuse_two_ranks(rank, world_size):
    moe = build_moe(world_size, 2)
    lshmoe_plugin.enable(LSH, moe)
    original = deepspeed_moe._compressed_forward
    diagnostics.install(["forward"], LSHMoEConfig(enabled=True))
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


def test_random_clusters_and_probe_need_their_settings():
    with pytest.raises(diagnostics.DiagnosticError, match="kernel 'torch'"):
        diagnostics.install(["random_clusters"], LSHMoEConfig(enabled=True))
    with pytest.raises(diagnostics.DiagnosticError, match="output_error_interval >= 1"):
        diagnostics.install(["probe"], LSHMoEConfig(enabled=True))
