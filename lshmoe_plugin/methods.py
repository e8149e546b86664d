"""Named configurations of the compressor: a method is a composition of stages (how tokens are clustered, what
format each crossing carries), so a user picks "the paper's" or FP8 on the wire by name instead of by four keys.

A method fixes the *stage* keys (STAGE_KEYS); the numeric knobs of those stages (compression_rate, num_hashes,
fp8_block_size, ...) keep their own defaults and stay free to set. Resolution (`resolve`, called by the config):

- ``method`` given: stage keys left out take the method's values; a stage key set to anything else is refused by
  name (a configuration that says two things must say which one it means).
- ``method`` left out (or ``custom``) and no stage key given: DEFAULT_METHOD.
- ``method`` left out (or ``custom``) and some stage key given: a composition. The stage keys left out take
  COMPOSITION_BASE's values (the paper's: LSH clustering, the model's dtype both ways) and the ones given are taken
  as they are; the config then reports the method whose stages it matches, or ``custom``. So
  ``"dispatch_dtype": "fp8_e4m3"`` alone means the paper's centroids in FP8, whatever the default is.

DEFAULT_METHOD is what ``"enabled": true`` and nothing else trains: ``fp4``, the configuration issue 24's rule chose
on the long-schedule testbed ``gpt-25m-long`` (docs/quality.md, section ``testbed_gpt_25m_pinned_frontier``): every
token crosses in FP4 both ways, 0.27 of stock's bytes, ending +0.01% ± 0.23% from stock's validation loss over 3
seeds, where the paper's configuration ends +17.5% and grows with the schedule. The paper's is ``"method":
"paper"``. It is provisional: the rule fails it on both d_model-512 GPT shapes (``gpt-72m-long``, and
``gpt-72m-1pass`` within one pass over the data: +0.60% ± 0.22%), and the single-pass shapes decide
(docs/quality.md, "Next on a GPU").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

STAGE_KEYS: Tuple[str, ...] = ("clustering", "dispatch_dtype", "combine_dtype")
CUSTOM = "custom"


@dataclass(frozen=True)
class Method:
    name: str
    stages: Mapping[str, str]   # a value for every STAGE_KEYS entry
    summary: str                # one line for the README table and for error messages


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("paper", {"clustering": "lsh", "dispatch_dtype": "model", "combine_dtype": "model"},
           "LSH-MoE as published: only the centroids of LSH clusters cross, each token gets E(centroid) plus its "
           "residual; 0.2 of stock's bytes at the default rate"),
    Method("paper_fp8", {"clustering": "lsh", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"},
           "the paper's centroids, in FP8 e4m3 on the wire both ways"),
    Method("bounded", {"clustering": "bounded", "dispatch_dtype": "model", "combine_dtype": "model"},
           "error-bounded merging: a token shares a centroid only within merge_tolerance of relative residual, "
           "the others cross as themselves; the rate is the data's"),
    Method("bounded_fp8", {"clustering": "bounded", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"},
           "error-bounded merging, in FP8 e4m3 on the wire both ways"),
    Method("fp8", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"},
           "every token crosses as itself, in FP8 e4m3 with float32 block scales both ways (0.52 of stock's bf16 "
           "bytes at d_model 256, block 128)"),
    Method("fp8_dispatch", {"clustering": "none", "dispatch_dtype": "fp8_e4m3", "combine_dtype": "model"},
           "every token crosses as itself; FP8 e4m3 to the experts and for the output gradient, the model's dtype "
           "back (as DeepEP ships)"),
    Method("fp4", {"clustering": "none", "dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1"},
           "every token crosses as itself, in OCP FP4 E2M1 with an e8m0 scale per 32 elements both ways (0.27 of "
           "stock's bf16 bytes)"),
    Method("fp6", {"clustering": "none", "dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3"},
           "every token crosses as itself, in OCP FP6 E2M3 with an e8m0 scale per 32 elements both ways (0.39 of "
           "stock's bf16 bytes): a candidate for the default"),
)}
DEFAULT_METHOD = "fp4"
COMPOSITION_BASE = "paper"  # what stage keys left out mean beside stage keys given (with no method named)


class MethodError(ValueError):
    """A method that does not exist, or stage keys that contradict the method named (the config re-raises it as
    its own error type)."""


def resolve(method: Optional[str], given: Mapping[str, Optional[str]]) -> Tuple[str, Dict[str, str]]:
    """(the method's name, every stage key's value) from ``lsh_moe.method`` and the stage keys as given (None: left
    out). Raises MethodError naming the key and the allowed values."""
    if method == CUSTOM:  # what an unnamed combination reports itself as; naming it changes nothing
        method = None
    if method is not None and method not in METHODS:
        raise MethodError(f"lsh_moe.method must be one of {list(METHODS) + [CUSTOM]}, got {method!r}")
    composing = method is None and any(given.get(key) is not None for key in STAGE_KEYS)
    base = METHODS[method or (COMPOSITION_BASE if composing else DEFAULT_METHOD)]
    stages = {}
    for key in STAGE_KEYS:
        value = given.get(key)
        if value is not None and method is not None and value != base.stages[key]:
            raise MethodError(f"lsh_moe.{key}={value!r} contradicts lsh_moe.method={method!r}, which sets {key} "
                              f"{base.stages[key]!r}; allowed: leave {key} out, set it to {base.stages[key]!r}, or "
                              f"leave method out and set every stage key yourself")
        stages[key] = base.stages[key] if value is None else value
    if method is not None:
        return method, stages
    matching = [m.name for m in METHODS.values() if dict(m.stages) == stages]
    return (matching[0] if matching else CUSTOM), stages
