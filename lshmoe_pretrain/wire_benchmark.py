"""The wire formats' encode and decode on one GPU against the memory-bandwidth floor (scripts/benchmark_wire.py).

Per layer and crossing the sender encodes its N rows once and the receiver decodes them once. Each pass reads and
writes N·d·b bytes of rows (b bytes per element of the model dtype) and the format's buffer, N·(v + c·blocks)
bytes: v = d (fp8_e4m3), ceil(d / 2) (fp4_e2m1) or 3·ceil(d / 4) (fp6_e2m3) bytes of values, c = 4 (float32) or 1
(e8m0) bytes per scale. A stochastic encode (the gradients' `lsh_moe.grad_rounding: "stochastic"`) moves the same
bytes: its uniforms are hashed in registers from the element's index and an 8-byte draw counter. The
fewest bytes either pass can move is their sum, and its floor is those bytes over the copy bandwidth measured in
the same run (`benchmarking.copy_bandwidth_gbs`, the compressor benchmark's ceiling). Nothing crosses a link: the
codec alone is timed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lshmoe_plugin import wire

from . import benchmarking as bench

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Every (wire dtype, scale coding) with a fused codec, as "<dtype>/<scale>", each format's default scale first; then
# those whose fused encode also rounds stochastically, as "<dtype>/<scale>/stochastic".
FORMATS = ("fp8_e4m3/float32", "fp8_e4m3/e8m0", "fp4_e2m1/e8m0", "fp4_e2m1/float32", "fp6_e2m3/e8m0",
           "fp6_e2m3/float32", "fp4_e2m1/e8m0/stochastic")
# Scale blocks timed unless --blocks names others: each format's default block (LSHMoEConfig) and one per row.
DEFAULT_BLOCKS = {"fp8_e4m3": (128, None), "fp4_e2m1": (32, None), "fp6_e2m3": (32, None)}
SECTION = "wire_codec"
TARGET = 1.5  # issue 23: encode + decode within 1.5x of the floor
HEADERS = ["d_model", "tokens", "format", "block", "kernel", "MiB read + written", "floor µs", "encode µs",
           "encode / floor", "decode µs", "decode / floor", "encode + decode µs", "per layer / floor",
           f"within {TARGET}x", "eager encode + decode µs", "eager / floor"]


@dataclass(frozen=True)
class Timing:
    """One (d_model, tokens, format, scale block, kernel): ms per call, as GPU time (CUDA graph replay) and eagerly
    launched from Python (what a training step sees)."""
    d: int
    tokens: int
    fmt: str  # one of FORMATS
    block: Optional[int]  # None: one scale per row
    kernel: str  # lsh_moe.kernel: "torch" (reference) or "triton" (fused)
    encode_ms: float
    decode_ms: float
    eager_encode_ms: float
    eager_decode_ms: float


def codec(fmt: str, block: Optional[int], kernel: str = "torch") -> wire.WireFormat:
    """The wire format named "<dtype>/<scale>[/stochastic]" (one of FORMATS) with `block` elements per scale (None:
    per row)."""
    name, scale, *rounding = fmt.split("/")
    return wire.wire_format(name, "row" if block is None else block, scale, kernel=kernel,
                            rounding=rounding[0] if rounding else "nearest")


def plan(formats: Sequence[str], blocks: Optional[Sequence[Optional[int]]]) -> List[Tuple[str, Optional[int]]]:
    """(format, block) pairs to time: `blocks` for every format, or each format's DEFAULT_BLOCKS when None."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"wire formats {unknown}: allowed {list(FORMATS)}")
    return [(fmt, block) for fmt in formats
            for block in (DEFAULT_BLOCKS[fmt.split("/")[0]] if blocks is None else blocks)]


def pass_bytes(tokens: int, d: int, dtype: torch.dtype, fmt: str, block: Optional[int]) -> int:
    """Fewest bytes one encode (or one decode) moves: the rows once and the buffer once."""
    return tokens * d * dtype.itemsize + codec(fmt, block).bytes(tokens, d, dtype)


def table_rows(timings: Sequence[Timing], bandwidth_gbs: float, dtype: torch.dtype) -> List[Tuple]:
    """The table's rows (HEADERS) from measured timings and the copy bandwidth (GB/s, read + write)."""
    rows = []
    for t in timings:
        moved = pass_bytes(t.tokens, t.d, dtype, t.fmt, t.block)
        floor_us = moved / (bandwidth_gbs * 1e9) * 1e6  # one pass; encode + decode is twice this
        encode_us, decode_us = t.encode_ms * 1e3, t.decode_ms * 1e3
        eager_us = (t.eager_encode_ms + t.eager_decode_ms) * 1e3
        per_layer = (encode_us + decode_us) / (2 * floor_us)
        rows.append((t.d, t.tokens, t.fmt.replace("/", " "), "row" if t.block is None else t.block, t.kernel,
                     2 * moved / 2**20, 2 * floor_us, encode_us, encode_us / floor_us, decode_us,
                     decode_us / floor_us, encode_us + decode_us, per_layer, "yes" if per_layer <= TARGET else "no",
                     eager_us, eager_us / (2 * floor_us)))
    return rows


