"""A model of the network between GPUs: how long the expert-parallel all-to-all and the data-parallel gradient
all-reduce take for a given number of bytes, per link.

All-to-all at EP degree k: every rank keeps 1/k of its buffer and sends each of its k-1 peers a message of
m = bytes/k (links are full duplex: it receives as much). Over one kind of link, to p peers:

    alpha + p * m / (B * eta(m)),    eta(m) = m / (m + m_half)

B is the per-rank, one-direction bandwidth NCCL reaches with large messages (its all-to-all "bus bandwidth", which
nccl-tests defines as algorithm bandwidth x (k-1)/k), eta(m) the efficiency of a per-peer message of m bytes
(half of B at m = m_half), alpha the fixed cost of the call. The same term reads p * (m + m_half) / B: every peer
costs m_half / B on top of its bytes, so the fixed part of a call grows with the number of peers. With g GPUs per
node, min(g, k) - 1 peers sit on the node and are reached over NVLink, the other k - min(g, k) through the NIC; the
two move at the same time, so the slower share sets the time, and at k <= g no byte crosses a NIC. Ring all-reduce
over n ranks: alpha + 2(n-1)/n * bytes / B (its chunks are large; no per-message term).

Calibration, sources and what is assumed: docs/link_model.md. Every time this module gives is *modelled*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Link:
    """One kind of link: NCCL's large-message bandwidth per rank (bytes/s, one direction), its fixed cost per call,
    and the per-peer message size at which it reaches half that bandwidth (0: every message at full bandwidth)."""
    name: str
    bandwidth: float
    latency_s: float
    source: str
    half_bandwidth_bytes: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 bytes/s, got {self.bandwidth}")
        if not self.latency_s >= 0:
            raise ValueError(f"link {self.name!r}: latency must be >= 0 s, got {self.latency_s}")
        if not self.half_bandwidth_bytes >= 0:
            raise ValueError(f"link {self.name!r}: half-bandwidth message size must be >= 0 bytes, got "
                             f"{self.half_bandwidth_bytes}")

    def efficiency(self, message_bytes: float) -> float:
        """Share of `bandwidth` a per-peer message of `message_bytes` reaches (1 with no half-bandwidth size)."""
        if self.half_bandwidth_bytes == 0:
            return 1.0
        return message_bytes / (message_bytes + self.half_bandwidth_bytes)

    def peers_s(self, message_bytes: float, peers: int) -> float:
        """Seconds to move one message of `message_bytes` to each of `peers` peers, all at once: their bytes at
        the bandwidth that message size reaches, i.e. peers x (m + m_half) / B. The call's fixed cost is apart."""
        if peers == 0 or math.isinf(self.bandwidth):
            return 0.0
        return peers * (message_bytes + self.half_bandwidth_bytes) / self.bandwidth


GB = 1e9
KiB, MiB = 2 ** 10, 2 ** 20
# Large-message bandwidths from NCCL's maintainers: 12 and 24 GB/s per 100G and 200G NIC, 46-49 GB/s per 400G NDR
# NIC (96% of line rate); 370 GB/s effective NVLink 4 on H100. The fixed costs and half-bandwidth sizes come from
# published nccl-tests all-to-all runs at the message sizes MoE layers send (128 KiB on the NIC, as NCCL's P2P
# network chunk; 1 MiB on NVLink). docs/link_model.md has every figure, its source and what is assumed.
_NIC_LATENCY_S, _NIC_HALF = 20e-6, 128 * KiB
LINKS: Dict[str, Link] = {
    "100gbps": Link("100gbps", 12 * GB, _NIC_LATENCY_S, "100 Gb/s NIC per GPU (Ethernet/RoCE or EDR InfiniBand)",
                    _NIC_HALF),
    "200gbps": Link("200gbps", 24 * GB, _NIC_LATENCY_S, "200 Gb/s NIC per GPU (HDR InfiniBand)", _NIC_HALF),
    "400gbps": Link("400gbps", 48 * GB, _NIC_LATENCY_S, "400 Gb/s NIC per GPU (NDR InfiniBand)", _NIC_HALF),
    "nvlink4": Link("nvlink4", 370 * GB, 10.5e-6, "NVLink 4 (H100/H200 HGX); as the network: every EP peer in one "
                    "NVLink domain (an NVLink Switch system)", 1 * MiB),
    "infinite": Link("infinite", math.inf, 0.0, "no link cost at all (the EP=1 compute alone)"),
}
NVLINK4 = LINKS["nvlink4"]
DEFAULT_GPUS_PER_NODE = 8  # an HGX node: 8 GPUs on NVLink, one NIC per GPU (what the modelled tables assume)


