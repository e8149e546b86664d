import json

import pytest
import torch

from lshmoe_plugin.config import ENABLED_ENV_VAR, LSHMoEConfig, LSHMoEConfigError


def test_defaults_everything_but_enabled():
    cfg = LSHMoEConfig.from_dict({"enabled": True, "method": "paper"}, env={})
    assert cfg.enabled and cfg.compression_rate == 0.2 and cfg.num_hashes == 6
    assert cfg.hash_type == "cross_polytope" and cfg.error_compensation and cfg.layers == "all"


def test_reads_block_from_deepspeed_json_path(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "lsh_moe": {
        "enabled": True, "method": "paper", "compression_rate": 0.1, "num_hashes": 4, "hash_type": "spherical",
        "error_compensation": False, "seed": 7, "layers": [2, 0]}}))
    cfg = LSHMoEConfig.from_deepspeed_config(str(path), env={})
    assert (cfg.compression_rate, cfg.num_hashes, cfg.hash_type, cfg.seed) == (0.1, 4, "spherical", 7)
    assert cfg.layers == (0, 2) and not cfg.error_compensation
    assert cfg.applies_to_layer(2) and not cfg.applies_to_layer(1)


@pytest.mark.parametrize("value", ["auto", True, False])
def test_cuda_graphs_takes_auto_or_a_bool(value):
    parsed = LSHMoEConfig.from_dict({"cuda_graphs": value}, env={}).cuda_graphs
    assert parsed == value and type(parsed) is type(value)


def test_cuda_graphs_true_without_cuda_is_an_error_naming_the_key():
    import torch

    from lshmoe_plugin.compressor import LSHCompressor
    compressor = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", cuda_graphs=True), 0)
    with pytest.raises(RuntimeError, match=r"cuda_graphs=true needs the fused kernels on a CUDA device.*'auto' or "
                                           r"false"):
        compressor.compress_fixed(torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool))
    # 'auto' runs the reference there, eagerly
    auto = LSHCompressor(LSHMoEConfig(enabled=True, method="paper"), 0)
    assert auto.compress_fixed(torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool))[1].graphed is None


@pytest.mark.parametrize("shape, dtype, replays", [
    ((40960, 2048), torch.bfloat16, True),    # 168 MB: graphs measured 1.20x eager per layer
    ((16384, 4096), torch.bfloat16, True),    # 134 MB: 1.36x
    ((40960, 4096), torch.bfloat16, False),   # 336 MB: 0.77x, eager is faster
    ((40960, 2048), torch.float32, False),    # not measured: the same rows in fp32, twice the bytes to copy
])
def test_auto_replays_graphs_only_up_to_the_measured_size(shape, dtype, replays):
    from lshmoe_plugin.compressor import AUTO_MAX_TOKEN_BYTES, replay_pays_off
    # The bound lies between the largest layer measured faster with graphs and the smallest measured slower.
    assert 40960 * 2048 * 2 <= AUTO_MAX_TOKEN_BYTES < 40960 * 4096 * 2
    assert replay_pays_off(torch.empty(shape, dtype=dtype, device="meta")) is replays


def test_missing_block_means_disabled():
    assert not LSHMoEConfig.from_deepspeed_config({"train_batch_size": 8}, env={}).enabled


@pytest.mark.parametrize("word, expected", [("1", True), ("true", True), ("off", False), ("0", False)])
def test_env_var_overrides_enabled(word, expected):
    cfg = LSHMoEConfig.from_deepspeed_config({"lsh_moe": {"enabled": not expected}}, env={ENABLED_ENV_VAR: word})
    assert cfg.enabled is expected


def test_bad_env_value_names_allowed_values():
    with pytest.raises(LSHMoEConfigError, match=r"LSHMOE_ENABLED='maybe'.*allowed values"):
        LSHMoEConfig.from_dict({}, env={ENABLED_ENV_VAR: "maybe"})


