"""How compressible the expert inputs are: every codec of lshmoe_pretrain.codecs on captured dispatches
(lshmoe_pretrain.capture), bytes on the wire against the error of the expert outputs through the real experts.

For each capture (one training step, one MoE layer) and codec: bytes as a fraction of stock's bf16 bytes for the same
real tokens (`codecs.stock_bytes`), and the relative error ||E(x_hat) - E(x)|| / ||E(x)|| over each expert's real
tokens, through that expert rebuilt in float32 on the CPU, averaged over the experts weighted by their tokens. For the
cluster codecs (x_hat a centroid c) also the error of what the layer returns with the paper's compensation,
||E(c) + (x - c) - E(x)|| / ||E(x)||. scripts/compressibility.py runs it and writes the report.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import capture, codecs

LSH_RATES = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
MORE_HASHES = ((8, 8), (12, 8), (16, 4))   # (num_hashes, hash_dim): 16 hashes of hash_dim 8 overflow the int64 key
MORE_HASHES_RATES = (0.2, 0.5)
MERGE_TOLERANCES = (0.01, 0.05, 0.1, 0.2)
PER_TOKEN = ("fp8", "fp8_block128", "fp8_e8m0", "int8", "int6", "int4", "fp4", "fp4_b16", "fp6")
TWO_LEVEL_RATES = (0.2, 0.1)
TWO_LEVEL_RESIDUALS = ("int4", "int2", "fp8")


@dataclass(frozen=True)
class Setting:
    family: str        # one line of the plot
    label: str         # one row of the table
    codec: Callable    # (tokens (E, W, d), valid (E, W)) -> (x_hat, bytes)
    clusters: bool     # x_hat is each token's centroid: the compensated error applies


def settings(layer_index: int) -> List[Setting]:
    """Every codec the study compares, at its budgets; LSH draws the captured layer's own projections."""
    out = [Setting("LSH (6 hashes, as shipped)", f"LSH rate {r}",
                   partial(codecs.lsh_centroids, rate=r, layer_index=layer_index), True) for r in LSH_RATES]
    for hashes, hash_dim in MORE_HASHES:
        family = f"LSH {hashes} hashes" + (f" (hash_dim {hash_dim})" if hash_dim != 8 else "")
        out += [Setting(family, f"{family} rate {r}", partial(codecs.lsh_centroids, rate=r, num_hashes=hashes,
                                                                hash_dim=hash_dim, layer_index=layer_index), True)
                for r in MORE_HASHES_RATES]
    out += [Setting("k-means (LSH's budget)", f"k-means rate {r}", partial(codecs.kmeans_centroids, rate=r), True)
            for r in LSH_RATES]
    out += [Setting("merge within tolerance", f"merge tau {t}", partial(codecs.merge_within_tolerance, tau=t), True)
            for t in MERGE_TOLERANCES]
    out += [Setting(f"per token {q}", f"per token {q}", partial(codecs.per_token, quantiser=q), False)
            for q in PER_TOKEN]
    for residual in TWO_LEVEL_RESIDUALS:
        out += [Setting(f"LSH centroid + {residual} residual", f"LSH rate {r} + {residual} residual",
                        partial(codecs.centroid_plus_residual, rate=r, quantiser=residual, layer_index=layer_index),
                        False) for r in TWO_LEVEL_RATES]
    return out


@dataclass
class Measured:
    """One codec on one capture."""
    family: str
    label: str
    bytes_fraction: float
    error: float
    error_compensated: Optional[float]
    seconds: float


@dataclass
class CaptureResult:
    path: str
    layer: int
    step: int
    train_steps: int
    provenance: dict
    tokens_per_expert: List[int]
    measured_slots: int                    # slots per expert measured (the capture's, or fewer when subsampled)
    captured_slots: int
    rows: List[Measured] = field(default_factory=list)


def expert_errors(experts: Sequence[torch.nn.Module], tokens: torch.Tensor, valid: torch.Tensor,
                  reference: List[torch.Tensor], x_hat: torch.Tensor,
                  compensate: bool) -> Tuple[float, Optional[float]]:
    """Token-weighted means over experts of ||out - E(x)|| / ||E(x)|| over each expert's real tokens, for out =
    E(x_hat), and with `compensate` also for out = E(x_hat) + (x - x_hat) (else None)."""
    totals, weight = [0.0, 0.0], 0
    with torch.no_grad():
        for e, expert in enumerate(experts):
            rows = valid[e]
            count = int(rows.sum())
            if count == 0:
                continue
            out = expert(x_hat[e][rows])
            totals[0] += count * float((out - reference[e]).norm() / reference[e].norm())
            if compensate:
                out = out + (tokens[e][rows] - x_hat[e][rows])
                totals[1] += count * float((out - reference[e]).norm() / reference[e].norm())
            weight += count
    return totals[0] / weight, totals[1] / weight if compensate else None


