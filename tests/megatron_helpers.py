"""Shared by the CPU and GPU Megatron tests: a small `MoELayer`, one forward+backward, comparisons, byte counts."""
import math

import torch
from lsh_blocks import paper_block

from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.patches import megatron_dispatcher
from lshmoe_plugin.patches.versioning import UnsupportedFrameworkError

HIDDEN, NUM_EXPERTS, SEQ, BATCH = 16, 4, 16, 4


def build_layer(ep_size, **overrides):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig
    settings = dict(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=32, num_attention_heads=2,
                    num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                    expert_model_parallel_size=ep_size, use_cpu_initialization=True, add_bias_linear=False,
                    params_dtype=torch.float32, moe_aux_loss_coeff=0.0)
    settings.update(overrides)
    torch.manual_seed(0)
    spec = get_moe_module_spec(use_te=False, num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    config = TransformerConfig(**settings)
    # 0.16 returns a ModuleSpec, 0.19 a partial of MoELayer
    return build_module(spec, config=config) if isinstance(spec, ModuleSpec) else spec(config=config)


class ScaledIdentityExperts(torch.nn.Module):
    """Megatron's expert contract with an identity MLP: output = routing probability * input."""

    def __init__(self):
        super().__init__()
        self.seen_tokens_per_expert = []

    def forward(self, hidden, tokens_per_expert, probs):
        self.seen_tokens_per_expert.append((hidden.shape[0], torch.as_tensor(tokens_per_expert).tolist()))
        return hidden * probs.unsqueeze(-1).to(hidden.dtype), None


def fwd_bwd(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out, _ = layer(x)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return out.detach(), x.grad.detach(), grads


def max_diff(a, b):
    """Largest absolute difference over output, input gradient and parameter gradients."""
    pairs = [(a[0], b[0]), (a[1], b[1])] + list(zip(a[2], b[2]))
    assert len(a[2]) == len(b[2])
    return max((p - q).abs().max().item() for p, q in pairs)


def bit_identical(a, b):
    return max_diff(a, b) == 0.0 and all(torch.equal(p, q) for p, q in zip(a[2], b[2]))


class TokenBytes:
    """Counts the bytes of token payloads handed to the real all-to-all (probabilities are 1-D, skipped)."""

    def __enter__(self):
        self.original, self.sent, self.splits = torch.distributed.all_to_all_single, [], []

        def counting(output, tensor, output_split_sizes=None, input_split_sizes=None, **kwargs):
            if tensor.dim() == 2:
                self.sent.append(tensor.numel() * tensor.element_size())
                self.splits.append(None if input_split_sizes is None else [int(s) for s in input_split_sizes])
            return self.original(output, tensor, output_split_sizes, input_split_sizes, **kwargs)
        torch.distributed.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        torch.distributed.all_to_all_single = self.original


def enabled(**overrides):
    return LSHMoEConfig(**paper_block({"enabled": True, "seed": 7, **overrides}))


def set_expert_biases(layer, zero_weights=False):
    """Biases that differ per expert (Megatron initialises them to zero), drawn from the global expert index;
    with `zero_weights`, expert e outputs only its fc2 bias b_e."""
    with torch.no_grad():
        for index, expert in zip(layer.local_expert_indices, layer.experts.local_experts):
            gen = torch.Generator().manual_seed(1000 + index)
            for linear in (expert.linear_fc1, expert.linear_fc2):
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen))
                if zero_weights:
                    linear.weight.zero_()


def compare_with_biases(world_size, device, x, clustered, out):
    """Experts with biases (add_bias_linear): Megatron scales an expert's output by the routing probability, bias
    included, and the patch sends centroids with probability 1 and scales on their return."""
    from lshmoe_plugin.telemetry import TELEMETRY
    megatron_dispatcher.revert()
    layer = build_layer(world_size, add_bias_linear=True).to(device)
    if world_size == 1:
        # megatron-core 0.16's local expert MLP adds fc2's bias in place to the output of the tensor-parallel
        # reduce, which at EP=1 returns its input as-is: autograd refuses that in stock Megatron already. At EP>1
        # the layer skips the reduce (explicit_expert_comm); at tensor-parallel size 1 it is an identity, so
        # skipping it here too changes no value.
        for expert in layer.experts.local_experts:
            expert.linear_fc2.explicit_expert_comm = True
    set_expert_biases(layer)
    reference = fwd_bwd(layer, x)
    megatron_dispatcher.apply(enabled(compression_rate=1.0))
    out["bias_rate1_diff"] = max_diff(reference, fwd_bwd(layer, x))
    # Experts that output only their own bias: p * E(c) = p * b_e whatever the centroid, so without error
    # compensation the layer matches stock at rate 0.2 only if every centroid reached its own expert and the bias
    # was scaled by each token's probability exactly once.
    megatron_dispatcher.revert()
    set_expert_biases(layer, zero_weights=True)
    reference = fwd_bwd(layer, clustered)
    megatron_dispatcher.apply(enabled(compression_rate=0.2, error_compensation=False))
    TELEMETRY.clear()
    out["bias_only_diff"] = max_diff(reference, fwd_bwd(layer, clustered))
    [stats] = TELEMETRY.latest.values()
    out["bias_only_merged"] = bool(stats.clusters < stats.valid_tokens)
    out["bias_only_output_large"] = reference[0].abs().max().item() > 0.1
    megatron_dispatcher.revert()


