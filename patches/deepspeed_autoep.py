"""Patch of DeepSpeed AutoEP's ``AutoEPMoELayer`` (deepspeed/module_inject/auto_ep_layer.py): LSH-compressed
variable-size all-to-all.

The stock forward is one function; the patched one follows it stage by stage with DeepSpeed's own helpers and only
changes what crosses the network: router -> sort routes by expert -> (pre-scale by score) -> compress each expert's
tokens to centroids -> split plan from centroid counts -> all-to-all -> permute by local expert -> experts
-> unpermute -> all-to-all back -> expand + residual -> the stock weighted combine and output tail.
With ``score_apply="post"`` a token's routing score multiplies ``E(c) + (x - c)`` in the combine, as it multiplies
``E(x)`` in the stock layer. Disabled, unselected layers and eval mode run the stock forward. With one EP rank
nothing crosses the network, yet the layer is still compressed (as the GShard patch does), so training sees the
same arithmetic at any EP size. With ``clustering: "none"`` every routed row crosses (no compress, no expand);
either way each all-to-all carries what crosses in its wire format (lshmoe_plugin.wire), through AutoEP's own
``_AllToAllV`` where that is the model's dtype both ways.
"""
from __future__ import annotations

from typing import Optional

import torch

from lshmoe_plugin import cost, wire
from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig

from . import engine_monitor
from .lifecycle import PatchLifecycle, refuse_cuda_graphs, refuse_fixed_layout_only
from .versioning import DEEPSPEED_RELEASES, UnsupportedFrameworkError, require_deepspeed

SUPPORTED_RELEASES = DEEPSPEED_RELEASES
_HELPERS = ("RouterOutput", "compute_split_plan", "_AllToAllV", "permute_by_local_expert", "unpermute_by_local_expert",
            "combine_from_routed", "apply_scores_before_experts_if_enabled", "AutoEPMoELayer")
LIFECYCLE = PatchLifecycle("autoep")


def _auto_ep_layer():
    version = require_deepspeed()
    from deepspeed.module_inject import auto_ep_layer
    missing = [name for name in _HELPERS if not hasattr(auto_ep_layer, name)]
    missing += [name for name in ("_forward", "_finalize_output") if not hasattr(auto_ep_layer.AutoEPMoELayer, name)]
    if missing:
        raise UnsupportedFrameworkError(f"deepspeed {version}: auto_ep_layer lacks {missing}; "
                                        f"lshmoe-plugin supports AutoEP of deepspeed {SUPPORTED_RELEASES[0]}x")
    return auto_ep_layer


def is_applied() -> bool:
    return LIFECYCLE.is_applied()


def apply(config: LSHMoEConfig, model: Optional[torch.nn.Module] = None) -> None:
    """Patch ``AutoEPMoELayer._forward`` (idempotent; a second call only swaps the config).

    AutoEP swaps the model's MoE blocks inside ``deepspeed.initialize``; pass the engine's module (or call again
    after initialize) to number its AutoEP layers in module order and check them now.
    """
    refuse_cuda_graphs(config, "autoep")
    refuse_fixed_layout_only(config, "autoep")
    auto_ep_layer = _auto_ep_layer()
    if model is not None:
        number_moe_layers(model)
    LIFECYCLE.use(config)
    if is_applied():
        return
    LIFECYCLE.install([(auto_ep_layer.AutoEPMoELayer, "_forward", _patched_forward)])
    engine_monitor.attach(LIFECYCLE)


def revert() -> None:
    LIFECYCLE.restore()
    engine_monitor.detach(LIFECYCLE)


def number_moe_layers(model: torch.nn.Module) -> int:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    return LIFECYCLE.number_layers((m for m in model.modules() if isinstance(m, AutoEPMoELayer)), check_layer)


