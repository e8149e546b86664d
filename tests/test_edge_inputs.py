"""Inputs at the edges, LSH on, through DeepSpeed's real `MoE` layer patched by the plugin, in 1 and 2 gloo processes.

Every case runs the same layer (same seed, same weights) three ways: stock, patched at compression_rate 1.0, and
patched at a compressing rate; once with MLP experts and once with identity experts. What must hold everywhere:
rate 1.0 is stock bit for bit (outputs, input and parameter gradients); identity experts with error compensation
give stock bit for bit at any rate; compressed outputs and gradients are finite. Each edge adds its own check.
All cases of one world size share one spawned run (a spawn costs more than all the cases together).
"""
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block

import lshmoe_plugin
from lshmoe_plugin import LSHCompressor, LSHMoEConfig, LSHMoEConfigError

NUM_EXPERTS = 4


@dataclass(frozen=True)
class Case:
    moe: dict = field(default_factory=dict)   # DeepSpeed MoE arguments over the defaults of `build`
    shape: Tuple[int, int] = (2, 12)          # (batch, sequence) of every rank's input
    d_model: int = 16
    rate: float = 0.2
    lsh: dict = field(default_factory=dict)   # lsh_moe keys over enabled/compression_rate
    gate: Optional[str] = None                # "zero": every token picks expert 0; "starve_last": none picks the last
    inputs: str = "random"                    # "random", "marked" (for starve_last), "identical"
    empty_ranks: Tuple[int, ...] = ()         # ranks whose batch holds no token at all
    compresses: bool = True                   # whether the compressing rate must merge tokens (ranks with any)


CASES = {
    "one_token_top1": Case(moe=dict(k=1, min_capacity=1), shape=(1, 1), compresses=False),
    "one_token_top2": Case(moe=dict(k=2, min_capacity=1), shape=(1, 1), compresses=False),
    "all_to_one_expert": Case(moe=dict(k=1), gate="zero"),
    "all_to_one_expert_no_drop": Case(moe=dict(k=1, drop_tokens=False), gate="zero"),
    "expert_without_tokens": Case(moe=dict(k=2), gate="starve_last", inputs="marked"),
    # 8 tokens, 4 experts, capacity factor 1: C = 2 < 1/rate = 5, so ceil(rate * C) = 1 centroid per expert
    "capacity_below_one_over_rate": Case(moe=dict(k=1, capacity_factor=1.0, min_capacity=1), shape=(1, 8)),
    "d_model_not_divisible_by_hash_dim": Case(d_model=12, lsh=dict(hash_dim=5)),
    "d_model_not_divisible_spherical": Case(d_model=12, lsh=dict(hash_dim=5, hash_type="spherical")),
    "spherical_hash_dim_above_d_model": Case(lsh=dict(hash_dim=20, hash_type="spherical")),
    "residual_moe": Case(moe=dict(k=2, use_residual=True)),
    "no_drop_top1": Case(moe=dict(k=1, drop_tokens=False)),
    "no_drop_top2": Case(moe=dict(k=2, drop_tokens=False)),
    "top1_jitter": Case(moe=dict(k=1, noisy_gate_policy="Jitter")),
    "top1_rsample": Case(moe=dict(k=1, noisy_gate_policy="RSample")),
    "ep_size_1_four_local_experts": Case(moe=dict(k=2, ep_size=1)),
    "identical_tokens": Case(moe=dict(k=1), inputs="identical"),
    # An empty batch is something stock DeepSpeed runs (capacity 0); top-2 without dropping shares one capacity
    # across ranks, so a rank with no tokens still takes part in the all-to-all.
    "empty_batch": Case(moe=dict(k=2, min_capacity=0), empty_ranks=(0, 1), compresses=False),
    "empty_batch_on_rank_1": Case(moe=dict(k=2, min_capacity=0, drop_tokens=False), empty_ranks=(1,)),
}
REFUSED = {
    # cross-polytope hashes are rotations: at most d_model directions
    "cross_polytope_hash_dim_above_d_model": Case(lsh=dict(hash_dim=20)),
    # 13 hashes of 4 bits leave 11 bits of the int64 bucket key for the expert id and its sentinel: 2047 experts
    "more_experts_than_the_bucket_key_holds": Case(moe=dict(k=1, num_experts=2048), lsh=dict(num_hashes=13)),
}


