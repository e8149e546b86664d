"""The link model against a link we can measure, at EP=2: gloo between 2 local processes on the CPU, or NCCL
between 2 GPUs (NVLink, or the emulated socket link of docs/benchmarks.md with its NCCL_* variables).

1. Calibrate: time all-to-alls of several sizes between the 2 ranks and fit alpha and B
   (t = alpha + bytes x (k-1)/k / B).
2. Measure, round-robin in the same processes: DeepSpeed's MoE layer fwd+bwd at EP=1 with each rank's shapes
   (stock and LSH-MoE), the same layer at EP=2 with the real all-to-all, and the EP=1 layer with the link
   stand-in (lshmoe_pretrain/link_standin.py) modelling the fitted link.
3. Predict EP=2 = EP=1 compute + 4 modelled all-to-alls of each variant's buffer, and print predicted / measured.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/check_link_model.py [--report docs/link_model.md]
    torchrun --nproc_per_node 2 scripts/check_link_model.py                  # 2 GPUs: NCCL, bf16, GPU-sized layer

A machine shared with other jobs makes every figure noisy: the load averages at the start and the end are printed
with the result.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_moe_layer import describe_link  # noqa: E402

from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import planning  # noqa: E402
from lshmoe_pretrain.link_model import LinkModel, fit_link  # noqa: E402
from lshmoe_pretrain.link_standin import ModelledAllToAll  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=None, help="default 128 on the CPU, 1024 on GPUs")
    p.add_argument("--d-ff", type=int, default=None,
                   help="expert FFN width (default d-model on the CPU, where a small FFN leaves the exchange a "
                        "visible share; 4 x d-model on GPUs)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 4096 on the CPU, 16384 on GPUs)")
    p.add_argument("--experts", type=int, default=None, help="experts over the 2 ranks (default 4 CPU, 8 GPUs)")
    p.add_argument("--top-k", type=int, default=2, choices=[1, 2])
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--report", default=None, metavar="PATH", help="also write the result as a section of PATH")
    p.add_argument("--section", default=None, help="default: gloo_check on the CPU, nccl_check on GPUs")
    return p.parse_args()


def time_all_to_all(nbytes: int, reps: int, device: torch.device) -> float:
    """Median seconds of one all-to-all of `nbytes` per rank; each repetition ends when the slower rank does."""
    x = torch.randn(nbytes // 4, device=device)
    out = torch.empty_like(x)
    samples = []
    for i in range(reps + 2):
        dist.barrier()
        bench.synchronize(device)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x)
        bench.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= 2:
            samples.append(float(elapsed))
    return statistics.median(samples)


class InLayerAllToAll:
    """Times every real all-to-all the EP=2 layers make while they are timed (each call still runs as it would):
    what the exchange costs inside a step, where a rank also waits for the slower one, next to the isolated
    all-to-alls the link is fitted to."""

    def __init__(self, device: torch.device) -> None:
        self.original = dist.all_to_all_single
        self.variant, self.seconds, self.events = None, {}, {}
        self.cuda = device.type == "cuda"  # CUDA events around the call: the call itself only enqueues

    def before_step(self, name: str, timed: bool) -> None:
        self.variant = name if timed else None

    def __enter__(self):
        def timed_call(*args, **kwargs):
            if self.variant is None:
                return self.original(*args, **kwargs)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = self.original(*args, **kwargs)
                end.record()
                self.events.setdefault(self.variant, []).append((start, end))
                return result
            t0 = time.perf_counter()
            result = self.original(*args, **kwargs)
            self.seconds.setdefault(self.variant, []).append(time.perf_counter() - t0)
            return result
        dist.all_to_all_single = timed_call
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self.original

    def per_call_ms(self, variant: str) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return statistics.median(start.elapsed_time(end) for start, end in self.events[variant])
        return 1e3 * statistics.median(self.seconds[variant])


def mean_over_ranks(times: dict, device: torch.device) -> dict:
    values = torch.tensor([times[k] for k in sorted(times)], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(sorted(times), values)}


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29513")):
        os.environ.setdefault(key, value)
    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    if on_gpus:
        device, dtype, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), torch.bfloat16, "nccl"
        torch.cuda.set_device(device)
    else:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(f"run with 2 ranks (torchrun --nproc_per_node 2), got {world}")
    d_model = args.d_model or (1024 if on_gpus else 128)
    shape = planning.LayerShape(d_model=d_model, d_ff=args.d_ff or (4 * d_model if on_gpus else d_model),
                                tokens_per_rank=args.tokens or (16384 if on_gpus else 4096),
                                experts=args.experts or (8 if on_gpus else 4), top_k=args.top_k, ep=2,
                                rate=args.rate, element_size=torch.empty((), dtype=dtype).element_size())
    link_name = f"{backend} (fitted)"
    args.link_text = (describe_link(world, backend, False)[0] if on_gpus else
                      "gloo over loopback TCP between 2 processes on this CPU")
    args.section = args.section or f"{backend}_check"

    sizes = sorted({2**k for k in range(16, 24 if not on_gpus else 28)} | {shape.lsh_bytes, shape.stock_bytes})
    a2a_s = [time_all_to_all(b, args.reps, device) for b in sizes]
    link = LinkModel(fit_link(link_name, sizes, a2a_s, 2))

    ep1 = {v: planning.build_layer(shape, 1, device, dtype) for v in ("stock", "lsh")}
    ep2 = {v: planning.build_layer(shape, 2, device, dtype) for v in ("stock", "lsh")}
    standin = {v: planning.build_layer(shape, 1, device, dtype) for v in ("stock", "lsh")}
    modelled = ModelledAllToAll(link, 2, device)
    for layer in standin.values():
        modelled.install(layer)
    variants = {}
    for group, layers in (("ep1", ep1), ("ep2", ep2), ("standin", standin)):
        variants.update({f"{group} {v}": (layer, v == "lsh") for v, layer in layers.items()})
    with InLayerAllToAll(device) as in_layer:
        times = planning.time_variants(shape, variants, device, dtype, args.reps, args.warmup,
                                       before_step=in_layer.before_step)
    times.update({f"in-layer a2a {v}": in_layer.per_call_ms(f"ep2 {v}") for v in ("stock", "lsh")})
    times = mean_over_ranks(times, device)
    load_end = os.getloadavg()

    prediction = planning.predict(shape, {v: times[f"ep1 {v}"] for v in ("stock", "lsh")}, link, link_name=link_name)
    if rank == 0:
        text = report(args, shape, device, sizes, a2a_s, link, times, prediction, load_start, load_end)
        print(text)
        if args.report:
            bench.write_section(args.report, args.section, text)
            print(f"wrote {args.report} [{args.section}]")
    dist.barrier()
    dist.destroy_process_group()


def report(args, shape, device, sizes, a2a_s, link, times, prediction, load_start, load_end) -> str:
    fit = link.network
    a2a_rows = [(f"{b / 2**20:.3g}", 1e3 * t, 1e3 * link.all_to_all_s(b, 2), link.all_to_all_s(b, 2) / t)
                for b, t in zip(sizes, a2a_s)]
    rows = []
    for v in ("stock", "lsh"):
        measured = times[f"ep2 {v}"]
        rows.append((v, times[f"ep1 {v}"], 4 * prediction.a2a_ms[v], prediction.layer_ms[v], times[f"standin {v}"],
                     measured, prediction.layer_ms[v] / measured, times[f"standin {v}"] / measured,
                     prediction.a2a_ms[v], times[f"in-layer a2a {v}"]))
    speedups = (times["ep2 stock"] / times["ep2 lsh"], prediction.layer_speedup,
                times["standin stock"] / times["standin lsh"])
    where = "gloo between 2 local processes (EP=2, CPU)" if device.type == "cpu" else "NCCL between 2 GPUs (EP=2)"
    return "\n".join([
        f"## The link model against {where}", "",
        f"- command: `{bench.command_line()}`",
        f"- device: {bench.device_name(device)}, {args.threads} torch thread(s) per rank; {bench.software_line()}",
        f"- link: {args.link_text}",
        f"- load average (1, 5, 15 min) at the start {load_start[0]:.1f} / {load_start[1]:.1f} / "
        f"{load_start[2]:.1f}, at the end {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f}: the machine "
        f"was shared with other jobs, so every figure is noisy",
        f"- measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- layer: DeepSpeed MoE, {'fp32' if shape.element_size == 4 else 'bf16'}, d_model {shape.d_model}, "
        f"FFN {shape.ffn}, {shape.tokens_per_rank} tokens per rank, {shape.experts} experts top-{shape.top_k} "
        f"over 2 ranks, LSH rate {shape.rate}; one all-to-all moves "
        f"{shape.stock_bytes / 2**20:.2f} MiB per rank stock, {shape.lsh_bytes / 2**20:.2f} MiB with LSH-MoE. "
        f"Fwd+bwd, median of {args.reps} round-robin steps after {args.warmup} warm-ups, mean of the 2 ranks.",
        "",
        f"Fitted link: alpha = {fit.latency_s * 1e6:.0f} us, B = {fit.bandwidth / 1e9:.3g} GB/s per rank and "
        f"direction (least squares over {len(sizes)} sizes, each the median of {args.reps} all-to-alls):", "",
        bench.markdown_table(["MiB per rank", "measured ms", "fitted model ms", "model / measured"], a2a_rows), "",
        "Layer fwd+bwd at EP=2: predicted = measured EP=1 compute + 4 modelled all-to-alls; stand-in = the EP=1 "
        "layer with the stand-in modelling the fitted link (a host sleep on the CPU, a spin kernel on CUDA); "
        "measured = the real EP=2 layer; the last column times each all-to-all call inside it.", "",
        bench.markdown_table(["variant", "EP=1 ms (measured)", "4 x a2a ms (modelled)", "EP=2 ms (predicted)",
                              "EP=1 + stand-in ms (modelled)", "EP=2 ms (measured)", "predicted / measured",
                              "stand-in / measured", "one a2a ms (modelled)", "one a2a ms in the EP=2 layer "
                              "(measured)"], rows), "",
        f"LSH-MoE speed-up at EP=2: measured {speedups[0]:.2f}x, predicted {speedups[1]:.2f}x, with the stand-in "
        f"{speedups[2]:.2f}x.",
    ])


if __name__ == "__main__":
    main()
