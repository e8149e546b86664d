"""Compressor microbenchmark: compress + decompress (forward, and forward + backward) against the bandwidth floor.

For every (d_model, tokens per rank, rate) it times the fixed-layout round trip with the reference ops and the
fused ops, and divides by the memory-bandwidth floor computed from the copy bandwidth measured in the same run.

    python scripts/benchmark_compressor.py                       # full sweep on a GPU, prints the tables
    python scripts/benchmark_compressor.py --report docs/benchmarks.md --plot docs/compressor_vs_floor.png
                                                                 # ... and (re)writes its section and plot there
    python scripts/benchmark_compressor.py --quick --device cpu  # smoke run

Nothing is written unless --report (or --plot) names where.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lshmoe_plugin.compressor import LSHCompressor, fixed_slots  # noqa: E402
from lshmoe_plugin.config import LSHMoEConfig  # noqa: E402
from lshmoe_pretrain import benchmarking as bench  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Per-rank, one-direction link bandwidths the break-even table marks (GB/s).
LINKS = {"NVLink 4 (450)": 450.0, "IB 400 Gb/s (50)": 50.0, "IB 200 Gb/s (25)": 25.0, "Ethernet 100 Gb/s (12.5)": 12.5}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768], help="E * C per rank")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--experts", type=int, default=8, help="experts on the sending rank's buffer (E)")
    p.add_argument("--kernels", nargs="+", default=["torch", "triton", "triton+graphs"],
                   choices=sorted(VARIANTS), help="torch: reference; triton: fused, eager; triton+graphs: fused, "
                                                 "replayed as CUDA graphs (lsh_moe.cuda_graphs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--breakdown", action="store_true", help="also time each stage of the fused round trip")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel degree the break-even table assumes: of a "
                   "rank's rows, (ep - 1) / ep leave it")
    p.add_argument("--report", default=None, metavar="PATH", help="also write the section 'compressor' into this "
                   "markdown file (docs/benchmarks.md holds the published one); default: print only")
    p.add_argument("--plot", default=None, metavar="PATH", help="on CUDA, also save the fwd / floor bar chart here")
    args = p.parse_args()
    if args.ep < 1:
        p.error(f"--ep must be an integer >= 1, got {args.ep}")
    return args


def make_dispatch(experts: int, capacity: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Tokens with cluster structure (as the gate produces) and 80% of the capacity occupied (factor 1.25)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(experts, max(capacity // 16, 1), d, generator=gen, device=device)
    pick = torch.randint(0, centres.shape[1], (experts, capacity), generator=gen, device=device)
    tokens = torch.gather(centres, 1, pick.unsqueeze(-1).expand(-1, -1, d))
    tokens += 0.3 * torch.randn(experts, capacity, d, generator=gen, device=device)
    valid = torch.arange(capacity, device=device).expand(experts, capacity) < int(capacity / 1.25)
    return tokens.to(dtype), valid


VARIANTS = {"torch": dict(kernel="torch", cuda_graphs=False), "triton": dict(kernel="triton", cuda_graphs=False),
            "triton+graphs": dict(kernel="triton", cuda_graphs=True)}


def floor_bytes(n: int, slots: int, d: int, elem: int) -> tuple:
    """Fewest bytes: fwd reads the tokens once, writes the centroids, reads the tokens + expert outputs and writes
    the outputs; bwd reads the output grads, writes the input grads and the expert-output grads."""
    fwd = (n + slots + n + slots + n) * d * elem
    bwd = (n + n + slots) * d * elem
    return fwd, fwd + bwd


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.quick:
        args.d_models, args.tokens, args.reps = [64], [512], 3
    if device.type != "cuda":
        args.kernels = [k for k in args.kernels if k == "torch"]
    bandwidth = bench.copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s on {bench.device_name(device)}", flush=True)

    rows, plot_points, stages, break_even = [], [], [], []
    for d in args.d_models:
        for n in args.tokens:
            capacity = n // args.experts
            # Rotate input sets so small problems are not timed out of the L2 cache.
            sets = max(1, min(4, math.ceil((256 << 20) / (n * d * torch.finfo(dtype).bits // 8))))
            data = [make_dispatch(args.experts, capacity, d, dtype, device, seed) for seed in range(sets)]
            for rate in args.rates:
                slots = args.experts * fixed_slots(capacity, rate)
                fwd_floor, both_floor = (b / (bandwidth * 1e9) * 1e3 for b in floor_bytes(
                    args.experts * capacity, slots, d, data[0][0].element_size()))
                times = {}
                for kernel in args.kernels:
                    config = LSHMoEConfig(enabled=True, method="paper", compression_rate=rate, telemetry_interval=0,
                                          **VARIANTS[kernel])
                    compressor = LSHCompressor(config, layer_index=0)
                    times[kernel] = time_round_trip(compressor, data, device, args.reps) + (
                        chained_round_trips_ms(config, data[0], device, args.reps),)
                    if args.breakdown and kernel == "triton":
                        stages.append((d, n, rate, kernel) + time_stages(compressor, data[0], device, args.reps))
                elem = data[0][0].element_size()
                best = min(args.kernels, key=lambda k: times[k][3])
                break_even.append(break_even_row(d, n, rate, best, times[best][3], args.experts * capacity, slots,
                                                 elem, args.ep))
                for kernel in args.kernels:
                    fwd, both, graphed, chained = times[kernel]
                    ref_fwd, ref_both, ref_graphed, ref_chained = times[args.kernels[0]]
                    rows.append((d, n, rate, kernel, fwd, fwd / fwd_floor, graphed, graphed / fwd_floor, both,
                                 both / both_floor, chained, chained / both_floor, ref_fwd / fwd,
                                 ref_graphed / graphed, ref_chained / chained))
                    plot_points.append((d, n, rate, kernel, graphed / fwd_floor))
                    print(" | ".join(bench.markdown_table([], [rows[-1]]).splitlines()[-1:]), flush=True)
            del data

    base = args.kernels[0]
    headers = ["d_model", "tokens/rank", "rate", "kernel", "fwd ms (eager)", "fwd / floor", "fwd ms (graph)",
               "graph fwd / floor", "fwd+bwd ms (eager)", "fwd+bwd / floor",
               f"fwd+bwd ms per layer ({CHAINED_LAYERS} chained)", "per layer / floor", f"eager fwd vs {base}",
               f"graph fwd vs {base}", f"per layer vs {base}"]
    table = bench.markdown_table(headers, rows)
    print(table)
    text = bench.header("Compressor round trip vs the memory-bandwidth floor", device) + (
        f"\nCopy bandwidth measured in this run: {bandwidth:.0f} GB/s (bytes read + written). {args.dtype}, "
        f"{args.experts} experts per buffer, capacity = tokens / experts, 80% of slots occupied, tokens drawn around "
        f"capacity/16 centres per expert. fwd = `compress_fixed` + `decompress_fixed` (expert = identity); "
        f"fwd+bwd adds the backward of both. Floor = bytes / copy bandwidth, with bytes = (3N + 2S)·d·b for fwd "
        f"and (5N + 3S)·d·b for fwd+bwd (N tokens, S centroid slots, b bytes per element): every token row read "
        f"once per pass, every output written once. Median of {args.reps} runs each, CUDA events. Kernels: "
        f"`torch` the reference ops, `triton` the fused kernels launched op by op (`cuda_graphs: false`), "
        f"`triton+graphs` the fused kernels replayed from the compressor's own per-stage CUDA graphs "
        f"(`cuda_graphs: true`; the default 'auto' does this on CUDA up to 240 MiB of token rows per layer), "
        f"including the copies of the inputs into the "
        f"graphs' buffers. 'eager' columns are what a training step sees (the compressor called from Python as "
        f"the MoE layer calls it); 'graph' captures the whole forward, benchmark-side, as one CUDA graph, i.e. the "
        f"GPU's own time without any launch cost; 'vs {base}' columns are speed-ups over kernel `{base}`, "
        f"the first one listed. 'fwd+bwd' runs one round trip and one `backward()`, so it carries the whole cost of a "
        f"`backward()` call (engine start, thread hand-offs) per round trip; 'per layer' chains {CHAINED_LAYERS} "
        f"round trips, each with its own compressor as {CHAINED_LAYERS} MoE layers would, under one `backward()`, "
        f"and divides by {CHAINED_LAYERS}: the compressor's cost per layer as a training step sees it.\n\n"
        + table + "\n")
    if stages:
        stage_table = bench.markdown_table(
            ["d_model", "tokens/rank", "rate", "kernel", "hash (matmul + keys)", "sort", "assign kernel",
             "centroids", "expand", "expand bwd (eager)", "centroids bwd (eager)"], stages)
        print(stage_table)
        text += ("\nStages of the fused round trip, each timed alone, in ms: forward stages as GPU time (each "
                 "replayed as a CUDA graph), backward stages eager (launch overhead included). 'hash' is the "
                 "projection matmul, the group sums and the sort-key kernel; 'sort' the one stable sort of the keys; "
                 "'assign kernel' the per-expert assignment that also writes the slots' CSR for the reduce and the "
                 "expand.\n\n" + stage_table + "\n")
    headers = ["d_model", "tokens/rank", "rate", "kernel", "compressor fwd+bwd ms per layer",
               f"MiB off the rank saved per layer step (EP={args.ep})", f"break-even GB/s (EP={args.ep})"] + [
        f"pays on {name}" for name in LINKS]
    even_table = bench.markdown_table(headers, break_even)
    print(even_table)
    text += (f"\nBreak-even link bandwidth at expert-parallel degree EP={args.ep} (`--ep`): compression pays on a "
             f"link slower than this. Per layer and training step a rank's buffer crosses the all-to-all four times "
             f"(dispatch and combine, forward and backward), and at EP=k the rows for the rank's own experts stay "
             f"on it: compression saves 4·(N − S)·d·b·(k − 1)/k bytes of link traffic per rank, at the cost of the "
             f"compressor's fwd+bwd time T per layer (chained, fastest kernel, from the table above); break-even "
             f"= bytes saved / T, so it grows with EP towards the (k → ∞) bound 4·(N − S)·d·b / T. Conservative: "
             f"it leaves out the expert compute saved on S instead of N rows. Links as per-rank, one-direction "
             f"bandwidth in GB/s.\n\n" + even_table + "\n")
    if args.plot and plot_points and device.type == "cuda":
        plot(plot_points, args.plot)
        text += f"\n![compressor time over floor]({os.path.basename(args.plot)})\n"
    bench.report_section(args.report, "compressor", text)


def break_even_row(d: int, n: int, rate: float, kernel: str, both_ms: float, tokens: int, slots: int, elem: int,
                   ep: int):
    """(d, n, rate, kernel, ms, MiB saved off the rank, break-even GB/s, pays on each of LINKS) at EP = `ep`."""
    saved = 4 * (tokens - slots) * d * elem * (ep - 1) / ep
    gbs = saved / (both_ms * 1e-3) / 1e9
    return (d, n, rate, kernel, both_ms, saved / 2**20, gbs) + tuple("yes" if bw < gbs else "no"
                                                                   for bw in LINKS.values())


def time_round_trip(compressor: LSHCompressor, data, device, reps: int):
    state = {"i": 0}

    def next_input():
        state["i"] = (state["i"] + 1) % len(data)
        return data[state["i"]]

    def forward():
        tokens, valid = next_input()
        centroids, st = compressor.compress_fixed(tokens, valid)
        return compressor.decompress_fixed(centroids, st)

    grads = [torch.randn_like(t) for t, _ in data]

    def forward_backward():
        tokens, valid = next_input()
        tokens = tokens.detach().requires_grad_()
        centroids, st = compressor.compress_fixed(tokens, valid)
        out = compressor.decompress_fixed(centroids * 1.0, st)
        out.backward(grads[state["i"]])
        return tokens.grad

    with torch.no_grad():
        fwd = bench.time_ms(forward, device, reps=reps)
    both = bench.time_ms(forward_backward, device, reps=reps)
    return fwd, both, graphed_forward_ms(compressor, data[0], device, reps)


CHAINED_LAYERS = 8


def chained_round_trips_ms(config: LSHMoEConfig, batch, device, reps: int, layers: int = CHAINED_LAYERS) -> float:
    """fwd+bwd of `layers` round trips in a row (one compressor each), one backward; per round trip."""
    compressors = [LSHCompressor(config, layer_index=i) for i in range(layers)]
    tokens, valid = batch
    grad = torch.randn_like(tokens)

    def step():
        h = tokens.detach().requires_grad_()
        for compressor in compressors:
            centroids, state = compressor.compress_fixed(h, valid)
            h = compressor.decompress_fixed(centroids * 1.0, state)
        h.backward(grad)
    return bench.time_ms(step, device, reps=reps) / layers


def graphed_forward_ms(compressor: LSHCompressor, batch, device, reps: int) -> float:
    """The forward round trip as one CUDA graph; capture works because the fixed layout never syncs."""
    tokens, valid = batch

    def forward():
        with torch.no_grad():
            centroids, st = compressor.compress_fixed(tokens, valid)
            compressor.decompress_fixed(centroids, st)
    return bench.graph_time_ms(forward, device, reps)


def time_stages(compressor: LSHCompressor, batch, device, reps: int):
    """Times of each stage of the fused round trip on one input (each alone, so their sum only approximates the
    round trip): forward stages as GPU time (replayed as CUDA graphs), backward stages eager."""
    from lshmoe_plugin.kernels import triton_ops
    tokens, valid = batch
    e, c, d = tokens.shape
    flat, flat_valid = tokens.reshape(-1, d), valid.reshape(-1)
    per = fixed_slots(c, compressor.config.compression_rate)
    proj = compressor.projections(d, device)
    cfg = compressor.config
    keys = torch.empty(flat.shape[0], dtype=torch.int64, device=device)
    triton_ops._hash_rows(flat, proj, cfg, keys, group_size=c, valid=flat_valid, num_groups=e, keys=True)
    clusters = triton_ops._assign(keys, flat_valid, cfg, e, group_size=c, slots_per_group=per)
    segments = clusters.segments
    cen, counts = triton_ops.centroids_by_slot(flat, clusters.slot, clusters.num_slots, segments)
    timed = bench.graph_time_ms
    with torch.no_grad():
        t_hash = timed(lambda: triton_ops._hash_rows(flat, proj, cfg, keys, group_size=c, valid=flat_valid,
                                                     num_groups=e, keys=True), device, reps)
        t_sort = timed(lambda: torch.sort(keys, stable=True), device, reps)
        t_assign = timed(lambda: triton_ops._assign(keys, flat_valid, cfg, e, group_size=c, slots_per_group=per),
                         device, reps)
        t_cen = timed(lambda: triton_ops.centroids_by_slot(flat, clusters.slot, clusters.num_slots, segments),
                      device, reps)
        t_exp = timed(lambda: triton_ops.expand_with_residual(flat, clusters.slot, cen, cen, counts, True, segments),
                      device, reps)
    leaf = flat.detach().requires_grad_()
    cen_leaf = cen.detach().requires_grad_()
    out = triton_ops.expand_with_residual(leaf, clusters.slot, cen_leaf, cen_leaf * 1.0, counts, True, segments)
    grad = torch.randn_like(out)
    t_exp_bwd = bench.time_ms(lambda: torch.autograd.grad(out, (leaf, cen_leaf), grad, retain_graph=True), device,
                              reps=reps)
    c2, _ = triton_ops.centroids_by_slot(leaf, clusters.slot, clusters.num_slots, segments)
    g2 = torch.randn_like(c2)
    t_cen_bwd = bench.time_ms(lambda: torch.autograd.grad(c2, leaf, g2, retain_graph=True), device, reps=reps)
    return t_hash, t_sort, t_assign - t_sort, t_cen, t_exp, t_exp_bwd, t_cen_bwd


def plot(points, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kernels = sorted({p[3] for p in points})
    labels = sorted({(p[0], p[1], p[2]) for p in points})
    width = 0.8 / len(kernels)
    for k_i, kernel in enumerate(kernels):
        values = {(p[0], p[1], p[2]): p[4] for p in points if p[3] == kernel}
        heights = [values.get(label, float("nan")) for label in labels]
        ax.bar([i + k_i * width for i in range(len(labels))], heights, width, label=kernel)
    ax.axhline(2.0, color="k", linestyle="--", linewidth=1, label="2x floor (target)")
    ax.set_xticks([i + width * (len(kernels) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"d{d}\n{n // 1024}k\nr{r}" for d, n, r in labels], fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("fwd GPU time (CUDA graph) / bandwidth floor")
    ax.set_title("Compressor round trip (fwd) over the memory-bandwidth floor, same run")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
