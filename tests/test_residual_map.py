"""Fitted error compensation (`residual_map`): E(c) + M (x - c) with M fitted per expert to the (centroid, output)
pairs the sender holds. Where the expert is affine the fit recovers it; rate 1.0 stays exact; gradients flow."""
import pytest
import torch
from test_compressor import make_compressor
from test_refine import clustered_batch

from lshmoe_plugin import residual_map
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError


def round_trip(kind, expert, rate=0.25, seed=0, dtype=torch.float32):
    x, valid = clustered_batch(num_experts=2, capacity=256, d=8, clusters=12, seed=seed)
    x = x.to(dtype)
    comp = make_compressor(compression_rate=rate, residual_map=kind)
    centroids, state = comp.compress_fixed(x, valid)
    out = comp.decompress_fixed(expert(centroids), state)
    exact = expert(x)
    keep = valid.unsqueeze(-1)
    return float(((out.float() - exact.float()) * keep).norm() / (exact.float() * keep).norm()), out, exact, valid


def affine_expert(seed=1, d=8):
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(2, d, d, generator=gen) * 0.3, torch.randn(2, 1, d, generator=gen)
    return lambda t: (torch.bmm(t.float(), weight) + bias).to(t.dtype)


def test_the_linear_fit_recovers_an_affine_expert_that_the_identity_misses():
    expert = affine_expert()
    linear = round_trip("linear", expert)[0]
    identity = round_trip("identity", expert)[0]
    assert linear < 0.01 < 0.1 < identity, (linear, identity)


def test_the_diagonal_fit_recovers_a_per_dimension_scaling():
    scale = torch.linspace(-0.5, 2.0, 8)
    expert = lambda t: t * scale + 1.0  # noqa: E731
    assert round_trip("diagonal", expert)[0] < 0.02 < round_trip("identity", expert)[0]


@pytest.mark.parametrize("kind", ["diagonal", "linear"])
def test_rate_one_stays_exact(kind):
    error, out, exact, valid = round_trip(kind, affine_expert(), rate=1.0)
    assert torch.equal(out[valid], exact[valid])


@pytest.mark.parametrize("kind", ["diagonal", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_those_of_a_fixed_map(kind, dtype):
    """out = E(c) + M (x - c) with M a constant of the step (docs/design.md): a token's gradient is M^T delta minus
    its cluster's mean of M^T delta (through its centroid), and an expert output's is its members' delta summed;
    no gradient flows through the fit."""
    x, valid = clustered_batch(num_experts=2, capacity=64, d=8, seed=2)
    x = x.to(dtype).requires_grad_(True)
    comp = make_compressor(compression_rate=0.25, residual_map=kind)
    centroids, state = comp.compress_fixed(x, valid)
    y = torch.tanh(centroids).detach().requires_grad_(True)
    out = comp.decompress_fixed(y, state)
    assert out.dtype == dtype
    out.float().square().sum().backward()

    fitted = residual_map.fit(kind, state.centroids.view(2, -1, 8), y.view(2, -1, 8), state.counts.view(2, -1))
    delta = 2 * out.detach().double().view(2, -1, 8)  # d(sum out^2)/d out
    pulled = delta * fitted.double() if kind == "diagonal" else delta @ fitted.double().transpose(1, 2)  # M^T delta
    pulled = pulled.reshape(-1, 8)
    slot, num_slots = state.slot, state.centroids.shape[0]
    members = torch.zeros(num_slots + 1, dtype=torch.float64).index_add_(0, slot, torch.ones(slot.shape[0],
                                                                                            dtype=torch.float64))
    cluster_sum = torch.zeros(num_slots + 1, 8, dtype=torch.float64).index_add_(0, slot, pulled)
    through_centroid = (cluster_sum / members.clamp(min=1).unsqueeze(-1))[slot]
    token_grad = torch.where((slot < num_slots).unsqueeze(-1), pulled - through_centroid, pulled)
    output_grad = torch.zeros(num_slots + 1, 8, dtype=torch.float64).index_add_(0, slot, delta.reshape(-1, 8))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(x.grad.double().reshape(-1, 8), token_grad, **tolerance)
    assert torch.allclose(y.grad.double().reshape(-1, 8), output_grad[:num_slots], **tolerance)
    assert token_grad[valid.reshape(-1)].abs().max() > 0.1  # the check compares something


def test_residual_map_is_validated_by_name():
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe.residual_map must be one of \['identity', 'diagonal', "
                                                r"'linear'\], got 'quadratic'"):
        LSHMoEConfig(enabled=True, method="paper", residual_map="quadratic")
    with pytest.raises(LSHMoEConfigError, match="with error_compensation false allowed: 'identity'"):
        LSHMoEConfig(enabled=True, method="paper", residual_map="linear", error_compensation=False)
