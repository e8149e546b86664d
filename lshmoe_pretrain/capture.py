"""Captures of what DeepSpeed's MoE layers dispatch, for offline measurements of how compressible it is.

At a few chosen training steps (``--capture_at`` fractions of the schedule), each captured MoE layer records the
tokens as dispatched to each of its first experts, i.e. the (E, C, d) buffer that the first all-to-all sends
(what LSH-MoE compresses), which capacity slots hold a real token, and the weights of those experts. One file per
(step, layer): ``<output_dir>/captures/step{N}_layer{L}.pt`` (the comment at `CAPTURE_FORMAT` lists what it holds);
lshmoe_pretrain.compressibility reads them.

The buffer is rebuilt from the gate's own outputs, inside a forward hook on the layer's gate, with DeepSpeed's own
encode: the same function, on the same tensors, as the layer's forward, whether or not the plugin then compresses
it; nothing is run again and no random number is drawn, so capturing leaves training bit for bit as it was. The
hooks exist only during the first forward of a capture step: other steps pay nothing (no host sync).

The same step also records ``output_grads``: the gradient of the loss with respect to those experts' outputs in the
same slots, i.e. what the combine all-to-all's backward carries back to the experts (lshmoe_pretrain.
gradient_rounding measures what each wire format does to it). A forward hook on the layer's experts module registers
a tensor hook on their output, only for the experts' forward that follows the recorded gate forward (the micro-batch
`tokens` came from: later micro-batches of gradient accumulation are not hooked); the tensor hook copies the
gradient and returns nothing, so the backward is unchanged. The gradient is stored unscaled (see `loss_scale` of
`Capturer`). A layer that the plugin clusters runs its experts on centroids, not on the dispatch buffer: there is
no per-slot gradient to record and the file says why instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from typing import Callable, Dict, List, Optional, Sequence

import torch

# A capture file holds: tokens (N, W, d) bfloat16, the first W = min(S, C) filled capacity slots of experts
# 0..N-1 (zero rows where an expert filled fewer); valid (N, W) bool; slot (N, W) int32, each row's capacity position
# (-1: padding); filled (N,) slots each expert filled in the whole buffer; routed (N,) routes the gate chose for it
# (dropped ones too); capacity C; num_experts; layer; experts [0..N-1]; expert_config (the harness's ModelConfig as
# a dict, for `rebuild_experts`); expert_state (N state dicts, in the dtype the model trained in); provenance.
# Format 2 adds output_grads (N, W, d), the gradient of the loss w.r.t. the experts' output in the same slots, in the
# dtype the model trained in (float32 where an fp16 loss scale had to be divided out), zero rows where `valid` is
# False; None where the layer's experts ran on centroids (provenance "output_grads" says why).
CAPTURE_FORMAT = 2
# Formats `load` reads: format 1 files are format 2 without output_grads.
READABLE_FORMATS = (1, 2)
# A capture is copied back from a remote GPU machine that returns files of at most 16 MiB; a layout that would write
# a bigger file is refused before training starts, naming the flags that shrink it.
MAX_CAPTURE_BYTES = 16 * 2**20
# What torch.save adds around the tensors (names, pickled metadata, zip headers), generously.
FILE_OVERHEAD_BYTES = 256 * 2**10
DEFAULT_EXPERTS = 4
DEFAULT_SLOTS = 1024


class CaptureConfigError(ValueError):
    """A bad --capture_* flag; the message names the flag and what is allowed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--capture_at", type=float, nargs="+", default=None, metavar="F",
        help="capture MoE dispatches at the steps round(F * train_steps) (fractions in (0, 1]; 1.0: the last "
             "step) into OUTPUT_DIR/captures/step{N}_layer{L}.pt")
    add("--capture_layers", type=int, nargs="+", default=None, metavar="L",
        help="MoE layer indices (module order) to capture; default: the first and the last MoE layer")
    add("--capture_experts", type=int, default=DEFAULT_EXPERTS, metavar="N",
        help=f"capture experts 0..N-1 of each layer (default {DEFAULT_EXPERTS})")
    add("--capture_slots", type=int, default=DEFAULT_SLOTS, metavar="S",
        help=f"capture the first S filled capacity slots of each captured expert (default {DEFAULT_SLOTS})")


def capture_steps(fractions: Optional[Sequence[float]], train_steps: int) -> Dict[int, float]:
    """{training step (1-based): fraction} of ``--capture_at``; refuses fractions outside (0, 1], a step 0, and
    two fractions that land on one step."""
    steps: Dict[int, float] = {}
    for fraction in fractions or ():
        if not (0.0 < fraction <= 1.0):
            raise CaptureConfigError(f"--capture_at {fraction}: fractions of the schedule must be in (0, 1]")
        step = round(fraction * train_steps)
        if step < 1:
            raise CaptureConfigError(f"--capture_at {fraction} is step {step} of {train_steps}: allowed fractions "
                                     f"give a step >= 1 (>= {0.5 / train_steps:.3g} here)")
        if step in steps:
            raise CaptureConfigError(f"--capture_at {steps[step]} and {fraction} are both step {step} of "
                                     f"{train_steps}: give each step once")
        steps[step] = fraction
    return dict(sorted(steps.items()))


