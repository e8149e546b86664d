"""Captures of the MoE dispatch (lshmoe_pretrain.capture): the files hold what DeepSpeed's real layer sends to its
experts (checked against the experts' own input, with one rank and with expert parallelism), the experts rebuild
exactly, capturing leaves training bit for bit as it was, and bad flags are refused by name."""
import argparse
import os
import re

import pytest
import torch
from distributed import run_distributed
from test_pretrain import metrics, pretrain

from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_pretrain import capture
from lshmoe_pretrain.models import build_gpt_moe
from lshmoe_pretrain.models.config import ModelConfig
from lshmoe_pretrain.models.layers import MLP


def capture_args(output_dir, **overrides):
    values = dict(capture_at=[1.0], capture_layers=None, capture_experts=capture.DEFAULT_EXPERTS,
                  capture_slots=capture.DEFAULT_SLOTS, train_steps=1, output_dir=str(output_dir), model_kind="gpt",
                  preset="test", seed=7, data="synthetic", data_prefix=None, ep_size=1, diagnostic="",
                  lsh=LSHMoEConfig())
    values.update(overrides)
    return argparse.Namespace(**values)


def test_capture_steps_are_fractions_of_the_schedule():
    assert capture.capture_steps([0.1, 0.5, 1.0], 3663) == {366: 0.1, 1832: 0.5, 3663: 1.0}
    assert capture.capture_steps(None, 10) == {}
    for fractions, message in (([0.0], "--capture_at 0.0: fractions of the schedule must be in (0, 1]"),
                               ([1.5], "--capture_at 1.5"), ([0.01], "--capture_at 0.01 is step 0 of 10"),
                               ([0.5, 0.52], "--capture_at 0.5 and 0.52 are both step 5 of 10")):
        with pytest.raises(capture.CaptureConfigError, match=re.escape(message)):
            capture.capture_steps(fractions, 10)
    for flag, overrides in (("--capture_experts", {"capture_experts": 0}), ("--capture_slots", {"capture_slots": -1}),
                            ("--capture_layers", {"capture_layers": [0, -1]})):
        with pytest.raises(capture.CaptureConfigError, match=flag):
            capture.check_counts(capture_args("unused", **overrides))


def test_first_filled_keeps_the_first_filled_slots_in_order():
    tokens = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1) + 1
    valid = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    got, kept, position = capture.first_filled(tokens * valid.unsqueeze(-1), valid, 2)
    assert got.squeeze(-1).tolist() == [[1.0, 3.0], [10.0, 0.0]]
    assert kept.tolist() == [[True, True], [True, False]]
    assert position.tolist() == [[0, 2], [4, -1]]
    wide, _, _ = capture.first_filled(tokens, valid, 99)  # never wider than the capacity
    assert wide.shape == (2, 5, 1)


def check_capture_matches_the_experts_input(rank, world_size, output_dir):
    """Two micro-batches of a real GPT-MoE, armed, each with its backward (gradient accumulation): every captured row
    is the row rank 0 sent its expert in the first one (the experts' input after the all-to-all, source rank 0),
    padding is exactly the slots the layer left empty, the rebuilt experts compute what the layer's experts compute,
    and output_grads are that micro-batch's gradient of the loss w.r.t. the experts' output in those slots (autograd's
    own `.grad` of the output, kept by a hook of the test's). A gradient-free forward of the same step is not
    captured, and the second micro-batch overwrites nothing."""
    config = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=4, d_ff=48, num_experts=4,
                         top_k=2)
    torch.manual_seed(3)
    model = build_gpt_moe(config, ep_size=world_size)
    for module in model.modules():
        if hasattr(module, "set_deepspeed_parallelism"):
            module.set_deepspeed_parallelism()
    local = 4 // world_size
    args = capture_args(output_dir, capture_experts=local, capture_slots=9, ep_size=world_size)
    capturer = capture.Capturer(model, args, rank)
    received, outputs = {}, {}

    def keep_input(module, inputs, i):  # the first with gradients; returns None, which keeps the input as it is
        if torch.is_grad_enabled():
            received.setdefault(i, inputs[0].detach().clone())

    def keep_output(module, inputs, output, i):
        if output.requires_grad:
            output.retain_grad()
            outputs.setdefault(i, []).append(output)

    for index, layer in enumerate(capture.moe_layers(model)):
        layer.experts.register_forward_pre_hook(lambda m, inputs, i=index: keep_input(m, inputs, i))
        layer.experts.register_forward_hook(lambda m, inputs, output, i=index: keep_output(m, inputs, output, i))
    armed = capturer.arm(1)
    assert armed == (rank == 0)
    with torch.no_grad():
        model(torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(rank + 10)))
    for micro in range(2):
        model(torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(rank + 100 * micro))).backward()
    if rank != 0:
        return None
    paths = capturer.save(1)
    layers = capture.moe_layers(model)
    assert not capturer.arm(2) and not any(layer.gate._forward_hooks for layer in layers)  # other steps: no hooks
    assert not any(len(layer.experts._forward_hooks) > 1 for layer in layers)  # only the test's own stays
    assert [os.path.basename(p) for p in paths] == ["step1_layer0.pt", "step1_layer1.pt"]
    checks = []
    for index, path in enumerate(paths):
        saved = capture.load(path)
        first, second = (out.grad for out in outputs[index])  # (ep_size, local, C, d) of each micro-batch
        for e in range(local):
            sent = received[index][0, e]                       # (C, d): what rank 0 dispatched to expert e
            filled = sent.abs().sum(-1) != 0                    # the encode leaves empty slots zero
            valid = saved["valid"][e]
            rows = saved["slot"][e][valid].long()
            checks.append(torch.equal(saved["tokens"][e][valid], sent[rows].to(torch.bfloat16)))
            checks.append(int(saved["filled"][e]) == int(filled.sum()) and bool(filled[rows].all()))
            checks.append(rows.tolist() == filled.nonzero().squeeze(-1)[:9].tolist())
            grads = saved["output_grads"][e]
            checks.append(torch.equal(grads[valid], first[0, e][rows]) and not grads[~valid].any())
            checks.append(bool(grads[valid].abs().sum(-1).gt(0).all()))  # every real slot carries a gradient
            checks.append(not torch.equal(grads[valid], second[0, e][rows]))  # not the later micro-batch's
            layer_expert = capture.moe_layers(model)[index].experts.deepspeed_experts[e]
            rebuilt = capture.rebuild_experts(saved)[e]
            with torch.no_grad():
                checks.append(torch.equal(rebuilt(sent), layer_expert(sent)))
        checks.append(saved["capacity"] == received[index].shape[2] and saved["layer"] == index)
        checks.append(saved["provenance"]["step"] == 1 and saved["provenance"]["ep_size"] == world_size)
        checks.append(saved["output_grads"].dtype == torch.float32)
        checks.append("unscaled" in saved["provenance"]["output_grads"])
    return checks


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_capture_is_what_the_experts_receive(tmp_path, world_size):
    results = run_distributed(check_capture_matches_the_experts_input, world_size, str(tmp_path))
    assert results[0] and all(results[0]), results[0]