def check_layer(layer) -> None:
    """Raise `UnsupportedFrameworkError` for an AutoEP layer whose dispatch the patch does not handle."""
    from deepspeed.module_inject.auto_ep_comm import COMM_BACKEND
    problems = []
    if layer.ep_size > 1 and layer.comm_backend != COMM_BACKEND:
        problems.append(f"comm_backend={layer.comm_backend!r} (allowed: {COMM_BACKEND!r}, the all-to-all-v path)")
    handles = layer.folding_group_handles
    if handles is not None and handles.spec.tp_size > 1:
        problems.append(f"AutoEP+AutoTP folding with tp_size={handles.spec.tp_size} (allowed: tp_size 1)")
    if problems:
        raise UnsupportedFrameworkError("lsh_moe cannot compress this AutoEP layer: " + "; ".join(problems))


def _stock_forward(self, hidden_states: torch.Tensor):
    from deepspeed.module_inject import auto_ep_layer
    return LIFECYCLE.original(auto_ep_layer.AutoEPMoELayer, "_forward")(self, hidden_states)


def _patched_forward(self, hidden_states: torch.Tensor):
    index = LIFECYCLE.layer_index(self)
    if not LIFECYCLE.active(index, self.training):
        return _stock_forward(self, hidden_states)
    check_layer(self)
    compressor = LIFECYCLE.compressor(self, index)
    if LIFECYCLE.config.decide_by_cost:
        if cost.measures_now(compressor, self.training):
            decide_by_cost(self, compressor, hidden_states)
        if not compressor.pays:  # None: not decided yet (eval before any training step) runs stock
            return _stock_forward(self, hidden_states)
    return _compressed_forward(self, compressor, hidden_states)


def _compressed_forward(self, compressor: LSHCompressor, hidden_states: torch.Tensor):
    from deepspeed.module_inject import auto_ep_layer as ael
    bsz, seqlen, hdim = hidden_states.shape
    x = hidden_states.reshape(-1, hdim)
    routes, order, routed = _route(self, x)
    with torch.no_grad():
        self.tokens_per_expert.add_(routes.num_tokens_per_expert)
    # An evaluation (compress_in_eval) leaves the training telemetry as it was.
    if compressor.config.clustering == "none":
        if self.training:
            compressor.record_exchange(routed, torch.ones(routed.shape[0], dtype=torch.bool, device=routed.device))
        expert_output = _experts_on_centroids(self, routed, routes.num_tokens_per_expert, routes)
    else:
        centroids, clusters_per_expert, state = compressor.compress_variable(routed, routes.num_tokens_per_expert,
                                                                             record=self.training)
        expert_output = _experts_on_centroids(self, centroids, clusters_per_expert, routes)
        expert_output = compressor.decompress_variable(expert_output, state)

    shape = (bsz, seqlen, hdim)
    if self.combine_impl == "fused_weighted_sum":
        output = ael.fused_token_ops.fused_weighted_restore(expert_output, top_scores=routes.top_scores,
                                                            token_indices_sorted=order, top_k=self.top_k, shape=shape)
    else:
        output = ael.combine_from_routed(expert_output, top_scores=routes.top_scores, token_indices_sorted=order,
                                         top_k=self.top_k, score_apply=self.score_apply,
                                         combine_impl=self.combine_impl, shape=shape)
    return self._finalize_output(output, x, hidden_states, hdim)


