"""Patched vs stock Megatron-core `MoEAlltoAllTokenDispatcher` on the same layer, in 1 and 2 real gloo processes.

Megatron-core needs CUDA in a few places that do no arithmetic (buffer placement, a DtoH side stream);
`lshmoe_plugin.patches.megatron_compat` answers them for the CPU so these tests run on a CPU-only torch.
Each world size is spawned once (module fixture) and every scenario runs inside it; the tests then check the
per-rank results.
"""
import types

import megatron.core  # noqa: E402,F401  (installed by the README's [test] extra)
import megatron_helpers as helpers  # noqa: E402
import pytest
import torch
from distributed import run_distributed  # noqa: E402
from megatron_helpers import compare_patched_and_stock, enabled  # noqa: E402

import lshmoe_plugin  # noqa: E402
from lshmoe_plugin.patches import megatron_dispatcher  # noqa: E402
from lshmoe_plugin.patches.versioning import UnsupportedFrameworkError  # noqa: E402


def scenarios(rank, world_size):
    from megatron.core import parallel_state

    from lshmoe_plugin.patches import megatron_compat
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    try:
        return compare_patched_and_stock(rank, world_size, torch.device("cpu"))
    finally:
        megatron_dispatcher.revert()
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def results(request):
    return request.param, run_distributed(scenarios, request.param)


def test_rate_one_matches_stock_outputs_and_grads(results):
    helpers.check_rate_one_matches_stock_outputs_and_grads(*results)


def test_identity_expert_with_error_compensation_is_exact(results):
    helpers.check_identity_expert_with_error_compensation_is_exact(*results)


def test_disabled_unselected_eval_and_reverted_are_bit_identical(results):
    helpers.check_disabled_unselected_eval_and_reverted_are_bit_identical(*results)


def test_bytes_sent_shrink_with_the_rate(results):
    helpers.check_bytes_sent_shrink_with_the_rate(*results)


def test_probs_on_input_and_capacity_dropping_are_exact_at_rate_one(results):
    helpers.check_probs_on_input_and_capacity_dropping_are_exact_at_rate_one(*results)


def test_experts_with_biases_match_stock(results):
    helpers.check_experts_with_biases_match_stock(*results)


def test_unsupported_settings_fail_loudly(results):
    helpers.check_unsupported_settings_fail_loudly(*results)


# -- in-process checks ------------------------------------------------------------------------------------------
@pytest.fixture
def clean_patch():
    megatron_dispatcher.revert()
    yield
    megatron_dispatcher.revert()


def test_apply_and_revert_are_idempotent_and_restore_the_originals(clean_patch):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as D
    originals = (MoELayer.forward, D.dispatch_preprocess, D.combine_postprocess)
    megatron_dispatcher.apply(enabled())
    megatron_dispatcher.apply(enabled(compression_rate=0.1))
    assert megatron_dispatcher.is_applied() and D.dispatch_preprocess is not originals[1]
    megatron_dispatcher.revert()
    megatron_dispatcher.revert()
    assert (MoELayer.forward, D.dispatch_preprocess, D.combine_postprocess) == originals


def test_enable_reads_the_deepspeed_style_block(clean_patch):
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.1}},
                         framework="megatron")
    assert megatron_dispatcher.is_applied()
    lshmoe_plugin.enable({"lsh_moe": {"enabled": False}}, framework="megatron")
    assert not megatron_dispatcher.is_applied()


def test_unsupported_release_is_refused(clean_patch, monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.13.1")
    with pytest.raises(UnsupportedFrameworkError, match=r"supports megatron-core 0.16.x, 0.19.x; found .* 0.13.1"):
        megatron_dispatcher.apply(enabled())
    assert not megatron_dispatcher.is_applied()


# Layer numbers are 1-based and count every layer; the index counts only the MoE layers before this one.
@pytest.mark.parametrize("freq, number, expected", [(1, 1, 0), (1, 4, 3), (2, 5, 2), (2, 7, 3), ([0, 1, 0, 1], 4, 1),
                                                    ([0, 1, 0, 1], 2, 0)])
def test_moe_layer_index_counts_moe_layers_across_the_whole_model(freq, number, expected):
    num_layers = 8 if isinstance(freq, int) else len(freq)
    layer = types.SimpleNamespace(layer_number=number,
                                  config=types.SimpleNamespace(moe_layer_freq=freq, num_layers=num_layers))
    assert megatron_dispatcher.moe_layer_index(layer) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims install only without CUDA")
def test_compat_shims_install_and_revert_cleanly():
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as D

    from lshmoe_plugin.patches import megatron_compat
    before = (torch.cuda.current_device, D._maybe_dtoh_and_synchronize, D.cuda_dtoh_stream,
              random._CUDA_RNG_STATE_TRACKER, hasattr(moe_utils, "te_general_gemm"))
    try:
        assert megatron_compat.apply() and megatron_compat.apply()
        assert torch.cuda.current_device() == torch.device("cpu") and moe_utils.te_general_gemm is None
        with random.get_cuda_rng_tracker().fork():  # no CUDA generator is touched
            pass
    finally:
        megatron_compat.revert()
        megatron_compat.revert()
    assert (torch.cuda.current_device, D._maybe_dtoh_and_synchronize, D.cuda_dtoh_stream,
            random._CUDA_RNG_STATE_TRACKER, hasattr(moe_utils, "te_general_gemm")) == before
