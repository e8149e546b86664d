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
    # An elementwise expert: a matmul's bits on the CPU can depend on where its operands lie in memory (MKL picks
    # its kernels by alignment), so `rows @ w` of equal rows in two tensors is not always equal to the last bit.
    weight, bias = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))

    def expert(rows):
        return torch.tanh(rows * weight + bias)
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


# -- DeepSpeed's real MoE layer -----------------------------------------------------------------------------------
class KeptStates:
    """The state of every `compress_fixed` while inside (the real call runs): the slots the compressor chose."""

    def __enter__(self):
        self.original, self.states = LSHCompressor.compress_fixed, []

        def keeping(compressor, *args, **kwargs):
            centroids, state = self.original(compressor, *args, **kwargs)
            self.states.append(state)
            return centroids, state
        LSHCompressor.compress_fixed = keeping
        return self

    def __exit__(self, *exc):
        LSHCompressor.compress_fixed = self.original


def reference_from_slots(moe, x, slot, slots_per_expert, dispatch=(None, None), combine=(None, None)):
    """`fwd_bwd` of DeepSpeed's MOELayer rebuilt from its own stages around the given slots (N,) of the dispatch
    buffer: centroids the float32 means of their members, through DeepSpeed's all-to-all and experts (each crossing
    coded as `RoundTrip` says), then E(c) for a token alone in its slot and x + (E(c) - c) for a merged one."""
    from deepspeed.moe import sharded_moe as sm
    from test_deepspeed_patch import D_MODEL
    from test_deepspeed_wire import RoundTrip
    layer = moe.deepspeed_moe
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1234)
    tokens = x.reshape(-1, D_MODEL)
    l_aux, C, E, indices, locations, gates, _ = layer.gate(tokens, None, True, False)
    C, num = int(C), E * slots_per_expert
    routes = sm._route_slots(indices, locations, E, C)
    flat = sm._sparse_encode(tokens, routes, E, C).reshape(-1, D_MODEL)
    counts = torch.zeros(num + 1).index_add(0, slot, torch.ones(slot.shape[0]))
    centroids = torch.zeros(num + 1, D_MODEL).index_add(0, slot, flat)[:num] / counts[:num].clamp(min=1)[:, None]

    def all_to_all(t):
        return sm._AllToAll.apply(layer.ep_group, t) if layer.ep_size > 1 else t.contiguous()
    received = all_to_all(RoundTrip.apply(centroids.view(E, slots_per_expert, D_MODEL), *dispatch))
    out = layer.experts(received.reshape(layer.ep_size, layer.num_local_experts, -1, D_MODEL))
    out = all_to_all(RoundTrip.apply(out.reshape(E, -1, D_MODEL), *combine)).reshape(num, D_MODEL)
    zero = torch.zeros(1, D_MODEL)
    own = torch.cat([out, zero])[slot]
    shared = flat + torch.cat([out - centroids, zero])[slot]
    expanded = torch.where((counts[slot] <= 1)[:, None], own, shared) * (slot < num)[:, None]
    y = sm._sparse_decode(expanded.view(E * C, D_MODEL), routes, gates, tokens.shape[0]).reshape(x.shape)
    (y.float().square().mean() + l_aux).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in moe.parameters()]
    return (y.detach(), x.grad.detach(), grads), C


def build_distinct_experts(rank, ep_size, k):
    """DeepSpeed's MoE with MLP experts that differ from one another (DeepSpeed copies one expert into every slot):
    a centroid sent to the wrong expert would change the output."""
    from test_deepspeed_patch import build_moe
    moe = build_moe(ep_size, k)
    local = moe.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        for i, expert in enumerate(local):
            gen = torch.Generator().manual_seed(1000 + rank * len(local) + i)
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return moe