def build(world_size, case, identity):
    from deepspeed.moe.layer import MoE
    torch.manual_seed(0)
    d = case.d_model
    expert = torch.nn.Identity() if identity else torch.nn.Sequential(
        torch.nn.Linear(d, 32), torch.nn.GELU(), torch.nn.Linear(32, d))
    kwargs = dict(num_experts=NUM_EXPERTS, ep_size=world_size, k=2, capacity_factor=1.25, min_capacity=4)
    kwargs.update(case.moe)
    moe = MoE(d, expert, **kwargs)
    moe.set_deepspeed_parallelism()
    gate = moe.deepspeed_moe.gate.wg.weight
    with torch.no_grad():
        if case.gate == "zero":  # all logits tie; argmax takes the first expert
            gate.zero_()
        elif case.gate == "starve_last":  # on marked inputs only the last expert's logit reads the mark, negatively
            gate[:, 0] = 0.0
            gate[-1, 0] = -10.0
    return moe


def case_input(rank, case):
    torch.manual_seed(100 + rank)
    if rank in case.empty_ranks:
        return torch.randn(0, case.d_model)
    x = torch.randn(*case.shape, case.d_model)
    if case.inputs == "marked":
        x[..., 0] = 10.0
    elif case.inputs == "identical":
        x = x[:1, :1].expand_as(x).contiguous()
    return x


