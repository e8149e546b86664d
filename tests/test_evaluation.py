"""Validation in the pretraining loop: the same tokens and the same gate draws at every evaluation, weighted per
token, and training's random state untouched."""
import argparse

import pytest
import torch
from distributed import run_distributed

from lshmoe_pretrain import training
from lshmoe_pretrain.data import EvalBatches, GPTSamples
from lshmoe_pretrain.models import build_gpt_moe


def check_evaluation(rank, world_size):
    import deepspeed
    torch.manual_seed(0)
    model = build_gpt_moe("tiny", top_k=2, vocab_size=64, seq_len=16)  # top-2 samples its 2nd expert in eval too
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-3,
                                                                                           "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    stream = torch.randint(0, 64, (16 * 17 * 10,), generator=torch.Generator().manual_seed(1)).numpy()
    valid = EvalBatches(GPTSamples(stream, 16), num_samples=10, micro_batch=4, dp_rank=0, dp_size=1)
    torch.manual_seed(99)
    first = training.evaluate(engine, valid)
    after_first = torch.rand(3)
    torch.manual_seed(99)
    second = training.evaluate(engine, valid)
    after_second = torch.rand(3)
    torch.manual_seed(99)
    untouched = torch.rand(3)
    # by hand: the batches' mean losses weighted by their tokens (4, 4 and 2 samples), draws seeded per batch
    engine.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(len(valid)):
            batch = valid.get(i)
            torch.manual_seed(training.EVAL_SEED + i)
            engine(batch["input_ids"], batch["labels"])
            total += float(engine.module.last_lm_loss) * batch["labels"].numel()
            tokens += batch["labels"].numel()
    return first, second, torch.equal(after_first, untouched) and torch.equal(after_second, untouched), \
        total / tokens, len(valid)


def test_evaluation_is_repeatable_token_weighted_and_leaves_the_training_rng_alone():
    [(first, second, rng_untouched, by_hand, batches)] = run_distributed(check_evaluation, 1)
    assert batches == 3 and first == second and rng_untouched
    assert first == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("argv, final, expected", [
    (["--eval_tokens", "1000"], False, 63),           # ceil(1000 / 16) samples
    (["--eval_tokens", "1e9"], False, 100),           # capped at the split
    (["--eval_iters", "2"], False, 8),                # 2 batches of 4
    ([], True, 100),                                  # the final point: the whole split
    (["--final_eval_tokens", "320"], True, 20),
])
def test_eval_samples(argv, final, expected):
    args = argparse.Namespace(eval_tokens=training.EVAL_TOKENS, final_eval_tokens=0, eval_iters=None,
                              model_kind="gpt")
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(args, flag[2:], int(value) if flag == "--eval_iters" else float(value))
    valid = GPTSamples(torch.zeros(17 * 100, dtype=torch.int64).numpy(), 16)
    assert training.eval_samples(args, valid, micro_batch=4, world=1, final=final) == expected
