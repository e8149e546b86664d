"""The tables of docs/link_model.md that the link model computes on its own (no GPU): the published all-to-all
figures it is calibrated from, against what it gives; the per-peer messages of the GPU presets' modelled jobs,
with the share of the bandwidth they reach and of the modelled time that is fixed and per-peer cost; and each
method's bytes per crossing (lshmoe_plugin.wire) and modelled all-to-all time per step against stock's (FP8 on
the wire alone and under LSH), which is the link's share of a step only, not a step speed-up.

    python scripts/link_model_tables.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lshmoe_pretrain.benchmarking import markdown_table  # noqa: E402
from lshmoe_pretrain.link_model import GB, LINKS, Link, LinkModel, MiB  # noqa: E402
from lshmoe_pretrain.models import PRESETS  # noqa: E402
from lshmoe_pretrain.planning import LayerShape  # noqa: E402

# Published alltoall_perf times, as the sources print them (docs/link_model.md cites each).
NCCL_1531 = [("out of place", 337.8), ("in place", 295.6)]        # 64 x H800, 8 per node, 8 MiB per rank
B300_ALGBW = [(1, 47.1), (2, 89.3), (4, 143.7), (8, 224.9), (16, 306.7), (32, 392.0)]  # 8 x B300, MiB: GB/s


def old_model(link: Link, gpus_per_node: int = 1) -> LinkModel:
    """The model before per-peer costs: every message at B, NVLink's call 10 us."""
    flat = Link(link.name, link.bandwidth, link.latency_s if link.latency_s != LINKS["nvlink4"].latency_s else 10e-6,
                link.source)
    return LinkModel(flat, gpus_per_node, Link("old nvlink4", LINKS["nvlink4"].bandwidth, 10e-6, "old"))


def calibration_rows():
    rows = []
    nic = LinkModel(LINKS["400gbps"], gpus_per_node=8)
    for label, measured in NCCL_1531:
        modelled = nic.all_to_all_s(8 * MiB, 64) * 1e6
        rows.append((f"nccl #1531, 64 x H800 (8 per node, 400 Gb/s NIC taken), {label}", "8 MiB", "128 KiB",
                     measured, modelled, modelled / measured, old_model(LINKS["400gbps"], 8).all_to_all_s(
                         8 * MiB, 64) * 1e6))
    nvlink = LINKS["nvlink4"]
    b300 = Link("b300", 620.3 * 7 / 8 * GB, nvlink.latency_s, "B300 NVLink 5", nvlink.half_bandwidth_bytes)
    for mib, algbw in B300_ALGBW:
        measured = mib * MiB / (algbw * GB) * 1e6
        modelled = LinkModel(b300).all_to_all_s(mib * MiB, 8) * 1e6
        rows.append(("uccl b300_native_nccl_measurements, 8 x B300 NVLink (its B)", f"{mib} MiB",
                     f"{mib * 1024 // 8} KiB", measured, modelled, modelled / measured,
                     old_model(b300).all_to_all_s(mib * MiB, 8) * 1e6))
    return rows


# The modelled jobs of bench-modelled-135m / -1.3b (and their -fp8 stages): the preset, its d_model, the tokens one
# rank's MoE layer sees per step (micro-batch x sequence).
JOBS = (("gpt-moe-135m", 512, 32 * 512), ("gpt-moe-1.3b", 2048, 8 * 2048))
METHODS = ("paper", "fp8", "fp8_dispatch", "paper_fp8")
METHOD_EPS, METHOD_LINKS = (8, 16, 64), ("100gbps", "200gbps", "400gbps")


def preset_rows():
    """The modelled jobs of bench-modelled-135m / -1.3b: one expert per rank, top-2, bf16."""
    rows = []
    for preset, d_model, tokens in JOBS:
        shape = LayerShape(d_model=d_model, tokens_per_rank=tokens, experts=1, top_k=2, ep=1)
        for variant, nbytes in (("stock", shape.stock_bytes), ("LSH-MoE", shape.lsh_bytes)):
            for ep in (8, 16, 64):
                message = nbytes / ep
                cells = [f"{preset} {variant}", f"{nbytes / MiB:.1f} MiB", ep, f"{message / MiB * 1024:.0f} KiB",
                         LINKS["100gbps"].efficiency(message), LINKS["nvlink4"].efficiency(message)]
                for link in ("100gbps", "400gbps"):
                    model = LinkModel(LINKS[link], gpus_per_node=8)
                    seconds = model.all_to_all_s(nbytes, ep)
                    local, remote = model.peers(ep)
                    bytes_only = max(nbytes / ep * remote / LINKS[link].bandwidth,
                                     nbytes / ep * local / LINKS["nvlink4"].bandwidth)
                    cells += [seconds * 1e3, 1 - bytes_only / seconds]
                rows.append(cells)
    return rows


