"""The link model against a link we can measure: gloo between 2 local processes on this machine (EP=2).

1. Calibrate: time gloo all-to-alls of several sizes between the 2 ranks and fit alpha and B
   (t = alpha + bytes x (k-1)/k / B).
2. Measure, round-robin in the same processes: DeepSpeed's MoE layer fwd+bwd at EP=1 with each rank's shapes
   (stock and LSH-MoE), the same layer at EP=2 with the real gloo all-to-all, and the EP=1 layer with the link
   stand-in (lshmoe_pretrain/link_standin.py) modelling the fitted link.
3. Predict EP=2 = EP=1 compute + 4 modelled all-to-alls of each variant's buffer, and print predicted / measured.

    torchrun --nproc_per_node 2 scripts/check_link_model.py [--d-model 128 --tokens 4096] [--report docs/link_model.md]

On the CPU (DS_ACCELERATOR=cpu). A machine shared with other jobs makes every figure noisy: the load averages at the
start and the end are printed with the result.
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

from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import planning  # noqa: E402
from lshmoe_pretrain.link_model import LinkModel, fit_link  # noqa: E402
from lshmoe_pretrain.link_standin import ModelledAllToAll  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=128, help="expert FFN width (small: the exchange's share is larger)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--experts", type=int, default=4, help="experts over the 2 ranks")
    p.add_argument("--top-k", type=int, default=2, choices=[1, 2])
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--report", default=None, metavar="PATH", help="also write the result as a section of PATH")
    p.add_argument("--section", default="gloo_check")
    return p.parse_args()


def time_all_to_all(nbytes: int, reps: int) -> float:
    """Median seconds of one gloo all-to-all of `nbytes` per rank; each repetition ends when the slower rank does."""
    x = torch.randn(nbytes // 4)
    out = torch.empty_like(x)
    samples = []
    for i in range(reps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= 2:
            samples.append(float(elapsed))
    return statistics.median(samples)


class InLayerAllToAll:
    """Times every real all-to-all the EP=2 layers make while they are timed (each call still runs as it would):
    what the exchange costs inside a step, where a rank also waits for the slower one, next to the isolated
    all-to-alls the link is fitted to."""

    def __init__(self) -> None:
        self.original = dist.all_to_all_single
        self.variant, self.seconds = None, {}

    def before_step(self, name: str, timed: bool) -> None:
        self.variant = name if timed else None

    def __enter__(self):
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            result = self.original(*args, **kwargs)
            if self.variant is not None:
                self.seconds.setdefault(self.variant, []).append(time.perf_counter() - t0)
            return result
        dist.all_to_all_single = timed_call
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self.original

    def per_call_ms(self, variant: str) -> float:
        return 1e3 * statistics.median(self.seconds[variant])


def mean_over_ranks(times: dict) -> dict:
    values = torch.tensor([times[k] for k in sorted(times)], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(sorted(times), values)}


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29513")):
        os.environ.setdefault(key, value)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(f"run with 2 ranks (torchrun --nproc_per_node 2), got {world}")
    device, dtype = torch.device("cpu"), torch.float32
    shape = planning.LayerShape(d_model=args.d_model, d_ff=args.d_ff, tokens_per_rank=args.tokens,
                                experts=args.experts, top_k=args.top_k, ep=2, rate=args.rate, element_size=4)

    sizes = sorted({2**k for k in range(16, 24)} | {shape.lsh_bytes, shape.stock_bytes})
    a2a_s = [time_all_to_all(b, args.reps) for b in sizes]
    link = LinkModel(fit_link("gloo (fitted)", sizes, a2a_s, 2))

    ep1 = {v: planning.build_layer(shape, 1, device, dtype) for v in ("stock", "lsh")}
    ep2 = {v: planning.build_layer(shape, 2, device, dtype) for v in ("stock", "lsh")}
    standin = {v: planning.build_layer(shape, 1, device, dtype) for v in ("stock", "lsh")}
    modelled = ModelledAllToAll(link, 2, device)
    for layer in standin.values():
        modelled.install(layer)
    variants = {}
    for group, layers in (("ep1", ep1), ("ep2", ep2), ("standin", standin)):
        variants.update({f"{group} {v}": (layer, v == "lsh") for v, layer in layers.items()})
    with InLayerAllToAll() as in_layer:
        times = planning.time_variants(shape, variants, device, dtype, args.reps, args.warmup,
                                       before_step=in_layer.before_step)
    times.update({f"in-layer a2a {v}": in_layer.per_call_ms(f"ep2 {v}") for v in ("stock", "lsh")})
    times = mean_over_ranks(times)
    load_end = os.getloadavg()

    prediction = planning.predict(shape, {v: times[f"ep1 {v}"] for v in ("stock", "lsh")}, link,
                                  link_name="gloo (fitted)")
    if rank == 0:
        text = report(args, shape, sizes, a2a_s, link, times, prediction, load_start, load_end)
        print(text)
        if args.report:
            bench.write_section(args.report, args.section, text)
            print(f"wrote {args.report} [{args.section}]")
    dist.barrier()
    dist.destroy_process_group()


def report(args, shape, sizes, a2a_s, link, times, prediction, load_start, load_end) -> str:
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
    return "\n".join([
        "## The link model against gloo between 2 local processes (EP=2, CPU)", "",
        f"- command: `{bench.command_line()}`",
        f"- device: {bench.device_name(torch.device('cpu'))}, {args.threads} torch thread(s) per rank; "
        f"{bench.software_line()}",
        f"- load average (1, 5, 15 min) at the start {load_start[0]:.1f} / {load_start[1]:.1f} / "
        f"{load_start[2]:.1f}, at the end {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f}: the machine "
        f"was shared with other jobs, so every figure is noisy",
        f"- measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- layer: DeepSpeed MoE, fp32, d_model {shape.d_model}, FFN {shape.ffn}, {shape.tokens_per_rank} tokens per "
        f"rank, {shape.experts} experts top-{shape.top_k} over 2 ranks, LSH rate {shape.rate}; one all-to-all moves "
        f"{shape.stock_bytes / 2**20:.2f} MiB per rank stock, {shape.lsh_bytes / 2**20:.2f} MiB with LSH-MoE. "
        f"Fwd+bwd, median of {args.reps} round-robin steps after {args.warmup} warm-ups, mean of the 2 ranks.",
        "",
        f"Fitted gloo link: alpha = {fit.latency_s * 1e6:.0f} us, B = {fit.bandwidth / 1e9:.3g} GB/s per rank and "
        f"direction (least squares over {len(sizes)} sizes, each the median of {args.reps} all-to-alls):", "",
        bench.markdown_table(["MiB per rank", "measured ms", "fitted model ms", "model / measured"], a2a_rows), "",
        "Layer fwd+bwd at EP=2: predicted = measured EP=1 compute + 4 modelled all-to-alls; stand-in = the EP=1 "
        "layer with the stand-in modelling the fitted link (a host sleep on the CPU); measured = the real EP=2 "
        "layer over gloo.", "",
        bench.markdown_table(["variant", "EP=1 ms (measured)", "4 x a2a ms (modelled)", "EP=2 ms (predicted)",
                              "EP=1 + stand-in ms (modelled)", "EP=2 ms (measured)", "predicted / measured",
                              "stand-in / measured", "one a2a ms (modelled)", "one a2a ms in the EP=2 layer "
                              "(measured)"], rows), "",
        f"LSH-MoE speed-up at EP=2: measured {speedups[0]:.2f}x, predicted {speedups[1]:.2f}x, with the stand-in "
        f"{speedups[2]:.2f}x.",
    ])


if __name__ == "__main__":
    main()
