"""Pretrain a small GPT-MoE built on Megatron-core's GPTModel, expert parallel, LSH-MoE on or off.

One process per rank, started by torchrun: NCCL on GPUs, gloo on CPU (Megatron needs the CPU shim of
lshmoe_plugin.patches.megatron_compat there). The lsh_moe block comes from the same JSON as the DeepSpeed scripts
(only that block and, if present, train_micro_batch_size_per_gpu are read); --lsh_moe on|off overrides it.

    torchrun --nproc_per_node 2 scripts/pretrain_megatron_gpt_moe.py --config configs/gpt_moe_cpu_lsh.json \
        --train_steps 50 --output_dir runs/megatron_gpt_lsh

Expert parallel size defaults to the world size; every rank is a data-parallel replica of the dense weights and
holds num_experts / ep_size experts. Data: the offline corpus pipeline of lshmoe_pretrain.data.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import lshmoe_plugin
from lshmoe_plugin.telemetry import TELEMETRY
from lshmoe_pretrain.data import Batches, GPTSamples, IndexedDataset, cached_preprocess, train_valid_split
from lshmoe_pretrain.data.corpus import DEFAULT_CORPUS
from lshmoe_pretrain.data.preprocess import DEFAULT_CACHE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON with an lsh_moe block (e.g. configs/gpt_moe_cpu_lsh.json)")
    p.add_argument("--lsh_moe", choices=("on", "off"), default=None, help="override lsh_moe.enabled")
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--ffn_hidden_size", type=int, default=256)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe_layer_freq", type=int, default=1, help="every N-th layer is MoE")
    p.add_argument("--aux_loss_coeff", type=float, default=1e-2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=None, help="default: the config's train_micro_batch_size_per_gpu")
    p.add_argument("--train_steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--eval_interval", type=int, default=50)
    p.add_argument("--eval_iters", type=int, default=4)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--ep_size", type=int, default=None, help="expert parallel size; default: the world size")
    p.add_argument("--data", default=DEFAULT_CORPUS)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--cache_dir", default=DEFAULT_CACHE)
    p.add_argument("--output_dir", default="runs/megatron_gpt_moe")
    p.add_argument("--bf16", action="store_true", help="bf16 params and compute (GPU)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def setup_distributed(args):
    """Process group, Megatron's parallel state (expert parallel only) and the model-parallel RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from lshmoe_plugin.patches import megatron_compat
    if "RANK" not in os.environ:  # plain `python script.py`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    megatron_compat.apply()
    world = dist.get_world_size()
    args.ep_size = args.ep_size or world
    parallel_state.initialize_model_parallel(expert_model_parallel_size=args.ep_size)
    torch.manual_seed(args.seed)
    if cuda:
        model_parallel_cuda_manual_seed(args.seed)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return torch.device("cuda") if cuda else torch.device("cpu")


def build_model(args, vocab_size, device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_heads,
        ffn_hidden_size=args.ffn_hidden_size, num_moe_experts=args.num_experts, moe_router_topk=args.topk,
        moe_layer_freq=args.moe_layer_freq, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        moe_aux_loss_coeff=args.aux_loss_coeff, moe_router_load_balancing_type="aux_loss",
        expert_model_parallel_size=args.ep_size, add_bias_linear=False, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=device.type == "cpu", params_dtype=dtype, bf16=args.bf16,
        pipeline_dtype=dtype)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=args.seq_len, position_embedding_type="rope")
    return model.to(device)


def all_reduce_grads(model):
    """Average gradients over data-parallel replicas: dense weights over all ranks, experts over their copies."""
    from megatron.core import parallel_state
    dense = parallel_state.get_data_parallel_group()
    experts = parallel_state.get_expert_data_parallel_group()
    for p in model.parameters():
        if p.grad is None:
            continue
        group = dense if getattr(p, "allreduce", True) else experts
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)


def lm_loss(model, batch, device):
    tokens, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    # Megatron's default causal mask is built on "cuda"; an explicit one (True = masked) works on any device.
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=device).triu(1)[None, None]
    return model(tokens, positions, causal, labels=labels).float().mean()


def load_data(args):
    if dist.get_rank() == 0:
        cached_preprocess(args.data, args.vocab_size, None, args.cache_dir)
    dist.barrier()
    prepared = cached_preprocess(args.data, args.vocab_size, None, args.cache_dir)
    train, valid = train_valid_split(IndexedDataset(prepared.prefix), 0.05)
    rank, world = dist.get_rank(), dist.get_world_size()
    return (Batches(GPTSamples(train, args.seq_len), args.micro_batch, 1, rank, world, args.seed),
            Batches(GPTSamples(valid, args.seq_len), args.micro_batch, 1, rank, world, args.seed, shuffle=False),
            prepared.vocab_size)


def evaluate(model, valid, args, device):
    model.eval()
    with torch.no_grad():
        losses = torch.stack([lm_loss(model, valid.get(i), device) for i in range(args.eval_iters)])
    model.train()
    dist.all_reduce(losses)
    return losses.mean().item() / dist.get_world_size()


def main():
    args = parse_args()
    with open(args.config) as f:
        ds_config = json.load(f)
    lsh = lshmoe_plugin.load_config(ds_config, enabled=None if args.lsh_moe is None else args.lsh_moe == "on")
    args.micro_batch = args.micro_batch or ds_config.get("train_micro_batch_size_per_gpu", 8)
    device = setup_distributed(args)
    train_batches, valid_batches, vocab_size = load_data(args)
    model = build_model(args, vocab_size, device)
    lshmoe_plugin.enable(lsh, model, framework="megatron")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))

    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if rank == 0 else None
    if rank == 0:
        print(f"world {world}, ep {args.ep_size}, lsh_moe {'on' if lsh.enabled else 'off'} "
              f"(rate {lsh.compression_rate}), {sum(p.numel() for p in model.parameters())} params on rank 0")
    start = time.time()
    for step in range(args.train_steps):
        lshmoe_plugin.set_training_step(step)  # no DeepSpeed engine here: redraw_interval and exact_from_step read it
        loss = lm_loss(model, train_batches.get(step), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        last = step + 1 == args.train_steps
        if step % args.log_interval == 0 or last:
            record = {"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - start, 2),
                      "tokens_per_s": (step + 1) * args.micro_batch * args.seq_len * world / (time.time() - start)}
            if args.eval_interval and (step % args.eval_interval == 0 or last):
                record["valid_loss"] = evaluate(model, valid_batches, args, device)
            record.update({k: v for k, v in TELEMETRY.summary().items() if k.startswith("lsh_moe/mean/")})
            if rank == 0:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      flush=True)
                log.write(json.dumps(record) + "\n")
                log.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
