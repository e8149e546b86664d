"""What a fused wire kernel compiles to on a GPU, worked out on a machine without one: the launch the plugin makes for
a format and a shape, compiled by Triton for an NVIDIA architecture with the `ptxas` its wheel ships, then its
registers, shared memory and a count of its SASS instructions (global loads and stores by width, barriers,
shuffles, the slow-path calls of a correctly rounded division).

Nothing is timed: this says how a kernel is built (whether its loads are vectorised, how many stores a thread
issues), which is what to look at before spending GPU time on a rework (docs/quality.md, 2026-12-06, fifth
session: FP6's encode loaded two bytes per instruction until its tile followed the rows).

    python scripts/kernel_sass.py --format fp6_e2m3 --pass encode --d-model 1024 --block 32
    python scripts/kernel_sass.py --format fp4_e2m1 --pass encode --stochastic --sass /tmp/fp4.sass

Needs Triton (with its NVIDIA backend's ptxas and cuobjdump); no CUDA device, no driver.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

MODULES = {"fp8_e4m3": "wire_triton", "fp4_e2m1": "wire_fp4_triton", "fp6_e2m3": "wire_fp6_triton"}
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
                 torch.int64: "*i64"}
COUNTED = r"\b(LDG[.A-Z0-9_]*|STG[.A-Z0-9_]*|BAR[.A-Z]*|SHFL[.A-Z]*|CALL[.A-Z]*|STS[.A-Z0-9]*|LDS[.A-Z0-9]*)"


class _Capture:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch instead of making it."""

    def __init__(self, jit, launches: List[Tuple[object, tuple, dict]]) -> None:
        self.jit, self.launches = jit, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.jit, args, kwargs))


def capture_launches(fmt: str, pass_: str, d: int, block, scale: str, stochastic: bool, rows: int,
                     dtype: torch.dtype) -> List[Tuple[object, tuple, dict]]:
    """The kernel launches (JITFunction, args, kwargs) one encode or decode of `rows` rows of `d` makes, on the CPU,
    through the kernels module's own public function (so its choice of kernel and constants is the plugin's)."""
    import importlib

    from lshmoe_plugin import wire
    module = importlib.import_module(f"lshmoe_plugin.kernels.{MODULES[fmt]}")
    launches: List[Tuple[object, tuple, dict]] = []
    kernels = {name: getattr(module, name) for name in dir(module)
               if name.endswith("_kernel") and hasattr(getattr(module, name), "fn")}  # its JITFunctions
    x = torch.zeros(rows, d, dtype=dtype)
    counter = torch.zeros(1, dtype=torch.int64) if stochastic else None
    try:
        for name, jit in kernels.items():
            setattr(module, name, _Capture(jit, launches))
        if pass_ == "encode":
            module.encode(x, block, scale, counter) if stochastic else module.encode(x, block, scale)
        else:
            codec = wire.wire_format(fmt, "row" if block is None else block, scale, kernel="torch")
            module.decode(codec.encode(x), d, block, dtype, scale)
    finally:
        for name, jit in kernels.items():
            setattr(module, name, jit)
    return launches


def compile_launch(jit, args: tuple, kwargs: dict, arch: int):
    """The launch compiled for sm_`arch`: pointer arguments as their tensors' element types, integers as i32, every
    keyword a compile-time constant, and the 16-byte divisibility Triton's launcher would find for arguments that
    have it (pointers of fresh tensors, strides that are multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature: Dict[str, str] = {}
    constexprs: Dict[str, object] = {}
    attrs = {}
    for i, param in enumerate(jit.params):
        name = param.name
        value = args[i] if i < len(args) else kwargs.get(name)
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def describe(compiled) -> Tuple[str, str, Dict[str, int]]:
    """(resource usage line, SASS, {instruction: count} of the counted kinds) of a compiled kernel."""
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = "/tmp/kernel_sass.cubin"
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                          check=True).stdout
    line = next((text.strip() for text in usage.splitlines() if "REG:" in text), "")
    return line, sass, dict(sorted(collections.Counter(re.findall(COUNTED, sass)).items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=sorted(MODULES), required=True)
    p.add_argument("--pass", dest="pass_", choices=["encode", "decode"], default="encode")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--block", default="32", help="elements per scale, or 'row'")
    p.add_argument("--scale", choices=["e8m0", "float32"], default="e8m0")
    p.add_argument("--stochastic", action="store_true", help="the encode that rounds stochastically (fp4_e2m1)")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--sass", metavar="PATH", help="also write the SASS here")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    block = None if args.block == "row" else int(args.block)
    launches = capture_launches(args.format, args.pass_, args.d_model, block, args.scale, args.stochastic,
                                args.rows, dtype)
    for jit, largs, kwargs in launches:
        usage, sass, counts = describe(compile_launch(jit, largs, dict(kwargs), args.arch))
        print(f"{jit.fn.__name__} (sm_{args.arch}): {usage}")
        print(f"  SASS instructions: {sass.count(chr(10))} lines; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if args.sass:
            with open(args.sass, "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
