"""The lifecycle every framework patch shares: install and restore the seams, hold the current config, number the
MoE layers, keep one compressor per layer (and its state through a checkpoint), decide whether a layer compresses
now, and the telemetry policy.

A framework patch keeps only its seam (what it replaces and the replacement's body) and calls this for the rest,
so the three patches cannot drift apart in how they number layers, rebuild compressors or clear telemetry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from lshmoe_plugin import wire
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError
from lshmoe_plugin.plugin_state import Restore, layer_states, layers_to_restore
from lshmoe_plugin.schedule import TRAINING_CLOCK, training_step
from lshmoe_plugin.telemetry import TELEMETRY, Telemetry

INDEX_ATTRIBUTE = "_lshmoe_index"
COMPRESSOR_ATTRIBUTE = "_lshmoe_compressor"
_INHERITED = object()  # the attribute lived on a base class: restoring deletes the override


class PatchLifecycle:
    """State of one framework patch between `install` and `restore`.

    Telemetry policy, the same for every patch: stats of an earlier config never mix with the current one's, so
    they are cleared whenever the config changes how layers compress (`compresses_alike`) and when the patch is
    reverted.
    """

    def __init__(self, name: str, telemetry: Telemetry = TELEMETRY) -> None:
        self.name = name
        self.telemetry = telemetry
        self.config: Optional[LSHMoEConfig] = None
        self.next_index = 0
        self.model_layers: Tuple[int, ...] = ()  # the MoE layer indices of the model `number_layers` saw last
        self._originals: Dict[Tuple[Any, str], Tuple[Any, Any]] = {}  # (owner, name) -> (own value, callable)
        # The compressor each layer index ran last (weakly: a model dropped takes its compressors with it), and the
        # states a load restored for layers whose compressor is built at their first forward after it.
        self._compressors: "weakref.WeakValueDictionary[int, LSHCompressor]" = weakref.WeakValueDictionary()
        self._restored: Dict[int, dict] = {}

    # -- seams ----------------------------------------------------------------------------------------------------
    def is_applied(self) -> bool:
        return bool(self._originals)

    def install(self, seams: Iterable[Tuple[Any, str, Any]]) -> None:
        """Replace ``owner.attribute`` by ``replacement`` for each seam, keeping the originals (idempotent).

        A new application starts the training clock from zero, as a fresh process would: the clock is
        process-global, and a second run in the same process must not start from the step where the first ended
        (its `exact_from_step` would fire at once). A DeepSpeed engine sets it to its own step before every forward;
        other loops set it with `set_training_step`.
        """
        if self.is_applied():
            return
        TRAINING_CLOCK.reset()
        for owner, attribute, replacement in seams:
            self._originals[(owner, attribute)] = (vars(owner).get(attribute, _INHERITED), getattr(owner, attribute))
            setattr(owner, attribute, replacement)

    def original(self, owner: Any, attribute: str) -> Any:
        """The callable a seam replaced, for the patched code to run the stock path."""
        return self._originals[(owner, attribute)][1]

    def restore(self) -> None:
        """Put every original back and forget the config (idempotent: nothing happens when not applied)."""
        if not self.is_applied():
            return
        for (owner, attribute), (own, _) in reversed(list(self._originals.items())):
            if own is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)
        self._originals.clear()
        self.config = None
        self.model_layers = ()
        self.telemetry.clear()
        self._forget_layer_states()

    # -- config ---------------------------------------------------------------------------------------------------
    def use(self, config: LSHMoEConfig) -> None:
        if not compresses_alike(self.config, config):
            self.telemetry.clear()
            self._forget_layer_states()  # the compressors are rebuilt for the new config, from scratch
        self.config = config

    @contextlib.contextmanager
    def compressing_in_eval(self) -> Iterator[None]:
        """Eval-mode forwards compress inside the block (``compress_in_eval``); the config before comes back on
        exit. No compressor is rebuilt either way. Nothing changes while the patch is not applied."""
        before = self.config
        if not self.is_applied() or before is None or before.compress_in_eval:
            yield
            return
        self.use(dataclasses.replace(before, compress_in_eval=True))
        try:
            yield
        finally:
            if self.is_applied():  # a revert inside the block forgot the config: nothing to put back
                self.use(before)

    def active(self, layer_index: int, training: bool) -> bool:
        """Compress this layer now? Disabled, unselected layers, eval mode (unless compress_in_eval) and steps from
        `exact_from_step` on run stock."""
        config = self.config
        if not (config is not None and config.enabled and config.applies_to_layer(layer_index)
                and (training or config.compress_in_eval)):
            return False
        if config.exact_from_step is not None and training_step() >= config.exact_from_step:
            # The layer runs stock from now on: its last compressed step's stats must not go on being reported.
            self.telemetry.latest.pop(layer_index, None)
            return False
        return True

    # -- layers ---------------------------------------------------------------------------------------------------
    def number_layers(self, layers: Iterable[Any], check: Callable[[Any], None],
                      index_of: Optional[Callable[[Any, int], int]] = None) -> int:
        """Check every layer and give it its index (`index_of(layer, position)`, default: its position in module
        order); layers first seen later are numbered after all of these."""
        indices = []
        for layer in layers:
            check(layer)
            index = index_of(layer, len(indices)) if index_of else len(indices)
            setattr(layer, INDEX_ATTRIBUTE, index)
            self.next_index = max(self.next_index, index + 1)
            indices.append(index)
        self.model_layers = tuple(sorted(indices))
        return len(indices)

    def layer_index(self, layer: Any) -> int:
        """The layer's index; a layer `number_layers` never saw gets the next free one, in order of first use."""
        index = getattr(layer, INDEX_ATTRIBUTE, None)
        if index is None:
            index = self.next_index
            self.next_index += 1
            setattr(layer, INDEX_ATTRIBUTE, index)
        return index

    def compressor(self, holder: Any, layer_index: int) -> LSHCompressor:
        """The compressor cached on `holder` (a layer or its dispatcher), rebuilt when the config changes how it
        compresses or the holder now serves another layer index; otherwise it keeps its projections, CUDA graphs
        and cost decision (switching ``compress_in_eval`` rebuilds nothing)."""
        compressor = getattr(holder, COMPRESSOR_ATTRIBUTE, None)
        if compressor is None or compressor.layer_index != layer_index \
                or not compresses_alike(compressor.config, self.config):
            compressor = LSHCompressor(self.config, layer_index, self.telemetry)
            compressor.load_state_dict(self._restored.pop(layer_index, None))
            setattr(holder, COMPRESSOR_ATTRIBUTE, compressor)
        compressor.config = self.config  # the same compression; saves the comparison on the next forward
        self._compressors[layer_index] = compressor
        return compressor

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self, model: Any = None) -> Optional[dict]:
        """Every layer's compressor state (`plugin_state.layer_states`), a restored one not yet applied included,
        and the draw counts of the config's stochastic formats (read back from the device: a save is no hot path);
        None while the patch is not applied. `model`: take the compressors of its layers (None: those that ran
        last, which is the same unless several models train in one process)."""
        if not self.is_applied() or self.config is None:
            return None
        layers = dict(self._restored)
        layers.update((index, compressor.state_dict()) for index, compressor in self._current(model).items())
        return layer_states(self.name, self.config, self.model_layers, layers, wire.draws_state(self.config))

    def load_state_dict(self, state: Optional[dict], model: Any = None, restore: Optional[Restore] = None) -> Restore:
        """Continue every layer from `state` (a `state_dict`; None: fresh), or as `restore` says; returns what was
        done, for the log line. The compressors of `model` (as in `state_dict`) take it now; layers whose compressor
        is built later (a new model's, at its first forward) take it then. The stochastic formats' draw counters
        continue from the state's counts, or from their first draw where it has none (no host synchronisation)."""
        if restore is None:
            restore = layers_to_restore(state, self.name, self.config, self.model_layers)
        self._restored = dict(restore.layers)
        for index, compressor in self._current(model).items():
            compressor.load_state_dict(self._restored.pop(index, None))
        wire.load_draws(self.config, restore.draws)
        return restore

    def _current(self, model: Any) -> Dict[int, LSHCompressor]:
        """The compressors of the current config by layer index: those held in `model` (a module or a list of model
        chunks), or those that ran last."""
        if model is None:
            return dict(self._compressors.items())
        found = {}
        chunks = model if isinstance(model, (list, tuple)) else [model]  # Megatron's model chunks
        for module in (m for chunk in chunks for m in chunk.modules()):
            for holder in (module, *vars(module).values()):  # a layer, or what it holds (Megatron's dispatcher)
                compressor = getattr(holder, COMPRESSOR_ATTRIBUTE, None)
                if isinstance(compressor, LSHCompressor) and compresses_alike(compressor.config, self.config):
                    found[compressor.layer_index] = compressor
        return found

    def _forget_layer_states(self) -> None:
        self._compressors.clear()
        self._restored.clear()


