"""The contract every framework patch keeps, checked on all three (DeepSpeed GShard, Megatron-core, AutoEP) in 1 and
2 real gloo processes: rate 1.0 matches stock, disabled / unselected layers / eval / reverted are bit-identical to
stock, compression changes the result (so the patch is really in the path), apply is idempotent and revert
restores the framework's own attributes, and ``decide_by_cost`` either works both ways or is refused by name.
"""
import pytest
import torch
from distributed import run_distributed
from lsh_blocks import paper_block

import lshmoe_plugin
from lshmoe_plugin import cost
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError


def config(**overrides):
    return LSHMoEConfig(**paper_block({"enabled": True, "seed": 7, **overrides}))


def identical(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def max_diff(a, b):
    assert len(a) == len(b)
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a, b))


def engine_seams(engine):
    return [(engine, name) for name in ("forward", "step", "save_checkpoint", "load_checkpoint")]


class DeepSpeedSubject:
    framework = "deepspeed"
    rate1_tolerance = 0.0  # the fixed layout at rate 1.0 sends every slot as its own centroid: bit for bit

    def __init__(self, rank, world_size):
        import test_deepspeed_patch as ds
        from deepspeed.moe.sharded_moe import MOELayer
        from deepspeed.runtime.engine import DeepSpeedEngine
        self.ds, self.model = ds, ds.build_moe(world_size, k=2)
        torch.manual_seed(100 + rank)
        self.x = torch.randn(2, 24, ds.D_MODEL)
        self.seam_owners = [(MOELayer, "forward")] + engine_seams(DeepSpeedEngine)

    def fwd_bwd(self):
        out, gx, grads = self.ds.fwd_bwd(self.model, self.x)
        return [out, gx] + [g for g in grads if g is not None]

    def close(self):
        pass


class AutoEPSubject:
    framework = "autoep"
    rate1_tolerance = 1e-5  # the patched forward re-sorts routes and sums in another order than the stock one

    def __init__(self, rank, world_size):
        import test_autoep_patch as autoep
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
        from deepspeed.runtime.engine import DeepSpeedEngine
        self.autoep, self.model = autoep, autoep.build_model(world_size)
        self.ids = torch.randint(0, 64, (autoep.BATCH, autoep.SEQ), generator=torch.Generator().manual_seed(rank))
        self.seam_owners = [(AutoEPMoELayer, "_forward")] + engine_seams(DeepSpeedEngine)

    def fwd_bwd(self):
        logits, grads = self.autoep.fwd_bwd(self.model, self.ids)
        return [logits] + grads

    def close(self):
        pass


class MegatronSubject:
    framework = "megatron"
    rate1_tolerance = 1e-5

    def __init__(self, rank, world_size):
        import megatron_helpers as helpers
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        from lshmoe_plugin.patches import megatron_compat
        megatron_compat.apply()
        parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
        self.helpers, self.model = helpers, helpers.build_layer(world_size)
        torch.manual_seed(100 + rank)
        self.x = torch.randn(helpers.SEQ, helpers.BATCH, helpers.HIDDEN)
        self.seam_owners = [(MoELayer, "forward"), (MoEAlltoAllTokenDispatcher, "dispatch_preprocess"),
                            (MoEAlltoAllTokenDispatcher, "combine_postprocess")]

    def fwd_bwd(self):
        out, gx, grads = self.helpers.fwd_bwd(self.model, self.x)
        return [out, gx] + grads

    def close(self):
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()


SUBJECTS = {s.framework: s for s in (DeepSpeedSubject, AutoEPSubject, MegatronSubject)}


def contract(rank, world_size, framework):
    subject = SUBJECTS[framework](rank, world_size)
    try:
        return check_contract(subject)
    finally:
        lshmoe_plugin.disable(framework)
        subject.close()


def seams(subject):
    return [vars(owner).get(name) for owner, name in subject.seam_owners]


def enable(subject, cfg):
    return lshmoe_plugin.enable(cfg, subject.model, framework=subject.framework)


def check_contract(subject):
    framework, out = subject.framework, {}
    lshmoe_plugin.disable(framework)
    stock = subject.fwd_bwd()
    stock_seams = seams(subject)

    enable(subject, config(compression_rate=1.0))
    out["rate1_diff"] = max_diff(stock, subject.fwd_bwd())
    enable(subject, config(compression_rate=0.2))
    out["compressed_differs"] = not identical(stock, subject.fwd_bwd())

    enable(subject, LSHMoEConfig(enabled=False, compression_rate=0.2))
    out["disabled_is_unpatched"] = seams(subject) == stock_seams
    out["disabled_identical"] = identical(stock, subject.fwd_bwd())

    enable(subject, config(layers=[7]))
    out["unselected_identical"] = identical(stock, subject.fwd_bwd())

    subject.model.eval()
    lshmoe_plugin.disable(framework)
    stock_eval = subject.fwd_bwd()
    enable(subject, config(compression_rate=0.2))
    out["eval_identical"] = identical(stock_eval, subject.fwd_bwd())
    subject.model.train()

    once = seams(subject)
    enable(subject, config(compression_rate=0.3))
    out["apply_idempotent"] = seams(subject) == once and once != stock_seams
    lshmoe_plugin.disable(framework)
    lshmoe_plugin.disable(framework)
    out["revert_restores_the_originals"] = seams(subject) == stock_seams
    out["reverted_identical"] = identical(stock, subject.fwd_bwd())

    out.update(check_decide_by_cost(subject, stock))
    return out


