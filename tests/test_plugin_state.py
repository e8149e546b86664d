"""The plugin's per-layer state through checkpoints (lshmoe_plugin.plugin_state): each compressor's forward count,
the slot budget of clustering "bounded" and the decide_by_cost decision, and the draw counters of the gradients'
stochastic rounding (the default method's). By hand (`state_dict` / `load_state_dict`) and through DeepSpeed's own
``save_checkpoint`` / ``load_checkpoint`` in 2 real gloo processes: a resumed run continues as the uninterrupted
one, and one resumed from a checkpoint without the state (an older one) does not."""
import logging
import os
import shutil

import pytest
import torch
from distributed import run_distributed
from test_bounded_merging import make_compressor, near_copies
from test_deepspeed_patch import D_MODEL, build_moe, failed

import lshmoe_plugin
from lshmoe_plugin import cost, wire
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.plugin_state import NO_DRAWS, STATE_KEY, LSHMoEStateError
from lshmoe_plugin.rounding import DrawCounters
from lshmoe_plugin.schedule import set_training_step
from lshmoe_plugin.slot_budget import SlotBudget

# Error-bounded merging with coarse hashes and a loose tolerance, so that the near-copies below merge and the slots
# a step sends follow the last step's need (fewer than the capacity); samples at forwards 1, 4 (residual norm) and
# 1, 5 (output error), so a count restarted at a resume after step 2 samples at other steps.
BOUNDED = {"enabled": True, "clustering": "bounded", "merge_tolerance": 0.3, "num_hashes": 2, "hash_dim": 2,
           "telemetry_interval": 3, "output_error_interval": 4}
SAMPLED = ("relative_residual_norm", "output_error")
# The default method (FP8 forward, FP4 gradients rounded stochastically): what a bare block trains.
DEFAULT = {"enabled": True}


@pytest.fixture(autouse=True)
def clock_from_zero():
    set_training_step(0)
    yield
    set_training_step(0)


