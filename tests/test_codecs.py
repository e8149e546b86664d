"""The dispatch codecs (lshmoe_pretrain.codecs) on hand-checkable inputs: their byte counts, where they must be exact,
and the error bounds their formats promise."""
import math

import pytest
import torch

from lshmoe_pretrain import codecs


def dispatch(experts=3, width=16, d=8, fill=(16, 11, 0), seed=0):
    """tokens (E, W, d) rounded to bf16 as the captures hold them, zero in padding; the first fill[e] slots real."""
    torch.manual_seed(seed)
    tokens = codecs.wire_bf16(torch.randn(experts, width, d))
    valid = torch.arange(width).unsqueeze(0) < torch.tensor(fill).unsqueeze(1)
    return tokens * valid.unsqueeze(-1), valid


def test_int_rows_stay_within_half_a_step_and_count_their_bytes():
    rows = torch.randn(5, 10) * torch.tensor([1.0, 10.0, 0.01, 3.0, 0.0]).unsqueeze(1)
    for bits, levels in ((8, 127), (4, 7), (2, 1)):
        hat, nbytes = codecs.int_rows(rows, bits)
        assert nbytes == 5 * (math.ceil(10 * bits / 8) + 4)
        scale = rows.abs().amax(1, keepdim=True) / levels
        assert bool(((hat - rows).abs() <= scale / 2 * (1 + 1e-6)).all())
        assert len(torch.unique(torch.round(hat[0] / scale[0]))) <= 2 * levels + 1
        assert torch.equal(hat[4], torch.zeros(10))  # a zero row stays zero
    with pytest.raises(ValueError, match="bits must be >= 2"):
        codecs.int_rows(rows, 1)


def test_fp8_rows_are_exact_on_representable_values_and_within_e4m3_precision():
    exact = torch.tensor([[448.0, 1.0, -2.0, 0.5, 0.0, -0.125]]) * 4.0  # scale 4: every value/4 is an e4m3 value
    hat, nbytes = codecs.fp8_rows(exact)
    assert torch.equal(hat, exact) and nbytes == 6 + 4
    rows = torch.randn(64, 32)
    hat, _ = codecs.fp8_rows(rows)
    scale = rows.abs().amax(1, keepdim=True) / 448
    # 3 mantissa bits: half a step is 2**-4 of the value for normals; subnormals are spaced 2**-9 (of the scale)
    assert bool(((hat - rows).abs() <= rows.abs() * 2**-4 + scale * 2**-10).all())


def test_fp8_blocks_scale_each_block_and_count_a_short_last_block():
    row = torch.cat([torch.full((128,), 1000.0), torch.full((2,), 0.001)]).unsqueeze(0)
    blocks, nbytes = codecs.fp8_blocks(row)
    assert nbytes == 130 + 4 * 2
    assert torch.allclose(blocks[0, 128:], row[0, 128:], rtol=2**-4)   # its own scale keeps the small block
    whole, _ = codecs.fp8_rows(row)
    assert torch.equal(whole[0, 128:], torch.zeros(2))                 # one scale per row flushes it to zero


def test_the_plugins_wire_formats_keep_their_bounds_and_count_their_scales():
    torch.manual_seed(3)
    rows = torch.randn(5, 96).to(torch.bfloat16).float()  # what a bf16 model's wire is given
    for name, fraction, block, bound in (("fp4", (48 + 3) / 192, 32, 2.0 ** -2), ("fp4_b16", (48 + 6) / 192, 16,
                                                                                   2.0 ** -2),
                                         ("fp8_e8m0", (96 + 1) / 192, 128, 2.0 ** -4)):
        hat, nbytes = codecs.ROW_QUANTISERS[name](rows)
        assert nbytes == round(5 * 192 * fraction), name  # e2m1 two per byte + an e8m0 byte per 32; e4m3 + one byte
        # each element within `bound` of its block's largest magnitude (plus bf16's rounding of the result)
        blocks = rows.view(5, -1, min(block, 96))
        amax = blocks.abs().amax(dim=2, keepdim=True)
        error = (hat.view_as(blocks) - blocks).abs()
        assert bool((error <= bound * amax * (1 + 2.0 ** -7) + 1e-30).all()), name
        assert bool((error > 0).any()), name  # it does round: these are not the rows sent back untouched
    assert codecs.ROW_QUANTISERS["fp4"](torch.tensor([[6.0, -0.5, 1.5, 0.0] * 8]))[0].tolist() == \
        [[6.0, -0.5, 1.5, 0.0] * 8]  # E2M1's own values at scale 1 come back exactly


