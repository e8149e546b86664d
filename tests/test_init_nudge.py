"""The quality study's null control (`--init_nudge`, lshmoe_pretrain.training.nudge_initial_weights): a run that
differs from its seed's run only in its initial weights' last digits. Off, nothing is touched; on, every weight
moves by about the relative size asked, the global generator (data order, gate draws) is not advanced, and the
replicated parameters of a 2-rank EP=2 model stay equal across ranks."""
import os

import pytest
import torch
from distributed import run_distributed

from lshmoe_pretrain import quality_study as study
from lshmoe_pretrain import training
from lshmoe_pretrain.models import ModelConfig, build_gpt_moe

CONFIG = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2, d_ff=48, num_experts=4, top_k=2)


def built(seed=3):
    torch.manual_seed(seed)
    return build_gpt_moe(CONFIG, ep_size=1)


def state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_off_touches_nothing_and_on_moves_every_weight_by_about_its_size():
    before = torch.get_rng_state()
    plain, untouched, nudged = built(), built(), built()
    reference = state(plain)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    training.nudge_initial_weights(untouched, 0.0, seed=1)
    training.nudge_initial_weights(nudged, 1e-3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "the nudge advanced the global generator"
    for name, p in untouched.named_parameters():
        assert torch.equal(p, reference[name]), name
    ratios = torch.cat([(p / reference[name]).flatten()[reference[name].flatten() != 0] - 1
                        for name, p in nudged.named_parameters()])
    assert ratios.std().item() == pytest.approx(1e-3, rel=0.05)
    assert ratios.abs().max().item() < 1e-2 and (ratios != 0).float().mean().item() > 0.99
    zeros = torch.cat([p.flatten()[reference[name].flatten() == 0] for name, p in nudged.named_parameters()])
    assert torch.count_nonzero(zeros) == 0  # multiplicative: a zero bias stays zero
    torch.set_rng_state(before)


def test_the_same_seed_nudges_alike_and_another_seed_differently():
    first, again, other = built(), built(), built()
    training.nudge_initial_weights(first, 1e-3, seed=1)
    training.nudge_initial_weights(again, 1e-3, seed=1)
    training.nudge_initial_weights(other, 1e-3, seed=2)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c) or torch.count_nonzero(a) == 0, name


def nudge_at_ep2(rank, world_size):
    torch.manual_seed(3)
    model = build_gpt_moe(CONFIG, ep_size=world_size)
    training.nudge_initial_weights(model, 1e-3, seed=5)
    # numpy, not tensors: a tensor goes back through the queue as a shared-memory handle of a process that has ended
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def test_replicated_parameters_stay_replicated_across_ranks():
    """At EP=2 each rank holds other experts but the same attention, embeddings and gates: their nudged values must
    be equal on both ranks (data parallelism assumes it), and no rank's parameters may be left unnudged."""
    ranks = [{name: torch.from_numpy(value) for name, value in rank.items()}
             for rank in run_distributed(nudge_at_ep2, 2)]
    torch.manual_seed(3)
    plain = dict(build_gpt_moe(CONFIG, ep_size=1).named_parameters())
    shared = [name for name in ranks[0] if "expert" not in name]
    assert shared and len(shared) < len(ranks[0])
    checked = 0
    for name in shared:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        if name in plain and torch.count_nonzero(plain[name]):
            assert not torch.equal(ranks[0][name], plain[name]), name
            checked += 1
    assert checked > len(shared) // 2


def test_the_null_controls_are_stock_with_the_nudge_and_nothing_else():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = study.StudyPlan("gpt", "tiny", ["stock", "stock_nudge", "stock_lr2x_nudge"], [1], 10**5, "unused",
                           os.path.join(root, "configs", "gpt_moe_cpu.json"), lr=1e-3)
    for name, scale in (("stock_nudge", 1.0), ("stock_lr1.5x_nudge", 1.5), ("stock_lr2x_nudge", 2.0)):
        assert study.init_nudge(name) == study.NULL_NUDGE and study.lr_scale(name) == scale
        assert study.is_study_only(name)
        assert study.deepspeed_config(plan, name)["lsh_moe"] == study.deepspeed_config(plan, "stock")["lsh_moe"]
    command = study.launch_command(plan, "stock_nudge", 1, "config.json", 29500)
    assert command[command.index("--init_nudge") + 1] == repr(study.NULL_NUDGE)
    assert "--init_nudge" not in study.launch_command(plan, "stock", 1, "config.json", 29500)
    assert [v for v in study.VARIANTS if study.init_nudge(v)] == ["stock_nudge", "stock_lr1.5x_nudge",
                                                                 "stock_lr2x_nudge"]


def test_a_bad_nudge_is_refused_by_name():
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            training.parse_args("gpt", ["--deepspeed_config", "configs/gpt_moe_cpu.json", "--init_nudge", bad])
