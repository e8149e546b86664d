"""lshmoe-plugin: LSH-compressed expert-parallel all-to-all for DeepSpeed and Megatron-core MoE training.

One line turns it on in a DeepSpeed training script, with the ``"lsh_moe"`` block in the same JSON config::

    lshmoe_plugin.enable(args.deepspeed_config, model)   # before or after deepspeed.initialize
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
from typing import Any, Iterator, Mapping, Optional, Union

from .compressor import ClusterState, LSHCompressor, fixed_slots
from .config import ENABLED_ENV_VAR, LSHMoEConfig, LSHMoEConfigError
from .plugin_state import STATE_KEY, LSHMoEStateError, log_restore
from .schedule import set_training_step, training_step
from .telemetry import TELEMETRY, CostDecision, LayerStats, Telemetry, write_to_monitor

__version__ = "0.1.0"


def _register_checkout_patches() -> None:
    """Make ``lshmoe_plugin.patches`` importable from a source checkout (``PYTHONPATH=.``, scripts, tests).

    Installed, setup.py maps the top-level ``patches/`` folder onto ``lshmoe_plugin.patches``. A checkout has no
    such subfolder, so its own ``patches/`` (beside this package) is registered under that name here. When this
    package is imported from a checkout, that checkout's folder wins over any install: an editable install of
    another checkout (a git worktree, say) would otherwise pair this checkout's plugin with the other's patches.
    """
    name = __name__ + ".patches"
    if name in sys.modules:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
    init = os.path.join(folder, "__init__.py")
    ours = os.path.isfile(init) and os.path.isfile(os.path.join(folder, "lifecycle.py"))
    if not ours:
        return  # installed: the package's own patches subpackage (or the usual ModuleNotFoundError)
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register_checkout_patches()

ConfigLike = Union[LSHMoEConfig, str, os.PathLike, Mapping[str, Any], None]


def load_config(config: ConfigLike, enabled: Optional[bool] = None) -> LSHMoEConfig:
    """An `LSHMoEConfig` from itself, a DeepSpeed JSON path, or a DeepSpeed config dict (its ``lsh_moe`` block).

    `enabled` (a command-line switch, say) overrides the block and ``LSHMOE_ENABLED`` when not None.
    """
    if isinstance(config, LSHMoEConfig):
        return config if enabled is None else dataclasses.replace(config, enabled=enabled)
    # The switch goes in before the block is read, as LSHMOE_ENABLED does, so that the block is checked as the
    # configuration that will train (a block written for the paper's layer, say, once turned on).
    env = None if enabled is None else {ENABLED_ENV_VAR: "1" if enabled else "0"}
    return LSHMoEConfig.from_deepspeed_config(config, env=env)


def enable(config: ConfigLike, model=None, framework: str = "deepspeed") -> LSHMoEConfig:
    """Apply the patch for `framework` when the config enables compression; otherwise make sure none is applied.

    framework: ``deepspeed`` (GShard ``MOELayer``), ``megatron`` (``MoEAlltoAllTokenDispatcher``) or ``autoep``.
    Returns the parsed config. Disabled means unpatched: the framework runs exactly as without the plugin.
    """
    parsed = load_config(config)
    patch = _patch_module(framework)
    if parsed.enabled:
        patch.apply(parsed, model)
    else:
        patch.revert()
    return parsed


def disable(framework: str = "deepspeed") -> None:
    """Revert the patch of `framework` (idempotent)."""
    _patch_module(framework).revert()


@contextlib.contextmanager
def compressed_eval(framework: str = "deepspeed") -> Iterator[None]:
    """Evaluate with compression: inside the block, eval-mode forwards compress as in training
    (``compress_in_eval``); afterwards the settings before come back.

    Every layer keeps its compressor: its hash projections, CUDA graphs and ``decide_by_cost`` decision (a layer
    that decided on stock evaluates stock; one that has not decided yet evaluates stock too, since evaluation never
    measures). Where the patch is not applied (compression disabled) the block runs the framework unchanged.
    """
    with _patch_module(framework).LIFECYCLE.compressing_in_eval():
        yield


def state_dict(model=None, framework: str = "deepspeed") -> Optional[dict]:
    """This rank's plugin state, for a training loop that checkpoints by hand (Megatron-core's): each compressing
    layer's forward count, slot budget and ``decide_by_cost`` decision, with the settings they were made under
    (plain Python values; save it per rank). `model`: the model whose layers to take (None: the layers that ran
    last, the same unless several models train in one process). None while the patch is off. The DeepSpeed
    engine's ``save_checkpoint`` already saves it in its client_state under ``"lsh_moe_state"``."""
    return _patch_module(framework).LIFECYCLE.state_dict(model)


def load_state_dict(state: Optional[dict], model=None, framework: str = "deepspeed") -> None:
    """Continue every layer from `state` (this rank's `state_dict` of an earlier run), after `enable` (with the
    model, so its MoE layers are numbered) and before the next training forward; logs one line. None (a checkpoint
    without it): every layer starts fresh. A state saved under other lsh_moe settings starts fresh too (a run that
    changes its settings is another run); one of another model raises `LSHMoEStateError`. `model` as in
    `state_dict`. While the patch is off there is nothing to restore: it does nothing."""
    lifecycle = _patch_module(framework).LIFECYCLE
    if lifecycle.is_applied():
        log_restore(lifecycle.load_state_dict(state, model))


def _patch_module(framework: str):
    if framework == "deepspeed":
        from .patches import deepspeed_moe
        return deepspeed_moe
    if framework == "megatron":
        from .patches import megatron_dispatcher
        return megatron_dispatcher
    if framework == "autoep":
        from .patches import deepspeed_autoep
        return deepspeed_autoep
    raise ValueError(f"framework={framework!r}: allowed values are 'deepspeed', 'megatron', 'autoep'")


__all__ = ["ClusterState", "CostDecision", "ENABLED_ENV_VAR", "LSHCompressor", "LSHMoEConfig", "LSHMoEConfigError",
           "LSHMoEStateError", "LayerStats", "STATE_KEY", "TELEMETRY", "Telemetry", "compressed_eval", "disable",
           "enable", "fixed_slots", "load_config", "load_state_dict", "set_training_step", "state_dict",
           "training_step", "write_to_monitor"]