def rank_tokens(rank):
    """Tokens made of a few base tokens with a little noise: 3 bases on rank 0, 16 on rank 1 (which needs more
    slots)."""
    gen = torch.Generator().manual_seed(100 + rank)
    base = torch.randn(3 + 13 * rank, 16, generator=gen)
    x = base[torch.randint(0, base.shape[0], (48,), generator=gen)]
    noise = 0.001 if rank == 0 else 0.01
    return (x + noise * torch.randn(x.shape, generator=gen) * x.norm(dim=-1, keepdim=True) / 4).view(2, 24, 16)


def check_bounded_layer(rank, world_size):
    from test_deepspeed_patch import build_moe, fwd_bwd, same
    from test_deepspeed_wire import BLOCK, FP8_ROW_BYTES, AllToAlls, crossing_bytes

    import lshmoe_plugin
    x = rank_tokens(rank)
    report, sizes = {}, {}
    bounded = {"enabled": True, "clustering": "bounded", "telemetry_interval": 1}
    for k in (1, 2):
        moe = build_moe(world_size, k)
        stock = fwd_bwd(moe, x)
        # a tiny tolerance on the first step: every token has its own slot, S = C, and the layer is stock's
        lshmoe_plugin.enable({"lsh_moe": {**bounded, "merge_tolerance": 1e-9}}, moe)
        report[f"top{k}_tiny_tolerance_is_stock"] = same(stock, fwd_bwd(moe, x))

        moe = build_distinct_experts(rank, world_size, k)
        for name, keys, coding in (("model", {}, (None, None)),
                                   ("fp8", {"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                                            "fp8_block_size": BLOCK}, ("fp8", "fp8"))):
            lshmoe_plugin.enable({"lsh_moe": {**bounded, **keys}}, moe)
            for step in (0, 1):
                lshmoe_plugin.set_training_step(step)
                with KeptStates() as kept, AllToAlls() as calls:
                    got = fwd_bwd(moe, x)
                state, stats = kept.states[-1], lshmoe_plugin.TELEMETRY.latest[0]
                slots_per_expert = state.centroids.shape[0] // 4
                expected, capacity = reference_from_slots(moe, x, state.slot, slots_per_expert, coding, coding)
                case = f"top{k}_{name}_step{step}"
                report[f"{case}_equals_the_reference_from_its_slots"] = same(expected, got)
                rows = 4 * slots_per_expert
                crossings = crossing_bytes(("fp8",) * 4 if name == "fp8" else (None,) * 4, rows)
                report[f"{case}_all_to_alls"] = calls.calls == (crossings if world_size > 1 else [])
                report[f"{case}_telemetry_bytes"] = stats.bytes_sent == rows * (
                    FP8_ROW_BYTES if name == "fp8" else 16 * 4)
                if step == 0:
                    report[f"{case}_sends_every_capacity_row"] = slots_per_expert == capacity
                    sizes[f"top{k}_{name}"] = (int(stats.slots_needed), capacity)
                else:
                    report[f"{case}_merges"] = int(stats.clusters) < int(stats.valid_tokens)
                    sizes[f"top{k}_{name}"] += (slots_per_expert,)
        # the output-error sample measures the bounded layer: next to nothing while every token crosses
        lshmoe_plugin.enable({"lsh_moe": {**bounded, "output_error_interval": 1}}, moe)
        errors = []
        for step in (0, 1):
            lshmoe_plugin.set_training_step(step)
            fwd_bwd(moe, x)
            errors.append(lshmoe_plugin.TELEMETRY.latest[0].as_floats())
        report[f"top{k}_output_error_exact_first"] = errors[0]["output_error"] < 1e-6
        # what the layer returned is the paper's compensation, up to the order of the sum (the expand forms
        # x + (E(c) - c), the sample x + E(c) - c)
        report[f"top{k}_output_error_measured"] = (
            math.isclose(errors[1]["output_error"], errors[1]["output_error_compensated"], rel_tol=1e-4)
            and errors[1]["output_error_uncompensated"] > 1e-4)
        lshmoe_plugin.disable()
        lshmoe_plugin.set_training_step(0)
    return report, sizes


@pytest.mark.parametrize("world_size", [1, 2])
def test_bounded_layer_against_stock_and_the_reference_from_its_slots(world_size):
    from distributed import run_distributed
    from test_deepspeed_patch import failed
    results = run_distributed(check_bounded_layer, world_size)
    for rank, (report, _) in enumerate(results):
        assert all(report.values()), (rank, failed(report))
    for case in results[0][1]:
        needs = [sizes[case][0] for _, sizes in results]
        capacity = results[0][1][case][1]
        budget = SlotBudget(0.2)
        budget.need = max(needs)  # the ranks agree on the largest need
        assert [sizes[case][2] for _, sizes in results] == [budget.slots_for(capacity)] * world_size, case
    if world_size == 2:  # rank 1's tokens need more slots than rank 0's: rank 0 sent rank 1's count
        assert all(results[1][1][case][0] > results[0][1][case][0] for case in results[0][1])


# -- Megatron-core's all-to-all dispatcher (the variable layout) --------------------------------------------------
def check_bounded_megatron(rank, world_size):
    import megatron_helpers as helpers
    from megatron.core import parallel_state

    from lshmoe_plugin.patches import megatron_compat, megatron_dispatcher
    from lshmoe_plugin.telemetry import TELEMETRY
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    bounded = {"clustering": "bounded", "telemetry_interval": 1}
    try:
        x = rank_tokens(rank).view(helpers.SEQ, -1, helpers.HIDDEN)
        out = {}
        layer = helpers.build_layer(world_size)
        stock = helpers.fwd_bwd(layer, x)
        megatron_dispatcher.apply(helpers.enabled(merge_tolerance=1e-9, **bounded), layer)
        out["tiny_tolerance_diff"] = helpers.max_diff(stock, helpers.fwd_bwd(layer, x))
        # Experts that output only their own bias, no error compensation: p * E(c) = p * b_e whatever the centroid,
        # so the layer matches stock only if every centroid reached its own expert and came back to its tokens.
        megatron_dispatcher.revert()
        layer = helpers.build_layer(world_size, add_bias_linear=True)
        helpers.set_expert_biases(layer, zero_weights=True)
        stock = helpers.fwd_bwd(layer, x)
        megatron_dispatcher.apply(helpers.enabled(error_compensation=False, **bounded))
        TELEMETRY.clear()
        with helpers.TokenBytes() as sent:
            got = helpers.fwd_bwd(layer, x)
        [stats] = TELEMETRY.latest.values()
        out["bias_only_diff"] = helpers.max_diff(stock, got)
        out["merged"] = int(stats.clusters) < int(stats.valid_tokens)
        out["bound"] = stats.as_floats()["merged_over_tolerance"] <= 0.1 and int(stats.over_budget_tokens) == 0
        out["telemetry_rows"] = stats.bytes_sent == int(stats.clusters) * helpers.HIDDEN * 4
        # what this rank sent to the experts; the backward returns what it received, so the four crossings add
        # up over the ranks
        out["dispatch_rows"] = sum(sent.splits[0]) == int(stats.clusters)
        out["wire_bytes"], out["telemetry_bytes"] = sum(sent.sent), stats.bytes_sent
        return out
    finally:
        megatron_dispatcher.revert()
        parallel_state.destroy_model_parallel()


def test_bounded_megatron_dispatcher_sends_what_each_expert_needs():
    from distributed import run_distributed
    results = run_distributed(check_bounded_megatron, 2)
    for rank, out in enumerate(results):
        assert out["tiny_tolerance_diff"] < 1e-5 and out["bias_only_diff"] < 1e-5, (rank, out)
        assert out["merged"] and out["bound"] and out["telemetry_rows"] and out["dispatch_rows"], (rank, out)
    assert sum(out["wire_bytes"] for out in results) == 4 * sum(out["telemetry_bytes"] for out in results)
