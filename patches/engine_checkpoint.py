"""The plugin's state in DeepSpeed's checkpoints: ``engine.save_checkpoint`` adds it to the client_state under
``lsh_moe_state``, ``engine.load_checkpoint`` takes it out again and restores it, so that a training script that
checkpoints as usual resumes exactly as the uninterrupted run goes on (lshmoe_plugin.plugin_state).

The state is per rank (clustering "bounded" agrees its slot need within each expert-parallel group only), while
DeepSpeed writes the client_state from one rank: the save gathers every rank's state (a collective, in a call every
rank makes anyway), and each rank loads its own. A checkpoint of another world size gives every rank the same
state where all its ranks had the same, and a fresh start (logged) where they differed.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional

from lshmoe_plugin.plugin_state import STATE_KEY, LSHMoEStateError, Restore, fresh, log_restore

from .lifecycle import PatchLifecycle

ENGINE_FORMAT = 1


def save_with_plugin_state(original, owners: Dict[str, PatchLifecycle]):
    """`DeepSpeedEngine.save_checkpoint` that adds every rank's state of the `owners` patches to client_state."""
    signature = inspect.signature(original)

    def save_checkpoint(self, *args, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        client_state = call.arguments["client_state"]
        if STATE_KEY in client_state:
            raise KeyError(f"client_state contains the key {STATE_KEY!r}, which lshmoe_plugin uses for its own "
                           f"state; rename that entry")
        ranks = _gather({name: lifecycle.state_dict(self.module) for name, lifecycle in owners.items()})
        call.arguments["client_state"] = {**client_state,  # a copy: the caller's dict stays as it was
                                          STATE_KEY: {"format": ENGINE_FORMAT, "world_size": len(ranks),
                                                      "ranks": ranks}}
        return original(*call.args, **call.kwargs)
    return save_checkpoint


def load_with_plugin_state(original, owners: Dict[str, PatchLifecycle]):
    """`DeepSpeedEngine.load_checkpoint` that restores this rank's state of the `owners` patches and returns the
    client_state without it, as it was saved."""
    signature = inspect.signature(original)

    def load_checkpoint(self, *args, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        path, client_state = original(*call.args, **call.kwargs)
        if path is None:  # nothing loaded: the engine, and the plugin, stay as they were
            return path, client_state
        saved = client_state.pop(STATE_KEY, None)
        if call.arguments["load_module_only"]:
            # The weights alone (a warm start): the engine keeps its own step, and the plugin its state.
            return path, client_state
        this_rank = _this_ranks_state(saved)
        for name, lifecycle in owners.items():
            if isinstance(this_rank, Restore):
                restore = lifecycle.load_state_dict(None, self.module, this_rank)
            else:
                restore = lifecycle.load_state_dict(this_rank.get(name), self.module)
            log_restore(restore)
        return path, client_state
    return load_checkpoint


def _gather(state: dict) -> List[dict]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    ranks: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, state)
    return ranks


def _this_ranks_state(saved: Optional[dict]):
    """This rank's {framework: state} from the checkpoint's entry, or a `Restore` that starts fresh, saying why."""
    import torch.distributed as dist
    if saved is None:
        return fresh()
    if saved.get("format") != ENGINE_FORMAT:
        raise LSHMoEStateError(f"the checkpoint's {STATE_KEY} has format {saved.get('format')!r}, which this version "
                               f"does not read (allowed: {ENGINE_FORMAT}); a checkpoint of a newer lshmoe-plugin "
                               f"needs that version")
    ranks = saved["ranks"]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(ranks) == world:
        return ranks[dist.get_rank() if world > 1 else 0]
    if all(state == ranks[0] for state in ranks):
        return ranks[0]
    return fresh(f"the checkpoint was saved by {len(ranks)} ranks whose plugin states differ, and this run has "
                 f"{world}")
