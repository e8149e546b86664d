"""`residual_grad: "stop"`: error compensation's forward, bit for bit, with the residual's gradient stopped, so a token
learns only through its centroid's expert output, as without compensation. In the compressor against hand-built
references, and in DeepSpeed's real MoE layer on 1 and 2 gloo ranks."""
import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block
from test_compressor import make_compressor
from test_deepspeed_patch import D_MODEL, build_moe, failed
from test_refine import clustered_batch

import lshmoe_plugin
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError


def expert_step(dtype, **settings):
    """One compress -> expert -> expand on clustered tokens, and its backward: output, token gradient, expert
    weight gradient and the centroid outputs' gradient. The expert is nonlinear, so J(c) is not the identity."""
    x, valid = clustered_batch(num_experts=2, capacity=64, d=8, seed=3)
    x = x.to(dtype).requires_grad_(True)
    weight = (torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5).requires_grad_(True)
    comp = make_compressor(compression_rate=0.25, **settings)
    centroids, state = comp.compress_fixed(x, valid)
    compute = torch.promote_types(dtype, torch.float32)
    y = torch.tanh(torch.bmm(centroids.to(compute), weight.to(compute))).to(dtype)
    y.retain_grad()
    out = comp.decompress_fixed(y, state)
    # a loss that weights each output coordinate differently, so that no gradient is a plain copy of the output
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out.float() * w).sum().backward()
    return out.detach(), x.grad.detach(), weight.grad.detach(), y.grad.detach(), state, valid


@pytest.mark.parametrize("residual_map", ["identity", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_forward_is_the_compensated_one_and_tokens_learn_only_through_their_centroid(residual_map, dtype):
    passing = expert_step(dtype, residual_map=residual_map)
    stopped = expert_step(dtype, residual_map=residual_map, residual_grad="stop")
    uncompensated = expert_step(dtype, error_compensation=False)
    assert torch.equal(stopped[0], passing[0]), "the forward must be the compensated one, bit for bit"
    assert not torch.equal(stopped[0], uncompensated[0])
    # Without compensation the expand gathers in the model's dtype; with it the sum runs in float32 and casts
    # once: in bf16 the sums' rounding differs, in float32 the three ways are exactly equal.
    like_uncompensated = torch.equal if dtype == torch.float32 else (
        lambda a, b: torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2))
    # the gradients that reach the expert are the same three ways: each centroid output's is its members' sum
    assert torch.equal(stopped[3], passing[3]) and like_uncompensated(stopped[3], uncompensated[3])
    assert torch.equal(stopped[2], passing[2])
    # the tokens': only their share through the centroid's expert output, what no compensation gives
    assert like_uncompensated(stopped[1], uncompensated[1])
    differs = (stopped[1] - passing[1]).float().abs().max()
    assert differs > 0.1, "the residual's own gradient must be gone"


def test_the_token_gradient_is_the_clusters_mean_through_the_experts_jacobian():
    """Against a reference built by hand: dL/dx_i = J(c)^T (mean of the members' output gradients), with J the
    Jacobian of tanh(c W) at the centroid, for every token that shares a cluster; a token alone in its cluster
    gets its own J^T g, as in stock."""
    out, grad_x, _, grad_y, state, valid = expert_step(torch.float64, residual_grad="stop")
    x, _ = clustered_batch(num_experts=2, capacity=64, d=8, seed=3)
    weight = (torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5).double()
    centroids = state.centroids.double().view(2, -1, 8)
    slots_per_group = centroids.shape[1]
    counts = state.counts.view(-1)
    reference = torch.zeros(x.reshape(-1, 8).shape, dtype=torch.float64)
    for i, s in enumerate(state.slot.tolist()):
        if s >= counts.shape[0]:
            continue  # an invalid slot: no token
        group, c = divmod(s, slots_per_group)
        pre = centroids[group, c] @ weight[group]
        jacobian = weight[group] * (1 - torch.tanh(pre) ** 2)  # d tanh(c W) / dc, rows: c's coordinates
        reference[i] = jacobian @ (grad_y.view(-1, 8)[s] / counts[s])
    assert torch.allclose(grad_x.reshape(-1, 8), reference, rtol=1e-10, atol=1e-12)
    assert int((counts > 1).sum()) > 4 and reference[valid.reshape(-1)].abs().max() > 0.05


def test_residual_grad_is_validated_by_name():
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe.residual_grad must be one of \['pass', 'stop', "
                                                r"'through_map'\], got 'half'"):
        LSHMoEConfig(enabled=True, method="paper", residual_grad="half")
    with pytest.raises(LSHMoEConfigError, match="with error_compensation false allowed: 'pass'"):
        LSHMoEConfig(enabled=True, method="paper", residual_grad="stop", error_compensation=False)
    with pytest.raises(LSHMoEConfigError, match="lsh_moe.residual_grad='stop' belongs to LSH clustering"):
        LSHMoEConfig(enabled=True, method="fp8", residual_grad="stop")
    with pytest.raises(LSHMoEConfigError, match="residual_map 'identity' fits none; allowed with it: residual_map "
                                                "'diagonal' or 'linear'"):
        LSHMoEConfig(enabled=True, method="paper", residual_grad="through_map")
    assert LSHMoEConfig(enabled=True, method="paper").residual_grad == "pass"


def layer_function(**settings):
    """The compressed layer's output as a function of its tokens x and the centroids' expert outputs y (clusters
    fixed by the first call's hashing), in float64."""
    x0, valid = clustered_batch(num_experts=2, capacity=32, d=8, clusters=6, seed=4)
    comp = make_compressor(compression_rate=0.25, **settings)
    _, state = comp.compress_fixed(x0.double(), valid)

    def f(x, y):
        centroids, again = comp.compress_fixed(x, valid)
        assert torch.equal(again.slot, state.slot)  # a finite-difference step must not move a token's cluster
        return comp.decompress_fixed(y, again)
    y0 = torch.tanh(state.centroids.double().view(2, -1, 8) * 1.5)
    return f, x0.double().requires_grad_(True), y0.clone().requires_grad_(True)


@pytest.mark.parametrize("residual_map", ["diagonal", "linear"])
def test_through_map_gives_the_outputs_true_derivative(residual_map):
    """With the fitted map differentiated, the gradient is the derivative of the function the forward computes
    (finite differences agree); with the map a constant of the step (`pass`) it is not: the check can fail."""
    f, x, y = layer_function(residual_map=residual_map, residual_grad="through_map")
    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-5, rtol=1e-4)
    f, x, y = layer_function(residual_map=residual_map)
    assert not torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False)