def parse_link(name: str) -> Link:
    """A named link (`LINKS`) or ``custom:<GB/s>:<latency in us>[:<half-bandwidth KiB>]``, e.g. ``custom:3:100``
    for ~3 GB/s per rank with every message at full bandwidth."""
    if name in LINKS:
        return LINKS[name]
    if name.startswith("custom:"):
        parts = name.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            gbps, latency_us = float(parts[1]), float(parts[2])
            half_kib = float(parts[3]) if len(parts) == 4 else 0.0
        except ValueError:
            raise ValueError(f"link {name!r}: write custom:<GB/s>:<latency in us>[:<half-bandwidth KiB>], e.g. "
                             f"custom:3:100 or custom:48:20:128") from None
        return Link(name, gbps * GB, latency_us * 1e-6, "a custom link", half_kib * KiB)
    raise ValueError(f"unknown link {name!r}; allowed: {', '.join(LINKS)} or "
                     f"custom:<GB/s>:<latency in us>[:<half-bandwidth KiB>]")


def _check_ranks(what: str, ranks: int) -> None:
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {ranks!r}")


@dataclass(frozen=True)
class LinkModel:
    """The network a job runs on: `network` between nodes, `gpus_per_node` GPUs that share a node over `intra_node`.

    gpus_per_node=1 puts every peer behind the network link (the link as named, no NVLink share): the topology of
    the 2-process checks and of custom links. The modelled tables and the planning command default to 8
    (`DEFAULT_GPUS_PER_NODE`).
    """
    network: Link
    gpus_per_node: int = 1
    intra_node: Link = NVLINK4

    def __post_init__(self) -> None:
        _check_ranks("gpus_per_node", self.gpus_per_node)

    @property
    def free(self) -> bool:
        """A network of infinite bandwidth (`infinite`) models no link at all, NVLink share included."""
        return math.isinf(self.network.bandwidth)

    def peers(self, ep: int) -> Tuple[int, int]:
        """(peers on the node over `intra_node`, peers over `network`) of one rank in an EP group of `ep`. With
        NVLink as the network every peer is in one NVLink domain: all over `intra_node`, whatever the node size."""
        _check_ranks("EP degree", ep)
        if self.network == self.intra_node:
            return ep - 1, 0
        local = min(self.gpus_per_node, ep) - 1
        return local, ep - 1 - local

    def all_to_all_s(self, nbytes: float, ep: int) -> float:
        """Seconds of one all-to-all in which every rank of an EP group of `ep` ranks holds `nbytes`."""
        if nbytes < 0:
            raise ValueError(f"bytes must be >= 0, got {nbytes}")
        local, remote = self.peers(ep)
        if ep == 1 or self.free:
            return 0.0  # nothing leaves the rank (DeepSpeed makes no call at all), or no link is modelled
        message = nbytes / ep
        intra = self.intra_node.peers_s(message, local)
        if remote == 0:
            return self.intra_node.latency_s + intra
        return self.network.latency_s + max(self.network.peers_s(message, remote), intra)

    def all_reduce_s(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-reduce of `nbytes` over `ranks` ranks (the dense gradients over data parallel).

        A ring that spans nodes runs at the network's per-rank bandwidth (NCCL builds one ring per NIC); within
        one node at NVLink's.
        """
        _check_ranks("data-parallel ranks", ranks)
        if nbytes < 0:
            raise ValueError(f"bytes must be >= 0, got {nbytes}")
        if ranks == 1 or self.free:
            return 0.0
        link = self.intra_node if ranks <= self.gpus_per_node else self.network
        return link.latency_s + 2 * (ranks - 1) / ranks * nbytes / link.bandwidth

    def topology(self, ep: Optional[int] = None) -> str:
        """The topology in words (and, for an EP degree, how its peers split between NVLink and the NIC)."""
        if self.network == self.intra_node:
            text = f"every EP peer in one {self.network.name} domain"
        elif self.gpus_per_node == 1:
            text = f"1 GPU per node: every EP peer over {self.network.name}"
        else:
            text = (f"{self.gpus_per_node} GPUs per node: peers on the node over {self.intra_node.name}, the "
                    f"others over {self.network.name}")
        if ep is not None and ep > 1:
            local, remote = self.peers(ep)
            text += f"; at EP={ep}: {local} of {ep - 1} peers over {self.intra_node.name}, {remote} over the NIC"
        return text

    def describe(self) -> str:
        net, nvl = self.network, self.intra_node
        text = (f"{net.name}: {net.source}; {net.bandwidth / GB:g} GB/s per rank and direction, "
                f"{net.latency_s * 1e6:g} us per call, half of it at {_size(net.half_bandwidth_bytes)} per peer; "
                f"{self.topology()}")
        if self.gpus_per_node > 1 and net != nvl:
            text += (f" ({nvl.bandwidth / GB:g} GB/s, {nvl.latency_s * 1e6:g} us per call, half of it at "
                     f"{_size(nvl.half_bandwidth_bytes)} per peer)")
        return text


def _size(nbytes: float) -> str:
    if nbytes == 0:
        return "any size"
    return f"{nbytes / MiB:g} MiB" if nbytes >= MiB else f"{nbytes / KiB:g} KiB"


def fit_link(name: str, nbytes: Sequence[float], seconds: Sequence[float], ep: int) -> Link:
    """The (alpha, B) that fit measured all-to-all times best (least squares on t = alpha + bytes (k-1)/k / B),
    from at least two sizes; for calibrating against a link one can measure (scripts/check_link_model.py). At one
    EP degree the per-peer cost is a constant too, so it is part of the fitted alpha: the link has no half-bandwidth
    size of its own."""
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
