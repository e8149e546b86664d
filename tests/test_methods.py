"""`lsh_moe.method`: a named configuration sets the stage keys, contradictions are refused by name, and a layer
trained under a method's name is the layer trained under its keys spelled out, on 1 and 2 gloo ranks."""
import dataclasses

import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import build_moe, failed, fwd_bwd, same

import lshmoe_plugin
from lshmoe_plugin import LSHMoEConfig, LSHMoEConfigError
from lshmoe_plugin.methods import DEFAULT_METHOD, METHODS, STAGE_KEYS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_sets_its_stages_and_is_what_its_keys_spelled_out_give(name):
    named = LSHMoEConfig.from_dict({"enabled": True, "method": name})
    spelled = LSHMoEConfig.from_dict({"enabled": True, **METHODS[name].stages})
    assert {key: getattr(named, key) for key in STAGE_KEYS} == dict(METHODS[name].stages)
    assert named == spelled  # the spelled-out keys report the method they match
    assert spelled.method == name
    assert dataclasses.replace(named, enabled=False).method == name  # a resolved config rebuilds as itself
    assert LSHMoEConfig.from_dict(named.to_dict()) == named


def test_the_paper_by_name():
    config = LSHMoEConfig.from_dict({"enabled": True, "method": "paper"})
    assert (config.method, config.clustering, config.dispatch_dtype, config.combine_dtype) == (
        "paper", "lsh", "model", "model")
    assert (config.compression_rate, config.num_hashes, config.error_compensation) == (0.2, 6, True)


def test_nothing_named_is_the_default_method_fp4():
    """`"enabled": true` and nothing else trains the long-schedule testbed's choice: every token in FP4 both ways."""
    assert DEFAULT_METHOD == "fp4"
    for config in (LSHMoEConfig.from_dict({"enabled": True}), LSHMoEConfig(enabled=True),
                   LSHMoEConfig.from_dict({"enabled": True, "seed": 3, "layers": [0], "method": "custom"})):
        assert (config.method, config.clustering, config.dispatch_dtype, config.combine_dtype) == (
            "fp4", "none", "fp4_e2m1", "fp4_e2m1")


def test_a_stage_key_alone_composes_on_the_papers_stages():
    """With no method named, the stage keys left out beside one given keep the paper's values, not the default's:
    FP8 dispatch alone is the paper's centroids sent in FP8 to the experts and returned in the model's dtype."""
    config = LSHMoEConfig.from_dict({"enabled": True, "dispatch_dtype": "fp8_e4m3"})
    assert (config.method, config.clustering, config.dispatch_dtype, config.combine_dtype) == (
        "custom", "lsh", "fp8_e4m3", "model")
    both = LSHMoEConfig.from_dict({"enabled": True, "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"})
    assert both.method == "paper_fp8"
    assert LSHMoEConfig.from_dict({"enabled": True, "clustering": "none", "dispatch_dtype": "fp4_e2m1",
                                   "combine_dtype": "fp4_e2m1"}).method == "fp4"


def test_a_clustering_knob_under_the_default_says_to_name_the_paper():
    """An old block that tunes LSH (a rate, no compensation) and names no method is refused by name, not trained as
    FP4 with the knob ignored."""
    for block in ({"enabled": True, "compression_rate": 0.3}, {"enabled": True, "error_compensation": False}):
        with pytest.raises(LSHMoEConfigError, match=r"belongs to LSH clustering, which clustering 'none' turns off.*"
                                                    r"Method 'fp4' sends every token \(the default when the block "
                                                    r"names no method and no stage key\); for the paper's LSH "
                                                    r"clustering set method 'paper'"):
            LSHMoEConfig(**block)  # the constructor: from_dict refuses such a block earlier (below)
        assert LSHMoEConfig.from_dict({**block, "method": "paper"}, env={}).clustering == "lsh"


def test_stage_keys_without_a_method_are_taken_as_given_and_named_custom_when_no_method_matches():
    config = LSHMoEConfig.from_dict({"enabled": True, "dispatch_dtype": "fp8_e4m3"})
    assert (config.method, config.clustering, config.dispatch_dtype, config.combine_dtype) == (
        "custom", "lsh", "fp8_e4m3", "model")
    assert LSHMoEConfig.from_dict({"enabled": True, "method": "custom", "dispatch_dtype": "fp8_e4m3"}) == config


