"""Error-bounded merging (``clustering: "bounded"``): which tokens merge, the bound, the slot budget, and DeepSpeed's
real MoE layer with it in 1 and 2 real gloo processes, against stock and against a reference built from the slots
the compressor chose."""
import math

import pytest
import torch

from lshmoe_plugin import clustering
from lshmoe_plugin.bounded import bounded_clusters
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.schedule import set_training_step
from lshmoe_plugin.slot_budget import SlotBudget
from lshmoe_plugin.telemetry import Telemetry, relative_residuals

BITS, HASHES = 4, 2  # hand-made codes: two digits of four bits, the first one the coarser


@pytest.fixture(autouse=True)
def clock_from_zero():
    set_training_step(0)
    yield
    set_training_step(0)


def code(first, second):
    return first << BITS | second


def assign(tokens, codes, budget, groups=None, tolerance=0.1, valid=None):
    n = tokens.shape[0]
    groups = torch.zeros(n, dtype=torch.long) if groups is None else groups
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    budget = None if budget is None else torch.tensor(budget)
    num_groups = int(groups.max()) + 1
    return bounded_clusters(tokens, torch.tensor(codes), groups, valid, budget, num_groups, tolerance, BITS, HASHES,
                            clustering.centroids_by_slot)


def alike(*tokens):
    return [torch.tensor(t, dtype=torch.float32) for t in tokens]


# A group of one expert: three near-copies of a, two of b (each set in one bucket), one token alone in its bucket,
# and a bucket of three tokens that are not alike (outliers), in mixed order. Relative residuals to their bucket's
# mean (1, 2, 4)/3 along three axes: e1 sqrt(24)/3 = 1.63, 2 e2 sqrt(33)/6 = 0.96, 4 e3 sqrt(69)/12 = 0.69.
A = [1.0, 1.0, 0.0, 0.0]
HAND_TOKENS = torch.stack(alike(
    A, [0.0, 0.0, 4.0, 0.0], [1.01, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 5.0], [1.0, 0.99, 0.0, 0.01], [0.0, 1.02, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]))
HAND_CODES = [code(1, 1), code(2, 1), code(1, 1), code(1, 2), code(2, 1), code(3, 0), code(1, 1), code(1, 2),
              code(2, 1)]
A_ROWS, B_ROWS, SINGLE_ROW = [0, 2, 6], [3, 7], [5]
OUTLIER_ROWS_BY_RESIDUAL = [4, 8, 1]  # e1, 2 e2, 4 e3


def members(local):
    """The sets of rows that share a cluster."""
    return sorted(sorted(torch.nonzero(local == c).flatten().tolist()) for c in torch.unique(local[local >= 0]))


def test_alike_tokens_merge_and_the_others_go_solo():
    got = assign(HAND_TOKENS, HAND_CODES, budget=[8])
    assert members(got.local) == sorted([A_ROWS, B_ROWS, SINGLE_ROW, [1], [4], [8]])
    assert got.needed.tolist() == [6] and got.clusters_per_group.tolist() == [6] and got.over_budget.tolist() == [0]
    # numbered in order of first token
    firsts = [int(torch.nonzero(got.local == c)[0]) for c in range(6)]
    assert firsts == sorted(firsts)


def test_a_budget_with_room_for_every_token_sends_every_token():
    got = assign(HAND_TOKENS, HAND_CODES, budget=[9])
    assert got.local.tolist() == list(range(9)) and got.needed.tolist() == [6]


def test_the_need_does_not_depend_on_the_budget():
    """Measured under the budget, a budget of one slot per token would find one slot per token needed."""
    assert [assign(HAND_TOKENS, HAND_CODES, budget=[b]).needed.tolist() for b in (2, 6, 9, 100)] == [[6]] * 4


