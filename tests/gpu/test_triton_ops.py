"""Fused Triton ops against the PyTorch reference: values and gradients on fresh random inputs, per dtype.

References run in float64 on the same inputs; errors are ‖out − ref‖ / ‖ref‖. Outputs are poisoned (NaN-filled
memory freed just before the call) so an unwritten element shows up as NaN.
"""
import os

import pytest
import torch

from lshmoe_plugin import clustering, hashing
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.kernels import triton_ops
from lshmoe_plugin.ops import REFERENCE, select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only under TRITON_INTERPRET=1
SMALL = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOL)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def poison() -> None:
    if DEVICE == "cuda":
        torch.full((64 << 20,), float("nan"), device=DEVICE)  # freed at once: the next allocations reuse it


def random_slots(n: int, num_slots: int, gen: torch.Generator, big_cluster: bool = True) -> torch.Tensor:
    """Slots in [0, num_slots]: some empty slots, some singletons, scratch tokens, and one large cluster."""
    slot = torch.randint(0, num_slots + 1, (n,), generator=gen)
    slot[slot % 7 == 3] = num_slots  # leaves slots 3, 10, ... empty, sends their tokens to the scratch row
    if big_cluster:
        slot[torch.randperm(n, generator=gen)[: n // 4]] = 0
    return slot.to(DEVICE)


SHAPES = [(257, 40, 96)] if SMALL else [(257, 40, 96), (4096, 700, 1024), (6000, 1200, 1536)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_slots,d", SHAPES)
def test_centroids_by_slot_values_and_grads(dtype, n, num_slots, d):
    gen = torch.Generator().manual_seed(n + d)
    tokens = torch.randn(n, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    slot = random_slots(n, num_slots, gen)
    grad = torch.randn(num_slots, d, generator=gen).to(DEVICE, dtype)

    ref_tokens = tokens.detach().double().requires_grad_()
    ref_c, ref_counts = clustering.centroids_by_slot(ref_tokens, slot, num_slots)
    ref_c.backward(grad.double())

    poison()
    c, counts = triton_ops.centroids_by_slot(tokens, slot, num_slots)
    c.backward(grad)
    assert c.dtype == dtype and c.shape == (num_slots, d)
    assert torch.equal(counts, ref_counts.float())
    assert rel_err(c, ref_c) < TOL[dtype]
    assert rel_err(tokens.grad, ref_tokens.grad) < TOL[dtype]
    invalid = slot == num_slots
    assert torch.all(tokens.grad[invalid] == 0)


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_slots,d", SHAPES)
def test_expand_with_residual_values_and_grads(dtype, n, num_slots, d, compensate):
    gen = torch.Generator().manual_seed(3 * n + d + compensate)
    slot = random_slots(n, num_slots, gen)
    leaves = [torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
              for shape in ((n, d), (num_slots, d), (num_slots, d))]
    tokens, centroids, outputs = leaves
    counts = torch.zeros(num_slots + 1, device=DEVICE).index_add_(0, slot, torch.ones(n, device=DEVICE))[:num_slots]
    grad = torch.randn(n, d, generator=gen).to(DEVICE, dtype)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = clustering.expand_with_residual(ref_leaves[0], slot, ref_leaves[1], ref_leaves[2], counts, compensate)
    ref.backward(grad.double())

    poison()
    out = triton_ops.expand_with_residual(tokens, slot, centroids, outputs, counts, compensate)
    out.backward(grad)
    assert out.dtype == dtype and out.shape == (n, d)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.all(out[slot == num_slots] == 0)
    for name, leaf, ref_leaf in zip(("tokens", "centroids", "outputs"), leaves, ref_leaves):
        if ref_leaf.grad is None or not ref_leaf.grad.any():
            assert leaf.grad is None or not leaf.grad.any(), name
        else:
            assert rel_err(leaf.grad, ref_leaf.grad) < TOL[dtype], name


@pytest.mark.parametrize("hash_type", ["cross_polytope", "spherical"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lsh_codes_match_reference(dtype, hash_type):
    config = LSHMoEConfig(hash_type=hash_type, num_hashes=6 if hash_type == "cross_polytope" else 4, hash_dim=8)
    experts, capacity, d = (3, 50, 64) if SMALL else (8, 1000, 1024)
    gen = torch.Generator().manual_seed(d + len(hash_type))
    tokens = (torch.randn(experts * capacity, d, generator=gen) + 3 * torch.randn(experts, d, generator=gen)
              .repeat_interleave(capacity, 0)).to(DEVICE, dtype)
    projections = hashing.hash_projections(config, d, 0).to(DEVICE)
    groups = torch.arange(experts, device=DEVICE).repeat_interleave(capacity)
    valid = (torch.rand(experts * capacity, generator=gen) < 0.9).to(DEVICE)

    # Without centring the kernel sees exactly the reference's projected values: codes must be identical.
    plain = triton_ops.lsh_codes(tokens, projections, config)
    assert torch.equal(plain, hashing.lsh_codes(tokens, projections, config))
    # Group means are sums in a different order (both use float atomics): a near-tie may flip, rarely.
    centred = triton_ops.lsh_codes(tokens, projections, config, groups, valid, experts)
    ref = hashing.lsh_codes(tokens, projections, config, groups, valid, experts)
    assert (centred == ref).float().mean() > 0.999


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressor_fixed_round_trip_matches_reference(dtype):
    """The whole fixed-layout compressor with triton ops vs the reference stages on the same clusters."""
    experts, capacity, d = (2, 40, 64) if SMALL else (8, 1024, 1024)
    gen = torch.Generator().manual_seed(7)
    dispatched = torch.randn(experts, capacity, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    valid = (torch.rand(experts, capacity, generator=gen) < 0.8).to(DEVICE)
    config = LSHMoEConfig(enabled=True, compression_rate=0.2, kernel="triton" if DEVICE == "cuda" else "torch")
    compressor = LSHCompressor(config, layer_index=0)
    if DEVICE != "cuda":
        compressor._ops = triton_ops.OPS
    weight = torch.randn(d, d, generator=gen).to(DEVICE, dtype) / d ** 0.5
    centroids, state = compressor.compress_fixed(dispatched, valid)
    out = compressor.decompress_fixed(torch.tanh(centroids @ weight), state)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(grad)

    ref_in = dispatched.detach().double().requires_grad_()
    flat = ref_in.reshape(-1, d)
    num_slots = centroids.shape[0] * centroids.shape[1]
    ref_c, ref_counts = REFERENCE.centroids_by_slot(flat, state.slot, num_slots)
    ref_y = torch.tanh(ref_c.view_as(centroids) @ weight.double()).reshape(-1, d)
    ref_out = REFERENCE.expand_with_residual(flat, state.slot, ref_c, ref_y, ref_counts, True)
    ref_out.backward(grad.double().reshape(-1, d))
    assert rel_err(out.reshape(-1, d), ref_out) < 2 * TOL[dtype]
    assert rel_err(dispatched.grad, ref_in.grad) < 2 * TOL[dtype]


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch to the kernels needs a CUDA device")
def test_auto_selects_triton_on_cuda():
    assert select("auto", torch.device("cuda")) is triton_ops.OPS
