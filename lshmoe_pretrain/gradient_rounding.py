"""What each wire format does to the gradients that cross the all-to-all's backward, on captured output gradients
(lshmoe_pretrain.capture, format 2), and to the expert weight gradients they produce.

For one capture (one training step, one MoE layer): the captured experts rebuilt in float32 run on their real slots'
tokens and differentiate with the exact output gradient G (what the combine's backward brought the experts):
reference weight gradients dW (every parameter of every captured expert) and input gradients dX. Then, for each wire
format F, G crosses in F (`crossed`: encoded and decoded by lshmoe_plugin.wire's own codec, rows as the wire sends
them, in the dtype the model trained in), and the same backward gives dW_F and dX_F; dX_F then crosses the dispatch's
backward in F too. Measured:

- crossing: ||Q_F(G) - G|| / ||G||, and the fraction of G's nonzero entries that Q_F sends to exactly 0;
- weights: ||dW_F - dW|| / ||dW|| over all the experts' parameters (and per parameter name, over the experts);
- input: ||Q_F(dX_F) - dX|| / ||dX||, the gradient the dispatch's backward carries on;
- bias: the error of the mean of dW_F over K draws (K in `DRAWS`). A stochastic codec draws fresh bits at every
  encode, so an unbiased one's error falls like 1/sqrt(K); nearest rounds every draw alike, so its error is all bias.
  Optimizer steps add the gradients of many steps: the part that does not average out is the K=64 number.

Everything is float32 on the CPU except what the wire rounds: G is quantised from the model's dtype and decoded
back to it, as on the wire, then the backward runs in float32 (bf16 arithmetic would add its own noise to dW).
scripts/gradient_rounding.py runs it and writes the report.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch

from lshmoe_plugin import wire
from lshmoe_plugin.config import LSHMoEConfig

from . import capture

DRAWS = (1, 4, 16, 64)
# (label, wire dtype, rounding): the candidates' formats with the plugin's default block and scale of each.
SCALED_FORMATS = (("fp8_e4m3", "fp8_e4m3", "nearest"), ("fp6_e2m3", "fp6_e2m3", "nearest"),
                  ("fp4_e2m1 nearest", "fp4_e2m1", "nearest"), ("fp4_e2m1 stochastic", "fp4_e2m1", "stochastic"))


@dataclass(frozen=True)
class WireCodec:
    """One format as the wire applies it to rows (..., d) of the model's dtype: encode, decode, back in that dtype."""
    label: str
    crossed: Callable[[torch.Tensor], torch.Tensor]
    stochastic: bool


def plugin_format(name: str, rounding: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """lshmoe_plugin.wire's format `name` with LSHMoEConfig's default block and scale, PyTorch's reference codec."""
    fmt = wire.configured_format(LSHMoEConfig(kernel="torch"), name, rounding)
    return lambda rows: fmt.decode(fmt.encode(rows), rows.shape[-1], rows.dtype)


def bf16_crossing(rows: torch.Tensor) -> torch.Tensor:
    """A bf16 wire for a float32 model: rounded to bf16 and back."""
    return rows.to(torch.bfloat16).to(rows.dtype)


def wire_codecs(model_dtype: torch.dtype) -> List[WireCodec]:
    """The formats compared; bf16 only where the model trained in a wider dtype (else it is the model's own)."""
    out = [WireCodec("bf16", bf16_crossing, False)] if model_dtype == torch.float32 else []
    return out + [WireCodec(label, plugin_format(name, rounding), rounding == "stochastic")
                  for label, name, rounding in SCALED_FORMATS]


def relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def zeroed_fraction(crossed: torch.Tensor, exact: torch.Tensor) -> float:
    """Of `exact`'s nonzero entries, the fraction that `crossed` makes exactly zero (flushed by the rounding)."""
    nonzero = exact != 0
    return float((crossed[nonzero] == 0).float().mean()) if nonzero.any() else 0.0


class ExpertBackward:
    """The captured experts on their real slots, one forward kept for as many backwards as the formats need.

    tokens (N, W, d), valid (N, W): expert e's rows are tokens[e][valid[e]]. `grads(G)`: G (N, W, d) the output
    gradient -> ({parameter name: (N, ...) stacked over the experts}, dX (N, W, d) zero on padding), in float32.
    """

    def __init__(self, experts: Sequence[torch.nn.Module], tokens: torch.Tensor, valid: torch.Tensor) -> None:
        self.experts, self.valid = list(experts), valid
        self.inputs = [tokens[e][valid[e]].float().requires_grad_() for e in range(len(self.experts))]
        self.outputs = [expert(x) for expert, x in zip(self.experts, self.inputs)]
        self.names = [name for name, _ in self.experts[0].named_parameters()]
        self.shape = tokens.shape

    def grads(self, output_grads: torch.Tensor):
        weights: Dict[str, List[torch.Tensor]] = {name: [] for name in self.names}
        inputs = torch.zeros(self.shape, dtype=torch.float32)
        for e, (expert, x, out) in enumerate(zip(self.experts, self.inputs, self.outputs)):
            params = [p for _, p in expert.named_parameters()]
            got = torch.autograd.grad(out, params + [x], output_grads[e][self.valid[e]].float(), retain_graph=True)
            for name, grad in zip(self.names, got[:-1]):
                weights[name].append(grad)
            inputs[e][self.valid[e]] = got[-1]
        return {name: torch.stack(g) for name, g in weights.items()}, inputs


def flat(weights: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.reshape(-1) for w in weights.values()])