def test_a_methods_knobs_stay_free_and_its_stages_refuse_other_values():
    config = LSHMoEConfig.from_dict({"enabled": True, "method": "paper", "compression_rate": 0.5})
    assert (config.method, config.compression_rate) == ("paper", 0.5)
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe\.clustering='lsh' contradicts lsh_moe\.method='fp8'"):
        LSHMoEConfig.from_dict({"method": "fp8", "clustering": "lsh"})
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe\.combine_dtype='model'.*sets combine_dtype 'fp8_e4m3'"):
        LSHMoEConfig.from_dict({"method": "paper_fp8", "combine_dtype": "model"})
    # a knob of a stage the method turns off is refused by the key's own rule
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe\.compression_rate=0\.5 belongs to LSH clustering"):
        LSHMoEConfig.from_dict({"method": "fp8", "compression_rate": 0.5})


def test_an_unknown_method_is_refused_with_the_allowed_names():
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe\.method must be one of \['paper', .*'custom'\], got 'fp9'"):
        LSHMoEConfig.from_dict({"method": "fp9"})


def check_method_trains_as_its_keys(rank, world_size):
    torch.manual_seed(7 + rank)
    x = torch.randn(2, 24, 16)
    report = {}
    for name, method in METHODS.items():
        moe = build_moe(world_size, 2)
        knobs = {"compression_rate": 0.25} if method.stages["clustering"] == "lsh" else {}
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": name, **knobs}}, moe)
        named = fwd_bwd(moe, x)
        named_bytes = lshmoe_plugin.TELEMETRY.latest[0].bytes_sent
        lshmoe_plugin.enable({"lsh_moe": {"enabled": True, **knobs, **method.stages}}, moe)
        spelled = fwd_bwd(moe, x)
        report[f"{name}_same_outputs_and_gradients"] = same(named, spelled)
        report[f"{name}_same_bytes"] = named_bytes == lshmoe_plugin.TELEMETRY.latest[0].bytes_sent
        lshmoe_plugin.disable()
        stock = fwd_bwd(moe, x)
        if method.stages["clustering"] == "bounded" and method.stages["dispatch_dtype"] == "model":
            # random rows are never within 10% of one another: every token crosses as itself, as in stock
            report[f"{name}_is_stock_on_distinct_tokens"] = same(stock, named)
        else:
            report[f"{name}_differs_from_stock"] = not same(stock, named)  # the others change what crosses
    return report


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_layer_under_a_methods_name_trains_as_under_its_keys(world_size):
    for rank, report in enumerate(run_distributed(check_method_trains_as_its_keys, world_size)):
        assert not failed(report), (rank, failed(report))


def test_an_old_lsh_block_that_names_no_method_is_refused_by_name():
    """A block written for the paper's layer before the default changed lists LSH keys at their defaults and names
    no method: refused by name, not trained as FP4 with the keys ignored. Naming the paper, a stage key, or the
    block being off lets it through; a resolved config written back (which names its method) always does."""
    old = {"enabled": True, "compression_rate": 0.2, "num_hashes": 6, "hash_type": "cross_polytope",
           "error_compensation": True, "seed": 1234, "layers": "all"}
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe.compression_rate configures LSH clustering, but the block "
                                                r"names no method.*'fp4'.*add \"method\": \"paper\".*or leave out "
                                                r"compression_rate, num_hashes, hash_type, error_compensation"):
        LSHMoEConfig.from_dict(old, env={})
    with pytest.raises(LSHMoEConfigError, match="names no method"):  # turned on by the environment
        LSHMoEConfig.from_dict({**old, "enabled": False}, env={"LSHMOE_ENABLED": "1"})
    assert not LSHMoEConfig.from_dict({**old, "enabled": False}, env={}).enabled
    assert LSHMoEConfig.from_dict({**old, "method": "paper"}, env={}).clustering == "lsh"
    assert LSHMoEConfig.from_dict({**old, "dispatch_dtype": "fp8_e4m3"}, env={}).method == "custom"
    for config in (LSHMoEConfig(enabled=True), LSHMoEConfig(enabled=True, method="paper")):
        assert LSHMoEConfig.from_dict(config.to_dict(), env={}) == config
