"""One DeepSpeed MoE layer (``deepspeed.moe.layer.MoE``), forward + backward: stock vs LSH-compressed.

bf16, top-2, capacity factor 1.25, 4 experts per rank, FFN 4 x d_model. Stock and every rate are timed round-robin
in the same processes, so every speed-up is a ratio measured side by side. Launch one process per rank:

    python scripts/benchmark_moe_layer.py                                   # EP=1: compressor cost, no network
    torchrun --nproc_per_node 2 scripts/benchmark_moe_layer.py              # EP=2, NCCL over NVLink
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo \\
        torchrun --nproc_per_node 2 scripts/benchmark_moe_layer.py          # EP=2, emulated inter-node link
    torchrun --nproc_per_node 2 scripts/benchmark_moe_layer.py              # on ONE GPU: ranks share it, gloo

With more ranks than GPUs the ranks share GPUs and the all-to-all goes through gloo (NCCL refuses two ranks on
one GPU): tensors are staged through host memory and cross loopback TCP, like Ethernet without GPUDirect.
Each run prints its table; ``--report docs/benchmarks.md`` also (re)writes its section there (and its plot next to
it), nothing is written otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lshmoe_plugin  # noqa: E402
from lshmoe_pretrain import benchmarking as bench  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per rank (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--eager-too", action="store_true",
                   help="also time every rate with lsh_moe.cuda_graphs=false (the compressor launched op by op)")
    p.add_argument("--decide-by-cost", action="store_true",
                   help="also time every rate with lsh_moe.decide_by_cost (the layer measures and may run stock)")
    p.add_argument("--backend", default=None, help="nccl or gloo (default: nccl when every rank has its own GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--report", default=None, metavar="PATH", help="also write the section into this markdown file "
                   "(docs/benchmarks.md holds the published ones); default: print only")
    p.add_argument("--plot", default=None, help="PNG path, on CUDA (default: <section>.png next to --report; "
                   "none without --report)")
    p.add_argument("--section", default=None, help="report section name (default: from EP size and link)")
    return p.parse_args()


def setup_distributed(args):
    """Rank, world size, device and backend; a plain `python` run is a one-rank world."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        shared = int(os.environ.get("LOCAL_WORLD_SIZE", world)) > gpus
    else:
        device, shared = torch.device("cpu"), False
    backend = args.backend or ("nccl" if device.type == "cuda" and not shared else "gloo")
    if backend == "nccl" and shared:
        raise SystemExit("NCCL refuses two ranks on one GPU ('Duplicate GPU detected'); use --backend gloo")
    import deepspeed
    if shared:
        # Ranks sharing a GPU: DeepSpeed would bind rank r to cuda:r (init_process_group's device_id, the
        # engine's set_device(LOCAL_RANK)), which does not exist. Bind every rank to the GPU it really uses.
        os.environ["LOCAL_RANK"] = str(device.index)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return rank, world, device, backend, shared


