"""Will LSH-MoE (or another method of the plugin: FP8 on the wire, alone or under LSH) make my MoE layer and
training step faster on my cluster's link, and how soon does it reach stock's loss? Measures one DeepSpeed MoE layer
(stock and the plugin under the method, forward + backward) on this GPU at the per-rank shapes of the EP job, adds
the link model's time for the bytes each of the four crossings would move in its wire format, and prints the
predicted layer and step speed-ups, whether the method pays, the bandwidth below which it does, and, where
docs/quality.md holds a measurement of the same layer shape and method, the tokens it needed to reach stock's loss
and the resulting time to that loss.

    python scripts/plan_lsh_moe.py --d-model 1024 --tokens-per-rank 16384 --experts 64 --top-k 2 --ep 16 \\
        --link 200gbps [--method paper] [--rate 0.2] [--fp8-block-size 128] [--gpus-per-node 8] \\
        [--moe-layers 12 --other-ms 40 --dense-params 3e8]

Methods (lshmoe_plugin.methods): paper (LSH-MoE as published), paper_fp8, fp8, fp8_dispatch; --rate applies to
the clustered ones (paper, paper_fp8) only, --fp8-block-size to the ones that send FP8.

Links: 100gbps, 200gbps, 400gbps (one NIC per GPU), nvlink4, infinite, or custom:<GB/s>:<latency us>[:<half KiB>];
several at once print a row each. Nodes hold 8 GPUs on NVLink unless --gpus-per-node says otherwise. Everything
about the network is modelled (docs/link_model.md says how and from what). Without a GPU the command refuses: a
CPU's expert FFN is two orders of magnitude slower, so compression looks free there; --cpu-timings runs it anyway
with every figure marked as CPU timing (for checking the command, not for planning).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lshmoe_plugin import wire  # noqa: E402
from lshmoe_plugin.config import LSHMoEConfig  # noqa: E402
from lshmoe_plugin.methods import METHODS  # noqa: E402
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import planning  # noqa: E402
from lshmoe_pretrain.link_model import DEFAULT_GPUS_PER_NODE, GB, LinkModel, parse_link  # noqa: E402
from lshmoe_pretrain.quality_records import find_record, read_records  # noqa: E402

QUALITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "quality.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, required=True)
    p.add_argument("--d-ff", type=int, default=None, help="expert FFN width (default 4 x d-model)")
    p.add_argument("--tokens-per-rank", type=int, required=True, help="tokens entering the layer per rank and step")
    p.add_argument("--experts", type=int, required=True, help="experts of the layer over all EP ranks")
    p.add_argument("--top-k", type=int, default=2, choices=[1, 2])
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--ep", type=int, required=True, help="expert-parallel degree k (ranks the experts spread over)")
    p.add_argument("--link", nargs="+", default=["200gbps"], help="one or more links (see above)")
    p.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE,
                   help=f"GPUs per node whose EP peers talk over NVLink, one NIC each (default "
                        f"{DEFAULT_GPUS_PER_NODE}, an HGX node; 1: every peer behind the NIC)")
    p.add_argument("--method", default="paper", choices=list(METHODS),
                   help="lsh_moe.method to plan (default paper: LSH-MoE as published)")
    p.add_argument("--rate", type=float, default=None,
                   help=f"lsh_moe.compression_rate of a clustered method (default "
                        f"{LSHMoEConfig.compression_rate}); refused for a method without clustering")
    p.add_argument("--fp8-block-size", default=str(LSHMoEConfig.fp8_block_size), metavar="N|row",
                   help=f"lsh_moe.fp8_block_size of a method that sends FP8 (default {LSHMoEConfig.fp8_block_size}; "
                        f"row: one scale per row)")
    p.add_argument("--moe-layers", type=int, default=1, help="MoE layers per step (for the step prediction)")
    p.add_argument("--other-ms", type=float, default=0.0,
                   help="rest of the training step without the network (attention, dense FFNs, optimizer), as "
                        "measured at EP=1; default 0: the step is its MoE layers")
    p.add_argument("--dense-params", type=float, default=0.0,
                   help="parameters outside the experts, whose gradients all-reduce over --dp ranks every step")
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks of the dense part (default: --ep)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cpu-timings", action="store_true",
                   help="without a GPU, measure the layer on the CPU anyway; every figure is marked as CPU timing, "
                        "which says nothing about a GPU cluster")
    p.add_argument("--quality", default=QUALITY, metavar="PATH",
                   help="the published quality study to look the layer shape up in (default docs/quality.md)")
    args = p.parse_args(argv)
    try:
        args.links = [parse_link(name) for name in args.link]
    except ValueError as error:
        p.error(f"--link: {error}")
    for flag, value in (("--ep", args.ep), ("--gpus-per-node", args.gpus_per_node), ("--moe-layers", args.moe_layers),
                        ("--reps", args.reps)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.dp is not None and args.dp < 1:
        p.error(f"--dp must be >= 1, got {args.dp}")
    if args.other_ms < 0 or args.dense_params < 0:
        p.error("--other-ms and --dense-params must be >= 0")
    args.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if args.device.type == "cpu" and not args.cpu_timings:
        p.error("no GPU here: the planning command times the MoE layer on the GPU you will train on; a CPU's "
                "expert FFN is two orders of magnitude slower, so its speed-ups say nothing about a GPU cluster. "
                "Run it on your GPU (or pass --cpu-timings to check the command, every figure marked CPU timing)")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    check_method_flags(p, args)
    try:
        args.shape = planning.LayerShape(
            d_model=args.d_model, tokens_per_rank=args.tokens_per_rank, experts=args.experts, top_k=args.top_k,
            ep=args.ep, d_ff=args.d_ff, capacity_factor=args.capacity_factor, rate=args.rate,
            element_size=torch.empty((), dtype=args.torch_dtype).element_size(), method=args.method,
            fp8_block_size=args.fp8_block_size)
    except ValueError as error:
        p.error(str(error))
    return args


def check_method_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--rate and --fp8-block-size belong to some methods only: set for another, they are refused by name (left at
    their defaults they are fine, as the config takes them)."""
    stages = METHODS[args.method].stages
    default_rate = LSHMoEConfig.compression_rate
    if args.rate is None:
        args.rate = default_rate
    elif stages["clustering"] == "none" and args.rate != default_rate:
        parser.error(f"--rate {args.rate:g} sets lsh_moe.compression_rate, which --method {args.method} does not use "
                     f"(clustering 'none': every token crosses as itself); allowed with --method {args.method}: "
                     f"leave --rate out")
    block = args.fp8_block_size
    if block != "row":
        try:
            block = int(block)
        except ValueError:
            block = 0
        if block < 1:
            parser.error(f"--fp8-block-size must be 'row' or an integer >= 1, got {args.fp8_block_size!r}")
    if block != LSHMoEConfig.fp8_block_size and "fp8_e4m3" not in stages.values():
        parser.error(f"--fp8-block-size {block} sets the scales of FP8, which --method {args.method} does not send; "
                     f"allowed with --method {args.method}: leave --fp8-block-size out")
    args.fp8_block_size = block


