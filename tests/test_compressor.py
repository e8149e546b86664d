
import pytest
import torch
from lsh_blocks import paper_block

from lshmoe_plugin.compressor import LSHCompressor, fixed_slots
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError
from lshmoe_plugin.telemetry import Telemetry

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_compressor(**overrides):
    return LSHCompressor(LSHMoEConfig(**paper_block({"enabled": True, **overrides})), layer_index=0,
                         telemetry=Telemetry())


def capacity_batch(num_experts=4, capacity=32, d=24, fill=(32, 20, 3, 0), dtype=torch.float32, seed=0):
    """Like DeepSpeed's dispatch buffer: each expert's tokens first, then zero padding slots."""
    gen = torch.Generator().manual_seed(seed)
    valid = torch.arange(capacity)[None, :] < torch.tensor(fill)[:, None]
    x = torch.randn(num_experts, capacity, d, generator=gen) * valid[..., None]
    return x.to(dtype), valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("hash_type", ["cross_polytope", "spherical"])
def test_identity_expert_round_trip_is_exact(dtype, rate, hash_type):
    comp = make_compressor(compression_rate=rate, hash_type=hash_type)
    x, valid = capacity_batch(dtype=dtype, seed=int(rate * 10))
    centroids, state = comp.compress_fixed(x, valid)
    assert centroids.shape == (4, fixed_slots(32, rate), 24) and centroids.dtype == dtype
    assert torch.equal(comp.decompress_fixed(centroids.clone(), state), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rate_one_sends_every_token_as_its_own_centroid(dtype):
    comp = make_compressor(compression_rate=1.0)
    x, valid = capacity_batch(dtype=dtype)
    centroids, state = comp.compress_fixed(x, valid)
    assert torch.equal(centroids, x)
    y = torch.tanh(centroids.float() * 3).to(dtype)  # any expert
    assert torch.equal(comp.decompress_fixed(y, state)[valid], y[valid])


def test_fixed_slots_is_ceil_of_rate_times_capacity():
    assert [fixed_slots(40, r) for r in (0.1, 0.2, 0.25, 1.0, 0.001)] == [4, 8, 10, 40, 1]


def test_padding_and_dropped_slots_never_enter_a_centroid():
    comp = make_compressor(compression_rate=0.25)
    x, valid = capacity_batch()
    poisoned = x.clone()
    poisoned[~valid] = 1e6
    c_clean, s_clean = comp.compress_fixed(x, valid)
    c_poison, s_poison = comp.compress_fixed(poisoned, valid)
    assert torch.equal(c_clean, c_poison)
    assert torch.equal(s_clean.slot, s_poison.slot)
    out = comp.decompress_fixed(c_poison * 2, s_poison)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    assert torch.equal(out[valid], comp.decompress_fixed(c_clean * 2, s_clean)[valid])


def test_centroids_are_means_of_their_members_and_fit_the_slot_budget():
    comp = make_compressor(compression_rate=0.2)
    x, valid = capacity_batch(capacity=40, fill=(40, 40, 9, 1))
    centroids, state = comp.compress_fixed(x, valid)
    slots_per_expert = fixed_slots(40, 0.2)
    flat_x, slot = x.reshape(-1, x.shape[-1]), state.slot
    for s in torch.unique(slot[slot < 4 * slots_per_expert]).tolist():
        members = flat_x[slot == s]
        assert torch.allclose(centroids.reshape(-1, x.shape[-1])[s], members.mean(0), atol=1e-6)
        assert (torch.nonzero(slot == s).flatten() // 40 == s // slots_per_expert).all()  # never crosses experts
    used = (state.counts.view(4, slots_per_expert) > 0).sum(1)
    assert used.tolist()[2:] == [min(9, slots_per_expert), 1] and (used <= slots_per_expert).all()


@pytest.mark.parametrize("error_compensation", [True, False])
def test_expansion_formula(error_compensation):
    comp = make_compressor(compression_rate=0.2, error_compensation=error_compensation)
    x, valid = capacity_batch()
    centroids, state = comp.compress_fixed(x, valid)
    y = torch.sin(centroids) + 1.0
    out = comp.decompress_fixed(y, state).reshape(-1, x.shape[-1])
    flat_x, flat_c, flat_y = x.reshape(-1, 24), centroids.reshape(-1, 24), y.reshape(-1, 24)
    for i in torch.nonzero(valid.reshape(-1)).flatten().tolist():
        s = state.slot[i]
        expected = flat_y[s] + (flat_x[i] - flat_c[s] if error_compensation else 0)
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_gradients_match_finite_differences_through_compress_expert_decompress():
    comp = make_compressor(compression_rate=0.25, hash_dim=3)
    x, valid = capacity_batch(capacity=8, d=6, fill=(8, 5, 2, 0), dtype=torch.float64)
    weight = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)

    def layer(tokens, w):
        centroids, state = comp.compress_fixed(tokens, valid)
        return comp.decompress_fixed(torch.tanh(centroids @ w), state)

    assert torch.autograd.gradcheck(layer, (x, weight), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_flow_in_every_dtype(dtype):
    comp = make_compressor(compression_rate=0.2)
    x, valid = capacity_batch(dtype=dtype)
    x.requires_grad_(True)
    w = torch.randn(24, 24).to(dtype).requires_grad_(True)
    centroids, state = comp.compress_fixed(x, valid)
    out = comp.decompress_fixed(torch.relu(centroids @ w), state)
    out.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0
    assert w.grad is not None and torch.isfinite(w.grad.float()).all() and w.grad.abs().sum() > 0


def test_variable_layout_sends_only_non_empty_clusters():
    comp = make_compressor(compression_rate=0.2)
    sizes = torch.tensor([50, 0, 7, 1, 30])
    x = torch.randn(int(sizes.sum()), 16)
    centroids, clusters, state = comp.compress_variable(x, sizes)
    budget = torch.ceil(sizes * 0.2).clamp(min=1)
    assert (clusters <= torch.minimum(budget, sizes)).all() and clusters[1] == 0 and clusters[3] == 1
    assert centroids.shape == (int(clusters.sum()), 16)
    assert (state.counts > 0).all()  # packed: no empty cluster crosses the network
    assert torch.equal(comp.decompress_variable(centroids, state), x)


def test_variable_layout_at_rate_one_is_exact():
    comp = make_compressor(compression_rate=1.0)
    sizes = torch.tensor([5, 0, 9])
    x = torch.randn(14, 8)
    centroids, clusters, state = comp.compress_variable(x, sizes)
    assert torch.equal(centroids, x) and clusters.tolist() == [5, 0, 9]
    assert torch.equal(comp.decompress_variable(centroids * 3, state), x * 3)


def test_telemetry_reports_rate_bytes_and_residual():
    telemetry = Telemetry()
    comp = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", compression_rate=0.25, telemetry_interval=1), 5,
                         telemetry)
    x, valid = capacity_batch(dtype=torch.bfloat16)
    comp.compress_fixed(x, valid)
    stats = telemetry.summary()
    assert stats["lsh_moe/layer5/bytes_uncompressed"] == 4 * 32 * 24 * 2
    assert stats["lsh_moe/layer5/bytes_sent"] == 4 * 8 * 24 * 2
    assert 0 < stats["lsh_moe/layer5/compression_rate"] <= 8 * 3 / 55
    assert 0 < stats["lsh_moe/layer5/relative_residual_norm"] < 1.5


def kmeans_error(x, k, iters=25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return (x - centres[torch.cdist(x, centres).argmin(1)]).square().sum(1).mean().item()


def test_centroid_error_on_clustered_tokens_is_close_to_kmeans(capsys):
    torch.manual_seed(0)
    d, per_cluster, true_clusters = 64, 32, 8
    centres = torch.randn(true_clusters, d)
    x = (centres.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(true_clusters * per_cluster, d))
    x = x[torch.randperm(x.shape[0])].unsqueeze(0)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    rows = []
    for rate in (0.05, 0.1, 0.2):
        comp = make_compressor(compression_rate=rate)
        centroids, state = comp.compress_fixed(x, valid)
        lsh = (x[0] - centroids.reshape(-1, d)[state.slot]).square().sum(1).mean().item()
        k = int((state.counts > 0).sum())
        reference = kmeans_error(x[0], k)
        rows.append((rate, k, lsh, reference))
    with capsys.disabled():
        print("\nLSH vs k-means reconstruction error (mean squared, 8 clusters of 32 tokens, d=64):")
        for rate, k, lsh, reference in rows:
            print(f"  rate {rate:.2f}: {k} clusters  LSH {lsh:.4f}  k-means {reference:.4f}  "
                  f"ratio {lsh / reference:.2f}")
    # At 5% (13 slots for 8 true clusters) the first hash's 16 codes can put two clusters in one bucket, so it
    # is held only to a loose bound: its centroids still explain three quarters of the tokens' variance.
    assert rows[0][2] < 0.25 * x[0].var(0).sum().item(), rows[0]
    for rate, k, lsh, reference in rows[1:]:
        assert lsh <= 1.5 * reference + 0.05, (rate, lsh, reference)
        assert lsh < 0.02 * x[0].var(0).sum().item()  # far below one centroid for all tokens


@pytest.mark.parametrize("layout", ["fixed", "variable"])
def test_more_experts_than_the_int64_bucket_key_holds_are_refused(layout):
    """13 hashes of 4 bits: 52 bits of code leave room for expert ids up to 2047 (and the sentinel past them)."""
    compressor = make_compressor(num_hashes=13, hash_dim=8, compression_rate=0.5)
    assert compressor.config.max_experts == 2047

    def compress(num_experts):
        tokens = torch.randn(num_experts, 2, 8)
        if layout == "fixed":
            return compressor.compress_fixed(tokens, torch.ones(num_experts, 2, dtype=torch.bool))
        return compressor.compress_variable(tokens.reshape(-1, 8), torch.full((num_experts,), 2))

    # The largest allowed layer: one cluster per expert (2 tokens, rate 0.5), every token in its own expert's.
    slot = compress(2047)[-1].slot.view(2047, 2)
    assert torch.equal(slot, torch.arange(2047).unsqueeze(1).expand(2047, 2))
    with pytest.raises(LSHMoEConfigError, match=r"MoE layer 0 has 2048 experts; lsh_moe.num_hashes=13 with "
                                                r"hash_dim=8 \(52 bits of bucket code\) fits int64 bucket keys for at "
                                                r"most 2047 experts"):
        compress(2048)