class Lines(logging.Handler):
    """The lshmoe_plugin logger's lines, while in a `with` block."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))

    def __enter__(self):
        logging.getLogger("lshmoe_plugin").addHandler(self)
        logging.getLogger("lshmoe_plugin").setLevel(logging.INFO)
        return self.lines

    def __exit__(self, *exc):
        logging.getLogger("lshmoe_plugin").removeHandler(self)


# -- one compressor ------------------------------------------------------------------------------------------------
def test_slot_budget_round_trip_keeps_the_need_the_step_and_its_pending_need():
    budget = SlotBudget(0.2)
    budget.slots(40, step=0)
    budget.record(torch.tensor(12))
    budget.slots(40, step=1)  # takes 12
    budget.record(torch.tensor(20))  # step 1's need so far
    state = budget.state_dict()
    assert state == {"need": 12, "step": 1, "pending": 20}
    copy = SlotBudget(0.2)
    copy.load_state_dict(state)
    for b in (budget, copy):  # the same step goes on recording into the pending need, the next takes it
        b.record(torch.tensor(15))
    assert copy.slots(40, step=1) == budget.slots(40, step=1) == 14
    assert copy.slots(40, step=2) == budget.slots(40, step=2) == 22  # ceil(20 * 1.1) to a multiple of 2
    copy.load_state_dict(None)
    assert copy.slots(40, step=3) == 40 and copy.state_dict() == {"need": None, "step": 3, "pending": None}


def test_compressor_round_trip_continues_its_samples_and_slots():
    """A compressor restored from another's state compresses the next step as that one does: the same slots, the
    same forward count and so the same sampled statistics; a fresh one sends every token (S = capacity)."""
    x, valid = near_copies(fill=(40, 40, 40, 40), copies=8, noise=1e-3)
    first = make_compressor(compression_rate=0.2, telemetry_interval=2)
    first.compress_fixed(x, valid)
    set_training_step(1)
    restored, fresh = make_compressor(compression_rate=0.2, telemetry_interval=2), make_compressor(
        compression_rate=0.2, telemetry_interval=2)
    restored.load_state_dict(first.state_dict())
    assert restored.state_dict() == first.state_dict() and first.state_dict()["forwards"] == 1
    got = {name: c.compress_fixed(x, valid) for name, c in (("first", first), ("restored", restored),
                                                              ("fresh", fresh))}
    assert torch.equal(got["first"][0], got["restored"][0]) and got["first"][0].shape[1] < 40
    assert got["fresh"][0].shape[1] == 40
    stats = {name: c.telemetry.latest[0] for name, c in (("first", first), ("restored", restored), ("fresh", fresh))}
    assert stats["first"].step == stats["restored"].step == 2 and stats["fresh"].step == 1
    # telemetry_interval 2 samples forwards 1, 3, ...: not the second one, which the fresh compressor counts as 1
    assert stats["first"].relative_residual is None and stats["restored"].relative_residual is None
    assert stats["fresh"].relative_residual is not None


def test_settings_compare_key_by_key_and_a_key_the_saving_version_lacked_as_its_default():
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.plugin_state import changed_settings
    config = LSHMoEConfig(**BOUNDED)
    saved = config.to_dict()
    assert changed_settings(saved, config) == {}
    assert changed_settings({**saved, "compress_in_eval": True}, config) == {}  # no training forward changes
    older = {key: value for key, value in saved.items() if key != "fp4_scale"}  # left at its default
    assert changed_settings(older, config) == {}
    assert changed_settings({**older, "seed": 1}, config) == {"seed": (1, 1234)}
    assert changed_settings({k: v for k, v in saved.items() if k != "clustering"}, config) == {
        "clustering": ("lsh", "bounded")}


def test_a_save_that_named_its_stages_otherwise_changed_nothing_it_trained():
    """Saved before the backward formats and grad_rounding were stage keys: `fp4` beside stochastic gradients (now
    fp4_sr), FP8 gradients spelled out under FP8 (now None, "as the forward"). The method's name alone is no change;
    beside a stage that did change it is listed too."""
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.plugin_state import changed_settings
    fp4_sr, fp8 = LSHMoEConfig(enabled=True, method="fp4_sr"), LSHMoEConfig(enabled=True, method="fp8")
    assert changed_settings({**fp4_sr.to_dict(), "method": "fp4"}, fp4_sr) == {}
    assert changed_settings({**fp8.to_dict(), "method": "custom", "dispatch_grad_dtype": "fp8_e4m3"}, fp8) == {}
    assert changed_settings({**fp4_sr.to_dict(), "method": "fp4", "grad_rounding": "nearest"}, fp4_sr) == {
        "grad_rounding": ("nearest", "stochastic"), "method": ("fp4", "fp4_sr")}


def test_a_bare_block_saved_under_an_earlier_default_resumes_fresh_naming_what_changed():
    """`{"enabled": true}` saved its resolved settings, which name the default of its day: resumed under today's
    default (fp6_fwd_fp4sr_grad) it is another run, so the state starts fresh and the line names the stages that
    changed. Under fp8_fwd_fp4sr_grad (the default until fp6_fwd_fp4sr_grad) only the forward formats differ; under
    fp8_fwd_fp4_grad (the default before that) the gradients' rounding too; under fp4 (earlier still) the gradient
    formats as well. The same bare block saved and resumed today changes nothing."""
    from lshmoe_plugin.config import LSHMoEConfig
    from lshmoe_plugin.plugin_state import changed_settings, layers_to_restore
    today = LSHMoEConfig.from_dict({"enabled": True}, env={})
    saved = {"format": 1, "framework": "deepspeed", "moe_layers": [0], "layers": {0: {"forwards": 4}}}
    before = LSHMoEConfig(enabled=True, method="fp8_fwd_fp4sr_grad").to_dict()  # what a bare block saved then
    assert changed_settings(before, today) == {"dispatch_dtype": ("fp8_e4m3", "fp6_e2m3"),
                                               "combine_dtype": ("fp8_e4m3", "fp6_e2m3"),
                                               "method": ("fp8_fwd_fp4sr_grad", "fp6_fwd_fp4sr_grad")}
    restore = layers_to_restore({**saved, "settings": before}, "deepspeed", today, [0])
    assert restore.fresh and restore.layers == {}
    assert restore.message == (
        'lsh_moe: the checkpoint\'s plugin state was saved under other lsh_moe settings (combine_dtype "fp8_e4m3" -> '
        '"fp6_e2m3", dispatch_dtype "fp8_e4m3" -> "fp6_e2m3", method "fp8_fwd_fp4sr_grad" -> "fp6_fwd_fp4sr_grad"), '
        "and a run that changes its settings goes on as another run; the plugin's per-layer state starts fresh "
        "(forward counts from 0, no slot need recorded, decide_by_cost measures again)")
    nearest = LSHMoEConfig(enabled=True, method="fp8_fwd_fp4_grad").to_dict()
    assert changed_settings(nearest, today) == {
        "dispatch_dtype": ("fp8_e4m3", "fp6_e2m3"), "combine_dtype": ("fp8_e4m3", "fp6_e2m3"),
        "grad_rounding": ("nearest", "stochastic"), "method": ("fp8_fwd_fp4_grad", "fp6_fwd_fp4sr_grad")}
    older = LSHMoEConfig(enabled=True, method="fp4").to_dict()
    assert changed_settings(older, today) == {
        "combine_grad_dtype": (None, "fp4_e2m1"), "dispatch_grad_dtype": (None, "fp4_e2m1"),
        "dispatch_dtype": ("fp4_e2m1", "fp6_e2m3"), "combine_dtype": ("fp4_e2m1", "fp6_e2m3"),
        "grad_rounding": ("nearest", "stochastic"), "method": ("fp4", "fp6_fwd_fp4sr_grad")}
    # resumed today with the old default named, the run goes on: nothing changed
    config = LSHMoEConfig.from_dict({"enabled": True, "method": "fp8_fwd_fp4sr_grad"}, env={})
    assert changed_settings(before, config) == {}
    assert layers_to_restore({**saved, "settings": before}, "deepspeed", config, [0]).layers == {0: {"forwards": 4}}
    assert not layers_to_restore({**saved, "settings": today.to_dict()}, "deepspeed", today, [0]).fresh


def test_a_checkpoint_of_another_world_size_gives_its_state_only_where_every_rank_saved_the_same():
    """(This process has no process group: a world of one.)"""
    from lshmoe_plugin.patches.engine_checkpoint import ENGINE_FORMAT, _this_ranks_state
    same = {"deepspeed": {"layers": {0: {"forwards": 3}}}}
    other = {"deepspeed": {"layers": {0: {"forwards": 3, "need": 7}}}}
    assert _this_ranks_state({"format": ENGINE_FORMAT, "world_size": 2, "ranks": [same, same]}) == same
    fresh = _this_ranks_state({"format": ENGINE_FORMAT, "world_size": 2, "ranks": [same, other]})
    assert fresh.fresh and "saved by 2 ranks whose plugin states differ, and this run has 1" in fresh.message
    assert _this_ranks_state(None).fresh
    with pytest.raises(LSHMoEStateError, match="format 7"):
        _this_ranks_state({"format": 7, "world_size": 1, "ranks": [same]})


def test_draw_counters_continue_from_their_state_in_place_and_each_count_on_one_device():
    """A format's counters saved after 3 encodes: a new format loaded with them draws the original's 4th and 5th
    encodes bit for bit (its state says 3 before it draws). A counter that exists is written in place (a CUDA graph
    may read it); None goes back to the start. A count saved on another device goes to one device: its own name,
    else the largest of its type, else the largest of any (rounding.DrawCounters.load_state_dict)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    first = wire.FP4E2M1(32, "e8m0", "stochastic")
    for _ in range(3):
        first.encode(x)
    state = first.draws.state_dict()
    assert state == {"cpu": 3}
    after = [first.encode(x) for _ in range(2)]
    restored = wire.FP4E2M1(32, "e8m0", "stochastic")
    restored.draws.load_state_dict(state)
    assert restored.draws.state_dict() == {"cpu": 3}  # kept until the device draws
    assert [torch.equal(a, restored.encode(x)) for a in after] == [True, True]
    assert restored.draws.state_dict() == first.draws.state_dict() == {"cpu": 5}
    fresh = wire.FP4E2M1(32, "e8m0", "stochastic")
    assert not torch.equal(fresh.encode(x), after[0])  # so the comparison above can fail
    counter = first.draws.counter("cpu")
    first.draws.load_state_dict(state)
    assert first.draws.counter("cpu") is counter and counter.item() == 3 and torch.equal(first.encode(x), after[0])
    first.draws.load_state_dict(None)
    assert counter.item() == 0 and first.draws.state_dict() == {"cpu": 0}
    moved = DrawCounters()  # saved by a GPU run, resumed on the CPU: its one count continues here
    moved.load_state_dict({"cuda:0": 7})
    assert moved.counter("cpu").item() == 7 and moved.state_dict() == {"cpu": 7}
    picks = DrawCounters()
    picks.load_state_dict({"cpu": 2, "cuda:3": 9, "cuda:5": 4})
    taken = [picks._take_restored(torch.device(name)) for name in ("cuda:5", "cuda:0", "cuda:1", "cuda:2")]
    assert taken == [4, 9, 2, 0]  # own name, largest of the type, any other, none left


