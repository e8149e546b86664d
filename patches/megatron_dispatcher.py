"""Patch of Megatron-core's ``MoEAlltoAllTokenDispatcher``: LSH-compressed variable-size all-to-all.

The stock dispatcher permutes the tokens expert after expert, sends them with split sizes counted in tokens, runs
the experts on what it received and sends the outputs back along the same splits. The patch wraps two of its
stages and leaves the rest stock:
- ``dispatch_preprocess``: after the stock permutation, each destination expert's tokens are reduced to their LSH
  cluster centroids; the split sizes, the per-expert counts the experts see (``tokens_per_expert``) and the chunk
  counts used to sort by local expert become centroid counts, exchanged once more across the EP group.
  The centroids go out with routing probability 1: a token's probability is applied on its return.
- ``combine_postprocess``: every token gets its centroid's expert output plus its residual (token - centroid),
  times its routing probability, and the stock un-permutation follows.
Megatron's experts scale their output by the probability (bias included), so ``p * (E(c) + x - c)`` is
``E_p(x)`` whenever ``E(c) + x - c`` is ``E(x)``: exact at rate 1.0 and for an identity expert.
- ``token_dispatch`` and ``token_combine`` run stock, but the ``all_to_all`` they call sends their rows in the
  configured wire format (lshmoe_plugin.wire; the gradient back along the transposed splits) wherever that is not
  the model's dtype. With ``clustering: "none"`` the preprocess leaves the tokens as they are (FP8 alone).
``MoELayer.forward`` is wrapped only to tell its dispatcher the layer's index and train/eval mode. Disabled,
unselected layers and eval mode run the stock dispatcher untouched.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

from lshmoe_plugin import wire
from lshmoe_plugin.config import LSHMoEConfig, LSHMoEConfigError

from .lifecycle import INDEX_ATTRIBUTE, PatchLifecycle, refuse_cuda_graphs, refuse_fixed_layout_only
from .versioning import UnsupportedFrameworkError, require_release

# 0.16.x runs in the test suite; 0.19.x has the same dispatcher stages, attributes and split-size flow (read
# from the 0.19.2 source) and runs the same suite on Python 3.12 (docs/megatron_autoep.md says how).
SUPPORTED_RELEASES = ("0.16.", "0.19.")
LIFECYCLE = PatchLifecycle("megatron")


def _megatron_modules():
    try:
        import megatron.core
    except ImportError as err:
        raise UnsupportedFrameworkError("lsh_moe with framework='megatron' needs megatron-core: "
                                        "pip install megatron-core==0.16.1") from err
    require_release("megatron-core", megatron.core.__version__, SUPPORTED_RELEASES)
    from megatron.core.transformer.moe import moe_layer, token_dispatcher
    return moe_layer, token_dispatcher


def is_applied() -> bool:
    return LIFECYCLE.is_applied()


def apply(config: LSHMoEConfig, model=None) -> None:
    """Patch the all-to-all dispatcher (idempotent; a second call only swaps the config).

    ``model``: a module or a list of model chunks. Its MoE layers get their indices now and are checked for
    unsupported settings up front; without it, layers are checked and numbered when they first run.
    """
    if config.decide_by_cost:
        # The stock exchange runs across three dispatcher stages that keep their split sizes in the dispatcher
        # object; timing it apart from the real step would mean re-running them out of order.
        raise LSHMoEConfigError("lsh_moe.decide_by_cost=true is not supported with framework='megatron'; allowed "
                                "there: false (it is supported with framework='deepspeed' and 'autoep')")
    refuse_cuda_graphs(config, "megatron")
    refuse_fixed_layout_only(config, "megatron")
    moe_layer, token_dispatcher = _megatron_modules()
    if model is not None:
        number_moe_layers(model)
    LIFECYCLE.use(config)
    if is_applied():
        return
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    LIFECYCLE.install([(moe_layer.MoELayer, "forward", _patched_layer_forward),
                       (dispatcher, "dispatch_preprocess", _patched_dispatch_preprocess),
                       (dispatcher, "token_dispatch", _patched_token_dispatch),
                       (dispatcher, "token_combine", _patched_token_combine),
                       (dispatcher, "combine_postprocess", _patched_combine_postprocess),
                       (token_dispatcher, "all_to_all", _coded_all_to_all)])


def revert() -> None:
    LIFECYCLE.restore()


# -- layer numbering and checks ---------------------------------------------------------------------------------
def number_moe_layers(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> int:
    """Give every MoE layer of `model` its index among the model's MoE layers and check its settings."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    layers = (m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer))
    return LIFECYCLE.number_layers(layers, check_layer, lambda layer, position: moe_layer_index(layer))


