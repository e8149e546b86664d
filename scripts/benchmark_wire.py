"""FP8 wire format microbenchmark: encode + decode of `fp8_e4m3` on one GPU against the memory-bandwidth floor.

For every (d_model, tokens per layer, scale block) it times the PyTorch reference and the fused Triton kernels
(lshmoe_plugin/kernels/wire_triton.py) and divides by the floor computed from the copy bandwidth measured in the
same run. Nothing crosses a link. CUDA only: on a CPU it refuses and writes nothing.

    python scripts/benchmark_wire.py                               # on a GPU, prints the table
    python scripts/benchmark_wire.py --report docs/benchmarks.md   # ... and (re)writes its section there

Nothing is written unless --report names where.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lshmoe_pretrain import wire_benchmark  # noqa: E402


def scale_block(value: str):
    """'row' (one scale per row) or an integer >= 1 (elements per scale), as lsh_moe.fp8_block_size."""
    if value == "row":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"a scale block is 'row' or an integer >= 1, got {value!r}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768],
                   help="rows per layer and crossing (E * C per rank, as benchmark_compressor.py's --tokens)")
    p.add_argument("--blocks", type=scale_block, nargs="+", default=[128, None], metavar="{row,N}",
                   help="elements per float32 scale (lsh_moe.fp8_block_size)")
    p.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    p.add_argument("--dtype", choices=sorted(wire_benchmark.DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--report", default=None, metavar="PATH", help=f"also write the section "
                   f"'{wire_benchmark.SECTION}' into this markdown file (docs/benchmarks.md holds the published "
                   f"one); default: print only")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    wire_benchmark.run(args.d_models, args.tokens, args.blocks, args.kernels, args.dtype, args.reps, args.report)


if __name__ == "__main__":
    main()