def compare_patched_and_stock(rank, world_size, device):
    """Every scenario of one rank: stock vs patched on the same layers and inputs; plain numbers out."""
    from lshmoe_plugin.telemetry import TELEMETRY
    torch.manual_seed(100 + rank)
    x = torch.randn(SEQ, BATCH, HIDDEN).to(device)
    # Tokens an expert receives are alike in a real model; a few shared directions make the data clusterable.
    clustered = (torch.randn(6, HIDDEN)[torch.randint(0, 6, (SEQ * BATCH,))] * 3
                 + 0.3 * torch.randn(SEQ * BATCH, HIDDEN)).view(SEQ, BATCH, HIDDEN).to(device)
    out = {}
    mlp = build_layer(world_size).to(device)
    stock = fwd_bwd(mlp, x)

    megatron_dispatcher.apply(enabled(compression_rate=1.0), mlp)
    out["rate1_diff"] = max_diff(stock, fwd_bwd(mlp, x))

    megatron_dispatcher.apply(LSHMoEConfig(enabled=False))
    out["disabled_identical"] = bit_identical(stock, fwd_bwd(mlp, x))
    megatron_dispatcher.apply(enabled(layers=[3]))
    out["unselected_identical"] = bit_identical(stock, fwd_bwd(mlp, x))
    mlp.eval()
    megatron_dispatcher.revert()
    stock_eval = fwd_bwd(mlp, x)
    megatron_dispatcher.apply(enabled())
    out["eval_identical"] = bit_identical(stock_eval, fwd_bwd(mlp, x))
    mlp.train()
    megatron_dispatcher.revert()
    out["reverted_identical"] = bit_identical(stock, fwd_bwd(mlp, x))

    # Identity experts: with error compensation, p * (c + (x - c)) == p * x at any rate.
    ident = build_layer(world_size).to(device)
    ident.experts = ScaledIdentityExperts()
    stock_ident = fwd_bwd(ident, clustered)
    stock_rows = ident.experts.seen_tokens_per_expert[-1][0]
    megatron_dispatcher.apply(enabled(compression_rate=0.2))
    out["identity_diff"] = max_diff(stock_ident, fwd_bwd(ident, clustered))
    rows, per_expert = ident.experts.seen_tokens_per_expert[-1]
    out["identity_rows_match_counts"] = rows == sum(per_expert)
    out["identity_rows_fewer"] = rows < 0.35 * stock_rows
    megatron_dispatcher.apply(enabled(compression_rate=0.2, error_compensation=False))
    out["identity_no_ec_diff"] = max_diff(stock_ident, fwd_bwd(ident, clustered))

    # Bytes on the wire: the token payload of dispatch and combine, at rate 1.0 and 0.2.
    megatron_dispatcher.revert()
    with TokenBytes() as full:
        fwd_bwd(mlp, clustered)
    tokens_per_expert = mlp.token_dispatcher.routing_map.sum(dim=0)
    megatron_dispatcher.apply(enabled(compression_rate=0.2))
    TELEMETRY.clear()
    with TokenBytes() as small:
        fwd_bwd(mlp, clustered)
    stats = TELEMETRY.latest[0]
    out["bytes_full"], out["bytes_small"] = sum(full.sent), sum(small.sent)
    out["budget_bytes"] = 4 * sum(math.ceil(0.2 * int(n)) for n in tokens_per_expert) * HIDDEN * 4
    out["telemetry_bytes_sent"] = stats.bytes_sent
    out["dispatch_splits_small"] = small.splits[0] if world_size > 1 else None
    out["dispatch_splits_full"] = full.splits[0] if world_size > 1 else None

    # Probabilities applied on the input (top-1) and token dropping by capacity (no padding): exact at rate 1.0.
    megatron_dispatcher.revert()
    for name, settings in (("probs_on_input", dict(moe_router_topk=1, moe_router_pre_softmax=True,
                                                       moe_apply_probs_on_input=True)),
                           ("capacity", dict(moe_expert_capacity_factor=0.5))):
        layer = build_layer(world_size, **settings).to(device)
        megatron_dispatcher.revert()
        reference = fwd_bwd(layer, x)
        megatron_dispatcher.apply(enabled(compression_rate=1.0))
        out[f"{name}_rate1_diff"] = max_diff(reference, fwd_bwd(layer, x))
        megatron_dispatcher.apply(enabled(compression_rate=0.25))
        lossy = fwd_bwd(layer, x)
        out[f"{name}_lossy_finite"] = bool(torch.isfinite(lossy[0]).all() and torch.isfinite(lossy[1]).all())
    megatron_dispatcher.revert()

    compare_with_biases(world_size, device, x, clustered, out)

    # Settings the patch refuses, named in the error.
    errors = {}
    for name, settings in (("drop_and_pad", dict(moe_expert_capacity_factor=1.0,
                                                 moe_pad_expert_input_to_capacity=True)),
                           ("allgather", dict(moe_token_dispatcher_type="allgather"))):
        try:
            megatron_dispatcher.apply(enabled(), build_layer(world_size, **settings))
            errors[name] = None
        except UnsupportedFrameworkError as err:
            errors[name] = str(err)
        megatron_dispatcher.revert()
    out["errors"] = errors
    return out