def fwd_bwd(moe, x):
    """Output, input gradient, parameter gradients and routed counts of one forward+backward on a fixed seed."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1234)  # the gate's noise and random token selection draw from the global generator
    out, l_aux, counts = moe(x)
    loss = out.float().square().sum() / max(1, out.numel())
    if x.shape[0]:  # DeepSpeed's aux loss is a mean over tokens: NaN for an empty batch, in stock too
        loss = loss + l_aux
    loss.backward()
    grads = [p.grad.clone() for p in moe.parameters() if p.grad is not None]
    return out.detach(), x.grad.detach(), grads, counts.detach().clone()


def same(a, b):
    return (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(a[2]) == len(b[2])
            and all(torch.equal(p, q) for p, q in zip(a[2], b[2])))


def finite(result):
    return all(torch.isfinite(t).all().item() for t in (result[0], result[1], *result[2]))


def lsh_config(case, rate):
    return {"lsh_moe": paper_block({"enabled": True, "compression_rate": rate, **case.lsh})}


class AllToAllCalls:
    """Counts calls of the real all-to-all (each still runs)."""

    def __enter__(self):
        import deepspeed.comm as dist
        self.dist, self.original, self.calls = dist, dist.all_to_all_single, 0

        def counting(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)
        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_to_all_single = self.original


def run_case(rank, world_size, case):
    x = case_input(rank, case)
    report = {}
    for kind in ("mlp", "identity"):
        moe = build(world_size, case, identity=kind == "identity")
        stock = fwd_bwd(moe, x)
        lshmoe_plugin.enable(lsh_config(case, 1.0), moe)
        at_rate_one = fwd_bwd(moe, x)
        lshmoe_plugin.enable(lsh_config(case, case.rate), moe)
        with AllToAllCalls() as calls:
            compressed = fwd_bwd(moe, x)
        stats = lshmoe_plugin.TELEMETRY.latest[0]
        lshmoe_plugin.disable()
        row_bytes = NUM_EXPERTS * case.d_model * x.element_size()
        report[kind] = {
            "rate_one_exact": same(stock, at_rate_one),
            "compressed_exact": same(stock, compressed),
            "compressed_close": all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(
                (compressed[0], compressed[1], *compressed[2]), (stock[0], stock[1], *stock[2]))),
            "finite": finite(compressed),
            "input_grad_nonzero": bool(compressed[1].abs().sum() > 0),
            "out_shape": tuple(compressed[0].shape),
            "valid": int(stats.valid_tokens), "clusters": int(stats.clusters),
            "slots_per_expert": stats.bytes_sent // row_bytes, "capacity": stats.bytes_uncompressed // row_bytes,
            "all_to_all_calls": calls.calls,
        }
        counts = stock[3].clone()
        if world_size > 1:
            torch.distributed.all_reduce(counts)
        report[kind]["global_counts"] = counts.tolist()
    return report


def run_refused(rank, world_size, case):
    moe = build(world_size, case, identity=False)
    lshmoe_plugin.enable(lsh_config(case, case.rate), moe)
    try:
        fwd_bwd(moe, case_input(rank, case))
    except Exception as error:  # noqa: BLE001 - the test checks which one
        return type(error).__name__, isinstance(error, LSHMoEConfigError), str(error)
    finally:
        lshmoe_plugin.disable()
    return None


def check_edge_cases(rank, world_size):
    reports = {name: run_case(rank, world_size, case) for name, case in CASES.items()}
    reports.update({name: run_refused(rank, world_size, case) for name, case in REFUSED.items()})
    return reports


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def run(request):
    """(world size, every rank's reports, in rank order)."""
    return request.param, run_distributed(check_edge_cases, request.param)


def ranks_with_tokens(run, name):
    """(rank, that rank's report of case `name`) for every rank whose batch is not empty."""
    _, per_rank = run
    return [(rank, reports[name]) for rank, reports in enumerate(per_rank) if rank not in CASES[name].empty_ranks]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rate_one_is_stock_bit_for_bit(run, name):
    for rank, reports in enumerate(run[1]):
        assert reports[name]["mlp"]["rate_one_exact"] and reports[name]["identity"]["rate_one_exact"], rank


@pytest.mark.parametrize("name", sorted(CASES))
def test_identity_experts_with_error_compensation_are_stock_bit_for_bit(run, name):
    for rank, reports in enumerate(run[1]):
        assert reports[name]["identity"]["compressed_exact"], (rank, reports[name]["identity"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_compressed_outputs_and_gradients_are_finite_and_flow(run, name):
    case = CASES[name]
    for rank, reports in enumerate(run[1]):
        mlp = reports[name]["mlp"]
        assert mlp["finite"], (rank, mlp)
        if rank in case.empty_ranks:
            assert mlp["out_shape"] == (0, case.d_model) and not mlp["input_grad_nonzero"], (rank, mlp)
        else:
            assert mlp["out_shape"] == (*case.shape, case.d_model) and mlp["input_grad_nonzero"], (rank, mlp)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.compresses))
def test_compressing_cases_really_merge_tokens(run, name):
    """Without merging, the exactness checks above would hold trivially."""
    for rank, report in ranks_with_tokens(run, name):
        mlp = report["mlp"]
        assert mlp["clusters"] < mlp["valid"], (rank, mlp)
        assert not mlp["compressed_exact"], rank
        assert mlp["slots_per_expert"] < mlp["capacity"], (rank, mlp)


@pytest.mark.parametrize("name", ["one_token_top1", "one_token_top2"])
def test_a_single_token_is_its_own_centroid(run, name):
    """Capacity 1 leaves one slot per expert: nothing to merge, so even MLP experts give stock bit for bit."""
    for rank, report in ranks_with_tokens(run, name):
        mlp = report["mlp"]
        assert mlp["capacity"] == mlp["slots_per_expert"] == 1, (rank, mlp)
        assert mlp["valid"] == CASES[name].moe["k"] and mlp["clusters"] == mlp["valid"], (rank, mlp)
        assert mlp["compressed_exact"], rank


@pytest.mark.parametrize("name", ["all_to_one_expert", "all_to_one_expert_no_drop"])
def test_all_tokens_routed_to_one_expert(run, name):
    world_size, _ = run
    tokens_per_rank = CASES[name].shape[0] * CASES[name].shape[1]
    for rank, report in ranks_with_tokens(run, name):
        mlp = report["mlp"]
        assert mlp["global_counts"] == [tokens_per_rank * world_size, 0, 0, 0], (rank, mlp)
        if CASES[name].moe.get("drop_tokens", True):
            assert mlp["valid"] == mlp["capacity"] < tokens_per_rank, (rank, mlp)  # the capacity drops the rest
        else:
            assert mlp["valid"] == tokens_per_rank, (rank, mlp)  # without dropping, the capacity holds them all
        assert mlp["slots_per_expert"] == math.ceil(CASES[name].rate * mlp["capacity"]), (rank, mlp)


def test_an_expert_receiving_no_tokens(run):
    """The case really starves the last expert; what the patched layer does with it (exact at rate 1 and with
    identity experts, finite, gradients flowing) is asserted for every case by the parametrised tests above."""
    for rank, report in ranks_with_tokens(run, "expert_without_tokens"):
        counts = report["mlp"]["global_counts"]
        assert counts[-1] == 0 and all(c > 0 for c in counts[:-1]), (rank, counts)


def test_capacity_below_one_over_rate_sends_one_centroid_per_expert(run):
    for rank, report in ranks_with_tokens(run, "capacity_below_one_over_rate"):
        mlp = report["mlp"]
        assert mlp["capacity"] < 1 / CASES["capacity_below_one_over_rate"].rate, (rank, mlp)
        assert mlp["slots_per_expert"] == 1, (rank, mlp)


@pytest.mark.parametrize("name", ["no_drop_top1", "no_drop_top2"])
def test_without_dropping_every_route_is_clustered(run, name):
    for rank, report in ranks_with_tokens(run, name):
        assert report["mlp"]["valid"] == CASES[name].shape[0] * CASES[name].shape[1] * CASES[name].moe["k"], rank


def test_ep_size_1_compresses_without_any_all_to_all(run):
    for rank, report in ranks_with_tokens(run, "ep_size_1_four_local_experts"):
        mlp = report["mlp"]
        assert mlp["all_to_all_calls"] == 0 and mlp["clusters"] < mlp["valid"], (rank, mlp)


def test_ep_size_2_cases_do_cross_the_network(run):
    world_size, per_rank = run
    for rank, reports in enumerate(per_rank):
        calls = reports["no_drop_top2"]["mlp"]["all_to_all_calls"]
        assert calls == (4 if world_size == 2 else 0), rank  # forward and backward, two exchanges each


def test_identical_tokens_have_no_residual(run):
    """One distinct token per rank: the centroid is that token, so compression changes nothing but rounding."""
    for rank, report in ranks_with_tokens(run, "identical_tokens"):
        mlp = report["mlp"]
        assert mlp["clusters"] < mlp["valid"] and mlp["compressed_close"], (rank, mlp)


def test_empty_batches_run_like_stock(run):
    world_size, per_rank = run
    for rank, reports in enumerate(per_rank):
        empty = reports["empty_batch"]["mlp"]
        assert empty["valid"] == empty["clusters"] == empty["capacity"] == empty["slots_per_expert"] == 0, rank
    # rank 0 keeps its tokens; rank 1, without any, sends an empty-slot buffer through the same all-to-all, and its
    # capacity (the group's maximum, without dropping) is rank 0's
    case = CASES["empty_batch_on_rank_1"]
    full = per_rank[0]["empty_batch_on_rank_1"]["mlp"]
    assert full["valid"] == case.shape[0] * case.shape[1] * case.moe["k"]
    assert full["all_to_all_calls"] == (4 if world_size == 2 else 0)
    if world_size == 2:
        empty = per_rank[1]["empty_batch_on_rank_1"]["mlp"]
        assert empty["valid"] == empty["clusters"] == 0, empty
        assert empty["capacity"] == full["capacity"] > 0 and empty["slots_per_expert"] == full["slots_per_expert"]
        assert empty["all_to_all_calls"] == 4 and empty["out_shape"] == (0, case.d_model)


def test_cross_polytope_hash_dim_above_d_model_is_a_named_error(run):
    for rank, reports in enumerate(run[1]):
        name, is_config_error, message = reports["cross_polytope_hash_dim_above_d_model"]
        assert name == "LSHMoEConfigError" and is_config_error, rank
        assert "lsh_moe.hash_dim=20" in message and "d_model=16" in message, rank
        assert "allowed: 1 <= hash_dim <= d_model for cross_polytope" in message and "spherical" in message, rank


def test_more_experts_than_the_bucket_key_holds_is_a_named_error(run):
    for rank, reports in enumerate(run[1]):
        name, is_config_error, message = reports["more_experts_than_the_bucket_key_holds"]
        assert name == "LSHMoEConfigError" and is_config_error, (rank, message)
        assert "MoE layer 0 has 2048 experts" in message and "for at most 2047 experts" in message, rank
        assert "lsh_moe.num_hashes=13 with hash_dim=8" in message, rank


def empty_dispatch_checks(compressor, device):
    """Both layouts with nothing to cluster: capacity 0 (an empty batch), a buffer of only empty capacity slots
    (a rank whose tokens all went elsewhere), and no tokens at all in the variable layout (Megatron, AutoEP)."""
    results = {}
    for capacity in (0, 5):
        tokens = torch.randn(4, capacity, 16, device=device, dtype=torch.float16, requires_grad=True)
        centroids, state = compressor.compress_fixed(tokens, torch.zeros(4, capacity, dtype=torch.bool, device=device))
        out = compressor.decompress_fixed(centroids * 2 + 1, state)
        out.float().sum().backward()
        results[f"fixed_capacity_{capacity}"] = (centroids.shape == (4, -(-capacity // 5), 16)
                                                 and out.shape == tokens.shape and not out.any()
                                                 and not tokens.grad.any())
    tokens = torch.randn(0, 16, device=device, requires_grad=True)
    centroids, per_group, state = compressor.compress_variable(tokens, torch.zeros(4, dtype=torch.long))
    out = compressor.decompress_variable(centroids * 2 + 1, state)
    out.sum().backward()
    results["variable_no_tokens"] = (centroids.shape == (0, 16) and per_group.tolist() == [0] * 4
                                     and out.shape == (0, 16) and tokens.grad.shape == (0, 16))
    return results


def test_empty_dispatch_in_both_layouts():
    compressor = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", compression_rate=0.2, kernel="torch"), 0)
    results = empty_dispatch_checks(compressor, torch.device("cpu"))
    assert all(results.values()), results
