"""The plugin's per-layer state in a checkpoint: what a resumed run needs to continue as the uninterrupted one.

The framework's checkpoint restores the weights, the optimizer and the step, from which the plugin derives its hash
projections and schedules. Three things a layer's forwards depend on live in the plugin alone
(`LSHCompressor.state_dict`): its forward count, which places the residual-norm and output-error samples
(`telemetry_interval`, `output_error_interval`); the slot budget of clustering "bounded", which sends the slots
the previous step needed; and the `decide_by_cost` decision of its first step. Beside them, not per layer: the draw
counters of the gradients' stochastic rounding (`grad_rounding: "stochastic"`, the default method's), one per
stochastic wire format and device of the process, shared by every layer (`wire.draws_state`,
`rounding.DrawCounters`), which decide the bits every later backward rounds with. This module checks a saved state
against the running settings and model and words the one log line a load gives; `patches.lifecycle` applies it.

What a load does (docs/faults.md):
- no state in the checkpoint (saved without the plugin, or by an older version): every layer starts fresh;
- a state saved under other lsh_moe settings: a resume with changed settings is allowed and is another run from
  there on, so every layer starts fresh; the line names the settings that changed;
- a state of another model (other MoE layer indices) under the same settings: refused (`LSHMoEStateError`);
- a state without draw counters (saved before the state kept them) under settings that round gradients
  stochastically: the layers' state is restored and the counters start from their first draw, with a WARNING, as
  the run then rounds its gradients otherwise than the uninterrupted one. Whenever a load starts fresh, the counters
  start from their first draw too (as a new process's do).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from .methods import STAGE_KEYS, canonical_stages

STATE_KEY = "lsh_moe_state"  # the key of DeepSpeed's client_state the engine hooks use
FORMAT = 1
NO_STATE = "the checkpoint holds no lsh_moe plugin state (saved without the plugin, or by a version before it kept one)"
NO_DRAWS = ("the checkpoint holds no draw counters of the gradients' stochastic rounding (saved by a version before "
            "it kept them): they start from their first draw, so the run rounds its gradients otherwise than the "
            "uninterrupted one")
_FRESH = ("the plugin's per-layer state starts fresh (forward counts from 0, no slot need recorded, decide_by_cost "
          "measures again)")

logger = logging.getLogger("lshmoe_plugin")


class LSHMoEStateError(ValueError):
    """Plugin state that cannot belong to this run; the message says what differs."""


class Restore(NamedTuple):
    """What a load restores: each layer's state by index (empty when fresh), the line to log, and the draw counts of
    the stochastic formats (`wire.draws_state`; None: the counters start from their first draw). `draws_fresh`: the
    layers were restored but the counters, which the uninterrupted run would have continued, start over."""
    layers: Dict[int, dict]
    message: str
    fresh: bool
    draws: Optional[Dict[str, Dict[str, int]]] = None
    draws_fresh: bool = False


def layer_states(framework: str, config, moe_layers: Sequence[int], layers: Mapping[int, dict],
                 draws: Optional[Mapping[str, Mapping[str, int]]] = None) -> dict:
    """One patch's state: the settings it was made under, the indices of the model's MoE layers on this rank (empty:
    the model was not given to `enable`), each compressing layer's `LSHCompressor.state_dict`, and, where gradients
    round stochastically, the draws of each stochastic format per device (`draws`, `wire.draws_state`; the key is
    left out otherwise, so a state without stochastic rounding is as it was before the counters were kept)."""
    state = {"format": FORMAT, "framework": framework, "settings": config.to_dict(), "moe_layers": list(moe_layers),
             "layers": {int(index): layers[index] for index in sorted(layers)}}
    if draws:
        state["draws"] = {name: dict(counts) for name, counts in draws.items()}
    return state


def changed_settings(saved: Mapping[str, Any], config) -> Dict[str, Tuple[Any, Any]]:
    """key: (saved, current) for every lsh_moe key that differs; ``compress_in_eval`` changes no training forward.
    A key the saving version did not have counts as its default (a newer version's key left at it changes nothing)."""
    current = config.to_dict()
    # A save from before the stage keys existed meant the paper's layer, whatever the default is now.
    saved = {**type(config)(enabled=True, method="paper").to_dict(), **saved}
    # One from before the backward formats and grad_rounding were stage keys may spell "as the forward" out, and its
    # method named only the other stages (fp4 beside stochastic gradients is fp4_sr now): the stages say what
    # trained, and the method only names them.
    saved.update(canonical_stages({key: saved.get(key) for key in STAGE_KEYS}))
    idle = idle_keys(saved, current)
    if all(saved.get(key) == current.get(key) for key in STAGE_KEYS):
        idle.add("method")
    return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if key != "compress_in_eval" and key not in idle and saved.get(key) != current.get(key)}


