"""`lsh_moe.method`: a named configuration sets the stage keys, contradictions are refused by name, and a layer
trained under a method's name is the layer trained under its keys spelled out, on 1 and 2 gloo ranks."""
import dataclasses

import pytest
import torch
from distributed import run_distributed
from test_deepspeed_patch import build_moe, failed, fwd_bwd, same

import lshmoe_plugin
from lshmoe_plugin import LSHMoEConfig, LSHMoEConfigError, methods, wire
from lshmoe_plugin.methods import DEFAULT_METHOD, METHODS, STAGE_KEYS, Method
from lshmoe_pretrain.quality_records import variant_configuration
from lshmoe_pretrain.quality_study import lsh_moe_block

# The long-schedule study's candidates that are methods now: study variant -> method.
STUDY_METHODS = {"fp8_fwd_fp4_grad": "fp8_fwd_fp4_grad", "fp4_both_sr": "fp4_sr",
                 "fp8_fwd_fp4sr_grad": "fp8_fwd_fp4sr_grad", "fp6_fwd_fp4sr_grad": "fp6_fwd_fp4sr_grad"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_sets_its_stages_and_is_what_its_keys_spelled_out_give(name):
    named = LSHMoEConfig.from_dict({"enabled": True, "method": name})
    spelled = LSHMoEConfig.from_dict({"enabled": True, **METHODS[name].stages})
    assert {key: getattr(named, key) for key in STAGE_KEYS} == dict(METHODS[name].stages)
    assert named == spelled  # the spelled-out keys report the method they match
    assert spelled.method == name
    assert dataclasses.replace(named, enabled=False).method == name  # a resolved config rebuilds as itself
    assert LSHMoEConfig.from_dict(named.to_dict()) == named


def test_every_method_spells_every_stage_key_once():
    """A backward format equal to its forward's is spelled None ("as the forward"), so that one configuration has
    one spelling and a composition finds its method."""
    assert STAGE_KEYS == ("clustering", "dispatch_dtype", "combine_dtype", "dispatch_grad_dtype",
                          "combine_grad_dtype", "grad_rounding")
    with pytest.raises(ValueError, match="stages must set exactly"):
        Method("fp8_spelled", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                               "dispatch_grad_dtype": "fp8_e4m3", "combine_grad_dtype": None,
                               "grad_rounding": "nearest"}, "")
    with pytest.raises(ValueError, match="stages must set exactly"):
        Method("fp8_short", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}, "")


@pytest.mark.parametrize("name, stages, crossings", [
    ("fp8_fwd_fp4_grad", ("none", "fp8_e4m3", "fp8_e4m3", "fp4_e2m1", "fp4_e2m1", "nearest"),
     ("fp8_e4m3", "fp4_e2m1", "fp8_e4m3", "fp4_e2m1")),
    ("fp4_sr", ("none", "fp4_e2m1", "fp4_e2m1", None, None, "stochastic"), ("fp4_e2m1",) * 4),
    ("fp8_fwd_fp4sr_grad", ("none", "fp8_e4m3", "fp8_e4m3", "fp4_e2m1", "fp4_e2m1", "stochastic"),
     ("fp8_e4m3", "fp4_e2m1", "fp8_e4m3", "fp4_e2m1")),
    ("fp6_fwd_fp4sr_grad", ("none", "fp6_e2m3", "fp6_e2m3", "fp4_e2m1", "fp4_e2m1", "stochastic"),
     ("fp6_e2m3", "fp4_e2m1", "fp6_e2m3", "fp4_e2m1")),
])
def test_the_study_candidates_resolve_to_their_stages_and_formats(name, stages, crossings):
    config = LSHMoEConfig.from_dict({"enabled": True, "method": name})
    assert tuple(getattr(config, key) for key in STAGE_KEYS) == stages
    assert config.wire_dtypes == crossings
    for crossing in wire.CROSSINGS:
        forward, backward = wire.formats(config, crossing)
        assert (forward.rounding, backward.rounding) == ("nearest", stages[-1])


