"""Pretrain T5-MoE (span corruption) with DeepSpeed, LSH-MoE on or off per the config (or --lsh_moe on|off).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 scripts/pretrain_t5_moe.py \
        --deepspeed_config configs/t5_moe_cpu_lsh.json --preset tiny --output_dir runs/t5_lsh
"""
import deepspeed

import lshmoe_plugin
from lshmoe_pretrain import training
from lshmoe_pretrain.models import build_t5_moe


def main() -> None:
    args = training.parse_args("t5")
    training.setup(args)
    data = training.load_data(args)
    model = build_t5_moe(args.preset, ep_size=args.ep_size, vocab_size=data.vocab_size,
                         decoder_start_id=data.pad_id)
    training.nudge_initial_weights(model, args.init_nudge, args.seed)
    lshmoe_plugin.enable(args.lsh, model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=args.ds_config)
    training.train(engine, data, args)


if __name__ == "__main__":
    main()
