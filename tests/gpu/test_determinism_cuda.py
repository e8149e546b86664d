"""Run-to-run determinism on CUDA: two identical training steps (same seed, same inputs) of stock and of LSH-MoE.

Why LSH-MoE's are not always bit-identical (docs/quality.md: two copies of one testbed run, resumed from the same
checkpoint, ended 3.84380 and 3.84391; stock's copies were identical, and on the CPU a resumed LSH-MoE run is
bit-identical to the straight one, tests/test_pretrain.py). One stage of the fused path depends on the order in
which GPU programs finish: `_group_sums_kernel` (lshmoe_plugin/kernels/triton_ops.py) adds every 64-row block's
partial sums of the projected tokens into each expert's fp32 group sum with `tl.atomic_add`. At the 25M testbed's
shape an expert's capacity is 2,560 rows, 40 blocks: 40 partial sums land on one address in whatever order the
programs finish, and fp32 addition is not associative. The mean every token is centred on then moves in its last
bits (fp32 rounding, ~1e-7 of its scale); that changes a token's code only where two of its centred coordinates tie
to within that (or one is that close to zero): rarely, but a training run hashes 16k tokens x 6 hashes per layer and
step. One changed code moves a token to another cluster, and from there bf16 training diverges as any perturbation
does. Every other stage is deterministic: the counts summed by the same atomics are integers (exact in fp32), the
sort is stable, the segment kernels reduce each cluster in one program in a fixed order, and stock's scatters
(index_select's backward in DeepSpeed's `_sparse_encode` / `_sparse_decode`) add at most top_k = 2 values into a
zeroed row, which commutes exactly.

So the tests do not assert zero difference: they assert where a difference may come from.
- The fused codes equal the float64 reference wherever a token's margin (the gap between its two largest centred
  coordinates, or the largest one's distance from zero) exceeds twice the worst-case fp32 error of the group mean
  in any summation order; only ties within that bound may change between runs.
- Two identical training runs of GPT-MoE (stock: bit-identical, always). With LSH-MoE every layer's expert outputs
  are bit-identical up to the first forward whose clusters differ, and in that forward they differ only in rows
  whose cluster (its members, in the order they are summed) changed. If no cluster ever differs, the losses and
  the weights are bit-identical.
"""
import pytest
import torch

from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.hashing import hash_projections, projection_width

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU nondeterminism needs a CUDA device")

# The 25M testbed's MoE shape: d_model 256, 8 experts, capacity 2 x 1.25 x 8192 / 8 rows each (40 blocks of the
# group sums).
D, EXPERTS, CAPACITY = 256, 8, 2560
UNIT_ROUNDOFF = 2.0 ** -24


