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
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

# A capture file holds: tokens (N, W, d) bfloat16, the first W = min(S, C) filled capacity slots of experts
# 0..N-1 (zero rows where an expert filled fewer); valid (N, W) bool; slot (N, W) int32, each row's capacity position
# (-1: padding); filled (N,) slots each expert filled in the whole buffer; routed (N,) routes the gate chose for it
# (dropped ones too); capacity C; num_experts; layer; experts [0..N-1]; expert_config (the harness's ModelConfig as
# a dict, for `rebuild_experts`); expert_state (N state dicts, in the dtype the model trained in); provenance.
CAPTURE_FORMAT = 1
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
    and the experts' weights as the model holds them."""
    d_model = layer.gate.wg.weight.shape[1]
    weights = sum(p.numel() * p.element_size() for e in layer.experts.deepspeed_experts[:experts]
                  for p in e.state_dict().values())
    return experts * slots * (d_model * 2 + 1 + 4) + weights + FILE_OVERHEAD_BYTES


class Capturer:
    """Records the dispatch of the chosen MoE layers at the chosen steps and writes one file per (step, layer).

    Rank 0 writes; with expert parallelism it captures what rank 0 dispatches to the experts it holds (the first
    ``num_experts / ep_size``), so --capture_experts may not exceed that.
    """

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, rank: int) -> None:
        self.steps = capture_steps(args.capture_at, args.train_steps)
        self.layers = moe_layers(model)
        self.model_config = model.config
        self.args, self.rank = args, rank
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
            gate = self.layers[index].gate
            self._hooks.append(gate.register_forward_hook(self._gate_hook(index)))
        return True

    def _gate_hook(self, index: int):
        def hook(gate, inputs, output):
            # The first forward of the step with gradients: later micro-batches and gradient-free trial runs of the
            # gate (decide_by_cost's timing) are not the dispatch this file describes.
            if index in self._records or not torch.is_grad_enabled():
                return
            self._records[index] = self._record(inputs[0].detach(), output)
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
        return {
            "format": CAPTURE_FORMAT,
            "layer": index,
            "experts": list(range(self.experts)),
            "tokens": tokens.to(torch.bfloat16).cpu(),
            "valid": valid.cpu(),
            "slot": positions.to(torch.int32).cpu(),
            "filled": record["valid"].sum(1).cpu(),
            "routed": record["routed"].cpu(),  # routes the gate chose per expert, dropped ones included
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


def load(path: str) -> dict:
    """A capture file, checked for its format."""
    capture = torch.load(path, map_location="cpu", weights_only=True)
    if capture.get("format") != CAPTURE_FORMAT:
        raise ValueError(f"{path}: capture format {capture.get('format')!r}, this code reads {CAPTURE_FORMAT}")
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