def compresses_alike(a: Optional[LSHMoEConfig], b: Optional[LSHMoEConfig]) -> bool:
    """Whether two configs compress a layer the same way: equal but for ``compress_in_eval``, which only says
    whether eval mode runs the compressor at all."""
    if a is None or b is None:
        return a is b
    return a == b or dataclasses.replace(a, compress_in_eval=b.compress_in_eval) == b


def refuse_cuda_graphs(config: LSHMoEConfig, framework: str) -> None:
    """The variable layout reads its cluster count back to the host once per layer: it cannot be captured."""
    if config.cuda_graphs is True:
        raise LSHMoEConfigError(f"lsh_moe.cuda_graphs=true is not supported with framework={framework!r} (its "
                                f"dispatch sizes are read back to the host every layer, which a CUDA graph cannot "
                                f"hold); allowed there: 'auto' or false (they run eagerly; cuda_graphs=true is "
                                f"supported with framework='deepspeed')")


def refuse_fixed_layout_only(config: LSHMoEConfig, framework: str) -> None:
    """Keys built for DeepSpeed's fixed-capacity buffer, refused by name where the dispatch sizes vary."""
    for key, off in (("refine_iterations", 0), ("output_error_interval", 0), ("residual_map", "identity"),
                     ("exact_token_stride", 0)):
        if getattr(config, key) != off:
            raise LSHMoEConfigError(f"lsh_moe.{key}={getattr(config, key)} is not supported with "
                                    f"framework={framework!r} (it is built for DeepSpeed's fixed-capacity layer, "
                                    f"framework='deepspeed'); allowed there: {key} {off!r}")