def test_per_token_sends_only_real_tokens():
    tokens, valid = dispatch()
    hat, nbytes = codecs.per_token(tokens, valid, "int8")
    assert nbytes == 27 * (8 + 4)
    assert torch.equal(hat[~valid], torch.zeros(int((~valid).sum()), 8))
    assert codecs.stock_bytes(valid, 8) == 27 * 8 * 2


def test_lsh_at_rate_one_returns_the_tokens_and_below_it_sends_means():
    tokens, valid = dispatch()
    hat, nbytes = codecs.lsh_centroids(tokens, valid, 1.0)
    assert torch.equal(hat, tokens) and nbytes == 3 * 16 * 8 * 2
    hat, nbytes = codecs.lsh_centroids(tokens, valid, 0.25)
    assert nbytes == 3 * 4 * 8 * 2                                      # ceil(0.25 * 16) slots per expert
    for e in range(2):                                                  # 16 and 11 tokens, 4 slots each
        rows = hat[e][valid[e]]
        distinct = torch.unique(rows, dim=0)
        assert 1 < len(distinct) <= 4
        for centroid in distinct:
            members = tokens[e][valid[e]][(rows == centroid).all(1)]
            assert torch.equal(centroid, codecs.wire_bf16(members.mean(0)))
    assert torch.equal(hat[2], torch.zeros(16, 8))                      # an empty expert sends zeros


def test_kmeans_finds_separated_blobs_and_is_exact_when_the_budget_covers_the_tokens():
    torch.manual_seed(1)
    blobs = torch.cat([torch.randn(8, 4) * 0.01 + 5, torch.randn(8, 4) * 0.01 - 5]).unsqueeze(0)
    valid = torch.ones(1, 16, dtype=torch.bool)
    hat, nbytes = codecs.kmeans_centroids(blobs, valid, 2 / 16)
    assert nbytes == 2 * 4 * 2
    expected = torch.cat([codecs.wire_bf16(blobs[0, :8].mean(0)).expand(8, 4),
                          codecs.wire_bf16(blobs[0, 8:].mean(0)).expand(8, 4)])
    assert torch.equal(hat[0], expected)
    tokens, valid = dispatch()
    exact, _ = codecs.kmeans_centroids(tokens, valid, 1.0)
    assert torch.equal(exact, tokens)


def test_merging_keeps_every_member_within_the_tolerance():
    tokens, valid = dispatch()
    hat, nbytes = codecs.merge_within_tolerance(tokens, valid, 0.0)
    assert torch.equal(hat, tokens) and nbytes == 27 * 8 * 2 + 3 * 4  # distinct tokens: nothing merges
    duplicated = tokens.clone()
    duplicated[0, 1] = duplicated[0, 0]
    hat, nbytes = codecs.merge_within_tolerance(duplicated, valid, 0.0)
    assert torch.equal(hat, duplicated) and nbytes == 26 * 8 * 2 + 3 * 4  # exact duplicates merge, losslessly
    torch.manual_seed(2)
    centres = torch.randn(4, 8)
    near = codecs.wire_bf16(centres.repeat(4, 1) + 0.05 * torch.randn(16, 8)).unsqueeze(0)
    full = torch.ones(1, 16, dtype=torch.bool)
    for tau in (0.05, 0.1, 0.2):
        hat, nbytes = codecs.merge_within_tolerance(near, full, tau)
        residual = (near[0] - hat[0]).norm(dim=1) / near[0].norm(dim=1)
        assert bool((residual <= tau).all()), (tau, residual.max())
        clusters = (nbytes - 4) // (8 * 2)
        assert clusters == len(torch.unique(hat[0], dim=0)) and clusters < 16


def test_centroid_plus_residual_counts_its_parts_and_is_exact_at_rate_one():
    tokens, valid = dispatch(width=16, d=8)
    hat, nbytes = codecs.centroid_plus_residual(tokens, valid, 1.0, "int4")
    assert torch.equal(hat, tokens)                                     # zero residuals quantise to zero
    hat, nbytes = codecs.centroid_plus_residual(tokens, valid, 0.25, "int4")
    centroids = 3 * 4 * 8 * 2
    residuals = 27 * (8 * 4 // 8 + 4)
    indices = math.ceil(27 * 2 / 8)                                     # 4 slots: 2 bits per token
    assert nbytes == centroids + residuals + indices
    lsh, _ = codecs.lsh_centroids(tokens, valid, 0.25)
    assert (hat - tokens).norm() < (lsh - tokens).norm()
    fp8, _ = codecs.centroid_plus_residual(tokens, valid, 0.25, "fp8")
    assert (fp8 - tokens).norm() < (hat - tokens).norm()