class OneLayer(torch.nn.Module):
    def __init__(self, config, ep_size=1):
        super().__init__()
        from lshmoe_pretrain.models.layers import FeedForward
        self.config, self.ffn = config, FeedForward(config, moe=True, ep_size=ep_size)


def check_capture_sizes(rank, world_size, output_dir):
    """The default capture of the `small` shape (d_model 256) stays under 10 MB in bf16 (tokens, output gradients
    and weights); at d_model 512 three bf16 experts do not fit the file limit and the refusal names the flag and
    what fits."""
    small = OneLayer(ModelConfig(d_model=256, n_heads=8, d_ff=1024, num_experts=8)).to(torch.bfloat16)
    small_bytes = capture.projected_file_bytes(capture.moe_layers(small)[0], capture.DEFAULT_EXPERTS,
                                               capture.DEFAULT_SLOTS)
    wide = OneLayer(ModelConfig(d_model=512, n_heads=8, d_ff=2048, num_experts=8)).to(torch.bfloat16)
    try:
        capture.Capturer(wide, capture_args(output_dir), rank)
        refusal = None
    except capture.CaptureConfigError as error:
        refusal = str(error)
    fits = capture.Capturer(wide, capture_args(output_dir, capture_experts=2), rank)
    try:
        capture.Capturer(wide, capture_args(output_dir, capture_layers=[1]), rank)
        wrong_layer = None
    except capture.CaptureConfigError as error:
        wrong_layer = str(error)
    return small_bytes, refusal, fits.chosen, wrong_layer


def test_capture_files_stay_small_or_are_refused_by_name(tmp_path):
    [(small_bytes, refusal, chosen, wrong_layer)] = run_distributed(check_capture_sizes, 1, str(tmp_path))
    assert small_bytes < 10e6, small_bytes
    assert refusal is not None and "--capture_experts 4 --capture_slots 1024" in refusal and \
        "allowed here: --capture_experts <= 2" in refusal, refusal
    assert chosen == [0]  # one MoE layer: the first and the last are the same
    assert wrong_layer == "--capture_layers [1]: the model has 1 MoE layers; allowed: 0..0"


def test_capturing_leaves_training_unchanged(tmp_path, cache_dir):
    """The real entry point, 2 ranks (EP=2): the same losses to the bit with and without captures (the gradient hook
    of step 2 leaves steps 3 and 4 as they were), and the files of every capture step and default layer, holding the
    experts rank 0 owns and their output gradients."""
    common = ("--train_steps", "4", "--eval_interval", "0")
    pretrain("pretrain_gpt_moe.py", tmp_path / "plain", cache_dir, *common, config="configs/gpt_moe_cpu.json")
    pretrain("pretrain_gpt_moe.py", tmp_path / "captured", cache_dir, *common, "--capture_at", "0.5", "1.0",
             "--capture_experts", "2", "--capture_slots", "64", config="configs/gpt_moe_cpu.json")
    assert [r["loss"] for r in metrics(tmp_path / "captured")] == [r["loss"] for r in metrics(tmp_path / "plain")]
    files = sorted(os.listdir(tmp_path / "captured" / "captures"))
    assert files == ["step2_layer0.pt", "step2_layer1.pt", "step4_layer0.pt", "step4_layer1.pt"]
    saved = capture.load(str(tmp_path / "captured" / "captures" / "step4_layer1.pt"))
    assert saved["tokens"].dtype == torch.bfloat16 and saved["tokens"].shape[:2] == (2, 64)
    grads = saved["output_grads"]  # fp32 model: fp32 gradients, zero on padding, nonzero on real slots
    assert grads.dtype == torch.float32 and grads.shape == saved["tokens"].shape
    assert not grads[~saved["valid"]].any() and grads[saved["valid"]].abs().sum(-1).gt(0).all()
    assert saved["provenance"]["output_grads_loss_scale"] == 1.0
    assert saved["provenance"]["train_steps"] == 4 and saved["provenance"]["preset"] == "tiny"
    assert isinstance(capture.rebuild_experts(saved)[1], MLP)
    refused = pretrain("pretrain_gpt_moe.py", tmp_path / "refused", cache_dir, "--capture_at", "1.0",
                       "--capture_layers", "2", nprocs=0, config="configs/gpt_moe_cpu.json", check=False)
    assert refused.returncode != 0 and "--capture_layers [2]: the model has 2 MoE layers" in refused.stderr


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))