@dataclass
class FormatResult:
    label: str
    crossing_error: float              # ||Q(G) - G|| / ||G||
    zeroed: float                      # of G's nonzero entries, the fraction Q(G) makes 0
    weight_error: float                # ||dW_F - dW|| / ||dW||, all parameters of the captured experts
    weight_error_by_param: Dict[str, float]
    input_error: float                 # ||Q(dX_F) - dX|| / ||dX||: what crosses the dispatch's backward
    mean_error: Dict[int, float]       # K -> error of the mean of dW_F over K draws (nearest: every K alike)


@dataclass
class CaptureResult:
    path: str
    layer: int
    step: int
    train_steps: int
    provenance: dict
    tokens_per_expert: List[int]
    model_dtype: str
    grad_norm: float                   # ||G|| over the real slots, for scale
    rows: List[FormatResult] = field(default_factory=list)


def measure_format(codec: WireCodec, backward: ExpertBackward, grads: torch.Tensor, reference: torch.Tensor,
                   reference_weights: Dict[str, torch.Tensor], reference_inputs: torch.Tensor,
                   draws: Sequence[int] = DRAWS) -> FormatResult:
    """One format on one capture: grads (N, W, d) in the model's dtype, zero on padding."""
    real = backward.valid
    crossed = codec.crossed(grads)
    weights, inputs = backward.grads(crossed)
    dispatched = codec.crossed(inputs.to(grads.dtype)).float()
    by_param = {name: relative(weights[name], reference_weights[name]) for name in weights}
    exact = flat(reference_weights)
    total, mean_error = flat(weights).clone(), {1: relative(flat(weights), exact)}
    if codec.stochastic:
        for k in range(2, max(draws) + 1):
            total += flat(backward.grads(codec.crossed(grads))[0])
            if k in draws:
                mean_error[k] = relative(total / k, exact)
    else:  # nearest: every draw is the first
        mean_error = {k: mean_error[1] for k in draws}
    return FormatResult(codec.label, relative(crossed[real].float(), reference[real]),
                        zeroed_fraction(crossed[real], grads[real]), mean_error[1], by_param,
                        relative(dispatched[real], reference_inputs[real]), mean_error)


