"""A model of the network between GPUs: how long the expert-parallel all-to-all and the data-parallel gradient
all-reduce take for a given number of bytes, per link.

All-to-all at EP degree k: every rank keeps 1/k of its buffer and sends (k-1)/k of it, while it receives as much
(links are full duplex), so one all-to-all takes

    alpha + bytes * (k-1)/k / B

with B the per-rank, one-direction bandwidth that NCCL reaches (its "bus bandwidth" for all-to-all, which
nccl-tests defines as exactly algorithm bandwidth x (k-1)/k). With g GPUs per node and k > g, (g-1)/(k-1) of the
peers sit on the same node and are reached over NVLink while the rest go through the network; the two move at the
same time, so the slower share sets the time. Ring all-reduce over n ranks: alpha + 2(n-1)/n * bytes / B.

Calibration, sources and what is assumed: docs/link_model.md. Every time this module gives is *modelled*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence


@dataclass(frozen=True)
class Link:
    """One kind of link: NCCL's achieved per-rank bandwidth (bytes/s, one direction) and a fixed cost per call."""
    name: str
    bandwidth: float
    latency_s: float
    source: str

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 bytes/s, got {self.bandwidth}")
        if not self.latency_s >= 0:
            raise ValueError(f"link {self.name!r}: latency must be >= 0 s, got {self.latency_s}")


GB = 1e9
# Achieved bandwidths from NCCL's maintainers (docs/link_model.md has the links and the figures): 12 and 24 GB/s
# per 100G and 200G NIC, 46-49 GB/s per 400G NDR NIC, i.e. 96% of the line rate each; 370 GB/s effective NVLink 4
# bandwidth on H100 (450 GB/s line rate less ~20% protocol overhead). The latencies are assumptions (see the doc):
# at the tens of MB an MoE layer sends they change a modelled time by well under 1%.
LINKS: Dict[str, Link] = {
    "100gbps": Link("100gbps", 12 * GB, 20e-6, "100 Gb/s NIC per GPU (Ethernet/RoCE or EDR InfiniBand)"),
    "200gbps": Link("200gbps", 24 * GB, 20e-6, "200 Gb/s NIC per GPU (HDR InfiniBand)"),
    "400gbps": Link("400gbps", 48 * GB, 20e-6, "400 Gb/s NIC per GPU (NDR InfiniBand)"),
    "nvlink4": Link("nvlink4", 370 * GB, 10e-6, "NVLink 4 (H100/H200 HGX), every EP peer in one NVLink domain"),
    "infinite": Link("infinite", math.inf, 0.0, "no link cost at all (the EP=1 compute alone)"),
}
NVLINK4 = LINKS["nvlink4"]


def parse_link(name: str) -> Link:
    """A named link (`LINKS`) or ``custom:<GB/s>:<latency in us>``, e.g. ``custom:3:100`` for ~3 GB/s per rank."""
    if name in LINKS:
        return LINKS[name]
    if name.startswith("custom:"):
        parts = name.split(":")
        try:
            gbps, latency_us = float(parts[1]), float(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"link {name!r}: write custom:<GB/s>:<latency in us>, e.g. custom:3:100") from None
        return Link(name, gbps * GB, latency_us * 1e-6, "a custom link")
    raise ValueError(f"unknown link {name!r}; allowed: {', '.join(LINKS)} or custom:<GB/s>:<latency in us>")


def _check_ranks(what: str, ranks: int) -> None:
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {ranks!r}")


@dataclass(frozen=True)
class LinkModel:
    """The network a job runs on: `network` between nodes, `gpus_per_node` GPUs that share a node over `intra_node`.

    gpus_per_node=1 (the default) puts every peer behind the network link: the link as named, with no NVLink share.
    """
    network: Link
    gpus_per_node: int = 1
    intra_node: Link = NVLINK4

    def __post_init__(self) -> None:
        _check_ranks("gpus_per_node", self.gpus_per_node)

    def all_to_all_s(self, nbytes: float, ep: int) -> float:
        """Seconds of one all-to-all in which every rank of an EP group of `ep` ranks holds `nbytes`."""
        _check_ranks("EP degree", ep)
        if nbytes < 0:
            raise ValueError(f"bytes must be >= 0, got {nbytes}")
        if ep == 1:
            return 0.0  # nothing leaves the rank: DeepSpeed makes no call at all
        local_peers = min(self.gpus_per_node, ep) - 1
        remote_peers = ep - 1 - local_peers
        intra = nbytes * local_peers / ep / self.intra_node.bandwidth
        if remote_peers == 0:
            return self.intra_node.latency_s + intra
        inter = nbytes * remote_peers / ep / self.network.bandwidth
        return self.network.latency_s + max(inter, intra)

    def all_reduce_s(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-reduce of `nbytes` over `ranks` ranks (the dense gradients over data parallel).

        A ring that spans nodes runs at the network's per-rank bandwidth (NCCL builds one ring per NIC); within
        one node at NVLink's.
        """
        _check_ranks("data-parallel ranks", ranks)
        if nbytes < 0:
            raise ValueError(f"bytes must be >= 0, got {nbytes}")
        if ranks == 1:
            return 0.0
        link = self.intra_node if ranks <= self.gpus_per_node else self.network
        return link.latency_s + 2 * (ranks - 1) / ranks * nbytes / link.bandwidth

    def describe(self) -> str:
        net = self.network
        text = (f"{net.name}: {net.source}; {net.bandwidth / GB:g} GB/s per rank and direction, "
                f"{net.latency_s * 1e6:g} us per call")
        if self.gpus_per_node > 1 and net is not self.intra_node:
            text += (f"; {self.gpus_per_node} GPUs per node, peers on the node over {self.intra_node.name} "
                     f"({self.intra_node.bandwidth / GB:g} GB/s)")
        return text


def fit_link(name: str, nbytes: Sequence[float], seconds: Sequence[float], ep: int) -> Link:
    """The (alpha, B) that fit measured all-to-all times best (least squares on t = alpha + bytes (k-1)/k / B),
    from at least two sizes; for calibrating against a link one can measure (scripts/check_link_model.py)."""
    _check_ranks("EP degree", ep)
    if ep == 1 or len(nbytes) != len(seconds) or len(set(nbytes)) < 2:
        raise ValueError("fitting a link needs times of at least two sizes, one per size, at EP >= 2")
    xs = [b * (ep - 1) / ep for b in nbytes]
    mean_x, mean_t = sum(xs) / len(xs), sum(seconds) / len(seconds)
    slope = (sum((x - mean_x) * (t - mean_t) for x, t in zip(xs, seconds))
             / sum((x - mean_x) ** 2 for x in xs))
    if slope <= 0:
        raise ValueError(f"the measured times do not grow with the bytes (slope {slope:.3g} s/byte): no bandwidth "
                         "to fit; measure larger sizes")
    return Link(name, 1 / slope, max(mean_t - slope * mean_x, 0.0), "fitted to measured all-to-all times")