def test_a_state_without_draw_counters_restores_its_layers_and_warns_that_the_draws_start_over():
    from lshmoe_plugin.plugin_state import layer_states, layers_to_restore
    config = LSHMoEConfig.from_dict(DEFAULT, env={})
    draws = {"fp4_e2m1": {"cpu": 12}}
    saved = layer_states("deepspeed", config, [0], {0: {"forwards": 3}}, draws)
    assert saved["draws"] == draws
    restore = layers_to_restore(saved, "deepspeed", config, [0])
    assert restore.draws == draws and not restore.draws_fresh and "draw counters" in restore.message
    del saved["draws"]
    old = layers_to_restore(saved, "deepspeed", config, [0])
    assert old.layers == {0: {"forwards": 3}} and old.draws is None and old.draws_fresh and not old.fresh
    assert old.message.endswith(NO_DRAWS)
    nearest = LSHMoEConfig.from_dict({"enabled": True, "method": "fp8_fwd_fp4_grad"}, env={})
    assert "draws" not in layer_states("deepspeed", nearest, [0], {0: {"forwards": 3}}, wire.draws_state(nearest))
    assert not layers_to_restore(saved, "deepspeed", nearest, [0]).draws_fresh  # (another run: fresh anyway)


# -- by hand, with DeepSpeed's real MoE layer -------------------------------------------------------------------
class Net(torch.nn.Module):
    """`num_layers` DeepSpeed MoE layers in a residual stack, and a head for a scalar loss."""

    def __init__(self, world_size, num_layers=2, make_groups=False):
        super().__init__()
        self.moes = torch.nn.ModuleList(build_moe(world_size, 2, seed=i, make_groups=make_groups)
                                        for i in range(num_layers))
        self.head = torch.nn.Linear(D_MODEL, 1)

    def forward(self, x):
        aux = 0.0
        for moe in self.moes:
            out, l_aux, _ = moe(x)
            x, aux = x + out, aux + l_aux
        return self.head(x).square().mean() + aux