# -- checks on the per-rank results (shared by the CPU and GPU tests) ------------------------------------------
def check_rate_one_matches_stock_outputs_and_grads(world_size, per_rank):
    for r in per_rank:
        assert r["rate1_diff"] < 1e-5, r["rate1_diff"]


def check_identity_expert_with_error_compensation_is_exact(world_size, per_rank):
    for r in per_rank:
        assert r["identity_diff"] < 1e-5, r["identity_diff"]
        assert r["identity_no_ec_diff"] > 1e-3  # without the residual the centroid output is visibly lossy
        assert r["identity_rows_match_counts"]  # experts see centroid rows and centroid counts that agree
        assert r["identity_rows_fewer"]  # ... and far fewer rows than the stock layer gives them


def check_disabled_unselected_eval_and_reverted_are_bit_identical(world_size, per_rank):
    for r in per_rank:
        assert r["disabled_identical"] and r["unselected_identical"]
        assert r["eval_identical"] and r["reverted_identical"]


def check_bytes_sent_shrink_with_the_rate(world_size, per_rank):
    for r in per_rank:
        # what the compressor reports sending per direction is within ceil(rate * tokens) rows per expert
        assert 4 * r["telemetry_bytes_sent"] <= r["budget_bytes"]
    total = {key: sum(r[key] for r in per_rank)
             for key in ("bytes_full", "bytes_small", "telemetry_bytes_sent", "budget_bytes")}
    if world_size == 1:  # one rank: Megatron skips the all-to-all, nothing crosses either way
        assert total["bytes_full"] == total["bytes_small"] == 0
        return
    # Dispatch and combine, forward and backward: every centroid row crosses four times (a rank's backward
    # sends what it received forward, so only the totals over ranks are fixed).
    assert total["bytes_small"] == 4 * total["telemetry_bytes_sent"] <= total["budget_bytes"]
    assert total["bytes_small"] < 0.35 * total["bytes_full"]
    for r in per_rank:  # the split sizes handed to the dispatch all-to-all are centroid counts
        assert sum(r["dispatch_splits_small"]) * HIDDEN * 4 == r["telemetry_bytes_sent"]
        assert sum(r["dispatch_splits_small"]) < sum(r["dispatch_splits_full"])


def check_probs_on_input_and_capacity_dropping_are_exact_at_rate_one(world_size, per_rank):
    for r in per_rank:
        for name in ("probs_on_input", "capacity"):
            assert r[f"{name}_rate1_diff"] < 1e-5, (name, r[f"{name}_rate1_diff"])
            assert r[f"{name}_lossy_finite"]


def check_experts_with_biases_match_stock(world_size, per_rank):
    for r in per_rank:
        assert r["bias_rate1_diff"] < 1e-5, r["bias_rate1_diff"]
        assert r["bias_only_diff"] < 1e-5 and r["bias_only_merged"] and r["bias_only_output_large"], r


def check_unsupported_settings_fail_loudly(world_size, per_rank):
    for r in per_rank:
        errors = r["errors"]
        assert "moe_pad_expert_input_to_capacity=True" in errors["drop_and_pad"]
        assert "moe_token_dispatcher_type='allgather'" in errors["allgather"]
        assert "Allowed: 'alltoall'" in errors["allgather"]


ALL_CHECKS = (check_rate_one_matches_stock_outputs_and_grads, check_identity_expert_with_error_compensation_is_exact,
              check_disabled_unselected_eval_and_reverted_are_bit_identical, check_bytes_sent_shrink_with_the_rate,
              check_probs_on_input_and_capacity_dropping_are_exact_at_rate_one, check_experts_with_biases_match_stock,
              check_unsupported_settings_fail_loudly)