def test_the_backward_stages_default_to_as_the_forward_rounded_to_nearest():
    """grad_rounding's field is None (left out) like the other stage keys, and resolution fills it in: beside a
    forward stage key or the paper, as the forward rounded to nearest; with nothing given, the default's (FP4
    gradients under its FP8 forward, rounded stochastically)."""
    assert {f.name: f.default for f in dataclasses.fields(LSHMoEConfig)}["grad_rounding"] is None
    for config in (LSHMoEConfig(method="paper"), LSHMoEConfig(clustering="none")):
        assert (config.dispatch_grad_dtype, config.combine_grad_dtype, config.grad_rounding) == (None, None,
                                                                                                 "nearest")
    config = LSHMoEConfig()
    assert (config.dispatch_grad_dtype, config.combine_grad_dtype, config.grad_rounding) == (
        "fp4_e2m1", "fp4_e2m1", "stochastic")


def test_a_backward_format_spelled_as_its_forward_is_no_contradiction():
    """What "as the forward" resolves to under the method, given explicitly: accepted, and stored as None."""
    for block in ({"method": "fp8", "dispatch_grad_dtype": "fp8_e4m3"},
                  {"method": "fp8", "dispatch_grad_dtype": "fp8_e4m3", "combine_grad_dtype": "fp8_e4m3"},
                  {"method": "paper", "combine_grad_dtype": "model"},
                  {"method": "fp8_dispatch", "combine_grad_dtype": "model", "grad_rounding": "nearest"}):
        config = LSHMoEConfig.from_dict({"enabled": True, **block}, env={})
        assert config == LSHMoEConfig.from_dict({"enabled": True, "method": block["method"]}, env={})
        assert (config.dispatch_grad_dtype, config.combine_grad_dtype) == (None, None)
    # the method's own backward format spelled out is its value, and null is "left out": the method's value too
    for value in ("fp4_e2m1", None):
        config = LSHMoEConfig.from_dict({"method": "fp8_fwd_fp4_grad", "dispatch_grad_dtype": value}, env={})
        assert (config.method, config.dispatch_grad_dtype) == ("fp8_fwd_fp4_grad", "fp4_e2m1")