def check_counts(args: argparse.Namespace) -> None:
    """--capture_experts and --capture_slots are positive; checked with the other flags, before any process group."""
    for flag, value in (("--capture_experts", args.capture_experts), ("--capture_slots", args.capture_slots)):
        if value < 1:
            raise CaptureConfigError(f"{flag} must be an integer >= 1, got {value}")
    if args.capture_layers is not None and min(args.capture_layers) < 0:
        raise CaptureConfigError(f"--capture_layers must be MoE layer indices >= 0, got {args.capture_layers}")
    capture_steps(args.capture_at, args.train_steps)


def moe_layers(model: torch.nn.Module) -> list:
    """DeepSpeed's MOELayer modules of `model` in module order (the numbering lsh_moe.layers uses too)."""
    from deepspeed.moe.sharded_moe import MOELayer
    return [m for m in model.modules() if isinstance(m, MOELayer)]


def projected_file_bytes(layer, experts: int, slots: int) -> int:
    """An upper bound of one capture file of `layer`: bf16 tokens, mask and slot index of `slots` slots per expert,
    their output gradients in the experts' dtype (float32 for fp16, unscaled), and the experts' weights as the model
    holds them."""
    d_model = layer.gate.wg.weight.shape[1]
    weights = sum(p.numel() * p.element_size() for e in layer.experts.deepspeed_experts[:experts]
                  for p in e.state_dict().values())
    grad_bytes = output_grad_dtype(next(layer.experts.parameters()).dtype).itemsize
    return experts * slots * (d_model * (2 + grad_bytes) + 1 + 4) + weights + FILE_OVERHEAD_BYTES


def output_grad_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """fp16 gradients carry the loss scale, and divided by it they could underflow fp16: those are kept in float32."""
    return torch.float32 if model_dtype == torch.float16 else model_dtype


