"""Patched vs stock DeepSpeed AutoEP on a tiny random-weight HF Mixtral, in 1 and 2 real gloo processes.

`deepspeed.initialize` with an ``expert_parallel`` block swaps the model's MoE blocks for `AutoEPMoELayer`s
(EP = world size); every scenario then runs on that same model, stock and patched.
"""
import math

import pytest
import torch
import transformers  # noqa: E402,F401  (installed by the README's [test] extra)
from distributed import run_distributed  # noqa: E402
from lsh_blocks import paper_block

import lshmoe_plugin  # noqa: E402
from lshmoe_plugin.config import LSHMoEConfig  # noqa: E402
from lshmoe_plugin.patches import deepspeed_autoep  # noqa: E402
from lshmoe_plugin.patches.versioning import UnsupportedFrameworkError  # noqa: E402

HIDDEN, NUM_EXPERTS, TOP_K, BATCH, SEQ = 16, 4, 2, 2, 16


def build_model(world_size):
    import deepspeed
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=NUM_EXPERTS,
                           num_experts_per_tok=TOP_K, max_position_embeddings=64)
    model = MixtralForCausalLM(config)
    ds_config = {"train_micro_batch_size_per_gpu": BATCH, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                 "expert_parallel": {"enabled": True, "method": "paper", "autoep_size": world_size,
                                     "preset_model": "mixtral"}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    return engine.module


def autoep_layers(model):
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    return [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]


class IdentityExperts(torch.nn.Module):
    def forward(self, rows, counts):
        return rows


def fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out.logits.detach(), grads


def max_diff(a, b):
    assert len(a[1]) == len(b[1])
    return max((p - q).abs().max().item() for p, q in [(a[0], b[0])] + list(zip(a[1], b[1])))


def bit_identical(a, b):
    return torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


class TokenBytes:
    """Bytes of token payloads handed to the real all-to-all (the 1-D count exchange is skipped)."""

    def __enter__(self):
        import deepspeed.comm as dist
        self.dist, self.original, self.sent = dist, dist.all_to_all_single, []

        def counting(output, tensor, *args, **kwargs):
            if tensor.dim() == 2:
                self.sent.append(tensor.numel() * tensor.element_size())
            return self.original(output, tensor, *args, **kwargs)
        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_to_all_single = self.original


def enabled(**overrides):
    return LSHMoEConfig(**paper_block({"enabled": True, "seed": 7, **overrides}))


def scenarios(rank, world_size):
    try:
        return _scenarios(rank, world_size)
    finally:
        deepspeed_autoep.revert()


def _scenarios(rank, world_size):
    from lshmoe_plugin.telemetry import TELEMETRY
    model = build_model(world_size)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(next(model.parameters()).device)
    out = {"num_layers": len(autoep_layers(model))}
    deepspeed_autoep.revert()
    stock = fwd_bwd(model, ids)

    lshmoe_plugin.enable(enabled(compression_rate=1.0), model, framework="autoep")
    out["rate1_diff"] = max_diff(stock, fwd_bwd(model, ids))
    lshmoe_plugin.enable(LSHMoEConfig(enabled=False), framework="autoep")
    out["disabled_identical"] = bit_identical(stock, fwd_bwd(model, ids))
    deepspeed_autoep.apply(enabled(layers=[5]))
    out["unselected_identical"] = bit_identical(stock, fwd_bwd(model, ids))
    model.eval()
    deepspeed_autoep.revert()
    stock_eval = fwd_bwd(model, ids)
    deepspeed_autoep.apply(enabled())
    out["eval_identical"] = bit_identical(stock_eval, fwd_bwd(model, ids))
    model.train()
    deepspeed_autoep.revert()
    out["reverted_identical"] = bit_identical(stock, fwd_bwd(model, ids))

    # Bytes on the wire at rate 1.0 (stock) and 0.2.
    with TokenBytes() as full:
        fwd_bwd(model, ids)
    deepspeed_autoep.apply(enabled(compression_rate=0.2))
    TELEMETRY.clear()
    with TokenBytes() as small:
        fwd_bwd(model, ids)
    routes_per_layer = BATCH * SEQ * TOP_K
    out["bytes_full"], out["bytes_small"] = sum(full.sent), sum(small.sent)
    out["telemetry_sent"] = sum(s.bytes_sent for s in TELEMETRY.latest.values())
    out["telemetry_full"] = sum(s.bytes_uncompressed for s in TELEMETRY.latest.values())
    out["budget_rows"] = out["num_layers"] * (math.ceil(0.2 * routes_per_layer) + NUM_EXPERTS)

    # Identity experts: with error compensation, s * (c + (x - c)) == s * x at any rate.
    deepspeed_autoep.revert()
    for layer in autoep_layers(model):
        layer.experts = IdentityExperts()
    stock_ident = fwd_bwd(model, ids)
    deepspeed_autoep.apply(enabled(compression_rate=0.2))
    out["identity_diff"] = max_diff(stock_ident, fwd_bwd(model, ids))
    deepspeed_autoep.apply(enabled(compression_rate=0.2, error_compensation=False))
    out["identity_no_ec_diff"] = max_diff(stock_ident, fwd_bwd(model, ids))
    deepspeed_autoep.revert()
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_autoep_replaced_the_moe_blocks(results):
    check_autoep_replaced_the_moe_blocks(*results)


def test_rate_one_matches_stock_logits_and_grads(results):
    check_rate_one_matches_stock_logits_and_grads(*results)


def test_identity_expert_with_error_compensation_is_exact(results):
    check_identity_expert_with_error_compensation_is_exact(*results)


def test_disabled_unselected_eval_and_reverted_are_bit_identical(results):
    check_disabled_unselected_eval_and_reverted_are_bit_identical(*results)


def test_bytes_sent_shrink_with_the_rate(results):
    check_bytes_sent_shrink_with_the_rate(*results)


# -- checks on the per-rank results (also run by tests/gpu/test_autoep_cuda.py) ---------------------------------
def check_autoep_replaced_the_moe_blocks(world_size, per_rank):
    assert all(r["num_layers"] == 2 for r in per_rank)


def check_rate_one_matches_stock_logits_and_grads(world_size, per_rank):
    for r in per_rank:
        assert r["rate1_diff"] < 1e-5, r["rate1_diff"]


def check_identity_expert_with_error_compensation_is_exact(world_size, per_rank):
    for r in per_rank:
        assert r["identity_diff"] < 1e-5, r["identity_diff"]
        assert r["identity_no_ec_diff"] > 1e-4


def check_disabled_unselected_eval_and_reverted_are_bit_identical(world_size, per_rank):
    for r in per_rank:
        assert r["disabled_identical"] and r["unselected_identical"]
        assert r["eval_identical"] and r["reverted_identical"]


def check_bytes_sent_shrink_with_the_rate(world_size, per_rank):
    for r in per_rank:
        # per layer: at most ceil(rate * routes) centroids, plus one per expert for the per-expert rounding up
        assert r["telemetry_sent"] <= r["budget_rows"] * HIDDEN * 4
        assert r["telemetry_sent"] < 0.35 * r["telemetry_full"]
    if world_size == 1:  # one rank: AutoEP runs no all-to-all
        assert all(r["bytes_full"] == r["bytes_small"] == 0 for r in per_rank)
        return
    total_small = sum(r["bytes_small"] for r in per_rank)
    total_full = sum(r["bytes_full"] for r in per_rank)
    # dispatch and combine, forward and backward: four crossings of every centroid row
    assert total_small == 4 * sum(r["telemetry_sent"] for r in per_rank)
    assert total_full == 4 * sum(r["telemetry_full"] for r in per_rank)
    assert total_small < 0.35 * total_full


ALL_CHECKS = (check_autoep_replaced_the_moe_blocks, check_rate_one_matches_stock_logits_and_grads,
              check_identity_expert_with_error_compensation_is_exact,
              check_disabled_unselected_eval_and_reverted_are_bit_identical, check_bytes_sent_shrink_with_the_rate)


@pytest.fixture
def clean_patch():
    deepspeed_autoep.revert()
    yield
    deepspeed_autoep.revert()


def test_apply_and_revert_are_idempotent(clean_patch):
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    original = AutoEPMoELayer._forward
    deepspeed_autoep.apply(enabled())
    deepspeed_autoep.apply(enabled(compression_rate=0.1))
    assert deepspeed_autoep.is_applied() and AutoEPMoELayer._forward is not original
    deepspeed_autoep.revert()
    deepspeed_autoep.revert()
    assert AutoEPMoELayer._forward is original


def test_unsupported_release_is_refused(clean_patch, monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "__version__", "0.18.3")
    with pytest.raises(UnsupportedFrameworkError, match=r"supports deepspeed 0.19.x; found deepspeed 0.18.3"):
        deepspeed_autoep.apply(enabled())
    assert not deepspeed_autoep.is_applied()