def test_the_paper_compensation_gives_its_true_derivative_and_a_stopped_one_does_not():
    f, x, y = layer_function()
    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-5, rtol=1e-4)
    f, x, y = layer_function(residual_grad="stop")
    assert not torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False)


def test_through_map_keeps_the_forward():
    passing = expert_step(torch.float32, residual_map="linear")
    through = expert_step(torch.float32, residual_map="linear", residual_grad="through_map")
    assert torch.equal(through[0], passing[0])
    assert (through[3] - passing[3]).abs().max() > 1e-3, "the expert outputs' gradient now includes the fit's"


def layer_step(moe, x):
    """Output, input gradient and parameter gradients of one step, under a loss linear in the output (so the
    gradient that reaches the layer does not depend on its output)."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1234)
    out, _, _ = moe(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(21))
    (out * w).sum().backward()
    return out.detach(), x.grad.detach(), {n: p.grad.clone() for n, p in moe.named_parameters()
                                           if p.grad is not None}


def check_stopped_residual_in_deepspeed(rank, world_size):
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 24, D_MODEL)
    moe = build_moe(world_size, 2)
    stock = layer_step(moe, x)
    runs = {}
    for name, extra in (("pass", {}), ("stop", {"residual_grad": "stop"})):
        lshmoe_plugin.enable({"lsh_moe": paper_block({"enabled": True, "compression_rate": 0.25, **extra})}, moe)
        runs[name] = layer_step(moe, x)
        lshmoe_plugin.disable()
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 1.0,
                                      "residual_grad": "stop"}}, moe)
    exact = layer_step(moe, x)
    lshmoe_plugin.disable()
    (out_p, gx_p, gp_p), (out_s, gx_s, gp_s) = runs["pass"], runs["stop"]
    experts = [n for n in gp_p if "experts" in n]
    return {
        "forward_is_the_compensated_one": torch.equal(out_s, out_p),
        "compressed": not torch.equal(out_s, stock[0]),
        # the experts and the gate see the same outputs and the same output gradients both ways
        "parameter_grads_as_with_the_residual_gradient": set(gp_s) == set(gp_p) and all(
            torch.allclose(gp_s[n], gp_p[n], rtol=1e-5, atol=1e-6) for n in gp_p),
        "expert_grads_present": len(experts) > 0 and all(gp_s[n].abs().sum() > 0 for n in experts),
        "input_grad_loses_the_residual_path": float((gx_s - gx_p).abs().max()) > 1e-3,
        # at rate 1.0 every token is alone in its cluster: no residual, stock exactly
        "rate_1_is_stock": torch.equal(exact[0], stock[0]) and torch.equal(exact[1], stock[1])
        and all(torch.equal(exact[2][n], stock[2][n]) for n in stock[2]),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_stopped_residual_in_deepspeeds_moe_layer(world_size):
    for rank, report in enumerate(run_distributed(check_stopped_residual_in_deepspeed, world_size)):
        assert all(report.values()), (rank, failed(report))