def idle_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> set:
    """The keys whose change means nothing between two settings: with the plugin off on either side, its method
    and stages trained nothing there (a stock run's block resolves to the default method, which says nothing
    about the run)."""
    return {"method", *STAGE_KEYS} if not (saved.get("enabled") and current.get("enabled")) else set()


def fresh(why: str = NO_STATE) -> Restore:
    return Restore({}, f"lsh_moe: {why}; {_FRESH}", True)


def layers_to_restore(state: Optional[Mapping[str, Any]], framework: str, config,
                      moe_layers: Sequence[int]) -> Restore:
    """Check a saved `layer_states` against the running patch (`framework`, `config`, the indices of the model's MoE
    layers, empty if unknown); raises `LSHMoEStateError` for a state of another format, framework or model."""
    if state is None:
        return fresh()
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise LSHMoEStateError(f"{STATE_KEY}: format {found!r} is not one this version reads (allowed: {FORMAT}); "
                               f"a checkpoint of a newer lshmoe-plugin needs that version")
    if state["framework"] != framework:
        raise LSHMoEStateError(f"{STATE_KEY}: the state was saved by the {state['framework']!r} patch, this is the "
                               f"{framework!r} one; load it with framework={state['framework']!r}")
    changed = changed_settings(state["settings"], config)
    if changed:
        diff = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changed.items())
        return fresh(f"the checkpoint's plugin state was saved under other lsh_moe settings ({diff}), and a run that "
                     f"changes its settings goes on as another run")
    layers = {int(index): layer for index, layer in state["layers"].items()}
    saved_layers, moe_layers = list(state["moe_layers"]), list(moe_layers)
    if moe_layers and (saved_layers and saved_layers != moe_layers or not set(layers) <= set(moe_layers)):
        raise LSHMoEStateError(f"{STATE_KEY}: the state is of a model with MoE layers {saved_layers or 'unknown'} "
                               f"(state of layers {sorted(layers)}), this model has MoE layers {moe_layers}: it "
                               f"belongs to another model. Allowed: the state saved by a run of this model, or none "
                               f"(then {_FRESH})")
    restored = (f"lsh_moe: restored the plugin's state of MoE layer(s) {sorted(layers)} from the checkpoint (forward "
                f"counts, slot budgets, decide_by_cost decisions")
    if config.grad_rounding != "stochastic":
        return Restore(layers, restored + ")", False)
    draws = state.get("draws")
    if draws is None:
        return Restore(layers, f"{restored}); {NO_DRAWS}", False, None, True)
    return Restore(layers, restored + ", stochastic rounding's draw counters)", False, draws)


def log_restore(restore: Restore) -> None:
    """The load's line, from rank 0 only (the ranks load alike): WARNING when the state (or the stochastic
    rounding's draw counters) starts fresh, since the run then samples, sizes or rounds otherwise than the
    uninterrupted one would, INFO when restored."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    logger.log(logging.WARNING if restore.fresh or restore.draws_fresh else logging.INFO, restore.message)