def test_a_short_budget_gives_its_spare_slots_to_the_largest_residuals():
    # 4 slots: the three inlier buckets keep theirs, one is left for the outliers: the largest residual's (e1);
    # the others merge with the inliers under 3 slots (the first digit's buckets), counted over budget
    got = assign(HAND_TOKENS, HAND_CODES, budget=[4])
    assert got.clusters_per_group.tolist() == [4] and got.over_budget.tolist() == [2]
    assert members(got.local) == sorted([sorted(A_ROWS + B_ROWS), [1, 8], SINGLE_ROW, [OUTLIER_ROWS_BY_RESIDUAL[0]]])
    # 5 slots: two for the two largest residuals; the third outlier goes through the merging under 3 slots, where
    # its first digit's bucket happens to hold it alone
    got = assign(HAND_TOKENS, HAND_CODES, budget=[5])
    assert members(got.local) == sorted([sorted(A_ROWS + B_ROWS), [1], [4], SINGLE_ROW, [8]])
    assert got.over_budget.tolist() == [1]


def test_outliers_only_keep_a_slot_for_the_rest():
    """Four tokens, none alike, all in one bucket; 3 slots: the two largest residuals go solo, two merge."""
    tokens = torch.stack(alike([0, 0, 4.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 8.0], [0, 2.0, 0, 0]))
    got = assign(tokens, [code(5, 5)] * 4, budget=[3])
    assert members(got.local) == [[0, 2], [1], [3]] and got.over_budget.tolist() == [2]
    assert got.needed.tolist() == [4]


def test_groups_are_independent_and_invalid_tokens_join_nothing():
    tokens = torch.cat([HAND_TOKENS, HAND_TOKENS, torch.full((2, 4), 1e6)])
    groups = torch.tensor([0] * 9 + [1] * 9 + [1, 1])
    valid = torch.tensor([True] * 18 + [False] * 2)
    got = assign(tokens, HAND_CODES * 2 + [code(1, 1)] * 2, budget=[7, 4], groups=groups, valid=valid)
    assert got.local[18:].tolist() == [-1, -1]
    assert members(got.local[:9]) == sorted([A_ROWS, B_ROWS, SINGLE_ROW, [1], [4], [8]])
    assert got.clusters_per_group.tolist() == [6, 4] and got.over_budget.tolist() == [0, 2]


def test_without_a_budget_each_group_gets_exactly_what_it_needs():
    got = assign(HAND_TOKENS, HAND_CODES, budget=None)
    assert got.clusters_per_group.tolist() == got.needed.tolist() == [6]
    assert members(got.local) == sorted([A_ROWS, B_ROWS, SINGLE_ROW, [1], [4], [8]])


# -- the compressor, fixed layout --------------------------------------------------------------------------------
def make_compressor(**overrides):
    config = LSHMoEConfig(enabled=True, clustering="bounded", **overrides)
    return LSHCompressor(config, layer_index=0, telemetry=Telemetry())


