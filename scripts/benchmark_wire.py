"""Wire format microbenchmark: encode + decode of `fp8_e4m3`, `fp4_e2m1` and `fp6_e2m3` (FP4's stochastic encode too),
with float32 or e8m0 scales, on one GPU
against the memory-bandwidth floor.

For every (d_model, tokens per layer, format, scale block) it times the PyTorch reference and the fused Triton
kernels (lshmoe_plugin/kernels/wire_triton.py, wire_fp4_triton.py) and divides by the floor computed from the copy
bandwidth measured in the same run. Nothing crosses a link. CUDA only: on a CPU it refuses and writes nothing.

    python scripts/benchmark_wire.py                               # on a GPU, prints the table
    python scripts/benchmark_wire.py --formats fp4_e2m1/e8m0 --blocks 32 16
    python scripts/benchmark_wire.py --report docs/benchmarks.md   # ... and (re)writes its section there
    python scripts/benchmark_wire.py --tile 8192 --kernels triton --section wire_codec_tile8192   # another tile

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


def tile_size(value: str) -> int:
    """A power of two in [512, 16384]: elements a fused wire kernel's program holds."""
    if value.isdigit() and 512 <= int(value) <= 16384 and int(value) & (int(value) - 1) == 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"a tile is a power of two from 512 to 16384 elements, got {value!r}")


def set_tile(tile: int) -> None:
    """Every wire kernel module's TILE (lshmoe_plugin/kernels/wire_blocks_triton.py's, and the copies the format
    modules import) and a format's own tile (FP4's BLOCK_TILE) set to `tile` for this process: a benchmark of
    another tile, before a constant changes."""
    from lshmoe_plugin.kernels import wire_blocks_triton, wire_fp4_triton, wire_fp6_triton, wire_triton
    for module in (wire_blocks_triton, wire_fp4_triton, wire_fp6_triton, wire_triton):
        for name in ("TILE", "BLOCK_TILE"):
            if hasattr(module, name):
                setattr(module, name, tile)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768],
                   help="rows per layer and crossing (E * C per rank, as benchmark_compressor.py's --tokens)")
    p.add_argument("--formats", nargs="+", default=list(wire_benchmark.FORMATS), choices=wire_benchmark.FORMATS,
                   help="wire dtype / scale coding (default: all)")
    p.add_argument("--blocks", type=scale_block, nargs="+", default=None, metavar="{row,N}",
                   help="elements per scale (lsh_moe.fp8_block_size, fp4_block_size), for every format; default: "
                   "each format's default block and 'row' (fp8_e4m3: 128 row, fp4_e2m1 and fp6_e2m3: 32 row)")
    p.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    p.add_argument("--dtype", choices=sorted(wire_benchmark.DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--report", default=None, metavar="PATH", help=f"also write the section "
                   f"'{wire_benchmark.SECTION}' into this markdown file (docs/benchmarks.md holds the published "
                   f"one); default: print only")
    p.add_argument("--section", default=wire_benchmark.SECTION,
                   help="the section's name in --report (another name keeps a published section beside it)")
    p.add_argument("--tile", type=tile_size, default=None, metavar="N",
                   help="elements a fused kernel's program holds, for this run only (default: the kernels' own, "
                   "TILE 4096, and 8192 for FP4's blocks); its rows go under their own --section")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.tile is not None:
        set_tile(args.tile)
    wire_benchmark.run(args.d_models, args.tokens, args.formats, args.blocks, args.kernels, args.dtype, args.reps,
                       args.report, args.section)


if __name__ == "__main__":
    main()