class Capturer:
    """Records the dispatch of the chosen MoE layers at the chosen steps and writes one file per (step, layer).

    Rank 0 writes; with expert parallelism it captures what rank 0 dispatches to the experts it holds (the first
    ``num_experts / ep_size``), so --capture_experts may not exceed that.

    `loss_scale`: returns the loss scale of the backward running now (DeepSpeed's fp16 dynamic or static scale),
    read inside the gradient hook because the scale may change at the step; the output gradients are divided by it.
    None: the loss is not scaled (bf16, fp32).
    """

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, rank: int,
                 loss_scale: Optional[Callable[[], float]] = None) -> None:
        self.steps = capture_steps(args.capture_at, args.train_steps)
        self.layers = moe_layers(model)
        self.model_config = model.config
        self.args, self.rank = args, rank
        self.loss_scale = loss_scale
        # A clustered layer's experts see centroids: their output gradient has no per-slot meaning.
        self.grads_skipped = ("not recorded: the plugin clusters this layer's tokens, so its experts ran on "
                              "centroids, not on the dispatch buffer"
                              if args.lsh.enabled and args.lsh.clustering != "none" else None)
        self.experts, self.slots = args.capture_experts, args.capture_slots
        self.directory = os.path.join(args.output_dir, "captures")
        self.chosen: List[int] = []
        self._hooks: list = []
        self._records: Dict[int, dict] = {}
        self.commit = None
        if self.steps:
            self._check_layout()  # on every rank, so that all of them stop on a bad layout
            self.commit = git_commit() if rank == 0 else None

    def _check_layout(self) -> None:
        count = len(self.layers)
        if count == 0:
            raise CaptureConfigError("--capture_at: the model has no DeepSpeed MoE layer to capture")
        chosen = self.args.capture_layers if self.args.capture_layers is not None else sorted({0, count - 1})
        wrong = [i for i in chosen if i >= count]
        if wrong:
            raise CaptureConfigError(f"--capture_layers {wrong}: the model has {count} MoE layers; allowed: "
                                     f"0..{count - 1}")
        self.chosen = sorted(set(chosen))
        for index in self.chosen:
            local = self.layers[index].num_local_experts
            if self.experts > local:
                raise CaptureConfigError(f"--capture_experts {self.experts}: rank 0 holds {local} experts of MoE "
                                         f"layer {index} (ep_size {self.layers[index].ep_size}); allowed: "
                                         f"1..{local}")
            size = projected_file_bytes(self.layers[index], self.experts, self.slots)
            if size > MAX_CAPTURE_BYTES:
                fits = max((n for n in range(1, self.experts) if
                            projected_file_bytes(self.layers[index], n, self.slots) <= MAX_CAPTURE_BYTES), default=0)
                raise CaptureConfigError(
                    f"--capture_experts {self.experts} --capture_slots {self.slots}: a capture of MoE layer {index} "
                    f"would take up to {size / 2**20:.1f} MiB, over the {MAX_CAPTURE_BYTES / 2**20:.0f} MiB a file "
                    f"may take; allowed here: --capture_experts <= {fits} (or fewer --capture_slots)")

    def arm(self, step: int) -> bool:
        """Hook the chosen layers when `step` (1-based) is a capture step; True if it is."""
        if step not in self.steps or self.rank != 0:
            return False
        self._records = {}
        for index in self.chosen:
            layer = self.layers[index]
            self._hooks.append(layer.gate.register_forward_hook(self._gate_hook(index)))
            if self.grads_skipped is None:
                self._hooks.append(layer.experts.register_forward_hook(self._experts_hook(index)))
        return True

    def _gate_hook(self, index: int):
        def hook(gate, inputs, output):
            # The first forward of the step with gradients: later micro-batches and gradient-free trial runs of the
            # gate (decide_by_cost's timing) are not the dispatch this file describes.
            if index in self._records or not torch.is_grad_enabled():
                return
            self._records[index] = self._record(inputs[0].detach(), output)
        return hook

    def _experts_hook(self, index: int):
        def hook(experts, inputs, output):
            # The experts' first forward with gradients after the recorded gate forward runs on that dispatch
            # (decide_by_cost's stock trial comes before the gate; exact_token_stride's sample after the main one).
            record = self._records.get(index)
            if record is None or "output_grads" in record or not output.requires_grad:
                return
            # (ep_size, local experts, C, d): row 0 holds what rank 0 itself sent, the slots `tokens` describes.
            if output.shape[2] != record["capacity"]:
                raise RuntimeError(f"MoE layer {index}: the experts' output has {output.shape[2]} slots per expert, "
                                   f"the gate's capacity is {record['capacity']}; output_grads would not match tokens")
            record["output_grads"] = None  # until the backward fills it
            output.register_hook(self._grad_hook(record))
        return hook

    def _grad_hook(self, record: dict):
        def hook(grad):
            scale = float(self.loss_scale()) if self.loss_scale is not None else 1.0
            kept = grad.detach()[0, :self.experts]
            if scale != 1.0:
                kept = kept.float() / scale
            record["output_grads"] = kept.to(output_grad_dtype(grad.dtype)).clone()
            record["loss_scale"] = scale
            # Returns None: the gradient flows on untouched.
        return hook

    @torch.no_grad()
    def _record(self, tokens: torch.Tensor, gate_output) -> dict:
        from deepspeed.moe import sharded_moe as sm

        from lshmoe_plugin.patches.deepspeed_moe import occupied_slots
        _, capacity, num_experts, indices, locations, _, routed = gate_output
        capacity = int(capacity)
        slots = sm._route_slots(indices, locations, num_experts, capacity)
        dispatched = sm._sparse_encode(tokens, slots, num_experts, capacity)[:self.experts]
        valid = occupied_slots(slots, num_experts, capacity)[:self.experts]
        return {"dispatched": dispatched, "valid": valid, "capacity": capacity, "num_experts": num_experts,
                "routed": routed[:self.experts],
                "tokens_in": tokens.shape[0], "dtype": str(tokens.dtype).replace("torch.", "")}

    def save(self, step: int) -> List[str]:
        """Write the files of this capture step and remove the hooks; returns the paths written."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        os.makedirs(self.directory, exist_ok=True)
        paths = []
        for index in self.chosen:
            record = self._records.get(index)
            if record is None:
                raise RuntimeError(f"MoE layer {index} did not run a training forward at capture step {step}")
            path = os.path.join(self.directory, f"step{step}_layer{index}.pt")
            torch.save(self._contents(index, step, record), path)
            size = os.path.getsize(path)
            if size > MAX_CAPTURE_BYTES:  # projected_file_bytes bounds it; this guards the bound itself
                raise RuntimeError(f"{path} takes {size} bytes, over the {MAX_CAPTURE_BYTES} the capture allows")
            paths.append(path)
        self._records = {}
        return paths

    def _contents(self, index: int, step: int, record: dict) -> dict:
        layer = self.layers[index]
        tokens, valid, positions = first_filled(record["dispatched"], record["valid"], self.slots)
        experts = layer.experts.deepspeed_experts[:self.experts]
        grads = record.get("output_grads")
        if self.grads_skipped is None and grads is None:
            raise RuntimeError(f"MoE layer {index}: no gradient reached its experts' output at capture step {step}")
        if grads is not None:
            grads = first_filled(grads, record["valid"], self.slots)[0].cpu()
        return {
            "format": CAPTURE_FORMAT,
            "layer": index,
            "experts": list(range(self.experts)),
            "tokens": tokens.to(torch.bfloat16).cpu(),
            "valid": valid.cpu(),
            "slot": positions.to(torch.int32).cpu(),
            "filled": record["valid"].sum(1).cpu(),
            "routed": record["routed"].cpu(),  # routes the gate chose per expert, dropped ones included
            "output_grads": grads,
            "capacity": record["capacity"],
            "num_experts": record["num_experts"],
            "expert_config": dataclasses.asdict(self.model_config),
            "expert_state": [{k: v.detach().cpu().clone() for k, v in e.state_dict().items()} for e in experts],
            "provenance": self._provenance(index, step, record),
        }

    def _provenance(self, index: int, step: int, record: dict) -> dict:
        import deepspeed
        args = self.args
        return {"run_dir": os.path.abspath(args.output_dir), "model_kind": args.model_kind, "preset": args.preset,
                "seed": args.seed, "step": step, "train_steps": args.train_steps, "fraction": self.steps[step],
                "data": args.data_prefix or args.data, "ep_size": args.ep_size, "rank": self.rank,
                "lsh_moe_enabled": args.lsh.enabled, "diagnostic": args.diagnostic,
                "tokens_into_layer": record["tokens_in"], "run_dtype": record["dtype"],
                "output_grads": self.grads_skipped or
                ("d loss / d expert output in the slots of `tokens`, as the experts received it from the combine's "
                 "backward (after that crossing's wire format, if the run had one), of the micro-batch `tokens` "
                 f"came from; unscaled: loss scale {record.get('loss_scale', 1.0):g} divided out "
                 "(bf16 and fp32 train without one)"),
                "output_grads_loss_scale": record.get("loss_scale"),
                "git_commit": self.commit, "torch": str(torch.__version__), "deepspeed": str(deepspeed.__version__),
                "device": _device_name()}


def first_filled(dispatched: torch.Tensor, valid: torch.Tensor, slots: int):
    """The first `slots` filled capacity slots of every expert.

    dispatched (N, C, d), valid bool (N, C) -> tokens (N, W, d), valid (N, W), capacity position (N, W) (-1 where
    an expert has fewer filled slots), W = min(slots, C). Padding rows are zero.
    """
    num_experts, capacity, d_model = dispatched.shape
    width = min(slots, capacity)
    # A stable sort of "not filled" puts every expert's filled slots first, in slot order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
    kept = torch.gather(valid, 1, order)
    tokens = torch.gather(dispatched, 1, order.unsqueeze(-1).expand(-1, -1, d_model))
    tokens = torch.where(kept.unsqueeze(-1), tokens, torch.zeros_like(tokens))
    return tokens, kept, torch.where(kept, order, torch.full_like(order, -1))


def git_commit() -> Optional[str]:
    """HEAD of the checkout this package runs from (with "-dirty" when files differ), None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def capture_files(given: Sequence[str]) -> List[str]:
    """Capture files named, or found (step*_layer*.pt) in the directories named; a name that is neither, or a
    directory without captures, is a ValueError naming it."""
    import glob
    paths: List[str] = []
    for item in given:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "step*_layer*.pt")))
            if not found:
                raise ValueError(f"{item} holds no capture files (step*_layer*.pt)")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ValueError(f"{item} does not exist")
    return paths


def load(path: str) -> dict:
    """A capture file, checked for its format."""
    capture = torch.load(path, map_location="cpu", weights_only=True)
    if capture.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: capture format {capture.get('format')!r}, this code reads {READABLE_FORMATS}")
    capture.setdefault("output_grads", None)
    return capture


def rebuild_experts(capture: dict, dtype: torch.dtype = torch.float32) -> List[torch.nn.Module]:
    """The captured experts as the harness's MLP modules, on the CPU, in `dtype`, in eval mode (no dropout)."""
    from .models.config import ModelConfig
    from .models.layers import MLP
    config = ModelConfig(**capture["expert_config"])
    experts = []
    for state in capture["expert_state"]:
        expert = MLP(config)
        expert.load_state_dict(state)
        experts.append(expert.to(dtype).eval())
    return experts


def write_records(path: str, results: Sequence[object]) -> None:
    """Every measurement of an offline capture study (dataclasses, one per capture file) as JSON at `path`, the
    records behind a docs section (scripts/compressibility.py, scripts/gradient_rounding.py)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(result) for result in results], f, indent=1)
    print(f"wrote {path}")
