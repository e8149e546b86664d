"""The plugin's own host time around the fused wire kernels: one encode plus one decode of a crossing, with the Triton
launches stubbed out, so what is timed is the Python the plugin runs around them (format routing, buffer checks
and allocation, grid arithmetic, the stochastic draw's counter).

Runs on a CPU with Triton installed (its launches are never made). It does not time Triton's own launch path, which
needs a GPU: that is the larger part of a crossing's host time in a GPU profile (docs/quality.md, 2026-12-06, fourth
session).

    python scripts/benchmark_host_path.py                         # the grid arithmetic as shipped (launch_math)
    python scripts/benchmark_host_path.py --grid-math triton      # ... as it was: Triton's constexpr functions

Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

FORMATS = {"fp8_e4m3, float32 scale per 128": ("FP8E4M3", (128, "float32")),
           "fp4_e2m1, e8m0 scale per 32, stochastic": ("FP4E2M1", (32, "e8m0", "stochastic")),
           "fp4_e2m1, e8m0 scale per 32": ("FP4E2M1", (32, "e8m0")),
           "fp6_e2m3, e8m0 scale per 32": ("FP6E2M3", (32, "e8m0"))}


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches(grid_math: str) -> None:
    """Every fused wire kernel's launch made a no-op, the fused path taken off CUDA, and (with `grid_math`
    'triton') the launch functions' grid arithmetic put back to Triton's constexpr functions."""
    import triton

    from lshmoe_plugin import ops
    from lshmoe_plugin.kernels import wire_blocks_triton, wire_fp4_triton, wire_fp6_triton, wire_triton
    modules = (wire_blocks_triton, wire_fp4_triton, wire_fp6_triton, wire_triton)
    for module in modules:
        for name in dir(module):
            # every kernel the module launches (a JITFunction named *_kernel), whatever it is called: a name list
            # missed the tile kernels once (scripts/kernel_sass.py finds them the same way)
            if name.endswith("_kernel") and hasattr(getattr(module, name), "fn"):
                setattr(module, name, _NoLaunch())
        if grid_math == "triton":
            for name in ("cdiv", "next_power_of_2"):
                if hasattr(module, name):
                    setattr(module, name, getattr(triton, name))
    ops.runs_fused = lambda kernel, device: kernel != "torch"
    wire_triton.runs_on = lambda device, kernel: True


def time_pair(fmt, rows: torch.Tensor, calls: int, repeats: int) -> float:
    """µs of one encode plus one decode, the best of `repeats` means over `calls`."""
    d = rows.shape[-1]
    for _ in range(200):
        fmt.decode(fmt.encode(rows), d, rows.dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fmt.decode(fmt.encode(rows), d, rows.dtype)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid-math", choices=["plain", "triton"], default="plain",
                   help="the launch functions' grid arithmetic: as shipped (plain) or Triton's constexpr functions")
    p.add_argument("--rows", type=int, default=40960, help="rows per crossing (E * C of one rank)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    stub_launches(args.grid_math)
    from lshmoe_plugin import wire
    rows = torch.empty(args.rows, args.d_model, dtype=torch.bfloat16)  # never read: the launches are stubbed
    print(f"host path of one encode + decode, launches stubbed, grid arithmetic {args.grid_math}, "
          f"{args.rows} x {args.d_model} bf16, best of {args.repeats} x {args.calls} calls")
    print("| format | µs |\n| --- | --- |")
    for label, (cls, params) in FORMATS.items():
        print(f"| {label} | {time_pair(getattr(wire, cls)(*params), rows, args.calls, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