def batch(step, rank):
    """Step `step`'s input of `rank`: 8 base tokens, 6 near-copies of each, which bounded merging merges."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    base = torch.randn(2, 4, D_MODEL, generator=gen).repeat_interleave(6, 1)
    return base + 0.01 * torch.randn(base.shape, generator=gen)


def forward_at(net, step, rank=0):
    set_training_step(step)
    torch.manual_seed(step)  # the gates' draws
    return net(batch(step, rank)).detach()


def check_by_hand(rank, world_size):
    out = {}
    config = {"lsh_moe": BOUNDED}
    first, second = Net(1, make_groups=True), Net(1, make_groups=True)
    lshmoe_plugin.enable(config, first)
    for step in (0, 1):
        forward_at(first, step)
    state = lshmoe_plugin.state_dict(first)
    out["layers_saved"] = sorted(state["layers"]) == [0, 1] and state["moe_layers"] == [0, 1]
    out["per_layer"] = state["layers"][0]["forwards"] == 2 and state["layers"][0]["slot_budget"]["step"] == 1
    lshmoe_plugin.enable(config, second)  # numbers its MoE layers, as a resumed run's script does
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(state, second)
    out["restored_line"] = lines == [(logging.INFO, "lsh_moe: restored the plugin's state of MoE layer(s) [0, 1] "
                                                    "from the checkpoint (forward counts, slot budgets, "
                                                    "decide_by_cost decisions)")]
    # Not built yet: the second net's compressors take the state at their first forward; a save before then keeps it.
    out["kept_until_built"] = lshmoe_plugin.state_dict(second)["layers"] == state["layers"]
    out["continues"] = torch.equal(forward_at(first, 2), forward_at(second, 2))
    out["same_state_after"] = lshmoe_plugin.state_dict(first) == lshmoe_plugin.state_dict(second)

    # No state (a checkpoint of an older version): fresh, with a warning. The first step after it sends every
    # token, where the uninterrupted run sends the slots its last step needed: another value.
    third = Net(1, make_groups=True)
    lshmoe_plugin.enable(config, third)
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(None, third)
    out["fresh_warning"] = len(lines) == 1 and lines[0][0] == logging.WARNING and \
        "holds no lsh_moe plugin state" in lines[0][1] and "starts fresh" in lines[0][1]
    out["fresh_differs"] = not torch.equal(forward_at(first, 3), forward_at(third, 3))
    out["fresh_counts_from_zero"] = lshmoe_plugin.state_dict(third)["layers"][0]["forwards"] == 1

    # Other settings: a run with changed settings is another run: fresh, and the line names what changed.
    lshmoe_plugin.enable({"lsh_moe": {**BOUNDED, "telemetry_interval": 5}}, third)
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(state, third)
    out["changed_settings_line"] = len(lines) == 1 and lines[0][0] == logging.WARNING and \
        "other lsh_moe settings (telemetry_interval 3 -> 5)" in lines[0][1]
    forward_at(third, 4)
    out["changed_settings_fresh"] = lshmoe_plugin.state_dict(third)["layers"][0]["forwards"] == 1

    # The same settings on another model (one MoE layer, not two): refused.
    lshmoe_plugin.disable()
    single = Net(1, num_layers=1, make_groups=True)
    lshmoe_plugin.enable(config, single)
    try:
        lshmoe_plugin.load_state_dict(state, single)
        out["other_model_refused"] = False
    except LSHMoEStateError as error:
        out["other_model_refused"] = "model with MoE layers [0, 1] (state of layers [0, 1]), this model has MoE " \
            "layers [0]" in str(error)
    try:
        lshmoe_plugin.load_state_dict({**state, "format": 99}, single)
        out["other_format_refused"] = False
    except LSHMoEStateError as error:
        out["other_format_refused"] = "format 99" in str(error)
    lshmoe_plugin.disable()
    out["off_has_no_state"] = lshmoe_plugin.state_dict() is None
    return out


def check_default_switch_by_hand(rank, world_size):
    """A run of `{"enabled": true}` saved while the default was fp8_fwd_fp4sr_grad (its block resolved to it, as
    `"method": "fp8_fwd_fp4sr_grad"` does today), resumed with the same bare block under today's default: one
    WARNING line naming the changed stages, and every layer starts fresh."""
    out = {}
    before, today = Net(1, make_groups=True), Net(1, make_groups=True)
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "fp8_fwd_fp4sr_grad"}}, before)
    forward_at(before, 0)
    state = lshmoe_plugin.state_dict(before)
    out["saved_the_old_default"] = (state["settings"]["method"], state["settings"]["dispatch_dtype"]) == (
        "fp8_fwd_fp4sr_grad", "fp8_e4m3") and state["layers"][0]["forwards"] == 1
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True}}, today)
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(state, today)
    out["warning_names_the_changed_stages"] = len(lines) == 1 and lines[0][0] == logging.WARNING and (
        'other lsh_moe settings (combine_dtype "fp8_e4m3" -> "fp6_e2m3", dispatch_dtype "fp8_e4m3" -> "fp6_e2m3", '
        'method "fp8_fwd_fp4sr_grad" -> "fp6_fwd_fp4sr_grad")') in lines[0][1] and "starts fresh" in lines[0][1]
    forward_at(today, 1)
    out["fresh_counts_from_zero"] = lshmoe_plugin.state_dict(today)["layers"][0]["forwards"] == 1
    lshmoe_plugin.disable()
    return out


def check_decision_by_hand(rank, world_size):
    """decide_by_cost: a restored layer keeps its decision (and its telemetry) and measures nothing again."""
    config = {"lsh_moe": {"enabled": True, "method": "paper", "compression_rate": 0.25, "decide_by_cost": True}}
    first, second = Net(1, make_groups=True), Net(1, make_groups=True)
    lshmoe_plugin.enable(config, first)
    measure, calls = cost.measure, []
    cost.measure = lambda *a, **k: calls.append(1) or (1.0, 2.0)  # stock measured faster
    try:
        forward_at(first, 0)
        lshmoe_plugin.TELEMETRY.clear()  # what a new process starts with
        lshmoe_plugin.enable(config, second)
        lshmoe_plugin.load_state_dict(lshmoe_plugin.state_dict(first), second)
        forward_at(second, 1)
        summary = lshmoe_plugin.TELEMETRY.summary()
    finally:
        cost.measure = measure
        lshmoe_plugin.disable()
    return {"measured_only_by_the_first": len(calls) == 2,
            "kept": [m.deepspeed_moe._lshmoe_compressor.pays for m in second.moes] == [False, False]}, summary


def forward_backward_at(net, step, rank=0):
    """Step `step`'s forward and backward (no optimizer: the weights stay): the parameters' gradients, which under
    the default method crossed back in FP4 rounded stochastically, so they depend on the draw counters."""
    set_training_step(step)
    torch.manual_seed(step)
    net.zero_grad(set_to_none=True)
    net(batch(step, rank)).backward()
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


def check_draws_saved(rank, world_size, directory):
    """A process that trains 2 steps of the default method, saves its state, then goes on with step 2 and saves its
    gradients and the state after it (files in `directory`: tensors do not come back through the result queue)."""
    net = Net(1, make_groups=True)
    lshmoe_plugin.enable({"lsh_moe": DEFAULT}, net)
    for step in (0, 1):
        forward_backward_at(net, step)
    state = lshmoe_plugin.state_dict(net)
    torch.save(state, os.path.join(directory, "state.pt"))
    continued = forward_backward_at(net, 2)
    after = lshmoe_plugin.state_dict(net)
    torch.save((continued, after), os.path.join(directory, "continued.pt"))
    lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "method": "fp8_fwd_fp4_grad"}}, net)  # rounds to nearest
    nearest_keys = sorted(lshmoe_plugin.state_dict(net))
    lshmoe_plugin.disable()
    return state["draws"], after["draws"], nearest_keys


def check_draws_restored(rank, world_size, directory):
    """Another process (its counters new) loads that state into a new model: the counters are the saved ones, and
    step 2's gradients and the state after it are the saving process's. Then the same state without its counters
    (as a version before them saved it): the layers restore, one WARNING says the draws start over, and step 2's
    gradients differ."""
    out = {}
    state = torch.load(os.path.join(directory, "state.pt"), weights_only=False)
    continued, after = torch.load(os.path.join(directory, "continued.pt"), weights_only=False)
    net = Net(1, make_groups=True)
    lshmoe_plugin.enable({"lsh_moe": DEFAULT}, net)
    config = LSHMoEConfig.from_dict(DEFAULT, env={})
    out["new_process_draws_nothing_yet"] = wire.draws_state(config) == {"fp4_e2m1": {}}
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(state, net)
    out["restored_line"] = lines == [(logging.INFO, "lsh_moe: restored the plugin's state of MoE layer(s) [0, 1] "
                                                    "from the checkpoint (forward counts, slot budgets, "
                                                    "decide_by_cost decisions, stochastic rounding's draw counters)")]
    out["same_counts"] = wire.draws_state(config) == state["draws"] and lshmoe_plugin.state_dict(net) == state
    got = forward_backward_at(net, 2)
    out["same_next_draws"] = len(got) == len(continued) and all(torch.equal(a, b) for a, b in zip(got, continued))
    out["same_state_after"] = lshmoe_plugin.state_dict(net) == after

    old = {key: value for key, value in state.items() if key != "draws"}
    with Lines() as lines:
        lshmoe_plugin.load_state_dict(old, net)
    out["old_warning"] = len(lines) == 1 and lines[0][0] == logging.WARNING and lines[0][1].endswith(NO_DRAWS)
    out["old_layers_restored"] = lshmoe_plugin.state_dict(net)["layers"] == state["layers"]
    out["old_draws_from_start"] = wire.draws_state(config) == {"fp4_e2m1": {"cpu": 0}}
    out["old_other_gradients"] = not all(torch.equal(a, b) for a, b in zip(forward_backward_at(net, 2), continued))
    lshmoe_plugin.disable()
    return out


def test_draw_counters_round_trip_through_the_state_into_a_new_process(tmp_path):
    """The default method's stochastic rounding: a process's state holds its draw counts (3 a step: both layers'
    combine gradients and the second layer's dispatch gradient; the first layer dispatches the data, which needs
    none), a new process that loads it draws what the first drew next, and the state of a method that rounds to
    nearest has no counters at all."""
    [(saved, after, nearest_keys)] = run_distributed(check_draws_saved, 1, str(tmp_path))
    assert saved == {"fp4_e2m1": {"cpu": 6}} and after == {"fp4_e2m1": {"cpu": 9}}
    assert "draws" not in nearest_keys and "layers" in nearest_keys
    [result] = run_distributed(check_draws_restored, 1, str(tmp_path))
    assert all(result.values()), failed(result)


def test_state_dict_round_trip_missing_state_other_settings_and_other_model():
    [result] = run_distributed(check_by_hand, 1)
    assert all(result.values()), failed(result)


def test_a_bare_block_saved_under_the_old_default_loads_fresh_by_hand():
    [result] = run_distributed(check_default_switch_by_hand, 1)
    assert all(result.values()), failed(result)


def test_a_restored_decide_by_cost_decision_is_kept_without_measuring():
    [(result, summary)] = run_distributed(check_decision_by_hand, 1)
    assert all(result.values()), failed(result)
    # the telemetry, cleared before the load, reports the restored decisions with what they measured
    assert [summary[f"lsh_moe/layer{i}/{name}"] for i in (0, 1) for name in ("compressed", "stock_exchange_ms")] \
        == [0.0, 1.0, 0.0, 1.0]


# -- through DeepSpeed's engine --------------------------------------------------------------------------------
def engine_for(world_size, lsh_moe):
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-2,
                                                                                          "torch_adam": True}}}
    if lsh_moe is not None:
        config["lsh_moe"] = lsh_moe
    net = Net(world_size)
    lshmoe_plugin.enable(config, net)
    return deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)[0]


def train(engine, start, stop, rank):
    """Steps start..stop-1; per step the loss, the slots each layer sent and which statistics it sampled."""
    records = []
    for step in range(start, stop):
        torch.manual_seed(step)
        loss = engine(batch(step, rank))
        engine.backward(loss)
        engine.step()
        summary = lshmoe_plugin.TELEMETRY.summary()
        records.append((float(loss), [summary.get(f"lsh_moe/layer{i}/slots_per_expert") for i in (0, 1)],
                        sorted(k for k in summary if k.endswith(SAMPLED) and "/mean/" not in k)))
    return records


def model_states(tag_dir):
    return torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)


def check_engine_resume(rank, world_size, out_dir):
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    out = {}
    straight = train(engine_for(world_size, BOUNDED), 0, 5, rank)
    first = engine_for(world_size, BOUNDED)
    train(first, 0, 2, rank)
    mine = {"step": 2}
    first.save_checkpoint(out_dir, tag="step2", client_state=mine)
    out["caller_dict_untouched"] = mine == {"step": 2}
    resumed = engine_for(world_size, BOUNDED)
    with Lines() as lines:
        path, client_state = resumed.load_checkpoint(out_dir, tag="step2")
    out["client_state_as_saved"] = client_state["step"] == 2 and STATE_KEY not in client_state
    out["restored_line"] = [level for level, _ in lines] == ([logging.INFO] if rank == 0 else [])
    got = train(resumed, 2, 5, rank)
    out["resumed_equals_straight"] = got == straight[2:]
    out["slots_below_capacity"] = all(s is not None and s < 30 for record in got for s in record[1])
    saved = model_states(os.path.join(out_dir, "step2"))[STATE_KEY]
    out["every_rank_saved"] = saved["world_size"] == world_size and len(saved["ranks"]) == world_size

    # The same checkpoint without the plugin's state, as an older version wrote it: it loads, says the state starts
    # fresh, and the run goes on otherwise than the uninterrupted one (so the comparison above can fail).
    old = os.path.join(out_dir, "step2_old")
    if rank == 0:
        shutil.copytree(os.path.join(out_dir, "step2"), old)
        states = model_states(old)
        del states[STATE_KEY]
        torch.save(states, os.path.join(old, "mp_rank_00_model_states.pt"))
    dist.barrier()
    from_old = engine_for(world_size, BOUNDED)
    with Lines() as lines:
        from_old.load_checkpoint(out_dir, tag="step2_old")
    out["old_warning"] = rank != 0 or (len(lines) == 1 and lines[0][0] == logging.WARNING
                                       and "holds no lsh_moe plugin state" in lines[0][1])
    old_run = train(from_old, 2, 5, rank)
    out["old_samples_elsewhere"] = [r[2] for r in old_run] != [r[2] for r in straight[2:]]
    out["old_sends_other_slots"] = [r[1] for r in old_run] != [r[1] for r in straight[2:]]
    out["old_other_loss"] = [r[0] for r in old_run] != [r[0] for r in straight[2:]]

    # With the plugin off: DeepSpeed's own methods, and no key written.
    lshmoe_plugin.disable()
    stock = engine_for(world_size, None)
    out["stock_methods"] = DeepSpeedEngine.save_checkpoint.__module__ == "deepspeed.runtime.engine" and \
        DeepSpeedEngine.load_checkpoint.__module__ == "deepspeed.runtime.engine"
    train(stock, 0, 1, rank)
    stock.save_checkpoint(out_dir, tag="off")
    out["off_writes_no_key"] = STATE_KEY not in model_states(os.path.join(out_dir, "off"))
    return out


def test_deepspeed_checkpoints_carry_the_plugin_state_and_a_resume_continues_exactly(tmp_path):
    for rank, result in enumerate(run_distributed(check_engine_resume, 2, str(tmp_path))):
        assert all(result.values()), (rank, failed(result))


def draws_as_a_new_process():
    """The stochastic formats' draw counters back at their start, as a new process has them: they are process-wide,
    and the engines of one test would otherwise go on from each other's draws."""
    wire.load_draws(LSHMoEConfig.from_dict(DEFAULT, env={}), None)