@pytest.mark.parametrize("block, message", [
    ({"enabled": True, "method": "paper", "compresion_rate": 0.2},
     r"unknown lsh_moe key\(s\) \['compresion_rate'\]; allowed keys"),
    ({"compression_rate": 0.0}, r"compression_rate must be a number in \(0, 1\], got 0.0"),
    ({"compression_rate": 1.5}, r"compression_rate must be a number in \(0, 1\], got 1.5"),
    ({"compression_rate": -0.1}, r"compression_rate must be a number in \(0, 1\]"),
    ({"compression_rate": "0.2"}, r"compression_rate must be a number in \(0, 1\]"),
    ({"num_hashes": 0}, r"num_hashes must be an integer >= 1, got 0"),
    ({"num_hashes": 2.5}, r"num_hashes must be an integer >= 1"),
    ({"hash_dim": 0}, r"hash_dim must be an integer >= 1"),
    ({"hash_type": "minhash"}, r"hash_type must be one of \['cross_polytope', 'spherical'\], got 'minhash'"),
    ({"kernel": "cuda"}, r"kernel must be one of \['auto', 'torch', 'triton'\]"),
    ({"layers": "some"}, r'layers must be "all" or a list of MoE layer indices'),
    ({"layers": [0, -1]}, r'layers must be "all" or a list of MoE layer indices'),
    ({"enabled": "yes"}, r"enabled must be a bool"),
    ({"error_compensation": 1}, r"error_compensation must be a bool"),
    ({"decide_by_cost": "auto"}, r"decide_by_cost must be a bool"),
    ({"method": "paper", "num_hashes": 20}, r"num_hashes=20 with hash_dim=8 needs 80 bits"),
    ({"telemetry_interval": -1}, r"telemetry_interval must be an integer >= 0"),
    ({"cuda_graphs": "on"}, r"cuda_graphs must be one of \['auto', true, false\], got 'on'"),
    ({"cuda_graphs": 1}, r"cuda_graphs must be one of \['auto', true, false\], got 1"),
    ({"cuda_graphs": True, "kernel": "torch"}, r"cuda_graphs=true .* needs kernel 'auto' or 'triton'"),
])
def test_bad_values_name_the_key_and_what_is_allowed(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict(block, env={})


def test_block_must_be_an_object():
    with pytest.raises(LSHMoEConfigError, match="'lsh_moe' must be a JSON object"):
        LSHMoEConfig.from_deepspeed_config({"lsh_moe": [1, 2]}, env={})


def test_wire_keys_default_to_todays_exchange_and_grads_follow_their_forward():
    cfg = LSHMoEConfig.from_dict({"enabled": True, "method": "paper"}, env={})
    assert (cfg.clustering, cfg.dispatch_dtype, cfg.combine_dtype, cfg.fp8_block_size) == ("lsh", "model", "model",
                                                                                          128)
    assert cfg.wire_dtypes == ("model",) * 4
    cfg = LSHMoEConfig.from_dict({"dispatch_dtype": "fp8_e4m3", "combine_grad_dtype": "fp8_e4m3",
                                  "fp8_block_size": "row"}, env={})
    assert cfg.wire_dtypes == ("fp8_e4m3", "fp8_e4m3", "model", "fp8_e4m3")
    assert LSHMoEConfig.from_dict(cfg.to_dict(), env={}) == cfg
    fp8_only = LSHMoEConfig.from_dict({"enabled": True, "clustering": "none", "dispatch_dtype": "fp8_e4m3",
                                       "compression_rate": 0.2, "seed": 5, "decide_by_cost": True}, env={})
    assert fp8_only.clustering == "none"  # defaults of the clustering keys and keys that still apply are fine


def test_each_scaled_format_has_its_own_block_and_scale_keys():
    cfg = LSHMoEConfig.from_dict({"enabled": True, "method": "paper"}, env={})
    assert (cfg.fp8_scale, cfg.fp4_block_size, cfg.fp4_scale) == ("float32", 32, "e8m0")
    mixed = LSHMoEConfig.from_dict({"dispatch_dtype": "fp8_e4m3", "fp8_scale": "e8m0", "fp8_block_size": 64,
                                    "dispatch_grad_dtype": "fp4_e2m1", "fp4_block_size": "row",
                                    "fp4_scale": "float32"}, env={})
    assert mixed.wire_dtypes == ("fp8_e4m3", "fp4_e2m1", "model", "model")
    assert LSHMoEConfig.from_dict(mixed.to_dict(), env={}) == mixed
    # the defaults spelled out are accepted whatever the crossings use, as fp8_block_size's always were
    LSHMoEConfig.from_dict({"method": "paper", "fp8_block_size": 128, "fp8_scale": "float32", "fp4_block_size": 32,
                            "fp4_scale": "e8m0"}, env={})
    # the default method crosses in both FP6 (forward) and FP4 (gradients): both formats' keys are its to set
    tuned = LSHMoEConfig.from_dict({"enabled": True, "fp6_block_size": 64, "fp4_block_size": 16}, env={})
    assert (tuned.method, tuned.fp6_block_size, tuned.fp4_block_size) == ("fp6_fwd_fp4sr_grad", 64, 16)


def test_grad_rounding_is_a_stage_key_nearest_but_under_the_stochastic_methods():
    """Every method but fp4_sr, fp8_fwd_fp4sr_grad and fp6_fwd_fp4sr_grad (the default) rounds its gradients to
    nearest; stochastic otherwise is a composition, which needs a backward crossing in a scaled format (the stage
    keys left out are the paper's beside a forward stage key, the default method's beside backward ones alone)."""
    assert LSHMoEConfig.from_dict({"enabled": True}, env={}).grad_rounding == "stochastic"  # the default's
    for block in ({"enabled": True, "method": "paper"}, {"enabled": True, "method": "fp8_fwd_fp4_grad"},
                  {"enabled": True, "clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"},
                  {"enabled": True, "grad_rounding": "nearest"}):
        assert LSHMoEConfig.from_dict(block, env={}).grad_rounding == "nearest", block
    for block in ({"enabled": True, "method": "fp4_sr"},
                  {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                   "grad_rounding": "stochastic"},
                  {"combine_grad_dtype": "fp4_e2m1", "grad_rounding": "stochastic"},
                  {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp4_e2m1",
                   "dispatch_grad_dtype": "model", "grad_rounding": "stochastic"}):  # combine's follows its forward
        cfg = LSHMoEConfig.from_dict(block, env={})
        assert cfg.grad_rounding == "stochastic" and LSHMoEConfig.from_dict(cfg.to_dict(), env={}) == cfg
    assert LSHMoEConfig.from_dict({"enabled": True, "clustering": "none", "dispatch_dtype": "fp4_e2m1",
                                   "combine_dtype": "fp4_e2m1", "grad_rounding": "stochastic"},
                                  env={}).method == "fp4_sr"
    # null is left out, as for every stage key: the method's value
    assert LSHMoEConfig.from_dict({"method": "fp4_sr", "grad_rounding": None}, env={}).grad_rounding == "stochastic"


@pytest.mark.parametrize("block, message", [
    ({"grad_rounding": "stochastic_fp4"}, r"lsh_moe.grad_rounding must be one of \['nearest', 'stochastic'\], got "
                                          r"'stochastic_fp4'"),
    ({"method": "fp8", "grad_rounding": "stochastic"},
     r"lsh_moe.grad_rounding='stochastic' contradicts lsh_moe.method='fp8', which sets grad_rounding 'nearest'; "
     r"allowed: leave grad_rounding out, set it to 'nearest', or leave method out and set every stage key yourself"),
    ({"enabled": True, "clustering": "lsh", "grad_rounding": "stochastic"},  # a forward key: the paper's stages
     r"lsh_moe.grad_rounding='stochastic' rounds gradients that cross in \['fp8_e4m3', 'fp4_e2m1', 'fp6_e2m3'\], and "
     r"no backward crossing uses one: nothing would change \(dispatch_grad_dtype and combine_grad_dtype, "
     r".*\['model', 'model'\]\); set one of them to a scaled format, set a method whose gradients round so "
     r"\('fp4_sr', 'fp8_fwd_fp4sr_grad', 'fp6_fwd_fp4sr_grad'\) instead, or leave grad_rounding out \(with no "
     r"method named, a forward stage key given makes the stage keys left out the paper's\)"),
    ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model", "grad_rounding": "stochastic"},
     r"grad_rounding='stochastic' .* no backward crossing uses one"),  # the FP8 forward rounds to nearest anyway
])
def test_bad_grad_rounding_names_the_key_and_what_is_allowed(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict(block, env={})


@pytest.mark.parametrize("block, message", [
    ({"clustering": "kmeans"}, r"clustering must be one of \['lsh', 'none', 'bounded'\], got 'kmeans'"),
    ({"dispatch_dtype": "fp8"}, r"dispatch_dtype must be one of \['model', 'fp8_e4m3', 'fp4_e2m1', 'fp6_e2m3'\], "
                                r"got 'fp8'"),
    ({"combine_dtype": "bf16"}, r"combine_dtype must be one of \['model', 'fp8_e4m3', 'fp4_e2m1', 'fp6_e2m3'\], "
                                r"got 'bf16'"),
    ({"dispatch_grad_dtype": "e5m2"}, r"dispatch_grad_dtype must be null \(as the forward\) or one of \['model', "
                                      r"'fp8_e4m3', 'fp4_e2m1', 'fp6_e2m3'\], got 'e5m2'"),
    ({"combine_dtype": "fp4"}, r"combine_dtype must be one of \['model', 'fp8_e4m3', 'fp4_e2m1', 'fp6_e2m3'\], "
                               r"got 'fp4'"),
    ({"dispatch_dtype": "fp6_e2m3", "fp6_block_size": 0}, r'fp6_block_size must be "row" or an integer >= 1, got 0'),
    ({"fp8_scale": "e8m0"}, r"fp8_scale='e8m0' sets the scales of fp8_e4m3, which no crossing uses"),  # the default
    ({"method": "fp8", "fp6_scale": "float32"}, r"fp6_scale='float32' sets the scales of fp6_e2m3, which no crossing "
                                                r"uses"),
    ({"dispatch_dtype": "fp8_e4m3", "fp8_block_size": 0}, r'fp8_block_size must be "row" or an integer >= 1, got 0'),
    ({"dispatch_dtype": "fp8_e4m3", "fp8_block_size": "block"}, r'fp8_block_size must be "row" or an integer'),
    ({"dispatch_dtype": "fp8_e4m3", "fp8_block_size": True}, r'fp8_block_size must be "row" or an integer'),
    ({"method": "fp4", "fp8_block_size": 64}, r"fp8_block_size=64 sets the scales of fp8_e4m3, which no crossing "
                                              r"uses"),
    ({"dispatch_dtype": "fp4_e2m1", "fp8_block_size": 64}, r"fp8_block_size=64 sets the scales of fp8_e4m3, which no "
                                                          r"crossing uses .*'fp4_e2m1'.*set one of them to 'fp8_e4m3'"),
    ({"dispatch_dtype": "fp8_e4m3", "fp8_scale": "float16"}, r"fp8_scale must be one of \['float32', 'e8m0'\], "
                                                             r"got 'float16'"),
    ({"method": "fp4", "fp8_scale": "e8m0"}, r"fp8_scale='e8m0' sets the scales of fp8_e4m3, which no crossing uses"),
    ({"dispatch_dtype": "fp4_e2m1", "fp4_block_size": 0}, r'fp4_block_size must be "row" or an integer >= 1, got 0'),
    ({"dispatch_dtype": "fp4_e2m1", "fp4_block_size": False}, r'fp4_block_size must be "row" or an integer'),
    ({"dispatch_dtype": "fp4_e2m1", "fp4_scale": "ue8m0"}, r"fp4_scale must be one of \['float32', 'e8m0'\], got "
                                                           r"'ue8m0'"),
    ({"dispatch_dtype": "fp8_e4m3", "fp4_block_size": 16}, r"fp4_block_size=16 sets the scales of fp4_e2m1, which "
                                                           r"no crossing uses"),
    ({"method": "fp8_fwd_fp4sr_grad", "fp6_block_size": 16},  # the default before: FP8/FP4, no FP6 anywhere
     r"fp6_block_size=16 sets the scales of fp6_e2m3, which no crossing uses"),
    ({"dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1", "fp8_block_size": 64},  # over FP6/FP4
     r"fp8_block_size=64 sets the scales of fp8_e4m3, which no crossing uses"),
    ({"clustering": "none", "compression_rate": 0.5},
     r"compression_rate=0.5 belongs to LSH clustering, which clustering 'none' turns off; allowed with clustering "
     r"'none': compression_rate 0.2"),
    ({"clustering": "none", "error_compensation": False}, r"error_compensation=False belongs to LSH clustering"),
    ({"clustering": "none", "exact_token_stride": 8}, r"exact_token_stride=8 belongs to LSH clustering"),
    ({"clustering": "none", "output_error_interval": 10}, r"output_error_interval=10 belongs to LSH clustering"),
])
def test_bad_wire_values_name_the_key_and_what_is_allowed(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict(block, env={})


def test_bounded_merging_keys():
    cfg = LSHMoEConfig.from_dict({"enabled": True, "clustering": "bounded"}, env={})
    assert (cfg.clustering, cfg.merge_tolerance) == ("bounded", 0.1)
    cfg = LSHMoEConfig.from_dict({"clustering": "bounded", "merge_tolerance": 0.05, "num_hashes": 4, "hash_dim": 4,
                                  "hash_type": "spherical", "seed": 3, "compression_rate": 0.1,
                                  "error_compensation": False, "dispatch_dtype": "fp8_e4m3",
                                  "output_error_interval": 10, "redraw_interval": 5}, env={})
    assert cfg.merge_tolerance == 0.05 and LSHMoEConfig.from_dict(cfg.to_dict(), env={}) == cfg
    assert LSHMoEConfig.from_dict({"clustering": "bounded", "merge_tolerance": 1e-9}, env={}).merge_tolerance == 1e-9


@pytest.mark.parametrize("block, message", [
    ({"clustering": "bounded", "merge_tolerance": 0}, r"merge_tolerance must be a number in \(0, 1\), got 0"),
    ({"clustering": "bounded", "merge_tolerance": 1.0}, r"merge_tolerance must be a number in \(0, 1\), got 1.0"),
    ({"clustering": "bounded", "merge_tolerance": "0.1"}, r"merge_tolerance must be a number in \(0, 1\)"),
    ({"clustering": "bounded", "merge_tolerance": True}, r"merge_tolerance must be a number in \(0, 1\)"),
    ({"method": "paper", "merge_tolerance": 0.2}, r"merge_tolerance=0.2 belongs to clustering 'bounded', got "
                                                  r"clustering 'lsh'"),
    ({"clustering": "none", "merge_tolerance": 0.2}, r"merge_tolerance=0.2 belongs to clustering 'bounded', got "
                                                     r"clustering 'none'"),
    ({"clustering": "bounded", "refine_iterations": 2},
     r"refine_iterations=2 is not supported with clustering 'bounded'; allowed there: refine_iterations 0"),
    ({"clustering": "bounded", "residual_map": "linear"},
     r"residual_map='linear' is not supported with clustering 'bounded'; allowed there: residual_map 'identity'"),
    ({"clustering": "bounded", "exact_token_stride": 8}, r"exact_token_stride=8 is not supported with clustering "
                                                         r"'bounded'"),
    ({"clustering": "bounded", "decide_by_cost": True}, r"decide_by_cost=True is not supported with clustering "
                                                        r"'bounded'; allowed there: decide_by_cost False"),
    ({"clustering": "bounded", "cuda_graphs": True}, r"cuda_graphs=true is not supported with clustering 'bounded'"),
])
def test_bounded_merging_refuses_by_name(block, message):
    with pytest.raises(LSHMoEConfigError, match=message):
        LSHMoEConfig.from_dict(block, env={})