def measure(path: str, max_slots: Optional[int] = None, only: Optional[Sequence[str]] = None,
            log: Callable[[str], None] = print) -> CaptureResult:
    """Every setting (those whose family or label starts with one of `only`, if given) on one capture file.
    max_slots keeps the first N slots of each expert (a subsample, reported as such)."""
    saved = capture.load(path)
    tokens, valid = saved["tokens"].float(), saved["valid"]
    captured = tokens.shape[1]
    if max_slots is not None and max_slots < captured:
        tokens, valid = tokens[:, :max_slots].contiguous(), valid[:, :max_slots].contiguous()
    experts = capture.rebuild_experts(saved)
    with torch.no_grad():
        reference = [expert(tokens[e][valid[e]]) for e, expert in enumerate(experts)]
    provenance = saved["provenance"]
    result = CaptureResult(path, saved["layer"], provenance["step"], provenance["train_steps"], provenance,
                           valid.sum(1).tolist(), tokens.shape[1], captured)
    stock = codecs.stock_bytes(valid, tokens.shape[2])
    for setting in settings(saved["layer"]):
        if only and not any(setting.family.startswith(o) or setting.label.startswith(o) for o in only):
            continue
        tick = time.perf_counter()
        x_hat, nbytes = setting.codec(tokens, valid)
        error, compensated = expert_errors(experts, tokens, valid, reference, x_hat, setting.clusters)
        seconds = time.perf_counter() - tick
        result.rows.append(Measured(setting.family, setting.label, nbytes / stock, error, compensated, seconds))
        log(f"{os.path.basename(path)} | {setting.label}: bytes {nbytes / stock:.3f} of stock, error {error:.4f}"
            + (f", compensated {compensated:.4f}" if compensated is not None else "") + f" ({seconds:.1f} s)")
    return result


def stage_name(result: CaptureResult) -> str:
    return f"step {result.step} of {result.train_steps} ({result.step / result.train_steps:.0%})"


def layer_name(result: CaptureResult, layers: Sequence[int]) -> str:
    where = "first" if result.layer == min(layers) else "last" if result.layer == max(layers) else "middle"
    return f"MoE layer {result.layer} ({where} captured)"


def report(results: Sequence[CaptureResult], title: str, plot_path: Optional[str], command: str) -> str:
    """The markdown section: how it was measured, each capture's provenance, one table per (stage, layer)."""
    from .benchmarking import markdown_table
    layers = sorted({r.layer for r in results})
    lines = [f"## {title}", "", f"- command: `{command}`",
             f"- measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
             "experts rebuilt in float32 on the CPU",
             "- bytes: the codec's bytes for one dispatch over stock's bf16 bytes for the same real tokens (2 d "
             "each); the fixed-layout codecs (LSH, k-means) send ceil(rate x W) slots per expert whatever the fill, "
             "as DeepSpeed's layer does, so an expert filled below W raises their fraction above the rate",
             "- error: ||E(x_hat) - E(x)|| / ||E(x)|| over each expert's real tokens, token-weighted mean over the "
             "captured experts; compensated: ||E(c) + (x - c) - E(x)|| / ||E(x)|| (cluster codecs only)", ""]
    if plot_path:
        lines += [f"![rate against error]({os.path.basename(plot_path)})", ""]
    lines += ["### Captures", ""]
    rows = []
    for r in sorted(results, key=lambda r: (r.step, r.layer)):
        p = r.provenance
        sampled = "" if r.measured_slots == r.captured_slots else f" (first {r.measured_slots} of {r.captured_slots})"
        rows.append([os.path.basename(r.path), stage_name(r), r.layer, f"{p['model_kind']} {p['preset']}", p["seed"],
                     p["run_dir"], p.get("git_commit") or "-", p["device"], p["torch"],
                     " / ".join(str(t) for t in r.tokens_per_expert) + sampled])
    lines += [markdown_table(["file", "stage", "MoE layer", "model", "seed", "run", "commit", "device", "torch",
                              "tokens per expert"], rows), ""]
    for r in sorted(results, key=lambda r: (r.step, r.layer)):
        lines += [f"### {stage_name(r)}, {layer_name(r, layers)}", ""]
        lines += [markdown_table(["codec", "bytes / stock", "error E(x_hat)", "error E(c) + (x - c)"],
                                 [[m.label, m.bytes_fraction, m.error,
                                   "-" if m.error_compensated is None else m.error_compensated] for m in r.rows]), ""]
    return "\n".join(lines)


def plot(results: Sequence[CaptureResult], path: str) -> None:
    """Bytes against error, one line per codec family (dashed: the compensated error), panels by stage x layer.
    Both axes are logarithmic: an exact point (error 0) is in the tables only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted({r.step for r in results})
    layers = sorted({r.layer for r in results})
    figure, axes = plt.subplots(len(steps), len(layers), figsize=(5.5 * len(layers), 4.2 * len(steps)),
                                squeeze=False, sharex=True, sharey=True)
    families: Dict[str, str] = {}
    colours = [plt.get_cmap("tab20")(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    for r in results:
        axis = axes[steps.index(r.step)][layers.index(r.layer)]
        by_family: Dict[str, List[Measured]] = {}
        for m in r.rows:
            by_family.setdefault(m.family, []).append(m)
        for family, points in by_family.items():
            colour = families.setdefault(family, colours[len(families) % len(colours)])
            points = sorted(points, key=lambda m: m.bytes_fraction)
            drawn = [m for m in points if m.error > 0]
            axis.plot([m.bytes_fraction for m in drawn], [m.error for m in drawn], "o-", color=colour, markersize=3)
            drawn = [m for m in points if m.error_compensated]
            if drawn:
                axis.plot([m.bytes_fraction for m in drawn], [m.error_compensated for m in drawn], "x--",
                          color=colour, markersize=3)
        axis.axvline(1.0, color="grey", linewidth=0.8)  # stock's bytes
        axis.set_title(f"{stage_name(r)}, {layer_name(r, layers)}", fontsize=9)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
    for axis in axes[-1]:
        axis.set_xlabel("bytes / stock bf16")
    for row in axes:
        row[0].set_ylabel("relative error of expert outputs")
    handles = [plt.Line2D([], [], color=c, marker="o", label=f) for f, c in families.items()]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", marker="x", label="E(c) + (x - c), compensated"))
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    figure.tight_layout(rect=(0, 0.04 + 0.02 * (len(handles) // 3), 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