def _route(self, x: torch.Tensor):
    """(router output, route order, routed rows): routes (token, k) in expert order, experts in global order,
    each row the token an expert is sent (scaled by its score first when ``score_apply="pre"``)."""
    from deepspeed.module_inject import auto_ep_layer as ael
    routes = ael.RouterOutput(*self.router(x, self.expert_bias))
    order = torch.argsort(routes.selected_experts.view(-1), stable=True)
    routed = x[order // self.top_k]
    routed = ael.apply_scores_before_experts_if_enabled(routed, routes.top_scores.view(-1)[order], self.score_apply)
    return routes, order, routed


def _experts_on_centroids(self, centroids: torch.Tensor, clusters_per_expert: torch.Tensor, routes,
                          coded: bool = True) -> torch.Tensor:
    """Centroids (K, d) sorted by global expert -> their expert outputs (K, d), through the EP all-to-all, each
    crossing in its wire format (`coded`; False: the model's dtype, the stock exchange)."""
    from deepspeed.module_inject import auto_ep_layer as ael
    counts = clusters_per_expert.to(routes.num_tokens_per_expert.dtype)
    if self.ep_size == 1:
        received = _crossing(self, centroids, "dispatch", None, coded)
        rows, perm, aligned, n = ael.permute_by_local_expert(received, counts)
        return _crossing(self, ael.unpermute_by_local_expert(self.experts(rows, aligned), perm, n), "combine", None,
                         coded)
    # The stock plan helper, fed centroid counts instead of token counts: splits and per-source counts follow.
    plan = ael.compute_split_plan(selected_experts=routes.selected_experts, num_experts=self.num_experts,
                                  ep_size=self.ep_size, num_local_experts=self.num_local_experts,
                                  ep_group=self.ep_group, num_tokens_per_expert=counts)
    received = _crossing(self, centroids, "dispatch", (plan.input_splits, plan.output_splits), coded)
    rows, perm, aligned, n = ael.permute_by_local_expert(received, plan.local_counts_by_source)
    output = ael.unpermute_by_local_expert(self.experts(rows, aligned), perm, n)
    return _crossing(self, output, "combine", (plan.output_splits, plan.input_splits), coded)


def _crossing(self, rows: torch.Tensor, crossing: str, splits, coded: bool) -> torch.Tensor:
    """One all-to-all of rows, `splits` (rows sent per rank, rows received per rank); None at EP=1, where nothing
    crosses the network and the wire format still applies (as compression does). In the model's dtype both ways it
    is AutoEP's own `_AllToAllV`, as before."""
    from deepspeed.module_inject import auto_ep_layer as ael
    config = LIFECYCLE.config
    if not (coded and wire.changes_crossing(config, crossing)):
        return rows if splits is None else ael._AllToAllV.apply(self.ep_group, rows, *splits)
    if splits is None:
        return wire.cross(rows, *wire.formats(config, crossing), _same)
    import deepspeed.comm as dist
    return wire.cross(rows, *wire.formats(config, crossing), *wire.split_exchanges(dist.all_to_all_single,
                                                                                  self.ep_group, *splits))


def _same(buffer: torch.Tensor) -> torch.Tensor:
    return buffer


def decide_by_cost(self, compressor: LSHCompressor, hidden_states: torch.Tensor) -> bool:
    """Time the stock exchange of this step's routed rows against the compressed one (`lshmoe_plugin.cost`).

    Exchange = all-to-all, experts, all-to-all (plus compress and expand when compressed). The router runs once,
    without gradients, to build the rows both trials start from.
    """
    devices = [hidden_states.device] if hidden_states.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        routes, _, routed = _route(self, hidden_states.reshape(-1, hidden_states.shape[-1]))
    counts = routes.num_tokens_per_expert

    def stock():
        leaf = routed.detach().requires_grad_()
        out = _experts_on_centroids(self, leaf, counts, routes, coded=False)
        torch.autograd.grad(out, leaf, torch.ones_like(out))

    def compressed():
        leaf = routed.detach().requires_grad_()
        if compressor.config.clustering == "none":  # the wire format alone
            out = _experts_on_centroids(self, leaf, counts, routes)
        else:
            centroids, clusters, state = compressor.compress_variable(leaf, counts, record=False)
            out = compressor.decompress_variable(_experts_on_centroids(self, centroids, clusters, routes), state)
        torch.autograd.grad(out, leaf, torch.ones_like(out))

    group_sum = None
    if self.ep_size > 1:
        import deepspeed.comm as dist
        group_sum = lambda times: dist.all_reduce(times, group=self.ep_group)  # noqa: E731
    return cost.decide(compressor, stock, compressed, routed.device, group_sum, self.ep_size)