def digits(codes: torch.Tensor, config: LSHMoEConfig) -> torch.Tensor:
    """Packed codes (N,) -> per-hash digits (N, num_hashes), first hash first."""
    bits = config.code_bits_per_hash
    shifts = torch.arange(config.num_hashes - 1, -1, -1, device=codes.device) * bits
    return (codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def reference_digits_and_margins(tokens, projections, valid, config):
    """Digits of the tokens centred on their group's float64 mean, each digit's margin, and the bound (N, 1) within
    which a margin may be decided otherwise by an fp32 mean summed in any order."""
    width = projection_width(config)
    projected = tokens.matmul(projections.to(tokens.dtype)).double()  # the kernel's matmul, read exactly
    weight = valid.double().unsqueeze(-1)
    grouped = (projected * weight).view(EXPERTS, CAPACITY, -1)
    count = weight.view(EXPERTS, CAPACITY).sum(1).clamp(min=1)[:, None]
    mean = grouped.sum(1) / count
    centred = (projected.view(EXPERTS, CAPACITY, -1) - mean[:, None]).view(-1, config.num_hashes, width)
    magnitude = centred.abs()
    top = magnitude.topk(2, dim=-1)
    index = top.indices[..., 0]
    negative = torch.gather(centred, -1, index.unsqueeze(-1)).squeeze(-1) < 0
    margin = torch.minimum(top.values[..., 0] - top.values[..., 1], top.values[..., 0])
    # A sum of n terms in fp32, in any order and grouping, is off by at most (n - 1) u sum|x_i|; the division by
    # the count and the kernel's subtraction round once more each.
    mean_error = ((CAPACITY - 1) * UNIT_ROUNDOFF * grouped.abs().sum(1) / count + UNIT_ROUNDOFF * mean.abs())
    centred_error = mean_error.amax(-1, keepdim=True)[:, None].expand(EXPERTS, CAPACITY, 1).reshape(-1, 1) \
        + UNIT_ROUNDOFF * magnitude.flatten(1).amax(-1, keepdim=True)
    return index * 2 + negative.long(), margin, 2 * centred_error


def test_fused_codes_differ_from_the_exact_ones_only_at_ties_within_the_reordering_bound():
    from lshmoe_plugin.kernels import triton_ops
    config = LSHMoEConfig(enabled=True, method="paper")  # the paper's defaults: cross-polytope, 6 hashes of hash_dim 8
    gen = torch.Generator().manual_seed(7)
    # Every expert's tokens share a component of their own (what the gate picked them for: what centring removes),
    # then fall near one of 64 shared centres.
    common = torch.randn(EXPERTS, D, generator=gen).repeat_interleave(CAPACITY, 0)
    centres = torch.randn(64, D, generator=gen)
    tokens = common + centres[torch.randint(0, 64, (EXPERTS * CAPACITY,), generator=gen)] \
        + 0.3 * torch.randn(EXPERTS * CAPACITY, D, generator=gen)
    valid = torch.rand(EXPERTS * CAPACITY, generator=gen) < 0.9
    tokens, valid = (tokens * valid.unsqueeze(-1)).cuda().bfloat16(), valid.cuda()
    projections = hash_projections(config, D, layer_index=0).cuda()
    groups = torch.arange(EXPERTS, device="cuda").repeat_interleave(CAPACITY)
    exact, margin, bound = reference_digits_and_margins(tokens, projections, valid, config)
    decided = (margin > bound) & valid.unsqueeze(-1)
    assert decided.sum() > 0.99 * valid.sum() * config.num_hashes, "the bound is too loose to test anything"
    runs = [digits(triton_ops.lsh_codes(tokens, projections, config, groups, valid, EXPERTS), config)
            for _ in range(30)]
    for run in runs:
        wrong = (run != exact) & decided
        assert not wrong.any(), f"{int(wrong.sum())} decided token-hashes got another digit (a wrong sum, not order)"
    changed = sum(int(((run != runs[0]) & valid.unsqueeze(-1)).sum()) for run in runs[1:])
    print(f"token-hashes whose digit changed between identical runs: {changed} "
          f"(ties within the bound: {int((~decided & valid.unsqueeze(-1)).sum())})")


# -- two identical training runs through DeepSpeed's engine -----------------------------------------------------------
STEPS = 3
PAPER_DEFAULTS = {"enabled": True, "method": "paper", "compression_rate": 0.2, "num_hashes": 6,
                  "hash_type": "cross_polytope",
                  "error_compensation": True, "seed": 1234}


def _train_twice(rank, world_size, lsh_moe):
    """GPT-MoE 25M (the testbed's preset and optimizer) from the same seed on the same batches, twice; compared
    here, in the rank: whether losses and weights are identical, and what every layer's training forwards did."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import lshmoe_plugin
    from lshmoe_plugin.compressor import LSHCompressor
    from lshmoe_pretrain.models import build_gpt_moe
    device = get_accelerator().current_device_name()
    forwards = []
    decompress = LSHCompressor.decompress_fixed

    def recording(self, centroid_outputs, state):
        out = decompress(self, centroid_outputs, state)
        if torch.is_grad_enabled():  # a training forward (a graphed state's buffers are reused: copy them now)
            segments = tuple(t.clone() for t in state.segments) if state.segments is not None else None
            forwards[-1][-1].append((self.layer_index, state.slot.clone(), segments, out.detach().clone()))
        return out

    LSHCompressor.decompress_fixed = recording
    runs = []
    try:
        for _ in range(2):
            forwards.append([])
            config = {"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0, "bf16": {"enabled": True},
                      "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 6,
                      "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95],
                                                                "weight_decay": 0.1, "torch_adam": True}},
                      "lsh_moe": lsh_moe}
            torch.manual_seed(0)
            model = build_gpt_moe("gpt-moe-25m", ep_size=world_size)
            lshmoe_plugin.enable(config, model)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            gen = torch.Generator().manual_seed(100 + rank)
            losses = []
            for step in range(STEPS):
                tokens = torch.randint(0, model.config.vocab_size, (32, model.config.seq_len + 1), generator=gen)
                tokens = tokens.to(device)
                forwards[-1].append([])
                torch.manual_seed(1 + 7919 * step + rank)  # the gates' draws, seeded as the training loop does
                loss = engine(tokens[:, :-1], tokens[:, 1:])
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
            lshmoe_plugin.disable()
    finally:
        LSHCompressor.decompress_fixed = decompress
    (losses_a, params_a), (losses_b, params_b) = runs
    identical = losses_a == losses_b and all(map(torch.equal, params_a, params_b))
    layers = [[layer for layer, *_ in step] for step in forwards[0]]
    every_forward_matched = forwards_differ_only_where_clusters_did(*forwards)
    return dict(identical=identical, losses=(losses_a, losses_b), layers=layers,
                every_forward_matched=every_forward_matched)


def cluster_signatures(slot: torch.Tensor, segments) -> list:
    """Per token row: its cluster's rows in the order the centroid sums them (the fused kernels: `segments`; the
    reference: row order). Equal signatures in two runs give the row the same centroid, bit for bit."""
    slot = slot.cpu()
    if segments is None:
        order = torch.sort(slot, stable=True).indices
        bounds = torch.searchsorted(slot[order], torch.arange(int(slot.max()) + 2))
    else:
        order, bounds = (t.cpu() for t in segments)
    order, bounds = order.tolist(), bounds.tolist()
    members = [tuple(order[bounds[s]:bounds[s + 1]]) for s in range(len(bounds) - 1)]
    return [members[s] for s in slot.tolist()]


def forwards_differ_only_where_clusters_did(first: list, second: list) -> bool:
    """Walk both runs' forwards in order; True if every one matched bit for bit. At the first forward whose clusters
    differ, only rows of changed clusters may differ (after it the inputs differ too: nothing to assert)."""
    for step, (a_step, b_step) in enumerate(zip(first, second)):
        for (layer, slot_a, seg_a, out_a), (_, slot_b, seg_b, out_b) in zip(a_step, b_step):
            where = f"step {step}, MoE layer {layer}"
            if torch.equal(slot_a, slot_b) and (seg_a is None or all(map(torch.equal, seg_a, seg_b))):
                assert torch.equal(out_a, out_b), f"{where}: same clusters, other expert outputs"
                continue
            kept = torch.tensor([x == y for x, y in zip(cluster_signatures(slot_a, seg_a),
                                                        cluster_signatures(slot_b, seg_b))], device=out_a.device)
            rows_a, rows_b = out_a.reshape(-1, out_a.shape[-1]), out_b.reshape(-1, out_b.shape[-1])
            assert torch.equal(rows_a[kept], rows_b[kept]), f"{where}: a row whose cluster did not change differs"
            print(f"{where}: clusters differ between identical runs; {int((~kept).sum())} of {kept.numel()} rows "
                  f"are in changed clusters", flush=True)
            return False
    return True


@pytest.mark.parametrize("lsh_moe", [{"enabled": False}, dict(PAPER_DEFAULTS, cuda_graphs="auto"),
                                     dict(PAPER_DEFAULTS, cuda_graphs=False)], ids=["stock", "graphed", "eager"])
def test_two_identical_training_runs(lsh_moe):
    from distributed import run_deepspeed_nccl
    result = run_deepspeed_nccl(_train_twice, 1, lsh_moe)[0]
    if not lsh_moe["enabled"]:  # stock: no order-dependent float sum anywhere, so bit-identical, always
        assert result["identical"], result["losses"]
        assert result["layers"] == [[]] * STEPS  # never reached the compressor
        return
    assert result["layers"] == [[0, 1, 2, 3]] * STEPS  # the preset's four MoE layers, once each per step
    if result["every_forward_matched"]:
        assert result["identical"], ("every forward matched, yet", result["losses"])