def moe_layer_index(layer) -> int:
    """0-based position of `layer` among the whole model's MoE layers, from its global ``layer_number`` (which
    counts earlier pipeline stages) and ``moe_layer_freq``; in order of first use where no number is set."""
    if getattr(layer, INDEX_ATTRIBUTE, None) is not None:
        return getattr(layer, INDEX_ATTRIBUTE)
    number = getattr(layer, "layer_number", None)
    if number is None:
        return LIFECYCLE.layer_index(layer)
    freq = layer.config.moe_layer_freq
    pattern = [int(i % freq == 0) for i in range(layer.config.num_layers)] if isinstance(freq, int) else list(freq)
    return sum(pattern[: number - 1])


def check_layer(layer) -> None:
    """Raise `UnsupportedFrameworkError` for a MoE layer whose dispatch the patch does not handle."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    config = layer.config
    kind = config.moe_token_dispatcher_type
    if kind != "alltoall" or not isinstance(layer.token_dispatcher, MoEAlltoAllTokenDispatcher):
        raise UnsupportedFrameworkError(
            f"lsh_moe supports Megatron's all-to-all dispatcher only; found moe_token_dispatcher_type={kind!r}. "
            "Allowed: 'alltoall'")
    _check_dispatcher(layer.token_dispatcher)


def _check_dispatcher(dispatcher) -> None:
    config = dispatcher.config
    problems = []
    if dispatcher.drop_and_pad:
        problems.append("moe_pad_expert_input_to_capacity=True (drop-and-pad sends fixed capacity buffers; "
                        "allowed: False, with or without moe_expert_capacity_factor)")
    if dispatcher.tp_size > 1:
        problems.append(f"expert tensor parallel size {dispatcher.tp_size} (allowed: expert_tensor_parallel_size=1)")
    if config.moe_router_padding_for_quantization:
        problems.append("moe_router_padding_for_quantization=True (allowed: False)")
    if config.fp8 or getattr(config, "fp4", None):
        problems.append("fp8/fp4 expert compute (not verified; allowed: bf16/fp16/fp32)")
    if config.moe_shared_expert_overlap:
        problems.append("moe_shared_expert_overlap=True (allowed: False; shared experts without overlap are fine)")
    if _graphs_capture_moe(config):
        problems.append(f"cuda_graph_impl={config.cuda_graph_impl!r} capturing the MoE layer (its split sizes "
                        "change every step under compression; allowed: no CUDA graph around MoE dispatch)")
    if problems:
        raise UnsupportedFrameworkError("lsh_moe cannot compress this Megatron MoE layer: " + "; ".join(problems))


def _graphs_capture_moe(config) -> bool:
    if config.cuda_graph_impl == "none":
        return False
    # 0.16 names the setting cuda_graph_scope, 0.19 cuda_graph_modules; empty means the whole layer.
    scope = getattr(config, "cuda_graph_modules", None) or getattr(config, "cuda_graph_scope", None) or []
    scope = scope if isinstance(scope, (list, tuple)) else [scope]
    names = {getattr(item, "name", str(item)) for item in scope}
    return not names or bool(names & {"full_iteration", "moe", "moe_preprocess", "full"})


# -- patched stages ---------------------------------------------------------------------------------------------
def _patched_layer_forward(self, hidden_states, *args, **kwargs):
    from megatron.core.transformer.moe import moe_layer
    index = moe_layer_index(self)
    setattr(self, INDEX_ATTRIBUTE, index)
    # 0.19 keeps the training dispatcher aside while an inference dispatcher is active; tag both.
    for dispatcher in (self.token_dispatcher, getattr(self, "_training_token_dispatcher", None)):
        if dispatcher is not None:
            setattr(dispatcher, INDEX_ATTRIBUTE, index)
            dispatcher._lshmoe_training = self.training
    return LIFECYCLE.original(moe_layer.MoELayer, "forward")(self, hidden_states, *args, **kwargs)


def _original_stage(name: str):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    return LIFECYCLE.original(MoEAlltoAllTokenDispatcher, name)


def _patched_dispatch_preprocess(self, hidden_states, routing_map, probs):
    permuted, permuted_probs = _original_stage("dispatch_preprocess")(self, hidden_states, routing_map, probs)
    self._lshmoe_saved = None
    index = getattr(self, INDEX_ATTRIBUTE, None)
    training = getattr(self, "_lshmoe_training", True)
    self._lshmoe_coded = index is not None and LIFECYCLE.active(index, training)  # the crossings' wire formats
    if not self._lshmoe_coded:
        return permuted, permuted_probs
    _check_dispatcher(self)
    if LIFECYCLE.config.clustering == "none":
        if training:
            valid = torch.ones(permuted.shape[0], dtype=torch.bool, device=permuted.device)
            LIFECYCLE.compressor(self, index).record_exchange(permuted, valid)
        return permuted, permuted_probs
    tokens = permuted
    if self.config.moe_apply_probs_on_input:
        # The expert would scale its input by p; scale before clustering so centroids are of what it sees.
        tokens = (permuted_probs.unsqueeze(-1) * permuted).to(permuted.dtype)
        permuted_probs = None
    # `permuted` holds each expert's tokens in turn (experts in global order); self.routing_map is the one the
    # stock stage permuted with (after any quantization padding).
    tokens_per_expert = self.routing_map.sum(dim=0)
    compressor = LIFECYCLE.compressor(self, index)
    # An evaluation (compress_in_eval) leaves the training telemetry as it was.
    centroids, clusters_per_expert, state = compressor.compress_variable(tokens, tokens_per_expert, record=training)
    self._lshmoe_saved = (compressor, state, permuted_probs)
    _use_centroid_counts(self, clusters_per_expert)
    centroid_probs = torch.ones(centroids.shape[0], dtype=probs.dtype, device=centroids.device)
    return centroids, centroid_probs


def _use_centroid_counts(self, clusters_per_expert: torch.Tensor) -> None:
    """Replace the token counts the stock preprocess computed with centroid counts, in the same places and forms.

    Mirrors ``MoEAlltoAllTokenDispatcher.preprocess`` for expert-TP size 1: every EP rank learns how many
    centroids each rank sends to each of its local experts.
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    ep, local = self.ep_size, self.num_local_experts
    if ep > 1:
        # [ep_size (sender), num_experts]
        gathered = gather_from_sequence_parallel_region(clusters_per_expert, group=self.tp_ep_group)
        gathered = gathered.reshape(ep, self.num_experts)
    else:
        gathered = clusters_per_expert.reshape(1, self.num_experts)
    first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
    host = torch.cat([clusters_per_expert.reshape(1, -1), gathered]).cpu()  # the one host sync
    sent, received = host[0], host[1:, first:last]  # received: [ep_size (sender), num_local_experts]
    if ep > 1:
        self.input_splits = sent.reshape(ep, local).sum(dim=1).numpy()
        self.output_splits = received.sum(dim=1).numpy()
    self.tokens_per_expert = received.sum(dim=0)
    if local > 1:
        self.num_global_tokens_per_local_expert = received.to(self.permute_idx_device)


