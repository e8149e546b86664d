"""Shared pieces of the benchmark scripts: device timing, the copy-bandwidth ceiling, and the report writer.

Every figure a script writes is computed in the same run that it reports, next to the command line, the GPU and
the link it was measured on; nothing is typed by hand. The scripts print their tables and write a report only into
the file ``--report`` names.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from lshmoe_plugin.timing import synchronize, time_ms  # noqa: F401  (the scripts time through this module)


def graph_time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Median ms of fn() replayed as one CUDA graph: the GPU's own time, without Python's launch overhead.

    Off CUDA, or when fn cannot be captured (it synchronises with the host), returns NaN and says why.
    """
    if torch.device(device).type != "cuda":
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"CUDA graph capture failed: {error}", flush=True)
        return float("nan")
    return time_ms(graph.replay, device, warmup=3, reps=reps)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written (METHOD.md's ceiling)."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def software_line() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("triton", "deepspeed"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except Exception:  # noqa: BLE001 - an absent package is simply not listed
            pass
    return ", ".join(parts)


def command_line() -> str:
    # Only the variables that change what is measured: NCCL's transport choice and the plugin's switch.
    names = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME", "LSHMOE_ENABLED")
    env = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1")]
    return " ".join(env + launcher + [shlex.quote(a) for a in sys.argv])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: str, name: str, text: str, after: Optional[str] = None) -> None:
    """Replace (or add) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a markdown file: a
    new block goes right after section `after` when the file has it, else at the end."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nWritten by the scripts in `scripts/`.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    anchor = f"<!-- END {after} -->" if after else None
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    elif anchor and anchor in old:
        new = old.replace(anchor, f"{anchor}\n\n{block}", 1)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(new)


def report_section(path: Optional[str], name: str, text: str, after: Optional[str] = None) -> None:
    """Write section `name` into `path` when the run was given one (``--report PATH``), else only say so: a
    benchmark run never edits the checkout's docs unless asked to. A new section goes after section `after`."""
    if path:
        write_section(path, name, text, after)
        print(f"wrote {path} [{name}]")
    else:
        print(f"section '{name}' not written (pass --report PATH to write it, e.g. --report docs/benchmarks.md)")


def read_section_text(path: str, name: str) -> str:
    """The text of section `name` in `path`, between its markers."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = open(path).read()
    if begin not in text:
        raise KeyError(f"{path} has no section {name!r}")
    return text.split(begin, 1)[1].split(end, 1)[0]


def read_section_table(path: str, name: str) -> Dict[str, Dict[str, str]]:
    """The first markdown table of section `name` in `path`, as {first cell: {header: cell}} (for reports that
    combine figures other scripts measured, instead of copying numbers by hand)."""
    text = read_section_text(path, name)
    start = text.find("\n|")
    # the first table only: a section may go on with others (a quality report's loss curve, say), whose first
    # cells could repeat this one's and overwrite its rows
    lines = text[start + 1:].split("\n\n", 1)[0].splitlines() if start >= 0 else []
    lines = [line for line in lines if line.startswith("|")]
    if len(lines) < 3:
        raise KeyError(f"section {name!r} of {path} holds no table")
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(headers, row)) for row in rows}


def header(title: str, device: torch.device, link: Optional[str] = None, stamp: str = "measured") -> str:
    """The lines every section starts with; `stamp` names the date line ("run, link modelled" for figures made
    with a modelled link)."""
    lines = [f"## {title}", "", f"- command: `{command_line()}`", f"- device: {device_name(device)}",
             f"- software: {software_line()}"]
    if link:
        lines.append(f"- link: {link}")
    lines.append(f"- {stamp}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return "\n".join(lines) + "\n"