@pytest.mark.parametrize("block, message", [
    ({"method": "fp8", "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1"},
     r"lsh_moe\.dispatch_grad_dtype='fp4_e2m1' contradicts lsh_moe\.method='fp8', which sets dispatch_grad_dtype as "
     r"its forward \(dispatch_dtype 'fp8_e4m3'\); allowed: leave dispatch_grad_dtype out, set it to 'fp8_e4m3', set "
     r"method 'fp8_fwd_fp4_grad' instead \(it sets these stages\), or leave method out and set every stage key "
     r"yourself$"),
    ({"method": "fp4", "grad_rounding": "stochastic"},
     r"lsh_moe\.grad_rounding='stochastic' contradicts lsh_moe\.method='fp4', which sets grad_rounding 'nearest'; "
     r"allowed: leave grad_rounding out, set it to 'nearest', set method 'fp4_sr' instead \(it sets these stages\), "
     r"or leave method out and set every stage key yourself$"),
    ({"method": "fp8", "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1",
      "grad_rounding": "stochastic"},
     r"lsh_moe\.dispatch_grad_dtype='fp4_e2m1' contradicts .* set method 'fp8_fwd_fp4sr_grad' instead"),
    # the stages asked for are no method's: nothing to name instead
    ({"method": "fp8", "dispatch_grad_dtype": "fp4_e2m1"},
     r"lsh_moe\.dispatch_grad_dtype='fp4_e2m1' contradicts lsh_moe\.method='fp8', which sets dispatch_grad_dtype as "
     r"its forward \(dispatch_dtype 'fp8_e4m3'\); allowed: leave dispatch_grad_dtype out, set it to 'fp8_e4m3', or "
     r"leave method out and set every stage key yourself$"),
    ({"method": "fp8_fwd_fp4_grad", "combine_grad_dtype": "fp8_e4m3"},
     r"lsh_moe\.combine_grad_dtype='fp8_e4m3' contradicts lsh_moe\.method='fp8_fwd_fp4_grad', which sets "
     r"combine_grad_dtype 'fp4_e2m1'; allowed: leave combine_grad_dtype out, set it to 'fp4_e2m1', or leave method "
     r"out"),
    ({"method": "fp8_fwd_fp4_grad", "grad_rounding": "stochastic"},
     r"lsh_moe\.grad_rounding='stochastic' contradicts lsh_moe\.method='fp8_fwd_fp4_grad'.* set method "
     r"'fp8_fwd_fp4sr_grad' instead"),
    ({"method": "fp4_sr", "grad_rounding": "nearest"},
     r"lsh_moe\.grad_rounding='nearest' contradicts lsh_moe\.method='fp4_sr', which sets grad_rounding "
     r"'stochastic'; allowed: leave grad_rounding out, set it to 'stochastic', set method 'fp4' instead"),
    # a forward given otherwise is refused by its own key first, whatever its gradient says
    ({"method": "fp8_fwd_fp4_grad", "dispatch_dtype": "fp4_e2m1", "dispatch_grad_dtype": "fp4_e2m1"},
     r"lsh_moe\.dispatch_dtype='fp4_e2m1' contradicts lsh_moe\.method='fp8_fwd_fp4_grad', which sets "
     r"dispatch_dtype 'fp8_e4m3'"),
])
def test_a_backward_stage_beside_a_method_that_sets_it_otherwise_is_refused_by_name(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict({"enabled": True, **block}, env={})


def test_a_composition_of_backward_stages_reports_the_method_it_matches():
    """No method named: the stage keys given over the paper's (over the default's where only backward keys are
    given), a backward format spelled as its forward's the same as one left out."""
    fp8 = {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}
    fp4 = {"clustering": "none", "dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1"}
    fp6 = {"clustering": "none", "dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3"}
    fp4_grads = {"dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1"}
    for block, name in ((fp8, "fp8"), ({**fp8, "dispatch_grad_dtype": "fp8_e4m3"}, "fp8"),
                        ({**fp8, "combine_grad_dtype": "fp8_e4m3", "grad_rounding": "nearest"}, "fp8"),
                        ({**fp8, **fp4_grads}, "fp8_fwd_fp4_grad"),
                        ({**fp8, **fp4_grads, "grad_rounding": "stochastic"}, "fp8_fwd_fp4sr_grad"),
                        ({**fp6, **fp4_grads, "grad_rounding": "stochastic"}, "fp6_fwd_fp4sr_grad"),
                        ({**fp6, **fp4_grads}, "custom"),  # rounded to nearest: no method's stages
                        ({**fp4, "grad_rounding": "stochastic"}, "fp4_sr"),
                        ({**fp4, **fp4_grads, "grad_rounding": "stochastic"}, "fp4_sr"),
                        ({**fp8, "dispatch_grad_dtype": "fp4_e2m1"}, "custom"),
                        ({**fp8, "grad_rounding": "stochastic"}, "custom"),
                        ({"combine_grad_dtype": "fp8_e4m3"}, "custom"),
                        # backward keys alone, over the default's stages (FP6 forward, FP4 gradients, stochastic)
                        ({"grad_rounding": "nearest"}, "custom"),
                        ({"grad_rounding": "stochastic"}, "fp6_fwd_fp4sr_grad"),
                        (fp4_grads, "fp6_fwd_fp4sr_grad"),
                        ({**fp4_grads, "grad_rounding": "nearest"}, "custom"),
                        ({"dispatch_grad_dtype": "fp6_e2m3"}, "custom"),
                        ({"dispatch_grad_dtype": "fp6_e2m3", "combine_grad_dtype": "fp6_e2m3",
                          "grad_rounding": "nearest"}, "fp6"),
                        ({"clustering": "lsh", "grad_rounding": "nearest"}, "paper")):
        config = LSHMoEConfig.from_dict({"enabled": True, **block}, env={})
        assert config.method == name, block
        if name != "custom":
            assert config == LSHMoEConfig.from_dict({"enabled": True, "method": name}, env={})
        assert LSHMoEConfig.from_dict(config.to_dict(), env={}) == config


def test_backward_stage_keys_alone_adjust_the_default_not_the_papers_stages(monkeypatch):
    """With no method and no forward stage key, the stages left out are the default's (fp6_fwd_fp4sr_grad):
    "grad_rounding" alone is the default with that rounding (nearest: FP6 forward, FP4 gradients rounded to
    nearest, no method's stages; stochastic: the default itself), never the paper's LSH clustering by surprise; a
    gradient format alone keeps the default's stochastic rounding; with the default set to FP8 forward (the default
    before) or FP4 both ways the same block follows it (fp8_fwd_fp4_grad, fp4_sr)."""
    nearest = LSHMoEConfig.from_dict({"enabled": True, "grad_rounding": "nearest"}, env={})
    assert (nearest.method, nearest.clustering, nearest.grad_rounding) == ("custom", "none", "nearest")
    assert nearest.wire_dtypes == ("fp6_e2m3", "fp4_e2m1", "fp6_e2m3", "fp4_e2m1")
    assert [wire.formats(nearest, crossing)[1].rounding for crossing in wire.CROSSINGS] == ["nearest"] * 2
    stochastic = LSHMoEConfig.from_dict({"enabled": True, "grad_rounding": "stochastic"}, env={})
    assert stochastic == LSHMoEConfig.from_dict({"enabled": True}, env={})
    assert (stochastic.method, stochastic.clustering, stochastic.grad_rounding) == ("fp6_fwd_fp4sr_grad", "none",
                                                                                    "stochastic")
    # the dispatch gradient in its forward's FP6 (stored as None, "as the forward"), the combine's still FP4, both
    # rounded stochastically as the default's: no method's stages
    fp6_grads = LSHMoEConfig.from_dict({"enabled": True, "dispatch_grad_dtype": "fp6_e2m3"}, env={})
    assert fp6_grads.method == "custom" and fp6_grads.clustering == "none"
    assert (fp6_grads.dispatch_grad_dtype, fp6_grads.combine_grad_dtype) == (None, "fp4_e2m1")
    assert fp6_grads.wire_dtypes == ("fp6_e2m3", "fp6_e2m3", "fp6_e2m3", "fp4_e2m1")
    assert fp6_grads.grad_rounding == "stochastic"
    assert [wire.formats(fp6_grads, crossing)[1].rounding for crossing in wire.CROSSINGS] == ["stochastic"] * 2
    assert LSHMoEConfig.from_dict(fp6_grads.to_dict(), env={}) == fp6_grads
    # both gradients in FP6 under the default's FP6 forward: fp6's crossings with the default's stochastic
    # gradients (no method's), and method fp6 where nearest is asked for
    both = {"enabled": True, "dispatch_grad_dtype": "fp6_e2m3", "combine_grad_dtype": "fp6_e2m3"}
    fp6_sr = LSHMoEConfig.from_dict(both, env={})
    assert (fp6_sr.method, fp6_sr.wire_dtypes, fp6_sr.grad_rounding) == ("custom", ("fp6_e2m3",) * 4, "stochastic")
    assert LSHMoEConfig.from_dict({**both, "grad_rounding": "nearest"}, env={}).method == "fp6"
    monkeypatch.setattr(methods, "DEFAULT_METHOD", "fp8_fwd_fp4sr_grad")
    assert methods.resolve(None, {"grad_rounding": "nearest"})[0] == "fp8_fwd_fp4_grad"
    assert methods.resolve(None, {"dispatch_grad_dtype": "fp8_e4m3", "combine_grad_dtype": "fp8_e4m3",
                                  "grad_rounding": "nearest"})[0] == "fp8"
    monkeypatch.setattr(methods, "DEFAULT_METHOD", "fp4")
    assert methods.resolve(None, {"grad_rounding": "stochastic"})[0] == "fp4_sr"
    assert methods.resolve(None, {"grad_rounding": "nearest"})[0] == "fp4"
    assert methods.resolve(None, {"clustering": "lsh", "grad_rounding": "nearest"})[0] == "paper"


def test_backward_keys_alone_that_leave_no_gradient_scaled_round_to_nearest():
    """The default rounds its gradients stochastically, but gradient formats given alone that send both gradients
    in the model's dtype leave nothing to round: grad_rounding left out is nearest there (stochastic, which would
    be refused, was not asked for); given as stochastic it is refused by name. One gradient still in FP4 keeps the
    default's stochastic rounding."""
    unscaled = {"enabled": True, "dispatch_grad_dtype": "model", "combine_grad_dtype": "model"}
    config = LSHMoEConfig.from_dict(unscaled, env={})
    assert (config.method, config.wire_dtypes, config.grad_rounding) == (
        "custom", ("fp6_e2m3", "model", "fp6_e2m3", "model"), "nearest")
    assert LSHMoEConfig.from_dict(config.to_dict(), env={}) == config
    with pytest.raises(LSHMoEConfigError, match=r"grad_rounding='stochastic' rounds gradients that cross in .* no "
                                                r"backward crossing uses one"):
        LSHMoEConfig.from_dict({**unscaled, "grad_rounding": "stochastic"}, env={})
    one = LSHMoEConfig.from_dict({"enabled": True, "dispatch_grad_dtype": "model"}, env={})
    assert (one.wire_dtypes, one.grad_rounding) == (("fp6_e2m3", "model", "fp6_e2m3", "fp4_e2m1"), "stochastic")


def test_the_study_candidates_are_their_methods_and_the_other_formats_stay_compositions():
    """lshmoe_pretrain.quality_records.variant_configuration: the study's four leading candidates are named
    methods with nothing beside them; FP6 forward with FP4 gradients rounded to nearest is no method's stages, and
    FP4 with 16-element blocks is fp4 with a knob."""
    for variant, method in STUDY_METHODS.items():
        assert variant_configuration(variant) == (method, {})
    assert variant_configuration("fp6_fwd_fp4_grad") == ("custom", {
        "clustering": "none", "dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3",
        "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1"})
    assert variant_configuration("fp4_both_b16") == ("fp4", {"fp4_block_size": 16})


def test_the_paper_by_name():
    config = LSHMoEConfig.from_dict({"enabled": True, "method": "paper"})
    assert (config.method, config.clustering, config.dispatch_dtype, config.combine_dtype) == (
        "paper", "lsh", "model", "model")
    assert (config.compression_rate, config.num_hashes, config.error_compensation) == (0.2, 6, True)


def test_nothing_named_is_the_default_method_fp6_fwd_fp4sr_grad():
    """`"enabled": true` and nothing else trains the single-pass testbed's choice: every token in FP6 forward both
    ways (rounded to nearest), its gradients back in FP4, rounded stochastically."""
    assert DEFAULT_METHOD == "fp6_fwd_fp4sr_grad"
    for config in (LSHMoEConfig.from_dict({"enabled": True}), LSHMoEConfig(enabled=True),
                   LSHMoEConfig.from_dict({"enabled": True, "seed": 3, "layers": [0], "method": "custom"})):
        assert (config.method, config.clustering, config.grad_rounding) == ("fp6_fwd_fp4sr_grad", "none",
                                                                            "stochastic")
        assert config.wire_dtypes == ("fp6_e2m3", "fp4_e2m1", "fp6_e2m3", "fp4_e2m1")  # dispatch, grad, combine, grad
        for crossing in wire.CROSSINGS:
            forward, backward = wire.formats(config, crossing)
            assert (forward.rounding, backward.rounding) == ("nearest", "stochastic")
            assert forward.draws is None and backward.draws is not None
    # its bytes against bf16's at d_model 256: FP6 rows of 192 bytes and 8 e8m0 scales (blocks of 32) forward,
    # FP4 rows of 128 bytes and 8 e8m0 scales back, over 512 bytes a row: 0.328 of stock's
    rows, d = 10, 256
    per_crossing = wire.bytes_per_crossing(config, rows, d, torch.bfloat16)
    assert per_crossing == rows * (2 * (192 + 8) + 2 * (128 + 8)) / 4
    assert round(per_crossing / (rows * d * 2), 3) == 0.328


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
    the default (FP6/FP4 with stochastic FP4 gradients, no clustering) with the knob ignored."""
    for block in ({"enabled": True, "compression_rate": 0.3}, {"enabled": True, "error_compensation": False}):
        with pytest.raises(LSHMoEConfigError, match=r"belongs to LSH clustering, which clustering 'none' turns off.*"
                                                    r"Method 'fp6_fwd_fp4sr_grad' sends every token \(the default "
                                                    r"when the block names no method and no stage key\); for the "
                                                    r"paper's LSH clustering set method 'paper'"):
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


def rewinder(block):
    """A function that sets the draw counters of the stochastic formats `block` trains with back to where they are
    now (CPU), so that a run after it draws the bits of the run after this call (lshmoe_plugin.rounding)."""
    config = LSHMoEConfig.from_dict(block)
    counters = [fmt.draws.counter("cpu") for crossing in wire.CROSSINGS for fmt in wire.formats(config, crossing)
                if getattr(fmt, "draws", None) is not None]  # the model's dtype draws nothing
    values = [counter.clone() for counter in counters]
    return lambda: [counter.copy_(value) for counter, value in zip(counters, values)]


def check_method_trains_as_its_keys(rank, world_size):
    torch.manual_seed(7 + rank)
    x = torch.randn(2, 24, 16)
    report = {}
    # each method against its stage keys spelled out; the study's candidates against the study's block as well
    spellings = {name: [{**method.stages}] for name, method in METHODS.items()}
    for variant, name in STUDY_METHODS.items():
        spellings[name].append({key: value for key, value in lsh_moe_block(variant).items() if key != "enabled"})
    # the default: nothing given; fp6: the default's gradients in its forward's format, rounded to nearest
    spellings["fp6_fwd_fp4sr_grad"].append({})
    spellings["fp6"].append({"dispatch_grad_dtype": "fp6_e2m3", "combine_grad_dtype": "fp6_e2m3",
                             "grad_rounding": "nearest"})
    for name, method in METHODS.items():
        moe = build_moe(world_size, 2)
        knobs = {"compression_rate": 0.25} if method.stages["clustering"] == "lsh" else {}
        block = {"enabled": True, "method": name, **knobs}
        rewind = rewinder(block)  # a stochastic method's spellings draw the bits its named run drew
        lshmoe_plugin.enable({"lsh_moe": block}, moe)
        named = fwd_bwd(moe, x)
        named_bytes = lshmoe_plugin.TELEMETRY.latest[0].bytes_sent
        for index, spelled_keys in enumerate(spellings[name]):
            rewind()
            lshmoe_plugin.enable({"lsh_moe": {"enabled": True, **knobs, **spelled_keys}}, moe)
            spelled = fwd_bwd(moe, x)
            report[f"{name}_{index}_same_outputs_and_gradients"] = same(named, spelled)
            report[f"{name}_{index}_same_bytes"] = named_bytes == lshmoe_plugin.TELEMETRY.latest[0].bytes_sent
        if method.stages["grad_rounding"] == "stochastic":
            # its stages rounded to nearest: the same forward, other gradients
            rewind()
            lshmoe_plugin.enable({"lsh_moe": {"enabled": True, **method.stages, "grad_rounding": "nearest"}}, moe)
            nearest = fwd_bwd(moe, x)
            report[f"{name}_forward_is_nearests"] = torch.equal(named[0], nearest[0])
            report[f"{name}_gradients_are_not_nearests"] = not torch.equal(named[1], nearest[1])
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
    no method: refused by name, not trained as the default method with the keys ignored. Naming the paper, a stage
    key, or the block being off lets it through; a resolved config written back (which names its method) always
    does."""
    old = {"enabled": True, "compression_rate": 0.2, "num_hashes": 6, "hash_type": "cross_polytope",
           "error_compensation": True, "seed": 1234, "layers": "all"}
    with pytest.raises(LSHMoEConfigError, match=r"lsh_moe.compression_rate configures LSH clustering, but the block "
                                                r"names no method.*'fp6_fwd_fp4sr_grad'.*add \"method\": "
                                                r"\"paper\".*or leave out compression_rate, num_hashes, hash_type, "
                                                r"error_compensation"):
        LSHMoEConfig.from_dict(old, env={})
    with pytest.raises(LSHMoEConfigError, match="names no method"):  # turned on by the environment
        LSHMoEConfig.from_dict({**old, "enabled": False}, env={"LSHMOE_ENABLED": "1"})
    assert not LSHMoEConfig.from_dict({**old, "enabled": False}, env={}).enabled
    assert LSHMoEConfig.from_dict({**old, "method": "paper"}, env={}).clustering == "lsh"
    assert LSHMoEConfig.from_dict({**old, "dispatch_dtype": "fp8_e4m3"}, env={}).method == "custom"
    for config in (LSHMoEConfig(enabled=True), LSHMoEConfig(enabled=True, method="paper")):
        assert LSHMoEConfig.from_dict(config.to_dict(), env={}) == config