def section_text(table: str, bandwidth_gbs: float, dtype_name: str, device: torch.device, reps: int) -> str:
    return bench.header("Wire formats: encode + decode vs the memory-bandwidth floor", device) + (
        f"\nNothing crosses a link: each buffer is encoded and decoded on this one GPU, and only the codec is "
        f"timed. Copy bandwidth measured in this run: {bandwidth_gbs:.0f} GB/s (bytes read + written). "
        f"{dtype_name} rows in each wire format (column 'format': `fp8_e4m3`, `fp4_e2m1` or `fp6_e2m3`, with "
        f"float32 or e8m0 scales; 'stochastic': the encode rounds stochastically, as the gradients do with "
        f"`grad_rounding: stochastic`), one scale per row or per block of elements (column 'block'). An encode "
        f"reads N·d·b bytes of rows and writes the buffer, N·(v + c·blocks) bytes (v = d for fp8_e4m3, "
        f"ceil(d / 2) for fp4_e2m1, 3·ceil(d / 4) for fp6_e2m3; c = 4 for float32 scales, 1 for e8m0), a decode "
        f"the reverse; floor = those bytes / copy bandwidth, per pass, "
        f"and 'per layer' is one encode + one decode (a crossing: the sender encodes, the receiver decodes) over "
        f"twice the floor. µs columns are GPU time: many calls on distinct inputs, more bytes in all than the L2 "
        f"cache holds, captured as one CUDA graph, divided by the calls (median of {reps} replays, CUDA events); "
        f"'eager' launches the same calls from Python, as a training step does. Kernels: `torch` the PyTorch "
        f"reference (`lsh_moe.kernel: torch`), `triton` the fused kernels (lshmoe_plugin/kernels/wire_triton.py "
        f"for fp8_e4m3, wire_fp4_triton.py for fp4_e2m1, wire_fp6_triton.py for fp6_e2m3; the default on CUDA); "
        f"both give the same bytes.\n\n"
        + table + "\n")


def _distinct_inputs(make: Callable[[int], torch.Tensor], call_bytes: int, l2_bytes: int) -> List[torch.Tensor]:
    """Enough inputs that one sweep over them moves 4x the L2 cache: no call finds its bytes cached."""
    return [make(seed) for seed in range(max(2, math.ceil(4 * l2_bytes / call_bytes)))]


def time_codec(fmt: wire.WireFormat, tokens: int, d: int, dtype: torch.dtype, device: torch.device, reps: int,
               call_bytes: int) -> Tuple[float, float, float, float]:
    """(encode, decode, eager encode, eager decode) ms per call of `fmt` on (tokens, d) rows of `dtype`; one call
    moves `call_bytes`."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)

    def rows(seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(tokens, d, generator=gen, device=device).mul_(3).to(dtype)

    inputs = _distinct_inputs(rows, call_bytes, l2_bytes)
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


def run(d_models: Sequence[int], tokens: Sequence[int], formats: Sequence[str],
        blocks: Optional[Sequence[Optional[int]]], kernels: Sequence[str], dtype_name: str, reps: int,
        report: Optional[str], section: str = SECTION) -> str:
    """Measure every (d_model, tokens, format, scale block, kernel) on CUDA (blocks None: each format's
    DEFAULT_BLOCKS), print the table, write it as `section` of `report` when given; returns the table."""
    pairs = plan(formats, blocks)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_wire.py times the wire codecs against a GPU's memory bandwidth and needs a "
                         "CUDA device; there is none here (torch.cuda.is_available() is False). Nothing was "
                         "measured or written: run it on a GPU machine.")
    device, dtype = torch.device("cuda"), DTYPES[dtype_name]
    bandwidth = bench.copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {bench.device_name(device)}", flush=True)
    timings = []
    for d in d_models:
        for n in tokens:
            for fmt, block in pairs:
                for kernel in kernels:
                    measured = time_codec(codec(fmt, block, kernel), n, d, dtype, device, reps,
                                          pass_bytes(n, d, dtype, fmt, block))
                    timings.append(Timing(d, n, fmt, block, kernel, *measured))
                    print(bench.markdown_table(HEADERS, table_rows(timings[-1:], bandwidth, dtype)).splitlines()[-1],
                          flush=True)
                torch.cuda.empty_cache()
    table = bench.markdown_table(HEADERS, table_rows(timings, bandwidth, dtype))
    print(table)
    bench.report_section(report, section, section_text(table, bandwidth, dtype_name, device, reps))
    return table