def measure(path: str, draws: Sequence[int] = DRAWS, log: Callable[[str], None] = print) -> CaptureResult:
    """Every format of `wire_codecs` on one capture file that holds output_grads."""
    saved = capture.load(path)
    if saved["output_grads"] is None:
        why = saved["provenance"].get("output_grads", "capture format 1 has no output gradients")
        raise ValueError(f"{path}: no output_grads ({why})")
    grads, valid = saved["output_grads"], saved["valid"]
    tokens = saved["tokens"]
    backward = ExpertBackward(capture.rebuild_experts(saved), tokens, valid)
    reference = grads.float()
    reference_weights, reference_inputs = backward.grads(reference)
    provenance = saved["provenance"]
    result = CaptureResult(path, saved["layer"], provenance["step"], provenance["train_steps"], provenance,
                           valid.sum(1).tolist(), str(grads.dtype).replace("torch.", ""),
                           float(reference[valid].norm()))
    for codec in wire_codecs(grads.dtype):
        tick = time.perf_counter()
        row = measure_format(codec, backward, grads, reference, reference_weights, reference_inputs, draws)
        result.rows.append(row)
        log(f"{os.path.basename(path)} | {codec.label}: G {row.crossing_error:.4f} (zeroed {row.zeroed:.3f}), "
            f"dW {row.weight_error:.4f}, dX {row.input_error:.4f}, mean of {max(draws)} draws "
            f"{row.mean_error[max(draws)]:.4f} ({time.perf_counter() - tick:.1f} s)")
    return result


def report(results: Sequence[CaptureResult], title: str, command: str, notes: Sequence[str] = ()) -> str:
    """The markdown section: how it was measured, each capture's provenance, one table per (stage, layer)."""
    from .benchmarking import markdown_table
    from .compressibility import layer_name, stage_name
    layers = sorted({r.layer for r in results})
    draws = sorted(results[0].rows[0].mean_error) if results and results[0].rows else list(DRAWS)
    lines = [f"## {title}", "", f"- command: `{command}`",
             f"- measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
             "experts rebuilt in float32 on the CPU; formats: lshmoe_plugin.wire's codecs (PyTorch reference) with "
             "the plugin's default blocks and scales (fp8_e4m3: a float32 scale per 128; fp6_e2m3 and fp4_e2m1: "
             "an e8m0 scale per 32)",
             "- G: the captured output gradient (d loss / d expert output, the combine's backward), real slots only; "
             "G err = ||Q(G) - G|| / ||G||; zeroed: of G's nonzero entries, the fraction Q sends to exactly 0",
             "- dW err = ||dW_Q - dW|| / ||dW|| over every parameter of the captured experts (up, down: the weight "
             "matrices alone); dX err = ||Q(dX_Q) - dX|| / ||dX||, the input gradient as it leaves through the "
             "dispatch's backward, crossing in the same format",
             f"- mean of K: the error of the mean of dW_Q over K encodes (K = {', '.join(map(str, draws))}); "
             "dW err is K = 1. Stochastic rounding draws fresh bits at every encode: unbiased, its error falls "
             "like 1/sqrt(K) (1/8 of K = 1's at 64), and what is left at the largest K bounds its bias; nearest "
             "is the same at every K: all of its error is bias, the part of one step's error that no averaging "
             "removes", *[f"- {note}" for note in notes], "", "### Captures", ""]
    rows = []
    for r in sorted(results, key=lambda r: (r.step, r.layer)):
        p = r.provenance
        rows.append([os.path.basename(r.path), stage_name(r), r.layer, f"{p['model_kind']} {p['preset']}", p["seed"],
                     p["run_dir"], p.get("git_commit") or "-", p["device"], r.model_dtype,
                     " / ".join(str(t) for t in r.tokens_per_expert), r.grad_norm])
    lines += [markdown_table(["file", "stage", "MoE layer", "model", "seed", "run", "commit", "device", "dtype",
                              "tokens per expert", "norm of G"], rows), ""]
    for r in sorted(results, key=lambda r: (r.step, r.layer)):
        names = [n for n in r.rows[0].weight_error_by_param if n.endswith("weight")] if r.rows else []
        lines += [f"### {stage_name(r)}, {layer_name(r, layers)}", ""]
        lines += [markdown_table(
            ["format", "G err", "zeroed", "dW err", *[f"dW {n.split('.')[0]}" for n in names], "dX err",
             *[f"mean of {k}" for k in draws[1:]]],
            [[m.label, m.crossing_error, m.zeroed, m.weight_error, *[m.weight_error_by_param[n] for n in names],
              m.input_error, *[m.mean_error[k] for k in draws[1:]]] for m in r.rows]), ""]
    return "\n".join(lines)
