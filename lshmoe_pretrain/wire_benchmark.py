"""The fp8_e4m3 wire format's encode and decode on one GPU against the memory-bandwidth floor
(scripts/benchmark_wire.py).

Per layer and crossing the sender encodes its N rows once and the receiver decodes them once. Each pass reads and
writes N·d·b bytes of rows (b bytes per element of the model dtype) and N·(d + 4·blocks) bytes of buffer, so the
fewest bytes either can move is their sum, and its floor is those bytes over the copy bandwidth measured in the
same run (`benchmarking.copy_bandwidth_gbs`, the compressor benchmark's ceiling). Nothing crosses a link: the codec
alone is timed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lshmoe_plugin import wire

from . import benchmarking as bench

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECTION = "wire_codec"
TARGET = 1.5  # issue 23: encode + decode within 1.5x of the floor
HEADERS = ["d_model", "tokens", "scales", "kernel", "MiB read + written", "floor µs", "encode µs", "encode / floor",
           "decode µs", "decode / floor", "encode + decode µs", "per layer / floor", f"within {TARGET}x",
           "eager encode + decode µs", "eager / floor"]


@dataclass(frozen=True)
class Timing:
    """One (d_model, tokens, scale block, kernel): ms per call, as GPU time (CUDA graph replay) and eagerly
    launched from Python (what a training step sees)."""
    d: int
    tokens: int
    block: Optional[int]  # None: one scale per row
    kernel: str  # lsh_moe.kernel: "torch" (reference) or "triton" (fused)
    encode_ms: float
    decode_ms: float
    eager_encode_ms: float
    eager_decode_ms: float


def pass_bytes(tokens: int, d: int, dtype: torch.dtype, block: Optional[int]) -> int:
    """Fewest bytes one encode (or one decode) moves: the rows once and the buffer once."""
    return tokens * d * dtype.itemsize + wire.FP8E4M3(block).bytes(tokens, d, dtype)


def table_rows(timings: Sequence[Timing], bandwidth_gbs: float, dtype: torch.dtype) -> List[Tuple]:
    """The table's rows (HEADERS) from measured timings and the copy bandwidth (GB/s, read + write)."""
    rows = []
    for t in timings:
        moved = pass_bytes(t.tokens, t.d, dtype, t.block)
        floor_us = moved / (bandwidth_gbs * 1e9) * 1e6  # one pass; encode + decode is twice this
        encode_us, decode_us = t.encode_ms * 1e3, t.decode_ms * 1e3
        eager_us = (t.eager_encode_ms + t.eager_decode_ms) * 1e3
        per_layer = (encode_us + decode_us) / (2 * floor_us)
        rows.append((t.d, t.tokens, "row" if t.block is None else t.block, t.kernel, 2 * moved / 2**20,
                     2 * floor_us, encode_us, encode_us / floor_us, decode_us, decode_us / floor_us,
                     encode_us + decode_us, per_layer, "yes" if per_layer <= TARGET else "no", eager_us,
                     eager_us / (2 * floor_us)))
    return rows


def section_text(table: str, bandwidth_gbs: float, dtype_name: str, device: torch.device, reps: int) -> str:
    return bench.header("FP8 wire format: encode + decode vs the memory-bandwidth floor", device) + (
        f"\nNothing crosses a link: each buffer is encoded and decoded on this one GPU, and only the codec is "
        f"timed. Copy bandwidth measured in this run: {bandwidth_gbs:.0f} GB/s (bytes read + written). "
        f"{dtype_name} rows, `fp8_e4m3` with one float32 scale per row or per block of elements (column "
        f"'scales'). An encode reads N·d·b bytes of rows and writes N·(d + 4·blocks) bytes of buffer, a decode "
        f"the reverse; floor = those bytes / copy bandwidth, per pass, and 'per layer' is one encode + one decode "
        f"(a crossing: the sender encodes, the receiver decodes) over twice the floor. µs columns are GPU time: "
        f"many calls on distinct inputs, more bytes in all than the L2 cache holds, captured as one CUDA graph, "
        f"divided by the calls (median of {reps} replays, CUDA events); 'eager' launches the same calls from "
        f"Python, as a training step does. Kernels: `torch` the PyTorch reference (`lsh_moe.kernel: torch`), "
        f"`triton` the fused kernels (lshmoe_plugin/kernels/wire_triton.py, the default on CUDA); both give the "
        f"same bytes.\n\n" + table + "\n")


def _distinct_inputs(make: Callable[[int], torch.Tensor], call_bytes: int, l2_bytes: int) -> List[torch.Tensor]:
    """Enough inputs that one sweep over them moves 4x the L2 cache: no call finds its bytes cached."""
    return [make(seed) for seed in range(max(2, math.ceil(4 * l2_bytes / call_bytes)))]


def time_codec(fmt: wire.FP8E4M3, tokens: int, d: int, dtype: torch.dtype, device: torch.device,
               reps: int) -> Tuple[float, float, float, float]:
    """(encode, decode, eager encode, eager decode) ms per call of `fmt` on (tokens, d) rows of `dtype`."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)

    def rows(seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(tokens, d, generator=gen, device=device).mul_(3).to(dtype)

    inputs = _distinct_inputs(rows, pass_bytes(tokens, d, dtype, fmt.block), l2_bytes)
    buffers = [fmt.encode(x) for x in inputs]
    kept: List[torch.Tensor] = []  # every output kept alive, so none reuses another's (cached) memory

    def encode_all():
        kept[:] = [fmt.encode(x) for x in inputs]

    def decode_all():
        kept[:] = [fmt.decode(b, d, dtype) for b in buffers]

    per_call = []
    for sweep in (encode_all, decode_all):
        per_call.append(bench.graph_time_ms(sweep, device, reps) / len(inputs))
    for sweep in (encode_all, decode_all):
        per_call.append(bench.time_ms(sweep, device, warmup=2, reps=reps) / len(inputs))
    return tuple(per_call)


def run(d_models: Sequence[int], tokens: Sequence[int], blocks: Sequence[Optional[int]], kernels: Sequence[str],
        dtype_name: str, reps: int, report: Optional[str]) -> str:
    """Measure every (d_model, tokens, scale block, kernel) on CUDA, print the table, write the section to
    `report` when given; returns the table."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_wire.py times the fp8_e4m3 codec against a GPU's memory bandwidth and needs a "
                         "CUDA device; there is none here (torch.cuda.is_available() is False). Nothing was "
                         "measured or written: run it on a GPU machine.")
    device, dtype = torch.device("cuda"), DTYPES[dtype_name]
    bandwidth = bench.copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {bench.device_name(device)}", flush=True)
    timings = []
    for d in d_models:
        for n in tokens:
            for block in blocks:
                for kernel in kernels:
                    fmt = wire.wire_format("fp8_e4m3", "row" if block is None else block, kernel=kernel)
                    timings.append(Timing(d, n, block, kernel, *time_codec(fmt, n, d, dtype, device, reps)))
                    print(bench.markdown_table(HEADERS, table_rows(timings[-1:], bandwidth, dtype)).splitlines()[-1],
                          flush=True)
                torch.cuda.empty_cache()
    table = bench.markdown_table(HEADERS, table_rows(timings, bandwidth, dtype))
    print(table)
    bench.report_section(report, SECTION, section_text(table, bandwidth, dtype_name, device, reps))
    return table
