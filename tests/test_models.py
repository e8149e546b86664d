"""GPT-MoE and T5-MoE on DeepSpeed's MoE layer: shapes and presets, then a few expert-parallel steps on 2 real
gloo ranks with the LSH-MoE patch on and off, on batches of the default (real text) corpus."""
import math

import pytest
import torch
from distributed import run_distributed

from lshmoe_pretrain.models import PRESETS, ModelConfig, build_gpt_moe, build_t5_moe, resolve_config

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lshmoe_pretrain.data import cached_preprocess
    prepared = cached_preprocess(vocab_size=2048, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return prepared.prefix, prepared.tokenizer_path


def test_moe_ffn_in_every_other_block():
    from deepspeed.moe.layer import MoE
    gpt = build_gpt_moe("tiny")
    assert [b.ffn.moe is not None for b in gpt.blocks] == [False, True, False, True]
    t5 = build_t5_moe("tiny")
    assert sum(isinstance(m, MoE) for m in t5.modules()) == 2 * (PRESETS["tiny"].n_layers // 2)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="top_k=3"):
        ModelConfig(top_k=3)
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        build_gpt_moe("tiny", ep_size=3)
    assert resolve_config("tiny", vocab_size=123).vocab_size == 123


def _train_few_steps(rank, world_size, kind, lsh_enabled, prefix, tokenizer_path):
    import deepspeed

    import lshmoe_plugin
    from lshmoe_plugin.patches import deepspeed_moe
    from lshmoe_pretrain.data import Batches, GPTSamples, IndexedDataset, T5Samples, load_tokenizer, special_ids
    torch.set_num_threads(1)  # two ranks on a 2-core runner: more threads only fight over the cores
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_path)
    special = special_ids(tokenizer)
    config = resolve_config("tiny", vocab_size=tokenizer.get_vocab_size(), seq_len=64)
    stream = IndexedDataset(prefix).tokens
    if kind == "gpt":
        model, samples = build_gpt_moe(config, ep_size=world_size), GPTSamples(stream, 64)
    else:
        model = build_t5_moe(config, ep_size=world_size, decoder_start_id=special["pad"])
        samples = T5Samples(stream, 64, special["sentinels"], special["eos"])
    ds_config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 6,
                 "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
                 "lsh_moe": {"enabled": lsh_enabled, "method": "paper", "compression_rate": 0.2,
                             "num_hashes": 6}}
    lshmoe_plugin.enable(ds_config, model)
    assert deepspeed_moe.is_applied() == lsh_enabled
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batches = Batches(samples, 4, 1, rank, world_size, seed=0)
    losses = []
    for step in range(STEPS):
        batch = batches.get(step % 2)  # two batches seen repeatedly: the loss must fall within a few steps
        loss = engine(batch["input_ids"], batch["labels"])
        engine.backward(loss)
        engine.step()
        losses.append(model.last_lm_loss.item())
    summary = lshmoe_plugin.TELEMETRY.summary()
    lshmoe_plugin.disable()
    return losses, summary


@pytest.mark.parametrize("kind", ["gpt", "t5"])
@pytest.mark.parametrize("lsh_enabled", [True, False], ids=["lsh_on", "lsh_off"])
def test_expert_parallel_steps(kind, lsh_enabled, corpus):
    for rank, (losses, summary) in enumerate(run_distributed(_train_few_steps, 2, kind, lsh_enabled, *corpus)):
        assert all(math.isfinite(x) for x in losses), rank
        assert losses[0] > math.log(2048) - 1.0, rank  # starts near uniform over the vocabulary
        assert min(losses[-2:]) < losses[0] - 0.5, (rank, losses)
        if lsh_enabled:
            moe_layers = 2 if kind == "gpt" else 4
            assert {k for k in summary if k.endswith("/bytes_ratio")} == \
                {f"lsh_moe/layer{i}/bytes_ratio" for i in range(moe_layers)} | {"lsh_moe/mean/bytes_ratio"}, rank
            assert summary["lsh_moe/mean/bytes_ratio"] < 0.3, rank
        else:
            assert summary == {}, rank
