"""k-means refinement of the LSH clusters (`refine_iterations`): same budget and layout, never larger residuals,
exact where it was exact, and gradients still flow."""
import pytest
import torch
from test_compressor import capacity_batch, make_compressor

from lshmoe_plugin.clustering import centroids_by_slot, refine_fixed
from lshmoe_plugin.compressor import fixed_slots


def squared_residual(x, valid, state):
    """Sum over valid tokens of ||token - its centroid||^2."""
    flat = x.reshape(-1, x.shape[-1]).float()
    per_token = torch.cat([state.centroids.float(), torch.zeros(1, x.shape[-1])])[state.slot]
    return ((flat - per_token).square().sum(-1) * valid.reshape(-1)).sum().item()


def clustered_batch(num_experts=3, capacity=64, d=16, clusters=6, seed=0):
    """Tokens scattered around a few centres per expert, as the gate hands them over: what LSH should group."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_experts, clusters, d, generator=gen) * 3
    pick = torch.randint(0, clusters, (num_experts, capacity), generator=gen)
    x = torch.gather(centres, 1, pick.unsqueeze(-1).expand(-1, -1, d)) + 0.3 * torch.randn(num_experts, capacity, d,
                                                                                          generator=gen)
    valid = torch.ones(num_experts, capacity, dtype=torch.bool)
    if num_experts > 1:
        valid[1, 40:] = False
    return x * valid[..., None], valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [0.1, 0.25])
def test_refinement_never_raises_the_residual_and_keeps_the_budget(seed, rate):
    x, valid = clustered_batch(seed=seed)
    plain, state_plain = make_compressor(compression_rate=rate).compress_fixed(x, valid)
    refined, state = make_compressor(compression_rate=rate, refine_iterations=3).compress_fixed(x, valid)
    assert refined.shape == plain.shape == (3, fixed_slots(64, rate), 16)
    before, after = squared_residual(x, valid, state_plain), squared_residual(x, valid, state)
    assert after <= before * (1 + 1e-6), (before, after)
    # every valid token sits in a slot of its own expert; padding stays in the scratch row
    slot = state.slot.view(3, 64)
    num_slots = state.centroids.shape[0]
    per_expert = fixed_slots(64, rate)
    expert = torch.arange(3).unsqueeze(1).expand(3, 64)
    assert torch.equal((slot // per_expert)[valid], expert[valid])
    assert torch.all(slot[~valid] == num_slots)


def test_refinement_lowers_the_residual_where_lsh_splits_badly():
    # 4 slots for 4 tight, far-apart groups that the hash splits across its buckets: Lloyd steps regroup them.
    torch.manual_seed(0)
    x, valid = clustered_batch(num_experts=1, capacity=40, clusters=4, seed=0)
    plain = make_compressor(compression_rate=0.1).compress_fixed(x, valid)[1]
    refined = make_compressor(compression_rate=0.1, refine_iterations=5).compress_fixed(x, valid)[1]
    assert squared_residual(x, valid, refined) < 0.6 * squared_residual(x, valid, plain)


def test_identity_expert_round_trip_stays_exact_with_refinement():
    x, valid = capacity_batch(seed=3)
    comp = make_compressor(compression_rate=0.2, refine_iterations=2)
    centroids, state = comp.compress_fixed(x, valid)
    assert torch.equal(comp.decompress_fixed(centroids.clone(), state), x)


def test_rate_one_is_untouched_by_refinement():
    x, valid = capacity_batch()
    centroids, state = make_compressor(compression_rate=1.0, refine_iterations=3).compress_fixed(x, valid)
    assert torch.equal(centroids, x)


def test_refined_centroids_are_the_means_of_their_members_with_gradients():
    x, valid = clustered_batch(seed=4)
    x = x.requires_grad_(True)
    comp = make_compressor(compression_rate=0.2, refine_iterations=2)
    centroids, state = comp.compress_fixed(x, valid)
    means, _ = centroids_by_slot(x.detach().reshape(-1, 16), state.slot, state.centroids.shape[0])
    assert torch.allclose(centroids.reshape(-1, 16), means, atol=1e-6)
    out = comp.decompress_fixed(torch.tanh(centroids), state)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[valid].abs().sum() > 0


def test_zero_iterations_return_the_slots_unchanged():
    slot = torch.tensor([0, 0, 1, 2])
    same = refine_fixed(torch.randn(4, 3), torch.ones(4, dtype=torch.bool), slot, 1, 4, 2, 0,
                        lambda t, s: centroids_by_slot(t, s, 2))
    assert same is slot


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_refinement_keeps_every_slot_of_a_crowded_expert_in_use(seed):
    """A slot that loses all its tokens to the reassignment takes the farthest token: no budget is sent empty."""
    x, valid = clustered_batch(num_experts=3, capacity=96, clusters=3, seed=seed)  # 3 tight groups, 10 slots
    plain = make_compressor(compression_rate=0.1).compress_fixed(x, valid)[1]
    refined = make_compressor(compression_rate=0.1, refine_iterations=3).compress_fixed(x, valid)[1]
    used = lambda state: int((state.counts > 0).sum())  # noqa: E731
    assert used(refined) == 3 * fixed_slots(96, 0.1) >= used(plain)
    assert squared_residual(x, valid, refined) <= squared_residual(x, valid, plain) * (1 + 1e-6)


@pytest.mark.parametrize("tokens, slots, expected", [
    # Slot 2 duplicates slot 1's centroid (2), so the reassignment empties it; slot 0 keeps only 100, the farthest
    # token from its new centroid (25). Taking 100 would empty slot 0: -50, the next farthest, re-seeds slot 2.
    ([100, -50, 1, 3, 2, 2], [0, 0, 1, 1, 2, 2], [0, 2, 1, 1, 1, 1]),
    # Slots 2 and 3 duplicate slot 1 and empty; slot 0 keeps 100 and 102, the two farthest tokens (from 40.25).
    # Taking both would empty slot 0: it keeps 100 (the nearer), 102 and -21 (the next farthest) re-seed.
    ([100, 102, -20, -21, 1, 3, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 2, 2, 3, 3], [0, 2, 1, 3, 1, 1, 1, 1, 1, 1]),
], ids=["singleton", "two_member_slot"])
def test_a_reseed_never_empties_another_slot(tokens, slots, expected):
    """Built so that the farthest tokens after the reassignment are all the members of one slot."""
    x = torch.tensor(tokens, dtype=torch.float32).unsqueeze(-1)
    n, per_group = len(tokens), max(slots) + 1
    slot = refine_fixed(x, torch.ones(n, dtype=torch.bool), torch.tensor(slots), 1, n, per_group, 1,
                        lambda t, s: centroids_by_slot(t, s, per_group))
    assert slot.tolist() == expected
    assert torch.bincount(slot, minlength=per_group).min() >= 1  # every slot in use
    initial = centroids_by_slot(x, torch.tensor(slots), per_group)[0][torch.tensor(slots)]
    refined = centroids_by_slot(x, slot, per_group)[0][slot]
    assert (x - refined).square().sum() < (x - initial).square().sum()
