"""The long-schedule testbed: named study presets that train for as many optimizer steps as users do.

Every quality figure before 2026-12-04 came from runs of 490-610 optimizer steps, and over 3,663 steps the gap of
the paper's configuration grew from +1.9% to +13-14% (issue 22). A quality claim is now read off these presets:
each names a model shape, a batch, a long schedule of >= 3,500 steps and the shorter complete schedules (each with
its own warm-up and decay to zero) that show how the gap moves with training length. A schedule is a fraction of
the long one; its runs live under ``<root>/<testbed>/x<fraction>/``, so one study root holds every length.

    python scripts/compare_quality.py run --testbed gpt-25m-long --lengths 1 0.5 0.125 --variants stock lsh \\
        --seeds 1 2 3 --concurrency 8 --root runs/testbed
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

# The pinned corpus' train split (docs/pretraining.md#corpora; every testbed run.json's `train_tokens`): what a
# single-pass shape's long schedule must stay within.
PINNED_TRAIN_TOKENS = 18_881_699

# The three schedule lengths of the gap-against-length study, as fractions of the long schedule.
LENGTHS: Tuple[float, ...] = (0.125, 0.5, 1.0)


@dataclass(frozen=True)
class Testbed:
    """One shape of the testbed: the model preset, its batch and its long schedule (optimizer steps)."""
    name: str
    purpose: str
    model_kind: str          # "gpt" or "t5"
    preset: str              # lshmoe_pretrain.models.PRESETS
    micro_batch: int         # sequences per step (EP=1, no accumulation)
    steps: int               # the long schedule
    lr: float = 6e-4         # peak; warm-up over 5% of the schedule, then linear decay to zero
    evals: int = 12          # validation points per run, plus the whole split after the last step
    eval_tokens: int = 2**18
    concurrency: int = 6     # runs trained at once on one H200 (docs/benchmarks.md `testbed_throughput`)
    base_config: Optional[str] = None   # the DeepSpeed JSON; default configs/{model_kind}_moe_gpu.json
    # A CPU stand-in names the testbed it stands in for: its runs order what that testbed screens first and say
    # whether a finding reproduces at another size; they are never a quality claim and set no default.
    proxy_of: Optional[str] = None
    # A single-pass shape names the long shape it halves the batch of: the same model and the same 3,663 steps, on
    # half the tokens, so its long schedule stays within one pass over the pinned train split. Its verdicts are
    # read among the single-pass shapes only.
    single_pass_of: Optional[str] = None
    # A width check names the single-pass shape it widens: the same batch and steps on a wider model. It was added
    # after the single-pass shapes chose the default, to ask whether a format's cost grows with d_model, so it is in
    # neither family: what its runs may change is written before they train (docs/quality.md, "Next on a GPU").
    widens: Optional[str] = None

    def config(self) -> str:
        return self.base_config or f"configs/{self.model_kind}_moe_gpu.json"

    def seq_len(self) -> int:
        from .models.config import PRESETS
        return PRESETS[self.preset].seq_len

    def steps_at(self, length: float) -> int:
        """Optimizer steps of the complete schedule that is `length` of the long one."""
        return max(1, round(length * self.steps))

    def tokens_at(self, length: float) -> int:
        """The study's --tokens for that schedule: steps x sequences x sequence length (the input side; a T5 run
        also counts its targets in its own tokens per step)."""
        return self.steps_at(length) * self.micro_batch * self.seq_len()


TESTBEDS: Dict[str, Testbed] = {t.name: t for t in (
    Testbed("gpt-25m-long",
            "narrow GPT-MoE (d_model 256, 4 MoE layers of 8 experts, top-2): the shape of issue 22's reference runs "
            "(+13-14% at 3,663 steps); the cheapest shape, for screening candidates over a full schedule",
            "gpt", "gpt-moe-25m", micro_batch=32, steps=3663),
    Testbed("gpt-72m-long",
            "GPT-MoE at d_model 512 (3 MoE layers of 8 experts, top-2): the width of the 135M presets, at a depth "
            "one H200 trains several of over a long schedule; does what holds at d_model 256 hold wider?",
            "gpt", "gpt-moe-72m", micro_batch=32, steps=3663),
    Testbed("t5-26m-long",
            "T5-MoE (span corruption, d_model 256, MoE in encoder and decoder): T5's 'below stock' has never been "
            "checked past 600 steps",
            "t5", "t5-moe-26m", micro_batch=32, steps=3663),
    # The long shapes above go 1.6-1.8 times over the pinned corpus' 18.9M train tokens. In the second pass FP4's
    # training-loss gap grew while its validation gap did not (gpt-25m-long: +0.35% -> +0.60% against +0.06% ->
    # +0.01%; gpt-72m-long: +0.75% -> +0.98% against +0.76% -> +0.67%), and at the end of the complete schedules
    # that stay within one pass the two agree to 0.2 points. Users train on one pass, so the rule's verdicts are
    # read here: half the batch (4,096 tokens a step for GPT), the same steps, 0.79 passes (T5: 0.88).
    Testbed("gpt-25m-1pass",
            "gpt-25m-long at half its batch, within one pass over the pinned train split (0.79 passes): where the "
            "rule's verdict is read for a user who trains on one pass",
            "gpt", "gpt-moe-25m", micro_batch=16, steps=3663, single_pass_of="gpt-25m-long"),
    Testbed("gpt-72m-1pass",
            "gpt-72m-long at half its batch, within one pass over the pinned train split (0.79 passes)",
            "gpt", "gpt-moe-72m", micro_batch=16, steps=3663, single_pass_of="gpt-72m-long"),
    Testbed("t5-26m-1pass",
            "t5-26m-long at half its batch, within one pass over the pinned train split (0.88 passes)",
            "t5", "t5-moe-26m", micro_batch=16, steps=3663, single_pass_of="t5-26m-long"),
    Testbed("gpt-185m-1pass",
            "gpt-72m-1pass at twice the width (d_model 1024, 2 MoE layers of 8 experts, top-2), the same batch and "
            "steps within one pass: FP6 forward ends +0.4% at d_model 512 and within 0.1% at 256; does a format's "
            "cost grow with width?",
            "gpt", "gpt-moe-185m", micro_batch=16, steps=3663, widens="gpt-72m-1pass"),
    Testbed("gpt-mini-long-cpu",
            "CPU proxy of gpt-25m-long: GPT-MoE `mini-moe` (d_model 128, 2 MoE layers of 8 experts, top-2, 3.2M "
            "parameters) in bf16 on 1,024 tokens per step over the same 3,663 steps, 3.75M tokens, about as many "
            "per parameter as gpt-25m-long's 30M are for its 25M; two runs at once finish in about 10 minutes on a "
            "2-core CPU. It orders what the GPU testbed screens; it is not a quality claim",
            "gpt", "mini-moe", micro_batch=4, steps=3663, lr=1e-3, eval_tokens=2**16, concurrency=2,
            base_config="configs/gpt_moe_cpu_bf16.json", proxy_of="gpt-25m-long"),
    Testbed("t5-mini-long-cpu",
            "CPU proxy of t5-26m-long: T5-MoE `mini-moe` (d_model 128, MoE in encoder and decoder, 8 experts, "
            "top-2) in bf16 on 1,024 input tokens per step over the same 3,663 steps; T5's 'below stock' at 600 "
            "steps, checked over a long schedule where no GPU is lent. It orders what the GPU testbed screens; "
            "it is not a quality claim",
            "t5", "mini-moe", micro_batch=4, steps=3663, lr=1e-3, eval_tokens=2**16, concurrency=2,
            base_config="configs/t5_moe_cpu_bf16.json", proxy_of="t5-26m-long"),
)}


FAMILIES = ("long", "single-pass")
WIDTH_CHECK = "width check"  # a family of its own, which no default is chosen on (Testbed.widens)


def family(bed: Testbed) -> str:
    """Which GPU shapes a shape answers with for the default: the long ones, the single-pass ones, or none (a
    width check)."""
    if bed.widens is not None:
        return WIDTH_CHECK
    return "long" if bed.single_pass_of is None else "single-pass"


def shapes(name: str) -> list:
    """The GPU shapes of one family (no CPU proxy: proxies never set a default)."""
    if name not in FAMILIES:
        raise TestbedError(f"--shapes {name!r}: allowed {list(FAMILIES)}")
    return [bed for bed in TESTBEDS.values() if not bed.proxy_of and family(bed) == name]


class TestbedError(ValueError):
    """A bad testbed request; the message names the flag and what is allowed."""


def testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise TestbedError(f"--testbed {name!r}: allowed {sorted(TESTBEDS)}")
    return TESTBEDS[name]


def check_lengths(lengths: Sequence[float]) -> None:
    bad = [length for length in lengths if not 0 < length <= 1]
    if bad:
        raise TestbedError(f"--lengths {bad}: each must be a fraction of the long schedule in (0, 1]")


def length_root(root: str, bed: Testbed, length: float) -> str:
    """Where the runs of one schedule length live: ``<root>/<testbed>/x<length>``."""
    return os.path.join(root, bed.name, f"x{length:g}")
