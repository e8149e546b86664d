"""Fused Triton ops against the PyTorch reference: values and gradients on fresh random inputs, per dtype.

References run in float64 on the same inputs; errors are ‖out − ref‖ / ‖ref‖. Outputs are poisoned (NaN-filled
memory freed just before the call) so an unwritten element shows up as NaN.
"""
import math
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
    config = LSHMoEConfig(enabled=True, method="paper", compression_rate=0.2,
                          kernel="triton" if DEVICE == "cuda" else "torch")
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


def random_codes(n: int, config: LSHMoEConfig, distinct: int, gen: torch.Generator) -> torch.Tensor:
    """Codes drawn from `distinct` random full codes: few distinct -> deep levels fit, many -> only coarse ones."""
    digits = torch.randint(0, 2 * config.hash_dim, (distinct, config.num_hashes), generator=gen)
    shifts = torch.arange(config.num_hashes - 1, -1, -1) * config.code_bits_per_hash
    pool = (digits << shifts).sum(-1)
    return pool[torch.randint(0, distinct, (n,), generator=gen)]


def check_segments(clusters, n: int) -> None:
    """The CSR the fused assignment hands to the segment kernels describes exactly `slot`."""
    order, bounds = (t.cpu() for t in clusters.segments)
    slot = clusters.slot.cpu()
    assert torch.equal(torch.sort(order).values, torch.arange(n)), "order is not a permutation"
    assert bounds[0] == 0 and bounds[-1] == n and torch.all(bounds[1:] >= bounds[:-1])
    owner = torch.repeat_interleave(torch.arange(clusters.num_slots + 1), bounds[1:] - bounds[:-1])
    assert torch.equal(slot[order], owner)


ASSIGN_CASES = [  # experts, capacity, distinct codes, valid fraction, rate
    (4, 64, 5, 0.8, 0.2), (4, 64, 200, 0.9, 0.2), (3, 50, 1, 1.0, 0.1), (5, 40, 40, 0.1, 0.2),
    (6, 33, 3, 0.7, 0.5), (2, 100, 100, 1.0, 1.0), (3, 300, 60, 0.6, 0.05)]
if not SMALL:
    ASSIGN_CASES += [(8, 5120, 700, 0.8, 0.2), (64, 640, 90, 0.8, 0.1), (8, 4096, 4096, 1.0, 0.3)]


@pytest.mark.parametrize("num_hashes,hash_dim", [(6, 8), (2, 4), (13, 2)])
@pytest.mark.parametrize("experts,capacity,distinct,valid_fraction,rate", ASSIGN_CASES)
def test_fused_assignment_gives_the_reference_slots(experts, capacity, distinct, valid_fraction, rate, num_hashes,
                                                    hash_dim):
    """Fixed layout, from the same codes: every token's slot and every expert's cluster count are identical."""
    config = LSHMoEConfig(num_hashes=num_hashes, hash_dim=hash_dim, compression_rate=rate)
    gen = torch.Generator().manual_seed(experts * capacity + distinct + num_hashes)
    n = experts * capacity
    codes = random_codes(n, config, distinct, gen)
    valid = torch.rand(n, generator=gen) < valid_fraction
    valid[:capacity] = False  # the first expert receives nothing
    groups = torch.arange(experts).repeat_interleave(capacity)
    slots = max(1, math.ceil(rate * capacity - 1e-9))
    budget = torch.full((experts,), slots)
    local, ref_clusters = clustering.assign_clusters(codes, groups, valid, budget, experts,
                                                     config.code_bits_per_hash, num_hashes)
    ref_slot = torch.where(valid, groups * slots + local, torch.full_like(local, experts * slots))

    code_bits = num_hashes * config.code_bits_per_hash
    keys = torch.where(valid, (groups << code_bits) | codes, torch.full_like(codes, experts << code_bits))
    fused = triton_ops._assign(keys.to(DEVICE), valid.to(DEVICE), config, experts, group_size=capacity,
                               slots_per_group=slots)
    assert fused.num_slots == experts * slots
    assert torch.equal(fused.slot.cpu(), ref_slot)
    assert torch.equal(fused.clusters_per_group.cpu(), ref_clusters)
    check_segments(fused, n)


@pytest.mark.parametrize("seed", range(4))
def test_fused_variable_assignment_gives_the_reference_slots(seed):
    """Variable layout (groups of any size, some empty, budget per group), packed slots: identical to reference."""
    config = LSHMoEConfig(num_hashes=6, hash_dim=8, compression_rate=0.2)
    gen = torch.Generator().manual_seed(100 + seed)
    groups_n = 5 if SMALL else 32
    sizes = torch.randint(0, 120 if SMALL else 3000, (groups_n,), generator=gen)
    sizes[seed % groups_n] = 0
    n = int(sizes.sum())
    codes = random_codes(n, config, [3, 30, 300, 3000][seed], gen)
    valid = torch.ones(n, dtype=torch.bool) if seed % 2 == 0 else torch.rand(n, generator=gen) < 0.9
    budget = torch.ceil(sizes.double() * 0.2 - 1e-9).long().clamp(min=1)
    groups = torch.repeat_interleave(torch.arange(groups_n), sizes)
    local, ref_clusters = clustering.assign_clusters(codes, groups, valid, budget, groups_n,
                                                     config.code_bits_per_hash, 6)
    offsets = torch.cumsum(ref_clusters, 0) - ref_clusters
    ref_num_slots = int(ref_clusters.sum())
    ref_slot = torch.where(valid, offsets[groups] + local, torch.full_like(local, ref_num_slots))

    code_bits = 6 * config.code_bits_per_hash
    keys = torch.where(valid, (groups << code_bits) | codes, torch.full_like(codes, groups_n << code_bits))
    fused = triton_ops._assign(keys.to(DEVICE), valid.to(DEVICE), config, groups_n,
                               group_end=torch.cumsum(sizes, 0).to(DEVICE), budget=budget.to(DEVICE))
    assert fused.num_slots == ref_num_slots
    assert torch.equal(fused.slot.cpu(), ref_slot)
    assert torch.equal(fused.clusters_per_group.cpu(), ref_clusters)
    check_segments(fused, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cluster_fixed_end_to_end(dtype):
    """Hash + sort keys + assign against the reference composite: the same slots wherever the codes agree (group
    means are float atomics, so a near-tie may flip a code, rarely), and a CSR that matches the slots."""
    config = LSHMoEConfig(compression_rate=0.2)
    experts, capacity, d = (3, 64, 64) if SMALL else (8, 2048, 1024)
    gen = torch.Generator().manual_seed(11)
    centres = torch.randn(experts, 6, d, generator=gen)
    tokens = (centres[torch.arange(experts).repeat_interleave(capacity), torch.randint(0, 6, (experts * capacity,),
              generator=gen)] + 0.3 * torch.randn(experts * capacity, d, generator=gen)).to(DEVICE, dtype)
    valid = (torch.rand(experts * capacity, generator=gen) < 0.8).to(DEVICE)
    projections = hashing.hash_projections(config, d, 0).to(DEVICE)
    slots = math.ceil(0.2 * capacity)
    fused = triton_ops.cluster_fixed(tokens, valid, projections, config, experts, capacity, slots)
    ref = clustering.cluster_fixed(tokens, valid, projections, config, experts, capacity, slots)
    check_segments(fused, experts * capacity)
    assert (fused.slot == ref.slot).float().mean() > 0.99
    assert torch.all(fused.slot[~valid] == experts * slots)


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch to the kernels needs a CUDA device")
def test_auto_selects_triton_on_cuda():
    assert select("auto", torch.device("cuda")) is triton_ops.OPS
