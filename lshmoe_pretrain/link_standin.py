"""A benchmark-side stand-in for the expert-parallel all-to-all: a rank of an EP=1 model, built with the per-rank
shapes of an EP=k job, holds up its compute stream for the time the link model (`link_model.py`) gives the bytes an
EP=k rank would send, while its tensors stay exactly as they are.

Never used by the plugin. At EP=1 both stock DeepSpeed and the plugin hand the layer's ``experts`` module the rows
that would cross the network: the (E, C, d) dispatch buffer for stock, the (E, S, d) centroids for LSH-MoE, every
row for a method without clustering. So the stand-in hooks that module: its input and its output pass through an
autograd function whose forward and backward each wait for the modelled duration of one all-to-all of those rows,
which is where a real exchange blocks the step (DeepSpeed's all-to-all is synchronous with the compute stream). The
four crossings of a layer's training step (dispatch and combine, forward and backward) are modelled for every
variant, and `decide_by_cost`, which times the layer's ``_experts``, meets the modelled exchange as it would a real
one.

What the experts see are the rows *decoded* into the model's dtype; what a crossing sends is their wire format
(lshmoe_plugin.wire: FP8 values and float32 scales, say). So each crossing is priced at the bytes of the format the
DeepSpeed patch sends it in now (`crossing_formats`), the forward's and the backward's apart, and the link model
sees each crossing's real message size.

Every figure made with it is *modelled*, never measured.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch

from lshmoe_plugin import wire

from .link_model import LinkModel


class DeviceDelay:
    """Holds up the work of a device for a given time: on CUDA a spin kernel on the current stream (so later
    kernels queue behind it as they would behind a blocking all-to-all, without a host sync), on the CPU a host
    sleep."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cycles_per_s = _cycles_per_second(self.device) if self.device.type == "cuda" else None

    def __call__(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.cycles_per_s is None:
            time.sleep(seconds)
        else:
            torch.cuda._sleep(int(round(seconds * self.cycles_per_s)))

    def drift(self) -> float:
        """The GPU's spin rate now over the one calibrated at start (1.0: the delays still last what they should;
        a GPU clocked down under load spins fewer cycles per second, so its delays last longer)."""
        if self.cycles_per_s is None:
            return 1.0
        return _measure_cycles_per_second(self.device) / self.cycles_per_s


_CALIBRATED: Dict[torch.device, float] = {}


def _cycles_per_second(device: torch.device) -> float:
    """`torch.cuda._sleep` counts GPU clock cycles: how many of them make a second, measured once per process."""
    if device not in _CALIBRATED:
        _CALIBRATED[device] = _measure_cycles_per_second(device)
    return _CALIBRATED[device]


def _measure_cycles_per_second(device: torch.device, cycles: int = 20_000_000, reps: int = 5) -> float:
    with torch.cuda.device(device):
        torch.cuda._sleep(1000)  # first launch out of the timing
        torch.cuda.synchronize()
        seconds = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    return cycles / statistics.median(seconds)


def crossing_formats(layer, crossing: str) -> Tuple[wire.WireFormat, wire.WireFormat]:
    """(forward, backward) wire formats in which the DeepSpeed MoE `layer`'s `crossing` ("dispatch" or "combine")
    crosses now: the patch's config where the patch compresses this layer (lshmoe_plugin.wire.formats), the model's
    dtype where the layer runs DeepSpeed's own forward (the plugin disabled, a layer not selected, eval mode, steps
    from `exact_from_step` on). Asked of the patch's own lifecycle, so it cannot drift from what the patch does.

    Two of the patch's extra exchanges send the model's dtype through the same ``experts`` while the layer's own
    exchange uses another format, and the stand-in cannot tell them apart there: `decide_by_cost`'s stock trial and
    `output_error_interval`'s sample. With a wire format other than the model's they are refused by name rather than
    priced wrong."""
    from lshmoe_plugin.patches import deepspeed_moe as patch
    from lshmoe_plugin.patches.lifecycle import INDEX_ATTRIBUTE
    config = patch.LIFECYCLE.config
    if not patch.is_applied() or config is None or not wire.changes_crossing(config, crossing):
        return wire.MODEL, wire.MODEL
    index = getattr(layer, INDEX_ATTRIBUTE, None)
    if index is None or not patch.LIFECYCLE.active(index, layer.training):
        return wire.MODEL, wire.MODEL
    refusal = unpriceable(config)
    if refusal is not None:
        raise ValueError(refusal)
    return wire.formats(config, crossing)


def unpriceable(config) -> Optional[str]:
    """Why the stand-in cannot price the exchange of an LSHMoEConfig, or None when it can (what `crossing_formats`
    refuses in the step, asked before one: a benchmark checks its variants with it before building a model)."""
    if not config.enabled or all(dtype == "model" for dtype in config.wire_dtypes):
        return None
    for key, off in (("decide_by_cost", False), ("output_error_interval", 0)):
        if getattr(config, key) != off:
            return (f"the link stand-in cannot price lsh_moe.{key}={getattr(config, key)!r} with wire formats other "
                    f"than the model's ({list(config.wire_dtypes)}): its extra exchange sends the model's dtype "
                    f"through the same experts; allowed with the stand-in: {key} {off!r}, or every wire dtype "
                    f"'model'")
    return None


class _LinkCrossing(torch.autograd.Function):
    """Identity on the values; forward and backward each wait for one modelled all-to-all of the tensor, priced in
    the forward's and the backward's wire format."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, standin: "ModelledAllToAll", crossing: str, formats) -> torch.Tensor:
        ctx.standin, ctx.crossing, ctx.backward_format = standin, crossing, formats[1]
        standin.cross(tensor, formats[0], (crossing, "forward"))
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.standin.cross(grad, ctx.backward_format, (ctx.crossing, "backward"))
        return grad, None, None, None


class ModelledAllToAll:
    """The modelled exchange of EP=`ep` over `link`, for the DeepSpeed MoE layers of EP=1 models it is installed on.

    `modelled_s` and `crossings` add up what it modelled (every crossing, forward and backward), and `priced_bytes`
    the bytes it priced per (crossing, direction), so a benchmark can report the modelled share of a step. `link`
    may be swapped between steps to time several links in one process.
    """

    def __init__(self, link: LinkModel, ep: int, device: torch.device) -> None:
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"modelled EP degree must be an integer >= 1, got {ep!r}")
        self.link, self.ep = link, ep
        self.delay = DeviceDelay(device)
        self.modelled_s, self.crossings = 0.0, 0
        self.priced_bytes: Dict[Tuple[str, str], int] = {}
        self._handles: List = []

    def seconds(self, tensor: torch.Tensor, fmt: wire.WireFormat = wire.MODEL) -> float:
        return self.link.all_to_all_s(wire_bytes(tensor, fmt), self.ep)

    def cross(self, tensor: torch.Tensor, fmt: wire.WireFormat = wire.MODEL,
              where: Tuple[str, str] = ("exchange", "forward")) -> None:
        nbytes = wire_bytes(tensor, fmt)
        seconds = self.link.all_to_all_s(nbytes, self.ep)
        self.modelled_s += seconds
        self.crossings += 1
        self.priced_bytes[where] = self.priced_bytes.get(where, 0) + nbytes
        self.delay(seconds)

    def install(self, model: torch.nn.Module) -> int:
        """Hook the ``experts`` of every DeepSpeed MoE layer of `model`; returns how many layers."""
        from deepspeed.moe.sharded_moe import MOELayer
        layers = [m for m in model.modules() if isinstance(m, MOELayer)]
        if not layers:
            raise ValueError("the link stand-in found no DeepSpeed MoE layer (deepspeed.moe.layer.MoE) in the model")
        for layer in layers:
            if layer.ep_size != 1:
                raise ValueError(f"the link stand-in models the exchange of EP=1 layers only; this layer has "
                                 f"ep_size={layer.ep_size}, whose all-to-all is real")
            if getattr(layer.experts, "_lshmoe_link_standin", None) is not None:
                raise ValueError("a link stand-in is already installed on this model; remove() it first")
        for layer in layers:
            layer.experts._lshmoe_link_standin = self
            self._handles.append(layer.experts.register_forward_pre_hook(self._before_experts(layer)))
            self._handles.append(layer.experts.register_forward_hook(self._after_experts(layer)))
            self._handles.append(_Unmark(layer.experts))
        return len(layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def all_reduce(self, nbytes: float, ranks: int) -> float:
        """Wait for a modelled ring all-reduce of `nbytes` over `ranks` ranks; returns its seconds."""
        seconds = self.link.all_reduce_s(nbytes, ranks)
        self.delay(seconds)
        return seconds

    def _before_experts(self, layer):
        """The dispatch: forward to the experts, and the gradient of their input back (dispatch_grad_dtype)."""
        def hook(module, args):
            formats = crossing_formats(layer, "dispatch")
            return (_LinkCrossing.apply(args[0], self, "dispatch", formats),) + tuple(args[1:])
        return hook

    def _after_experts(self, layer):
        """The combine: the experts' output back, and the gradient of that output to them (combine_grad_dtype)."""
        def hook(module, args, output):
            return _LinkCrossing.apply(output, self, "combine", crossing_formats(layer, "combine"))
        return hook


def wire_bytes(tensor: torch.Tensor, fmt: wire.WireFormat) -> int:
    """Bytes of `tensor`'s rows (..., d) in wire format `fmt` (the model's dtype: the tensor's own bytes)."""
    d = tensor.shape[-1] if tensor.dim() else 1
    return fmt.bytes(tensor.numel() // max(d, 1), d, tensor.dtype)


class _Unmark:
    """A removable handle that clears the installed marker, next to the hooks' own handles."""

    def __init__(self, experts: torch.nn.Module) -> None:
        self.experts = experts

    def remove(self) -> None:
        self.experts._lshmoe_link_standin = None


def dense_gradient_bytes(model: torch.nn.Module, element_size: int) -> int:
    """Bytes of the gradients that data parallelism all-reduces over every rank: all parameters but the experts'
    (DeepSpeed marks those ``allreduce = False``; they are reduced only among replicas of the same experts)."""
    from deepspeed.moe.utils import is_moe_param
    return sum(p.numel() for p in model.parameters() if p.requires_grad and not is_moe_param(p)) * element_size


class ModelledRuns:
    """What a benchmark run models: every (EP degree, link) pair, timed round-robin in one EP=1 process whose
    model has one rank's shapes, with one stand-in per engine switched to the pair before each step.

    The per-rank model is the same at every EP degree (a fixed number of experts per rank: the job has
    experts_per_rank x K experts), so the pairs differ only in what the link model charges.
    """

    def __init__(self, link_names: List[str], eps: List[int], gpus_per_node: int, device: torch.device) -> None:
        from .link_model import parse_link
        for ep in eps:
            if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
                raise ValueError(f"--modelled-ep: every EP degree must be an integer >= 1, got {ep!r}")
        self.links = {name: LinkModel(parse_link(name), gpus_per_node=gpus_per_node) for name in link_names}
        self.pairs = [(ep, name) for ep in eps for name in link_names]
        self.device = device
        self.standins: Dict[str, ModelledAllToAll] = {}
        self.dense_bytes: Dict[str, int] = {}

    def install(self, variant: str, model: torch.nn.Module, grad_element_size: int) -> None:
        ep, name = self.pairs[0]
        self.standins[variant] = ModelledAllToAll(self.links[name], ep, self.device)
        self.standins[variant].install(model)
        self.dense_bytes[variant] = dense_gradient_bytes(model, grad_element_size)

    def use(self, variant: str, pair) -> None:
        standin = self.standins[variant]
        standin.ep, standin.link = pair[0], self.links[pair[1]]

    def all_reduce(self, variant: str, pair) -> float:
        """The dense gradients' modelled all-reduce over the EP degree's ranks (data parallel = EP here)."""
        return self.standins[variant].all_reduce(self.dense_bytes[variant], pair[0])

    def drift(self) -> float:
        """How far the device's delays have drifted from their calibration (1.0: not at all; see DeviceDelay)."""
        return next(iter(self.standins.values())).delay.drift()

    @staticmethod
    def label(variant: str, pair) -> str:
        return variant if pair is None else f"{variant} @ {pair[1]} EP{pair[0]}"

    def describe(self, experts_per_rank: int) -> str:
        links = "; ".join(model.describe() for model in self.links.values())
        gpus = next(iter(self.links.values())).gpus_per_node
        on_node = [ep for ep, _ in self.pairs if 1 < ep <= gpus]
        topology = (f"**{gpus} GPU(s) per node** (NVLink inside a node, one NIC per GPU); the last column gives "
                    f"each row's split of a rank's EP peers"
                    + (f"; at EP={'/'.join(map(str, sorted(set(on_node))))} every peer is on the node, so no byte "
                       f"crosses a NIC and the NIC rows differ only by noise" if on_node else ""))
        return (f"**modelled**, not measured: one process at EP=1 holding one rank's shapes ({experts_per_rank} "
                f"expert(s) per rank, i.e. the modelled job has {experts_per_rank} x K experts; with 1 expert per "
                f"rank and top-2 both of a token's picks go to that expert, which keeps the E x C x d dispatch "
                f"buffer and the expert rows of an EP=K rank); the all-to-all of EP=K is a delay of the link "
                f"model's time (lshmoe_pretrain/link_model.py) on the compute stream where each crossing would be, "
                f"forward and backward, for the bytes that crossing sends in its wire format (the model's dtype, or "
                f"FP8 values with their float32 scales; lshmoe_pretrain/link_standin.py), and the dense gradients' "
                f"ring all-reduce over K ranks is one more after each backward; {topology}; links: {links}")