def init_single_process(device: torch.device) -> None:
    """A one-rank process group: DeepSpeed's MoE layer needs one to build its expert groups."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def main(argv=None) -> str:
    args = parse_args(argv)
    init_single_process(args.device)
    shape = args.shape
    ep1 = planning.time_layer(shape, 1, args.device, args.torch_dtype, reps=args.reps, warmup=args.warmup,
                              kernel=args.kernel)
    step = planning.StepShape(moe_layers=args.moe_layers, other_ms=args.other_ms,
                              dense_params=int(args.dense_params), dp=args.dp, grad_element_size=shape.element_size)
    predictions = [planning.predict(shape, ep1, LinkModel(link, gpus_per_node=args.gpus_per_node), step, name)
                   for link, name in zip(args.links, args.link)]
    records = read_records(args.quality)
    record, matches = find_record(records, shape.d_model, shape.ffn, shape.experts, shape.top_k,
                                  shape.capacity_factor, shape.tokens_per_rank, shape.rate, shape.method)
    recorded = any(r.method == shape.method for r in records)
    text = report(args, shape, ep1, predictions, step, record, matches, recorded)
    print(text)
    torch.distributed.destroy_process_group()
    return text


def report(args, shape: planning.LayerShape, ep1, predictions, step: planning.StepShape, record=None,
           matches: int = 0, recorded: bool = True) -> str:
    models = [LinkModel(link, gpus_per_node=args.gpus_per_node) for link in args.links]
    links = "\n".join(f"  - {model.describe()}; {model.topology(shape.ep).split('; ')[-1]}" for model in models)
    cpu = args.device.type == "cpu"
    marked = "CPU timing, says nothing about a GPU cluster: " if cpu else ""
    name = planning.method_name(shape.method)
    method = "" if shape.method == "paper" else f", method {shape.method}"
    rate = f", rate {shape.rate}" if shape.clustered else ""
    lines = [
        f"LSH-MoE plan: d_model {shape.d_model}, FFN {shape.ffn}, {shape.tokens_per_rank} tokens per rank, "
        f"{shape.experts} experts top-{shape.top_k} (capacity factor {shape.capacity_factor}), EP={shape.ep}"
        f"{method}{rate}, {args.dtype}",
        f"- method {shape.method} (lshmoe_plugin.methods): {METHODS[shape.method].summary}",
        f"- measured here: {bench.device_name(args.device)}; {bench.software_line()}",
        f"- measured: DeepSpeed's MoE layer fwd+bwd at EP=1 with this rank's shapes ({shape.local_experts} local "
        f"experts, the same E x C x d dispatch buffer and expert rows as an EP={shape.ep} rank), stock and "
        f"{name} through the plugin, median of {args.reps} round-robin steps after {args.warmup} warm-ups",
        modelled_bytes_line(shape, args.dtype) + " a layer's training step makes 4 crossings (dispatch and "
        "combine, forward and backward), each priced at its own bytes; time = alpha + per link: peers x (message + "
        "half-bandwidth size) / B, the NVLink and the NIC share at once, not overlapped with compute (DeepSpeed's "
        "all-to-all blocks the step):",
        links,
        f"- step = {step.other_ms:g} ms (given: the rest of the step without network) + {step.moe_layers} MoE "
        f"layer(s) + the ring all-reduce of {step.dense_params:.3g} dense gradients over {step.dp or shape.ep} "
        f"ranks (the same for both; modelled)",
        f"- {planning.quality_text(record, matches, shape.method, recorded)}",
        "- assumptions and sources: docs/link_model.md. Modelled figures, not measurements of a cluster.",
    ]
    if cpu:
        lines.insert(1, "- CPU TIMINGS (--cpu-timings): the layer ran on this CPU, whose expert FFN is two orders of "
                        "magnitude slower than a GPU's; every speed-up below is CPU compute plus modelled links and "
                        "says nothing about a GPU cluster")
    summary = []
    for p, link in zip(predictions, args.links):
        pays = (" at any bandwidth" if p.break_even_gbps is None else
                f" (it pays below {p.break_even_gbps:.3g} GB/s per rank; this link: {link.bandwidth / GB:g} GB/s)")
        what = "compression" if shape.method == "paper" else name
        summary.append(f"{p.link}: {marked}{name} predicted {p.layer_speedup:.2f}x per MoE layer, "
                       f"{p.step_speedup:.2f}x per step; {what} {'pays' if p.pays else 'does not pay'}{pays}; "
                       f"{planning.time_to_target_text(record, p.step_speedup, shape.method, recorded)}")
    table = planning.plan_table(shape, ep1, predictions)
    if cpu:
        table = table.replace("(measured)", "(measured on CPU)").replace("(predicted)", "(CPU + modelled)")
    return "\n".join(lines + ["", table, "", "\n".join(summary)])


def _per(block) -> str:
    return "row" if block == "row" else f"{block} elements"


def modelled_bytes_line(shape: planning.LayerShape, dtype: str) -> str:
    """What one rank sends per crossing, stock and under the method, and in which wire format each crossing goes."""
    mib = 2 ** 20
    rows = (f"{shape.experts} x {shape.method_rows // shape.experts} centroid slots" if shape.clustered else
            f"all {shape.experts} x {shape.capacity} slots, no clustering")
    formats = shape.config().wire_dtypes  # dispatch, its gradient, combine, its gradient
    if set(formats) == {"model"}:
        wire_text = f"in {dtype}"
    else:
        config = shape.config()
        named = [dtype if f == "model" else f for f in formats]
        # Only the scale layouts of the formats this method sends (an FP4 plan names no FP8 block).
        scales = [f"{fmt} with one {getattr(config, scale_key)} scale per {_per(getattr(config, block_key))}"
                  for fmt, (block_key, scale_key) in wire.FORMAT_KEYS.items() if fmt in formats]
        wire_text = (f"dispatch {named[0]} forward / {named[1]} backward, combine {named[2]} / {named[3]}; "
                     + ", ".join(scales))
    crossings = shape.crossing_bytes("lsh")
    per_crossing = ("" if len(set(crossings)) == 1 else
                    "; per crossing " + ", ".join(f"{b / mib:.2f}" for b in crossings) + " MiB")
    return (f"- modelled: one all-to-all moves {shape.stock_bytes / mib:.2f} MiB per rank stock ({shape.experts} x "
            f"{shape.capacity} x {shape.d_model}, {dtype}) and {shape.method_bytes / mib:.2f} MiB with "
            f"{planning.method_name(shape.method)} ({rows}; {wire_text}{per_crossing}): "
            f"{shape.method_bytes / shape.stock_bytes:.3f} of stock's bytes, the mean of the four crossings, scales "
            f"included; a message of 1/{shape.ep} of it to each peer;")


if __name__ == "__main__":
    main()