def method_shape(d_model: int, tokens: int, method: str) -> LayerShape:
    """One rank's MoE layer of a modelled job (one expert per rank, top-2, bf16) under `method` (its defaults:
    rate 0.2, one float32 scale per 128 elements)."""
    return LayerShape(d_model=d_model, tokens_per_rank=tokens, experts=1, top_k=2, ep=1, method=method)


def moe_layers(preset: str) -> int:
    config = PRESETS[preset]
    return sum(config.is_moe_layer(i) for i in range(config.n_layers))


def method_bytes_rows():
    """Bytes one rank sends per crossing under each method, against stock's."""
    rows = []
    for preset, d_model, tokens in JOBS:
        for method in METHODS:
            shape = method_shape(d_model, tokens, method)
            crossings = shape.crossing_bytes("lsh")
            formats = shape.config().wire_dtypes
            rows.append((preset, method, shape.method_rows, " / ".join("bf16" if f == "model" else f for f in formats),
                         " / ".join(f"{b / MiB:.2f}" for b in crossings), f"{shape.stock_bytes / MiB:.2f}",
                         sum(crossings) / sum(shape.crossing_bytes("stock"))))
    return rows


def method_time_rows():
    """Modelled all-to-all ms per training step (every MoE layer's 4 crossings, each at its own bytes) of stock
    and each method, and each method's over stock's, at every EP degree and NIC with 8 GPUs per node."""
    rows = []
    for preset, d_model, tokens in JOBS:
        shapes = {m: method_shape(d_model, tokens, m) for m in METHODS}
        layers = moe_layers(preset)
        for ep in METHOD_EPS:
            for link in METHOD_LINKS:
                model = LinkModel(LINKS[link], gpus_per_node=8)

                def step_ms(shape: LayerShape, variant: str) -> float:
                    return layers * sum(model.all_to_all_s(b, ep) for b in shape.crossing_bytes(variant)) * 1e3
                stock = step_ms(shapes["paper"], "stock")
                cells = [preset, ep, link, "{} / {}".format(*model.peers(ep)), stock]
                for method in METHODS:
                    ms = step_ms(shapes[method], "lsh")
                    cells += [ms, ms / stock]
                rows.append(cells)
    return rows


def main() -> None:
    print("Published all-to-all times against the model (us):\n")
    print(markdown_table(["source and setup", "per rank", "per peer", "measured us", "modelled us",
                          "modelled / measured", "old model us (every message at B)"], calibration_rows()))
    print("\nPer-peer messages of the GPU presets' modelled jobs (8 GPUs per node, bf16, 1 expert per rank):\n")
    print(markdown_table(["job, variant", "buffer per rank", "EP", "message per peer", "NIC efficiency",
                          "NVLink efficiency", "one a2a ms, 100gbps", "fixed + per-peer share, 100gbps",
                          "one a2a ms, 400gbps", "fixed + per-peer share, 400gbps"], preset_rows()))
    print("\nBytes per crossing of each method (the modelled jobs' MoE layer, one rank, bf16; FP8 e4m3 with one "
          "float32 scale per 128 elements, rate 0.2; lshmoe_plugin.wire):\n")
    print(markdown_table(["job", "method", "rows per crossing", "wire format (dispatch fwd / bwd, combine fwd / bwd)",
                          "MiB per crossing", "stock MiB per crossing", "bytes / stock (4 crossings)"],
                         method_bytes_rows()))
    print("\nModelled all-to-all ms per training step (every MoE layer's 4 crossings, each at its own bytes; 8 GPUs "
          "per node). The link's share of a step only, not a step speed-up: that needs the H200's compute of each "
          "method (scripts/gpu_session.sh bench-modelled-135m-fp8 / bench-modelled-1.3b-fp8):\n")
    headers = ["job", "EP", "link", "EP peers over NVLink / NIC", "stock ms"]
    for method in METHODS:
        headers += [f"{method} ms", f"{method} / stock"]
    print(markdown_table(headers, method_time_rows()))


if __name__ == "__main__":
    main()
