"""Pretrain GPT-MoE with DeepSpeed, LSH-MoE on or off per the config's lsh_moe block (or --lsh_moe on|off).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 scripts/pretrain_gpt_moe.py \
        --deepspeed_config configs/gpt_moe_cpu_lsh.json --preset tiny --output_dir runs/gpt_lsh
"""
import deepspeed

import lshmoe_plugin
from lshmoe_pretrain import training
from lshmoe_pretrain.models import build_gpt_moe


def main() -> None:
    args = training.parse_args("gpt")
    training.setup(args)
    data = training.load_data(args)
    model = build_gpt_moe(args.preset, ep_size=args.ep_size, vocab_size=data.vocab_size)
    training.nudge_initial_weights(model, args.init_nudge, args.seed)
    lshmoe_plugin.enable(args.lsh, model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=args.ds_config)
    training.train(engine, data, args)


if __name__ == "__main__":
    main()
