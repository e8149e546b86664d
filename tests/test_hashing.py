import pytest
import torch

from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.hashing import hash_projections, lsh_codes


@pytest.mark.parametrize("hash_type", ["cross_polytope", "spherical"])
def test_codes_are_deterministic_given_seed_and_layer(hash_type):
    cfg = LSHMoEConfig(hash_type=hash_type)
    x = torch.randn(64, 32)
    a = lsh_codes(x, hash_projections(cfg, 32, layer_index=3), cfg)
    b = lsh_codes(x, hash_projections(cfg, 32, layer_index=3), cfg)
    c = lsh_codes(x, hash_projections(cfg, 32, layer_index=4), cfg)
    d = lsh_codes(x, hash_projections(LSHMoEConfig(hash_type=hash_type, seed=99), 32, layer_index=3), cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_cross_polytope_projections_are_orthonormal_per_hash():
    cfg = LSHMoEConfig(num_hashes=3, hash_dim=8)
    p = hash_projections(cfg, 64, 0).view(64, 3, 8)
    for h in range(3):
        assert torch.allclose(p[:, h].T @ p[:, h], torch.eye(8), atol=1e-5)


@pytest.mark.parametrize("hash_type", ["cross_polytope", "spherical"])
def test_near_duplicates_share_a_bucket_far_more_often_than_unrelated_tokens(hash_type):
    torch.manual_seed(0)
    cfg = LSHMoEConfig(hash_type=hash_type, num_hashes=2, hash_dim=8)
    proj = hash_projections(cfg, 128, 0)
    base = torch.randn(2000, 128)
    near = base + 0.05 * torch.randn_like(base)
    unrelated = torch.randn_like(base)
    codes = lambda t: lsh_codes(t, proj, cfg)  # noqa: E731
    near_rate = (codes(base) == codes(near)).float().mean().item()
    unrelated_rate = (codes(base) == codes(unrelated)).float().mean().item()
    assert near_rate > 0.6, near_rate
    assert unrelated_rate < 0.05, unrelated_rate
    assert near_rate > 10 * unrelated_rate


def test_more_hashes_give_finer_buckets():
    torch.manual_seed(0)
    x = torch.randn(4000, 64)
    distinct = []
    for num_hashes in (1, 2, 4):
        cfg = LSHMoEConfig(num_hashes=num_hashes)
        distinct.append(torch.unique(lsh_codes(x, hash_projections(cfg, 64, 0), cfg)).numel())
    assert distinct[0] <= 16 and distinct[0] < distinct[1] < distinct[2]


def test_group_centring_splits_a_cluster_that_shares_an_offset():
    # Tokens an expert receives share a large common component; hashed raw they would all land in one bucket.
    torch.manual_seed(0)
    cfg = LSHMoEConfig(num_hashes=1)
    proj = hash_projections(cfg, 64, 0)
    x = 50.0 * torch.ones(256, 64) + torch.randn(256, 64)
    groups = torch.zeros(256, dtype=torch.long)
    raw = lsh_codes(x, proj, cfg)
    centred = lsh_codes(x, proj, cfg, groups, torch.ones(256, dtype=torch.bool), 1)
    assert torch.unique(raw).numel() <= 2
    assert torch.unique(centred).numel() >= 10