def check_engine_resume_default(rank, world_size, out_dir):
    """The default method at EP=2 through DeepSpeed's checkpoints, each engine drawing as a new process would: a
    resume continues the uninterrupted run exactly (its gradients rounded with the draws that run makes), and one
    from the same checkpoint without the counters warns and goes on otherwise."""
    import torch.distributed as dist
    out = {}
    draws_as_a_new_process()
    straight = train(engine_for(world_size, DEFAULT), 0, 5, rank)
    draws_as_a_new_process()
    first = engine_for(world_size, DEFAULT)
    out["first_as_straight"] = train(first, 0, 2, rank) == straight[:2]
    first.save_checkpoint(out_dir, tag="step2", client_state={"step": 2})
    saved = model_states(os.path.join(out_dir, "step2"))[STATE_KEY]["ranks"]
    # each rank's count of its own draws (3 a step), alike: its stream (rank << 32) is not saved but restarted
    out["every_rank_saved_its_draws"] = [r["deepspeed"]["draws"] for r in saved] == [{"fp4_e2m1": {"cpu": 6}}] * 2
    draws_as_a_new_process()
    resumed = engine_for(world_size, DEFAULT)
    with Lines() as lines:
        resumed.load_checkpoint(out_dir, tag="step2")
    out["restored_line"] = rank != 0 or (len(lines) == 1 and lines[0][0] == logging.INFO
                                         and lines[0][1].endswith("stochastic rounding's draw counters)"))
    out["resumed_equals_straight"] = train(resumed, 2, 5, rank) == straight[2:]

    old = os.path.join(out_dir, "step2_old")
    if rank == 0:
        shutil.copytree(os.path.join(out_dir, "step2"), old)
        states = model_states(old)
        for state in states[STATE_KEY]["ranks"]:
            del state["deepspeed"]["draws"]
        torch.save(states, os.path.join(old, "mp_rank_00_model_states.pt"))
    dist.barrier()
    draws_as_a_new_process()
    from_old = engine_for(world_size, DEFAULT)
    with Lines() as lines:
        from_old.load_checkpoint(out_dir, tag="step2_old")
    out["old_warning"] = rank != 0 or (len(lines) == 1 and lines[0][0] == logging.WARNING
                                       and lines[0][1].endswith(NO_DRAWS))
    old_run = train(from_old, 2, 5, rank)
    out["old_same_first_loss"] = old_run[0][0] == straight[2][0]  # the weights are the checkpoint's
    out["old_other_losses"] = [r[0] for r in old_run[1:]] != [r[0] for r in straight[3:]]
    lshmoe_plugin.disable()
    return out


def test_deepspeed_checkpoints_carry_the_draw_counters_of_the_default_method(tmp_path):
    for rank, result in enumerate(run_distributed(check_engine_resume_default, 2, str(tmp_path))):
        assert all(result.values()), (rank, failed(result))
