"""Does a method of the plugin (LSH-MoE's centroids, FP8 on the wire, or both) pay on my cluster? Measure one MoE
layer's compute on this device, add the link model's time for the bytes an EP=k rank would exchange, and predict
the layer's and the training step's speed-up.

The compute is measured at EP=1 on the per-rank shapes of the EP=k job: the k-th part of the experts
(E/k experts), each with k times the capacity of one sender's share, i.e. the same (E x C x d) dispatch buffer and
the same expert GEMM rows as an EP=k rank. Both variants run DeepSpeed's real MoE layer, the plugin's one under
the method's config (lshmoe_plugin.methods), forward and backward, timed round-robin. What crosses the network is
computed, not measured: stock sends E x C rows of d in the model's dtype; the method E x S rows (S = ceil(rate x C)
centroid slots per expert) with LSH clustering, every one of the E x C rows without, each in the wire format of
its crossing (lshmoe_plugin.wire: the model's dtype, or FP8 values and float32 scales). A layer's training step
makes four crossings (dispatch and combine, forward and backward), each priced at its own bytes. With the published
quality record of the same layer shape and method (docs/quality.md), the step speed-up becomes a time to stock's
loss. Used by scripts/plan_lsh_moe.py and scripts/check_link_model.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from lshmoe_plugin import wire
from lshmoe_plugin.compressor import fixed_slots
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.methods import METHODS

from .link_model import GB, LinkModel
from .quality_records import QualityRecord

# The model's dtype by its element size: the wire formats count bytes by the dtype's item size only.
_MODEL_DTYPES = {2: torch.bfloat16, 4: torch.float32}
_CONFIG_DEFAULTS = LSHMoEConfig()


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer of an EP=`ep` job, per rank, and the plugin's method (lshmoe_plugin.methods) planned for it:
    `rate` is the compression rate of a clustered method (a method without clustering takes none: left at the
    default), `fp8_block_size` the scales' block of a method that sends FP8."""
    d_model: int
    tokens_per_rank: int
    experts: int
    top_k: int
    ep: int
    d_ff: Optional[int] = None          # default 4 x d_model
    capacity_factor: float = 1.25
    rate: float = _CONFIG_DEFAULTS.compression_rate
    element_size: int = 2               # bytes per element of the model's dtype (bf16)
    min_capacity: int = 4
    method: str = "paper"
    fp8_block_size: Union[str, int] = _CONFIG_DEFAULTS.fp8_block_size

    def __post_init__(self) -> None:
        for key in ("d_model", "tokens_per_rank", "experts", "ep", "element_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if self.element_size not in _MODEL_DTYPES:
            raise ValueError(f"element_size must be one of {sorted(_MODEL_DTYPES)} (bf16/fp16, fp32), got "
                             f"{self.element_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 (DeepSpeed's gate), got {self.top_k!r}")
        if self.experts % self.ep:
            raise ValueError(f"experts={self.experts} must be a multiple of ep={self.ep} (each rank holds "
                             f"experts / ep of them)")
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {self.rate!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor!r}")
        if not self.clustered and self.rate != _CONFIG_DEFAULTS.compression_rate:
            raise ValueError(f"rate={self.rate!r} is LSH clustering's compression rate, which method "
                             f"{self.method!r} does not use (clustering 'none'); allowed: leave it at its default")
        self.config()  # the plugin's own validation of the method's settings (fp8_block_size, say)

    def config(self, kernel: str = "auto") -> LSHMoEConfig:
        """The plugin's config of the planned method (telemetry off: the trial times the layer, nothing else)."""
        settings = dict(enabled=True, method=self.method, kernel=kernel, telemetry_interval=0,
                        fp8_block_size=self.fp8_block_size)
        if self.clustered:
            settings["compression_rate"] = self.rate
        return LSHMoEConfig(**settings)

    @property
    def clustered(self) -> bool:
        return METHODS[self.method].stages["clustering"] != "none"

    @property
    def dtype(self) -> torch.dtype:
        return _MODEL_DTYPES[self.element_size]

    @property
    def ffn(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def local_experts(self) -> int:
        return self.experts // self.ep

    @property
    def capacity(self) -> int:
        """Slots per expert on one sender, as DeepSpeed's gate sizes them."""
        return max(math.ceil(self.tokens_per_rank / self.experts * self.capacity_factor * self.top_k),
                   self.min_capacity)

    @property
    def stock_bytes(self) -> int:
        """One rank's all-to-all buffer, stock: E x C x d."""
        return self.experts * self.capacity * self.d_model * self.element_size

    @property
    def lsh_bytes(self) -> int:
        """One rank's all-to-all buffer with LSH-MoE as published: E x S x d centroids in the model's dtype."""
        return self.experts * fixed_slots(self.capacity, self.rate) * self.d_model * self.element_size

    @property
    def method_rows(self) -> int:
        """Rows one rank sends per crossing under the method: E x S centroids, or all E x C slots unclustered."""
        return self.experts * (fixed_slots(self.capacity, self.rate) if self.clustered else self.capacity)

    def crossing_bytes(self, variant: str) -> Tuple[int, int, int, int]:
        """One rank's bytes per crossing of a layer's training step (dispatch forward, dispatch backward, combine
        forward, combine backward) for `variant` "stock" (the model's dtype) or "lsh" (the method, each crossing
        in its wire format, scales included)."""
        if variant == "stock":
            return (self.stock_bytes,) * 4
        config = self.config()
        return tuple(fmt.bytes(self.method_rows, self.d_model, self.dtype)
                     for crossing in wire.CROSSINGS for fmt in wire.formats(config, crossing))

    @property
    def method_bytes(self) -> Union[int, float]:
        """The method's bytes per crossing, the mean of the four (wire.bytes_per_crossing)."""
        return wire.bytes_per_crossing(self.config(), self.method_rows, self.d_model, self.dtype)


def build_layer(shape: LayerShape, ep_size: int, device: torch.device, dtype: torch.dtype):
    """DeepSpeed's MoE layer with FFN experts: the EP=1 stand-in of one rank (ep_size=1: E/k experts) or the real
    EP layer (ep_size=k: all E experts over the group). Needs an initialised process group."""
    from deepspeed.moe.layer import MoE
    torch.manual_seed(0)
    d = shape.d_model
    expert = torch.nn.Sequential(torch.nn.Linear(d, shape.ffn), torch.nn.GELU(), torch.nn.Linear(shape.ffn, d))
    experts = shape.local_experts if ep_size == 1 else shape.experts
    moe = MoE(d, expert, num_experts=experts, ep_size=ep_size, k=shape.top_k,
              capacity_factor=shape.capacity_factor, min_capacity=shape.min_capacity)
    moe.set_deepspeed_parallelism()
    return moe.to(device, dtype)


def time_layer(shape: LayerShape, ep_size: int, device: torch.device, dtype: torch.dtype, reps: int = 10,
               warmup: int = 3, kernel: str = "auto") -> Dict[str, float]:
    """Median fwd+bwd ms of the layer, stock and ("lsh") the plugin under `shape`'s method, timed round-robin in
    this process (and in step with the other ranks of a real EP group)."""
    layers = {v: build_layer(shape, ep_size, device, dtype) for v in ("stock", "lsh")}
    return time_variants(shape, {v: (layer, v == "lsh") for v, layer in layers.items()}, device, dtype, reps,
                         warmup, kernel)


def time_variants(shape: LayerShape, variants: Dict[str, tuple], device: torch.device, dtype: torch.dtype,
                  reps: int = 10, warmup: int = 3, kernel: str = "auto",
                  before_step: Optional[Callable[[str, bool], None]] = None) -> Dict[str, float]:
    """Median fwd+bwd ms of each ``name: (layer, compressed)``, all timed round-robin on the same tokens, so that
    drift of the machine (other jobs on a shared CPU) meets every variant alike. `before_step(name, timed)` is
    told which variant runs next; the compressed ones run under `shape`'s method."""
    import statistics

    import lshmoe_plugin
    config = shape.config(kernel)
    x = torch.randn(1, shape.tokens_per_rank, shape.d_model, generator=torch.Generator().manual_seed(11 + _rank()))
    x = x.to(device, dtype)
    grad = torch.randn_like(x)
    times: Dict[str, List[float]] = {v: [] for v in variants}
    try:
        for i in range(warmup + reps):
            for name, (layer, compressed) in variants.items():
                if compressed:
                    lshmoe_plugin.enable(config, layer)
                else:
                    lshmoe_plugin.disable()
                if before_step is not None:
                    before_step(name, i >= warmup)
                _barrier()
                _synchronize(device)
                t0 = time.perf_counter()
                inp = x.detach().requires_grad_()
                out, l_aux, _ = layer(inp)
                torch.autograd.backward([out, l_aux.to(out.dtype)], [grad, torch.ones_like(l_aux, dtype=out.dtype)])
                _synchronize(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        lshmoe_plugin.disable()
    return {v: statistics.median(t) for v, t in times.items()}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepShape:
    """What of a training step is not this layer: `moe_layers` such layers, `other_ms` of the rest of the step
    without the network (attention, dense FFNs, optimizer; measured by the user), `dense_params` parameters whose
    gradients all-reduce over `dp` ranks (data parallel) in `grad_element_size` bytes each."""
    moe_layers: int = 1
    other_ms: float = 0.0
    dense_params: int = 0
    dp: Optional[int] = None           # default: the EP degree (every EP rank is also a data-parallel replica)
    grad_element_size: int = 2

    def __post_init__(self) -> None:
        if self.moe_layers < 1:
            raise ValueError(f"moe_layers must be >= 1, got {self.moe_layers}")
        if self.other_ms < 0 or self.dense_params < 0:
            raise ValueError("other_ms and dense_params must be >= 0")


@dataclass(frozen=True)
class Prediction:
    link: str
    a2a_ms: Dict[str, float]           # one modelled all-to-all of the variant: the mean of its four crossings
    layer_ms: Dict[str, float]         # EP=1 compute + the 4 all-to-alls
    all_reduce_ms: float               # the dense gradients' all-reduce, once per step, both variants
    step_ms: Dict[str, float]
    break_even_gbps: Optional[float]   # per-rank network bandwidth below which compression pays; None: any

    @property
    def layer_speedup(self) -> float:
        return self.layer_ms["stock"] / self.layer_ms["lsh"]

    @property
    def step_speedup(self) -> float:
        return self.step_ms["stock"] / self.step_ms["lsh"]

    @property
    def pays(self) -> bool:
        return self.layer_ms["lsh"] < self.layer_ms["stock"]


def predict(shape: LayerShape, ep1_ms: Dict[str, float], link: LinkModel, step: StepShape = StepShape(),
            link_name: Optional[str] = None) -> Prediction:
    """Layer and step times at EP=`shape.ep` over `link`, from the EP=1 compute `ep1_ms` (stock, lsh: the method).
    Each crossing is priced at its own bytes, i.e. its own per-peer message size: a method's crossings may differ
    (FP8 to the experts, the model's dtype back), and where the NVLink and the NIC share trade places between
    them, the time of their mean size is not their mean time."""
    crossing_ms = {v: [1e3 * link.all_to_all_s(b, shape.ep) for b in shape.crossing_bytes(v)]
                   for v in ("stock", "lsh")}
    a2a = {v: sum(ms) / len(ms) for v, ms in crossing_ms.items()}
    layer = {v: ep1_ms[v] + sum(ms) for v, ms in crossing_ms.items()}
    all_reduce = (1e3 * link.all_reduce_s(step.dense_params * step.grad_element_size, step.dp or shape.ep)
                  if step.dense_params else 0.0)
    steps = {v: step.other_ms + step.moe_layers * layer[v] + all_reduce for v in crossing_ms}
    return Prediction(link_name or link.network.name, a2a, layer, all_reduce, steps,
                      break_even_gbps(shape, ep1_ms, link))


def break_even_gbps(shape: LayerShape, ep1_ms: Dict[str, float], link: LinkModel) -> Optional[float]:
    """The network bandwidth (GB/s per rank) at which the two layers take equally long: the method pays below
    it. None when it pays at any bandwidth (the method's compute is no slower); 0 when no byte would cross the
    network (every peer on the node) and the compute decides alone. The fixed and the per-peer costs cancel (both
    variants make 4 calls to the same peers); the network share is taken to be the slower one, as it is for any
    network slower than NVLink."""
    extra_ms = ep1_ms["lsh"] - ep1_ms["stock"]
    if extra_ms <= 0:
        return None
    remote = link.peers(shape.ep)[1]
    saved = sum(shape.crossing_bytes("stock")) - sum(shape.crossing_bytes("lsh"))
    return max(saved, 0) * remote / shape.ep / (extra_ms * 1e-3) / GB


def method_name(method: str, short: bool = False) -> str:
    """How the texts and tables name the method: LSH-MoE for the paper's (as before), its own name otherwise."""
    if method == "paper":
        return "LSH" if short else "LSH-MoE"
    return method if short else f"method `{method}`"


def quality_text(record: Optional[QualityRecord], matches: int, method: str = "paper",
                 recorded: bool = True) -> str:
    """What the published quality study measured for this layer shape and method (docs/quality.md), in one line;
    `recorded`: whether docs/quality.md holds any record of the method at all (at any shape)."""
    name = method_name(method)
    if record is None and not recorded:
        return (f"quality: no long-schedule record exists for {name} yet (docs/quality.md holds no measurement of "
                f"this method; other methods' records are not this one's, and none is shown)")
    if record is None:
        return ("quality: no quality measurement for this configuration (docs/quality.md holds none at this "
                "d_model, FFN, experts, top-k, capacity factor, tokens per rank, method and rate)")
    where = (f"measured, {record.where()}; the same MoE layer shape, the rest of that model and its data are the "
             f"record's" + (f"; {matches} published records match, this one is shown" if matches > 1 else ""))
    if record.token_ratio is not None:
        return (f"quality ({where}): {name} needed {record.token_ratio:.3f}x stock's tokens to reach stock's final "
                f"validation loss")
    if not record.reached:
        return (f"quality ({where}): not reached: final gap {100 * record.final_gap:+.2f}% ({name} ended above "
                f"stock's final loss within the same {record.trained_tokens} tokens)")
    return (f"quality ({where}): ended at or below stock's final loss (final gap {100 * record.final_gap:+.2f}%); "
            f"the tokens it needed to reach it were not measured")


def time_to_target_text(record: Optional[QualityRecord], step_speedup: float, method: str = "paper",
                        recorded: bool = True) -> str:
    """Time to stock's final loss, the method over stock: measured token ratio / predicted step speed-up."""
    name = method_name(method)
    if record is None and not recorded:
        return f"time to stock's loss: unknown until {name} has a long-schedule record"
    if record is None:
        return "time to stock's loss: no quality measurement for this configuration"
    if record.token_ratio is not None:
        return (f"time to stock's loss {record.token_ratio / step_speedup:.2f}x stock's (measured token ratio "
                f"{record.token_ratio:.3f} / predicted step speed-up {step_speedup:.2f})")
    if not record.reached:
        return (f"time to stock's loss: not reached: final gap {100 * record.final_gap:+.2f}%; {name} would be "
                f"sooner only if it needed fewer than {step_speedup:.2f}x stock's tokens")
    return "time to stock's loss: its token ratio was not measured"


def plan_table(shape: LayerShape, ep1_ms: Dict[str, float], predictions: List[Prediction]) -> str:
    """A markdown table: one row per link, with what is measured and what is modelled named in the headers."""
    from .benchmarking import markdown_table
    rows = []
    for p in predictions:
        even = "any" if p.break_even_gbps is None else f"{p.break_even_gbps:.3g}"
        rows.append((p.link, ep1_ms["stock"], ep1_ms["lsh"], 4 * p.a2a_ms["stock"], 4 * p.a2a_ms["lsh"],
                     p.layer_ms["stock"], p.layer_ms["lsh"], p.layer_speedup, p.all_reduce_ms, p.step_ms["stock"],
                     p.step_ms["lsh"], p.step_speedup, "yes" if p.pays else "no", even))
    name = method_name(shape.method, short=True)
    headers = ["link", "stock EP=1 ms (measured)", f"{name} EP=1 ms (measured)", "stock 4 x a2a ms (modelled)",
               f"{name} 4 x a2a ms (modelled)", "stock layer ms (predicted)", f"{name} layer ms (predicted)",
               "layer speed-up (predicted)", "dense all-reduce ms (modelled)", "stock step ms (predicted)",
               f"{name} step ms (predicted)", "step speed-up (predicted)",
               "compression pays" if shape.method == "paper" else f"{name} pays", "pays below GB/s per rank"]
    return markdown_table(headers, rows)
