"""Per-layer, per-step compression statistics, readable from Python and written to DeepSpeed's monitor.

Counters stay on the device as tensors; nothing is synchronised to the host until someone reads them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

logger = logging.getLogger("lshmoe_plugin")


@dataclass
class LayerStats:
    """What one forward of one compressed MoE layer achieved."""
    layer_index: int
    step: int
    valid_tokens: torch.Tensor          # tokens that entered clustering (dropped/padding excluded)
    clusters: torch.Tensor              # non-empty clusters sent
    # all-to-all payload per crossing as sent (compressed, in its wire format, scales included), the mean of the
    # four crossings of a training step (dispatch and combine, forward and backward): each one's where they match
    bytes_sent: Union[int, float]
    bytes_uncompressed: int             # stock's payload per crossing
    relative_residual: Optional[torch.Tensor] = None  # mean ||token - centroid|| / ||token||
    # ||y - y_stock|| / ||y_stock|| over a sample of the expert outputs (output_error_interval): as the layer
    # returned them, and with the paper's compensation (E(c) + x - c) and without any (E(c))
    output_error: Optional[torch.Tensor] = None
    output_error_compensated: Optional[torch.Tensor] = None
    output_error_uncompensated: Optional[torch.Tensor] = None
    # clustering "bounded" (lshmoe_plugin.bounded): slots per expert the fixed layout sent (None: variable layout);
    # the most slots one expert needed to keep every token within the tolerance; outliers that found no slot of
    # their own (and went through the merging with the rest); the tokens that share their centroid with others,
    # and those of them whose residual exceeds the tolerance (on the steps the residual statistic is taken)
    slots_per_expert: Optional[int] = None
    slots_needed: Optional[torch.Tensor] = None
    over_budget_tokens: Optional[torch.Tensor] = None
    merged_tokens: Optional[torch.Tensor] = None
    merged_over_tolerance: Optional[torch.Tensor] = None

    def as_floats(self) -> Dict[str, float]:
        valid = float(self.valid_tokens)
        out = {
            "compression_rate": float(self.clusters) / valid if valid else 0.0,
            "bytes_sent": float(self.bytes_sent),
            "bytes_uncompressed": float(self.bytes_uncompressed),
            "bytes_ratio": self.bytes_sent / self.bytes_uncompressed if self.bytes_uncompressed else 0.0,
        }
        if self.relative_residual is not None:
            out["relative_residual_norm"] = float(self.relative_residual)
        for name in ("output_error", "output_error_compensated", "output_error_uncompensated"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        for name in ("slots_per_expert", "slots_needed", "over_budget_tokens"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        if self.merged_over_tolerance is not None:  # a fraction of the merged tokens
            merged = float(self.merged_tokens)
            out["merged_over_tolerance"] = float(self.merged_over_tolerance) / merged if merged else 0.0
        return out


@dataclass
class CostDecision:
    """What ``decide_by_cost`` measured for one layer and chose; the same on every expert-parallel rank."""
    layer_index: int
    compressed: bool
    stock_ms: float        # the stock exchange, forward + input backward, summed over the ranks
    compressed_ms: float   # the compressed one, likewise
    ranks: int

    def as_floats(self) -> Dict[str, float]:
        return {"compressed": float(self.compressed), "stock_exchange_ms": self.stock_ms,
                "compressed_exchange_ms": self.compressed_ms}

    def describe(self) -> str:
        return (f"layer {self.layer_index} {'compressed' if self.compressed else 'stock'} (stock "
                f"{self.stock_ms:.2f} ms vs compressed {self.compressed_ms:.2f} ms)")


class Telemetry:
    """Keeps the latest `LayerStats` of every layer and every layer's `CostDecision`; `summary()` turns them into
    floats (one host sync)."""

    def __init__(self) -> None:
        self.latest: Dict[int, LayerStats] = {}
        self.decisions: Dict[int, CostDecision] = {}
        self._decisions_unlogged = False

    def record(self, stats: LayerStats) -> None:
        self.latest[stats.layer_index] = stats

    def record_decision(self, decision: CostDecision) -> None:
        self.decisions[decision.layer_index] = decision
        self._decisions_unlogged = True

    def clear(self) -> None:
        self.latest.clear()
        self.decisions.clear()
        self._decisions_unlogged = False

    def log_decisions(self) -> None:
        """Log every layer's cost decision in one line, once after new ones were made (the DeepSpeed patches call
        it after each ``engine.step()``): at WARNING where any layer runs stock, which would otherwise go unseen,
        else at INFO. Rank 0 only: the ranks decide alike."""
        if not self._decisions_unlogged:
            return
        self._decisions_unlogged = False
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0:
            return
        decisions = [self.decisions[i] for i in sorted(self.decisions)]
        stock = sum(not d.compressed for d in decisions)
        per_layer = "; ".join(d.describe() for d in decisions)
        if stock:
            logger.warning(f"lsh_moe.decide_by_cost: {stock} of {len(decisions)} layer(s) run stock, where "
                           f"compressing measured slower: {per_layer}")
        else:
            logger.info(f"lsh_moe.decide_by_cost: all {len(decisions)} layer(s) compress: {per_layer}")

    def summary(self) -> Dict[str, float]:
        """Flat ``{"lsh_moe/layer{i}/{name}": value}`` over all layers, plus ``lsh_moe/mean/...`` averages."""
        flat: Dict[str, float] = {}
        sums: Dict[str, List[float]] = {}
        for index in sorted(self.latest):
            for name, value in self.latest[index].as_floats().items():
                flat[f"lsh_moe/layer{index}/{name}"] = value
                sums.setdefault(name, []).append(value)
        for name, values in sums.items():
            flat[f"lsh_moe/mean/{name}"] = sum(values) / len(values)
        for index in sorted(self.decisions):  # also for layers that run stock, which record no LayerStats
            for name, value in self.decisions[index].as_floats().items():
                flat[f"lsh_moe/layer{index}/{name}"] = value
        return flat

    def monitor_events(self, global_samples: int) -> List[Tuple[str, float, int]]:
        """Events in the (name, value, x) form `deepspeed.monitor.MonitorMaster.write_events` takes."""
        return [(name, value, global_samples) for name, value in self.summary().items()]


TELEMETRY = Telemetry()


def write_to_monitor(engine, telemetry: Telemetry = TELEMETRY) -> None:
    """Write the latest stats through a DeepSpeed engine's monitor (tensorboard/csv/wandb blocks of its JSON)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False) or not (telemetry.latest or telemetry.decisions):
        return
    monitor.write_events(telemetry.monitor_events(engine.global_samples))


def relative_residuals(tokens: torch.Tensor, centroids_per_token: torch.Tensor) -> torch.Tensor:
    """||token - centroid|| / ||token|| of every row (float32 (N,); rows (N, d), no gradient)."""
    t = tokens.detach().float()
    residual = (t - centroids_per_token.detach().float()).norm(dim=-1)
    return residual / t.norm(dim=-1).clamp(min=1e-12)


def mean_over(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (N,) over the valid rows (float32 scalar tensor; 0 when none is)."""
    valid = valid.float()
    return (values * valid).sum() / valid.sum().clamp(min=1)


def relative_error(approx: torch.Tensor, exact: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """||approx - exact|| / ||exact|| over the valid rows (float32 scalar tensor; rows (..., d), valid (...))."""
    keep = valid.unsqueeze(-1).float()
    a, e = approx.detach().float() * keep, exact.detach().float() * keep
    return (a - e).norm() / e.norm().clamp(min=1e-12)