def describe_link(world: int, backend: str, shared: bool) -> tuple:
    """(human description, short key) of the path the all-to-all takes."""
    if world == 1:
        return "none (EP=1: no all-to-all; measures the compressor's cost and the experts' smaller batch)", "ep1"
    socket_only = all(os.environ.get(k) == "1" for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE"))
    if backend == "gloo":
        where = f"all {world} ranks share ONE GPU" if shared else "one GPU per rank"
        return (f"gloo over loopback TCP, CUDA tensors staged through host memory (emulates an inter-node "
                f"Ethernet link without GPUDirect); {where}", f"ep{world}_gloo" + ("_shared_gpu" if shared else ""))
    if socket_only:
        return ("NCCL socket transport over loopback (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 "
                "NCCL_SOCKET_IFNAME=lo): emulated inter-node link; one GPU per rank", f"ep{world}_nccl_socket")
    return "NCCL default transport (NVLink within one host); one GPU per rank", f"ep{world}_nccl"


def build_layer(d: int, ep: int, args, device, dtype):
    from deepspeed.moe.layer import MoE
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
    moe = MoE(d, expert, num_experts=args.experts_per_rank * ep, ep_size=ep, k=args.top_k,
              capacity_factor=args.capacity_factor, min_capacity=4)
    moe.set_deepspeed_parallelism()
    return moe.to(device, dtype)


def time_all_to_all(moe, shape, device, dtype, reps: int) -> float:
    """Median ms of one all-to-all of a (E, C, d) buffer through the layer's expert-parallel group."""
    from deepspeed.moe.sharded_moe import _AllToAll
    layer = moe.deepspeed_moe
    if layer.ep_size == 1:
        return 0.0
    x = torch.randn(shape, device=device, dtype=dtype)
    return bench.time_ms(lambda: _AllToAll.apply(layer.ep_group, x), device, warmup=2, reps=reps)


def main() -> None:
    args = parse_args()
    rank, world, device, backend, shared = setup_distributed(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    link, key = describe_link(world, backend, shared)
    section = args.section or f"moe_layer_{key}"
    import torch.distributed as dist

    from lshmoe_plugin.compressor import fixed_slots

    variants = ["stock"] + [f"lsh {r}" for r in args.rates]
    configs = {f"lsh {r}": lshmoe_plugin.LSHMoEConfig(enabled=True, method="paper", compression_rate=r,
                                                      kernel=args.kernel, telemetry_interval=0) for r in args.rates}
    if args.eager_too:  # the same rates with the compressor launched op by op (lsh_moe.cuda_graphs=false)
        variants += [f"lsh {r} eager" for r in args.rates]
        configs.update({f"lsh {r} eager": lshmoe_plugin.LSHMoEConfig(
            enabled=True, method="paper", compression_rate=r, kernel=args.kernel, telemetry_interval=0,
            cuda_graphs=False)
            for r in args.rates})
    if args.decide_by_cost:
        variants += [f"lsh {r} decide_by_cost" for r in args.rates]
        configs.update({f"lsh {r} decide_by_cost": lshmoe_plugin.LSHMoEConfig(
            enabled=True, method="paper", compression_rate=r, kernel=args.kernel, telemetry_interval=0,
            decide_by_cost=True)
            for r in args.rates})
    rows, points = [], []
    for d in args.d_models:
        # One layer per variant, all from the same seed: each keeps its own compressor (and hash projections)
        # across steps, as in training, although the variants alternate.
        layers = {v: build_layer(d, world, args, device, dtype) for v in variants}
        moe = layers["stock"]
        x = torch.randn(args.tokens // args.seq_len, args.seq_len, d, device=device, dtype=dtype)
        grad = torch.randn_like(x)

        def step(layer):
            inp = x.detach().requires_grad_()
            out, l_aux, _ = layer(inp)
            torch.autograd.backward([out, l_aux.to(out.dtype)], [grad, torch.ones((), device=device, dtype=out.dtype)])

        def use(variant: str) -> None:
            if variant == "stock":
                lshmoe_plugin.disable()
            else:
                lshmoe_plugin.enable(configs[variant], layers[variant])

        times = {v: [] for v in variants}
        for i in range(args.warmup + args.reps):
            for variant in variants:  # round-robin: drift of clocks or link hits every variant alike
                use(variant)
                dist.barrier()
                bench.synchronize(device)
                t0 = time.perf_counter()
                step(layers[variant])
                bench.synchronize(device)
                if i >= args.warmup:
                    times[variant].append((time.perf_counter() - t0) * 1e3)
        lshmoe_plugin.disable()
        layer = moe.deepspeed_moe
        num_experts = args.experts_per_rank * world
        capacity = int(layer.gate.capacity_factor * args.tokens * args.top_k / num_experts + 0.999999)
        capacity = max(capacity, 4)
        a2a_full = time_all_to_all(moe, (num_experts, capacity, d), device, dtype, args.reps)
        stock = statistics.median(times["stock"])
        for variant in variants:
            ms = statistics.median(times[variant])
            if variant == "stock":
                a2a = a2a_full
            else:
                slots = fixed_slots(capacity, float(variant.split()[1]))
                a2a = time_all_to_all(moe, (num_experts, slots, d), device, dtype, args.reps)
            label = variant
            if variant.endswith("decide_by_cost"):
                pays = layers[variant].deepspeed_moe._lshmoe_compressor.pays
                label += " (decided: compress)" if pays else " (decided: stock)"
                a2a = a2a if pays else a2a_full
            rows.append((d, args.tokens, label, ms, stock / ms, 4 * a2a, (4 * a2a / ms) if world > 1 else 0.0))
            if variant != "stock":
                points.append((d, variant, stock / ms))
        if rank == 0:
            print(bench.markdown_table(["d_model", "tokens/rank", "variant", "step ms", "speed-up vs stock",
                                        "4 x a2a ms (alone)", "a2a share"], rows[-len(variants):]), flush=True)
        moe = layers = None  # free this width's layers before the next
        torch.cuda.empty_cache() if device.type == "cuda" else None

    if rank == 0:
        headers = ["d_model", "tokens/rank", "variant", "fwd+bwd ms", "speed-up vs stock", "4 x a2a ms (alone)",
                   "a2a share of step"]
        table = bench.markdown_table(headers, rows)
        title = f"DeepSpeed MoE layer fwd+bwd, EP={world}: stock vs LSH-MoE"
        text = bench.header(title, device, link) + (
            f"\n`deepspeed.moe.layer.MoE`, {args.dtype}, top-{args.top_k}, capacity factor {args.capacity_factor}, "
            f"{args.experts_per_rank} experts per rank, FFN {4}x d_model, {args.tokens} tokens per rank, kernel "
            f"`{args.kernel}`, backend {backend}, {world} rank(s). Median of {args.reps} steps after {args.warmup} "
            f"warm-ups, stock and every rate timed round-robin in the same processes. The expert FFN runs on the "
            f"centroids, so the compressed step also does less expert work. '4 x a2a' is four all-to-alls of the "
            f"step's payload (stock: E x C x d, compressed: E x S x d) timed alone.\n\n" + table + "\n")
        plot_path = args.plot or (args.report and os.path.join(os.path.dirname(args.report) or ".", f"{section}.png"))
        if plot_path and points and device.type == "cuda":
            plot(points, plot_path, f"{title}\nlink: {key}")
            text += f"\n![speed-up]({os.path.basename(plot_path)})\n"
        bench.report_section(args.report, section, text)
    dist.barrier()
    dist.destroy_process_group()


def plot(points, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ds = sorted({p[0] for p in points})
    variants = sorted({p[1] for p in points})
    width = 0.8 / len(ds)
    for i, d in enumerate(ds):
        values = {p[1]: p[2] for p in points if p[0] == d}
        ax.bar([j + i * width for j in range(len(variants))], [values[v] for v in variants], width,
               label=f"d_model {d}")
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set_xticks([j + width * (len(ds) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(variants)
    ax.set_ylabel("speed-up vs stock (same run)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