def _patched_token_dispatch(self, permuted, permuted_probs):
    return _coding(self, "dispatch", permuted, "token_dispatch", permuted, permuted_probs)


def _patched_token_combine(self, hidden_states, *args, **kwargs):
    return _coding(self, "combine", hidden_states, "token_combine", hidden_states, *args, **kwargs)


# (crossing, rows) of the dispatcher stage running now: the all-to-all that sends exactly `rows` codes them.
_CODING = []


def _coding(self, crossing: str, rows: torch.Tensor, stage: str, *args, **kwargs):
    """Run the stock `stage`; its all-to-all of `rows` goes in the crossing's wire format when that changes it."""
    original = _original_stage(stage)
    if not (getattr(self, "_lshmoe_coded", False) and wire.changes_crossing(LIFECYCLE.config, crossing)):
        return original(self, *args, **kwargs)
    _CODING.append((crossing, rows))
    try:
        return original(self, *args, **kwargs)
    finally:
        _CODING.pop()


def _coded_all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None):
    """Megatron's ``all_to_all`` as the dispatcher module calls it; the rows `_coding` names cross encoded."""
    from megatron.core.transformer.moe import token_dispatcher
    if not _CODING or input_ is not _CODING[-1][1]:
        return LIFECYCLE.original(token_dispatcher, "all_to_all")(group, input_, output_split_sizes_,
                                                                  input_split_sizes)
    formats = wire.formats(LIFECYCLE.config, _CODING[-1][0])
    if group.size() == 1:  # nothing crosses the network; the wire format applies all the same
        return wire.cross(input_, *formats, _same)
    return wire.cross(input_, *formats, *wire.split_exchanges(torch.distributed.all_to_all_single, group,
                                                              input_split_sizes, output_split_sizes_))


def _same(buffer: torch.Tensor) -> torch.Tensor:
    return buffer


def _patched_combine_postprocess(self, hidden_states):
    saved, self._lshmoe_saved = getattr(self, "_lshmoe_saved", None), None
    if saved is None:
        return _original_stage("combine_postprocess")(self, hidden_states)
    compressor, state, permuted_probs = saved
    tokens = compressor.decompress_variable(hidden_states, state)
    if permuted_probs is not None:
        tokens = (tokens * permuted_probs.unsqueeze(-1)).to(tokens.dtype)
    return _original_stage("combine_postprocess")(self, tokens)
