"""lshmoe-plugin: LSH-compressed expert-parallel all-to-all for DeepSpeed and Megatron-core MoE training.

One line turns it on in a DeepSpeed training script, with the ``"lsh_moe"`` block in the same JSON config::

    lshmoe_plugin.enable(args.deepspeed_config, model)   # before or after deepspeed.initialize
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from .compressor import ClusterState, LSHCompressor, fixed_slots
from .config import ENABLED_ENV_VAR, LSHMoEConfig, LSHMoEConfigError
from .telemetry import TELEMETRY, LayerStats, Telemetry, write_to_monitor

__version__ = "0.1.0"

ConfigLike = Union[LSHMoEConfig, str, os.PathLike, Mapping[str, Any], None]


def load_config(config: ConfigLike) -> LSHMoEConfig:
    """An `LSHMoEConfig` from itself, a DeepSpeed JSON path, or a DeepSpeed config dict (its ``lsh_moe`` block)."""
    if isinstance(config, LSHMoEConfig):
        return config
    return LSHMoEConfig.from_deepspeed_config(config)


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


__all__ = ["ClusterState", "ENABLED_ENV_VAR", "LSHCompressor", "LSHMoEConfig", "LSHMoEConfigError", "LayerStats",
           "TELEMETRY", "Telemetry", "disable", "enable", "fixed_slots", "load_config", "write_to_monitor"]
