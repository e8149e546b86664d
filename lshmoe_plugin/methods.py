"""Named configurations of the compressor: a method is a composition of stages (how tokens are clustered, what
format each of the four crossings carries and how the gradients round to it), so a user picks "the paper's" or FP8
on the wire by name instead of by six keys.

A method fixes the *stage* keys (STAGE_KEYS): ``clustering``, the forward formats ``dispatch_dtype`` and
``combine_dtype``, the backward formats ``dispatch_grad_dtype`` and ``combine_grad_dtype`` (None: as that crossing's
forward) and ``grad_rounding``. The numeric knobs of those stages (compression_rate, num_hashes, fp8_block_size, ...)
keep their own defaults and stay free to set. Resolution (`resolve`, called by the config), a stage key given as
None (null) counting as left out:

- ``method`` given: stage keys left out take the method's values; a stage key set to anything else is refused by
  name (a configuration that says two things must say which one it means), and the refusal names the method to set
  instead where the stages asked for are one. A backward format given as its forward's format says what None says
  ("as the forward") and is no contradiction: ``fp8`` with ``"dispatch_grad_dtype": "fp8_e4m3"`` is ``fp8``.
- ``method`` left out (or ``custom``) and no stage key given: DEFAULT_METHOD.
- ``method`` left out (or ``custom``) and some stage key given: a composition. The ones given are taken as they are
  and the config then reports the method whose stages it matches, or ``custom``. The stage keys left out take
  - COMPOSITION_BASE's values (the paper's: LSH clustering, the model's dtype both ways, gradients as their
    forwards, rounded to nearest) when a forward stage key (FORWARD_STAGE_KEYS) is given: a different forward is
    described from the paper's. So ``"dispatch_dtype": "fp8_e4m3"`` alone means the paper's centroids in FP8,
    whatever the default is;
  - DEFAULT_METHOD's values when only backward stage keys are given: they adjust how the default's gradients cross.
    So ``"grad_rounding": "nearest"`` alone is the default with its gradients rounded to nearest (``custom``
    while the default is ``fp6_fwd_fp4sr_grad``: FP6 forward both ways, FP4 gradients rounded to nearest), never
    the paper's clustering by surprise, ``"grad_rounding": "stochastic"`` alone is the default itself, and
    ``"dispatch_grad_dtype": "fp6_e2m3"`` alone is the default with the dispatch gradient in FP6 like its forward
    (``custom``: FP6 forward both ways, FP6 dispatch gradient, FP4 combine gradient, both rounded
    stochastically; with ``"combine_grad_dtype": "fp6_e2m3"`` too it is ``fp6``'s crossings with stochastic
    gradients, ``custom``, and ``fp6`` with
    ``"grad_rounding": "nearest"`` beside them). Backward formats that leave no gradient in a scaled format
    (``"dispatch_grad_dtype": "model", "combine_grad_dtype": "model"``) round nothing: grad_rounding left out is
    ``nearest`` there, not the default's ``stochastic`` (which is refused where nothing rounds).

Either way a backward format equal to its forward's is written None (`canonical_stages`): one configuration, one
spelling, whichever way it was asked for.

DEFAULT_METHOD is what ``"enabled": true`` and nothing else trains: ``fp6_fwd_fp4sr_grad`` (since 2026-12-07),
every token crossing in OCP FP6 E2M3 (an e8m0 scale per 32 elements) forward both ways, rounded to nearest, and its
gradients back in FP4 E2M1, rounded stochastically (unbiased, E[Q(g)] = g): 0.328 of stock's bf16 bytes over the four
crossings. The single-pass testbed shapes decide the default (lshmoe_pretrain/default_choice.py, its rule written
before they trained; docs/quality.md, section default_single_pass): the candidate with the fewest bytes that passes
on every shape, if a guard written before its last runs lets it replace the present default. Over 3 seeds each it
ends -0.07%, +0.37% and -0.09% from stock's validation loss on ``gpt-25m-1pass``, ``gpt-72m-1pass`` and
``t5-26m-1pass``, its gap not growing across the schedule lengths; against ``fp8_fwd_fp4sr_grad`` (the default
before, 0.391 of the bytes: +0.07%, +0.06%, -0.01%) seed by seed on all nine seeds it is +0.03 points, +0.27 at two
standard errors, below the guard's +0.5. On ``gpt-72m-1pass`` all three of its seeds end above stock (+0.28% to
+0.50%), where the default before ended within +0.14%: a user who wants that margin back names
``fp8_fwd_fp4sr_grad``. ``fp8_fwd_fp4_grad`` (nearest gradients) and ``fp4`` (FP4 both ways, 0.266 of the bytes,
+0.78% and +0.60% on the two GPT shapes, outside the rule's ±0.5%) stay by name, and so does the paper's
(``"method": "paper"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

STAGE_KEYS: Tuple[str, ...] = ("clustering", "dispatch_dtype", "combine_dtype", "dispatch_grad_dtype",
                               "combine_grad_dtype", "grad_rounding")
# What the forward does: given without a method, the other stages come from the paper's (COMPOSITION_BASE).
FORWARD_STAGE_KEYS: Tuple[str, ...] = ("clustering", "dispatch_dtype", "combine_dtype")
# Each backward crossing's format key and the forward format it follows when None.
GRAD_FORWARDS: Dict[str, str] = {"dispatch_grad_dtype": "dispatch_dtype", "combine_grad_dtype": "combine_dtype"}
CUSTOM = "custom"


def canonical_stages(stages: Mapping[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """`stages` with every backward format that equals its forward's written None ("as the forward"), the one
    spelling methods use: so that FP8 gradients spelled out under an FP8 forward are the stages of ``fp8``."""
    return {key: None if key in GRAD_FORWARDS and value == stages.get(GRAD_FORWARDS[key]) else value
            for key, value in stages.items()}


@dataclass(frozen=True)
class Method:
    name: str
    stages: Mapping[str, Optional[str]]  # a value for every STAGE_KEYS entry, spelled as `canonical_stages` does
    summary: str                         # one line for the README table and for error messages

    def __post_init__(self) -> None:
        if set(self.stages) != set(STAGE_KEYS) or dict(self.stages) != canonical_stages(self.stages):
            raise ValueError(f"method {self.name!r}: stages must set exactly {list(STAGE_KEYS)}, a backward format "
                             f"equal to its forward's as None; got {dict(self.stages)}")


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("paper", {"clustering": "lsh", "dispatch_dtype": "model", "combine_dtype": "model",
                     "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "LSH-MoE as published: only the centroids of LSH clusters cross, each token gets E(centroid) plus its "
           "residual; 0.2 of stock's bytes at the default rate"),
    Method("paper_fp8", {"clustering": "lsh", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                         "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "the paper's centroids, in FP8 e4m3 on the wire both ways"),
    Method("bounded", {"clustering": "bounded", "dispatch_dtype": "model", "combine_dtype": "model",
                       "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "error-bounded merging: a token shares a centroid only within merge_tolerance of relative residual, "
           "the others cross as themselves; the rate is the data's"),
    Method("bounded_fp8", {"clustering": "bounded", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                           "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "error-bounded merging, in FP8 e4m3 on the wire both ways"),
    Method("fp8", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                   "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "every token crosses as itself, in FP8 e4m3 with float32 block scales both ways (0.52 of stock's bf16 "
           "bytes at d_model 256, block 128)"),
    Method("fp8_dispatch", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "model",
                            "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "every token crosses as itself; FP8 e4m3 to the experts and for the output gradient, the model's dtype "
           "back (as DeepEP ships)"),
    Method("fp4", {"clustering": "none", "dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1",
                   "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "every token crosses as itself, in OCP FP4 E2M1 with an e8m0 scale per 32 elements both ways (0.27 of "
           "stock's bf16 bytes)"),
    Method("fp6", {"clustering": "none", "dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3",
                   "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "nearest"},
           "every token crosses as itself, in OCP FP6 E2M3 with an e8m0 scale per 32 elements both ways (0.39 of "
           "stock's bf16 bytes): a candidate for the default"),
    # The long-schedule study's leading candidates (lshmoe_pretrain/quality_study.py VARIANTS fp8_fwd_fp4_grad,
    # fp4_both_sr, fp8_fwd_fp4sr_grad, fp6_fwd_fp4sr_grad), named so that DEFAULT_METHOD could become one of them:
    # it is the fourth, and was the third before.
    Method("fp8_fwd_fp4_grad", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                                "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1",
                                "grad_rounding": "nearest"},
           "every token crosses as itself, in FP8 e4m3 with a float32 scale per 128 elements forward both ways, its "
           "gradients back in OCP FP4 E2M1 with an e8m0 scale per 32, rounded to nearest (0.391 of stock's bf16 "
           "bytes over the four crossings): the default before fp8_fwd_fp4sr_grad, measured on the single-pass "
           "testbed (docs/quality.md)"),
    Method("fp4_sr", {"clustering": "none", "dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1",
                      "dispatch_grad_dtype": None, "combine_grad_dtype": None, "grad_rounding": "stochastic"},
           "`fp4` with its gradients rounded stochastically (unbiased, E[Q(g)] = g; the forward rounds to nearest), "
           "0.266 of stock's bf16 bytes: a candidate for the default, measured on the single-pass testbed "
           "(docs/quality.md)"),
    Method("fp8_fwd_fp4sr_grad", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                                  "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1",
                                  "grad_rounding": "stochastic"},
           "`fp8_fwd_fp4_grad` with its FP4 gradients rounded stochastically (unbiased, E[Q(g)] = g), 0.391 of "
           "stock's bf16 bytes: the default before fp6_fwd_fp4sr_grad, measured on the single-pass testbed "
           "(docs/quality.md)"),
    Method("fp6_fwd_fp4sr_grad", {"clustering": "none", "dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3",
                                  "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1",
                                  "grad_rounding": "stochastic"},
           "every token crosses as itself, in OCP FP6 E2M3 with an e8m0 scale per 32 elements forward both ways, its "
           "gradients back in OCP FP4 E2M1, rounded stochastically (unbiased, E[Q(g)] = g; 0.328 of stock's bf16 "
           "bytes over the four crossings): the default, chosen on the single-pass testbed (docs/quality.md, "
           "section default_single_pass)"),
)}
DEFAULT_METHOD = "fp6_fwd_fp4sr_grad"
COMPOSITION_BASE = "paper"  # what stage keys left out mean beside stage keys given (with no method named)


class MethodError(ValueError):
    """A method that does not exist, or stage keys that contradict the method named (the config re-raises it as
    its own error type)."""


def resolve(method: Optional[str], given: Mapping[str, Optional[str]]) -> Tuple[str, Dict[str, Optional[str]]]:
    """(the method's name, every stage key's value) from ``lsh_moe.method`` and the stage keys as given (None: left
    out), by the rules of the module docstring; the values spelled as `canonical_stages` spells them. Raises
    MethodError naming the key, the method and the allowed values."""
    if method == CUSTOM:  # what an unnamed combination reports itself as; naming it changes nothing
        method = None
    if method is not None and method not in METHODS:
        raise MethodError(f"lsh_moe.method must be one of {list(METHODS) + [CUSTOM]}, got {method!r}")
    forward_given = any(given.get(key) is not None for key in FORWARD_STAGE_KEYS)
    base = METHODS[method or (COMPOSITION_BASE if forward_given else DEFAULT_METHOD)]
    stages = canonical_stages({key: base.stages[key] if given.get(key) is None else given[key]
                               for key in STAGE_KEYS})
    if method is None and given.get("grad_rounding") is None and not _rounds_a_gradient(stages):
        # the default's stochastic rounding beside backward keys that leave every gradient in the model's dtype:
        # nothing rounds, and nearest is what says so (stochastic there is refused, and was not asked for)
        stages["grad_rounding"] = "nearest"
    if method is None:
        return matching_method(stages), stages
    for key in STAGE_KEYS:
        if given.get(key) is not None and stages[key] != base.stages[key]:
            raise MethodError(_contradiction(base, key, given[key], matching_method(stages)))
    return method, stages


def _rounds_a_gradient(stages: Mapping[str, Optional[str]]) -> bool:
    """Whether a gradient crosses back in a scaled format (anything but the model's dtype), which grad_rounding
    rounds."""
    return any((stages[key] or stages[forward]) != "model" for key, forward in GRAD_FORWARDS.items())


def matching_method(stages: Mapping[str, Optional[str]]) -> str:
    """The name of the method whose stages are `stages` (spelled as `canonical_stages` does), or CUSTOM."""
    return next((m.name for m in METHODS.values() if dict(m.stages) == dict(stages)), CUSTOM)


def _contradiction(method: Method, key: str, value: str, instead: str) -> str:
    """The refusal of stage key `key` set to `value` beside `method`; `instead`: the method the stages asked for
    match (CUSTOM: none)."""
    own = method.stages[key]
    sets = repr(own)
    if own is None and key in GRAD_FORWARDS:  # "as the forward": the forward's format is the one value to write
        own = method.stages[GRAD_FORWARDS[key]]
        sets = f"as its forward ({GRAD_FORWARDS[key]} {own!r})"
    other = f"set method {instead!r} instead (it sets these stages), " if instead != CUSTOM else ""
    return (f"lsh_moe.{key}={value!r} contradicts lsh_moe.method={method.name!r}, which sets {key} {sets}; allowed: "
            f"leave {key} out, set it to {own!r}, {other}or leave method out and set every stage key yourself")