def check_decide_by_cost(subject, stock):
    """Where supported: a measured decision, shared by the ranks, and both branches; elsewhere a named refusal."""
    try:
        enable(subject, config(compression_rate=0.2, decide_by_cost=True))
    except LSHMoEConfigError as error:
        lshmoe_plugin.disable(subject.framework)
        return {"decide_by_cost_refused": str(error)}
    measured = subject.fwd_bwd()
    holders = _compressed_holders(subject)
    pays = [layer._lshmoe_compressor.pays for layer in holders]
    recorded = lshmoe_plugin.TELEMETRY.decisions
    decisions = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(decisions, pays)
    out = {"decided_every_layer": all(p is not None for p in pays) and len(pays) > 0,
           "telemetry_records_every_decision": sorted(recorded) == sorted(h._lshmoe_compressor.layer_index
                                                                           for h in holders)
           and all(recorded[h._lshmoe_compressor.layer_index].compressed == h._lshmoe_compressor.pays
                   for h in holders),
           "ranks_agree": all(d == decisions[0] for d in decisions),
           "measured_step_follows_the_decision": identical(stock, measured) == (not any(pays))}
    measure = cost.measure
    try:
        for faster in ("stock", "compressed"):
            # A new seed is a new config: every layer measures again, here with a fixed outcome.
            cost.measure = (lambda *a, **k: (1.0, 2.0)) if faster == "stock" else (lambda *a, **k: (2.0, 1.0))
            enable(subject, config(compression_rate=0.2, decide_by_cost=True, seed=11 if faster == "stock" else 12))
            result = subject.fwd_bwd()
            out[f"when_{faster}_is_faster"] = identical(stock, result) == (faster == "stock")
    finally:
        cost.measure = measure
        lshmoe_plugin.disable(subject.framework)
    return out


def _compressed_holders(subject):
    return [m for m in subject.model.modules() if getattr(m, "_lshmoe_compressor", None) is not None]


@pytest.fixture(scope="module", params=[(f, w) for f in SUBJECTS for w in (1, 2)],
                ids=[f"{f}-{w}rank{'s' if w > 1 else ''}" for f in SUBJECTS for w in (1, 2)])
def results(request):
    framework, world_size = request.param
    return framework, run_distributed(contract, world_size, framework)


def test_rate_one_matches_stock(results):
    framework, per_rank = results
    for r in per_rank:
        assert r["rate1_diff"] <= SUBJECTS[framework].rate1_tolerance, r["rate1_diff"]


def test_compression_is_in_the_path(results):
    assert all(r["compressed_differs"] for r in results[1])


def test_disabled_unselected_eval_and_reverted_are_bit_identical(results):
    for r in results[1]:
        assert r["disabled_is_unpatched"] and r["disabled_identical"], r
        assert r["unselected_identical"] and r["eval_identical"] and r["reverted_identical"], r


def test_apply_is_idempotent_and_revert_restores_the_originals(results):
    for r in results[1]:
        assert r["apply_idempotent"] and r["revert_restores_the_originals"], r


def test_decide_by_cost_works_both_ways_or_is_refused_by_name(results):
    framework, per_rank = results
    for r in per_rank:
        if framework == "megatron":
            assert "lsh_moe.decide_by_cost=true is not supported with framework='megatron'" in \
                r["decide_by_cost_refused"]
            assert "allowed there: false" in r["decide_by_cost_refused"]
            continue
        assert "decide_by_cost_refused" not in r, r
        assert r["decided_every_layer"] and r["ranks_agree"] and r["measured_step_follows_the_decision"], r
        assert r["telemetry_records_every_decision"], r
        assert r["when_stock_is_faster"] and r["when_compressed_is_faster"], r


@pytest.mark.parametrize("framework", ["megatron", "autoep"])
def test_cuda_graphs_true_is_refused_by_name_for_the_variable_layout(framework):
    """Megatron and AutoEP size their all-to-all from a host read-back every layer: not capturable."""
    import lshmoe_plugin
    from lshmoe_plugin.patches import deepspeed_autoep, megatron_dispatcher
    config = {"lsh_moe": {"enabled": True, "method": "paper", "cuda_graphs": True}}
    with pytest.raises(lshmoe_plugin.LSHMoEConfigError,
                       match=rf"cuda_graphs=true is not supported with framework='{framework}'.*allowed there: "
                             r"'auto' or false"):
        lshmoe_plugin.enable(config, framework=framework)
    assert not megatron_dispatcher.is_applied() and not deepspeed_autoep.is_applied()
    patch = megatron_dispatcher if framework == "megatron" else deepspeed_autoep
    try:
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "cuda_graphs": "auto"}},
                             framework=framework)
        assert patch.is_applied()  # 'auto' is accepted there, and runs eagerly
    finally:
        lshmoe_plugin.disable(framework)
    assert not patch.is_applied()