def near_copies(num_experts=4, capacity=40, d=16, fill=(40, 31, 7, 0), copies=5, noise=0.01, seed=0):
    """Each expert's tokens: a few base tokens, `copies` noisy copies of each (relative noise `noise`), plus one
    token unlike any other every 8 slots; then padding."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(num_experts, capacity // copies + 1, d, generator=gen)
    x = base.repeat_interleave(copies, 1)[:, :capacity]
    x = x + noise * torch.randn(x.shape, generator=gen) * x.norm(dim=-1, keepdim=True) / math.sqrt(d)
    x[:, ::8] = 3 * torch.randn(num_experts, len(range(0, capacity, 8)), d, generator=gen)
    valid = torch.arange(capacity)[None, :] < torch.tensor(fill)[:, None]
    return x * valid[..., None], valid


def check_the_bound(comp, x, valid):
    """Compress once; every merged token within the tolerance or counted; centroids the means of their members."""
    centroids, state = comp.compress_fixed(x, valid)
    stats = comp.telemetry.latest[0]
    flat = x.reshape(-1, x.shape[-1])
    per_token = comp.per_token(centroids, state)
    residual = relative_residuals(flat, per_token)
    merged = valid.reshape(-1) & (torch.cat([state.counts, torch.zeros(1)])[state.slot] > 1)
    over = merged & (residual > comp.config.merge_tolerance)
    assert int(stats.merged_tokens) == int(merged.sum()) and int(stats.merged_over_tolerance) == int(over.sum())
    for s in torch.unique(state.slot[valid.reshape(-1)]).tolist():
        assert torch.allclose(centroids.reshape(-1, x.shape[-1])[s], flat[state.slot == s].mean(0), atol=1e-6)
    return centroids, state, stats, merged, over


def test_merged_tokens_stay_within_the_tolerance_or_are_counted():
    comp = make_compressor(merge_tolerance=0.1, telemetry_interval=1)
    x, valid = near_copies()
    centroids, state, stats, merged, over = check_the_bound(comp, x, valid)
    # the first step sends a slot per capacity row, and every token crosses as itself
    assert centroids.shape == (4, 40, 16) and torch.equal(centroids, x) and not merged.any()
    assert stats.slots_per_expert == 40 and int(stats.over_budget_tokens) == 0
    set_training_step(1)  # the next step sends the slots the last one needed, plus headroom
    centroids, state, stats, merged, over = check_the_bound(comp, x, valid)
    assert centroids.shape[1] == comp.slot_budget.slots_for(40) < 40 and stats.slots_per_expert == centroids.shape[1]
    assert int(stats.over_budget_tokens) == 0 and stats.as_floats()["bytes_ratio"] < 0.6
    assert merged.sum() >= 20 and over.sum() <= 0.1 * merged.sum()
    lone = torch.zeros_like(valid)
    lone[:, ::8] = True  # the tokens unlike any other cross as themselves
    assert not (merged & (lone & valid).reshape(-1)).any()


def test_recomputed_centroids_and_a_short_budget_are_counted():
    """Copies 10% apart: some members end past the tolerance once their centroid is the inliers' mean. A budget
    set from calmer data is too short for them: the outliers that get no slot of their own are counted."""
    comp = make_compressor(merge_tolerance=0.1, telemetry_interval=1)
    calm, valid = near_copies(copies=8, noise=0.01)
    check_the_bound(comp, calm, valid)
    set_training_step(1)
    check_the_bound(comp, calm, valid)
    set_training_step(2)
    noisy, _ = near_copies(copies=8, noise=0.1)
    centroids, state, stats, merged, over = check_the_bound(comp, noisy, valid)
    assert int(stats.slots_needed) > centroids.shape[1] and int(stats.over_budget_tokens) > 0 and over.sum() > 0
    assert (state.counts.view(4, -1) > 0).sum(1).max() <= centroids.shape[1]
    comp = make_compressor(merge_tolerance=0.1, telemetry_interval=1)
    set_training_step(0)
    check_the_bound(comp, noisy, valid)
    set_training_step(1)
    centroids, state, stats, merged, over = check_the_bound(comp, noisy, valid)
    assert int(stats.over_budget_tokens) == 0 and 0 < over.sum() < 0.1 * merged.sum()


def test_a_tiny_tolerance_is_stock_exactly_in_forward_and_gradient():
    """Every token its own slot, in its own row (S = C on the first step): the expert sees the dispatch buffer."""
    comp = make_compressor(merge_tolerance=1e-9)
    x, valid = near_copies(noise=1e-3)
    leaf = x.clone().requires_grad_()
    centroids, state = comp.compress_fixed(leaf, valid)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))

    def expert(rows):
        return torch.tanh(rows @ weight)
    out = comp.decompress_fixed(expert(centroids), state)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    stock_leaf = x.clone().requires_grad_()
    stock = expert(stock_leaf) * valid[..., None]
    stock.backward(grad * valid[..., None])
    assert torch.equal(centroids, x) and torch.equal(out, stock) and torch.equal(leaf.grad, stock_leaf.grad)


def test_the_slot_budget_follows_the_steps():
    comp = make_compressor(compression_rate=0.2)
    x, valid = near_copies(fill=(40, 40, 40, 40), copies=8, noise=1e-3)
    assert comp.compress_fixed(x, valid)[0].shape[1] == 40
    need = int(comp.telemetry.latest[0].slots_needed)
    assert comp.compress_fixed(x, valid)[0].shape[1] == 40  # the same step (a micro-batch, a recomputation)
    assert comp.compress_fixed(x, valid, record=False)[0].shape[1] == 40  # an evaluation reads
    set_training_step(1)
    expected = min(40, max(8, math.ceil(need * 1.1 - 1e-9)))
    expected = min(40, math.ceil(expected / 2) * 2)  # a multiple of 40 // 16 = 2
    assert comp.compress_fixed(x, valid)[0].shape[1] == expected < 40
    # an evaluation of other data neither moves S nor feeds the need
    assert comp.compress_fixed(torch.randn(4, 40, 16), valid, record=False)[0].shape[1] == expected
    set_training_step(2)
    assert comp.compress_fixed(x, valid)[0].shape[1] == expected


def test_slot_budget_floor_ceiling_and_rounding():
    budget = SlotBudget(0.2)
    assert budget.slots(40, step=0) == 40 and budget.slots(0, step=0) == 0
    budget.record(torch.tensor(10))
    budget.record(torch.tensor(12))  # a step's need is its largest
    assert budget.slots(40, step=0) == 40 and budget.slots(40) == 40  # same step; an evaluation
    assert budget.slots(40, step=1) == 14  # ceil(12 * 1.1) = 14, a multiple of 2
    budget.record(torch.tensor(3))
    assert budget.slots(40) == 14  # read-only: the pending need waits for the step
    assert budget.slots(40, step=2) == 8  # ceil(3.3) = 4 < the floor ceil(0.2 * 40)
    budget.record(torch.tensor(39))
    assert budget.slots(40, step=3) == 40  # ceil(42.9) capped at the capacity
    assert budget.slots(40, step=4) == 40  # a step without forwards keeps the need
    budget.record(torch.tensor(50))
    # ceil(55) to a multiple of 64 // 16 = 4, of 100 // 16 = 6; at least ceil(0.2 * 1000), a multiple of 62
    assert (budget.slots(64, step=5), budget.slots_for(100), budget.slots_for(1000)) == (56, 60, 248)
    budget.need = 10
    assert (budget.slots_for(64), budget.slots_for(100)) == (16, 24)  # the floors 13 and 20, rounded up
    budget.need = 88
    assert budget.slots_for(100) == 100  # 97 rounds up to 102: never past the capacity


def test_slot_budget_takes_the_agreed_need():
    budget = SlotBudget(0.1)
    budget.slots(160, step=0)
    budget.record(torch.tensor(20), agree=lambda need: need.fill_(max(int(need), 50)))  # another rank needed 50
    assert budget.slots(160, step=1) == 60  # ceil(55) to a multiple of 10


# -- the compressor, variable layout -----------------------------------------------------------------------------
def test_variable_layout_sends_exactly_what_each_expert_needs():
    comp = make_compressor(compression_rate=0.05, telemetry_interval=1)
    x, valid = near_copies(fill=(40, 31, 7, 1))
    tokens = x[valid]
    per_expert = valid.sum(1)
    centroids, clusters, state = comp.compress_variable(tokens, per_expert)
    stats = comp.telemetry.latest[0]
    assert clusters.sum() == centroids.shape[0] == int(stats.clusters) and stats.slots_per_expert is None
    assert (clusters <= per_expert).all() and clusters[3] == 1 and (clusters > 0).all()
    assert int(stats.over_budget_tokens) == 0  # no budget to run out of
    residual = relative_residuals(tokens, comp.per_token(centroids, state))
    merged = state.counts[state.slot] > 1
    assert int(stats.merged_over_tolerance) == int((merged & (residual > 0.1)).sum()) <= 0.1 * int(merged.sum())
    assert int(stats.slots_needed) == int(clusters.max()) and clusters.sum() < 0.6 * per_expert.sum()
    exact = make_compressor(merge_tolerance=1e-9)
    centroids, clusters, state = exact.compress_variable(tokens, per_expert)
    assert torch.equal(centroids, tokens) and torch.equal(clusters, per_expert)
