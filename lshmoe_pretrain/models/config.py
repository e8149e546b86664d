"""One typed model config shared by GPT-MoE and T5-MoE, and the named presets the scripts build from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Union


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and MoE settings of a transformer whose FFN is an MoE layer in every `moe_every`-th block.

    n_layers counts decoder blocks for GPT, and blocks of the encoder and of the decoder each for T5.
    vocab_size is usually replaced by the tokenizer's vocabulary size (`with_vocab`).
    top_k: 1 or 2 (DeepSpeed's GShard gate); capacity_factor sizes each expert's buffer in training.
    aux_loss_coef weights the gate's load-balancing loss added to the LM loss.
    """

    vocab_size: int = 4096
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    num_experts: int = 4
    moe_every: int = 2
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    aux_loss_coef: float = 0.01
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k={self.top_k}: DeepSpeed's MoE gate allows 1 or 2")
        for key in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff", "num_experts", "moe_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def is_moe_layer(self, index: int) -> bool:
        # Odd blocks carry the MoE FFN, as in GShard and DeepSpeed-Megatron's MoE models.
        return index % self.moe_every == self.moe_every - 1

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        return dataclasses.replace(self, vocab_size=vocab_size)


PRESETS: Dict[str, ModelConfig] = {
    # Trains on a 2-core CPU in minutes.
    "tiny": ModelConfig(),
    # The CPU quality study (docs/quality.md): the quality presets' routing (8 experts, top-2, MoE in every other
    # block) at a width a 2-core machine trains on a million tokens in minutes.
    "mini-moe": ModelConfig(seq_len=256, d_model=128, n_heads=4, n_layers=4, d_ff=512, num_experts=8, top_k=2),
    # A quick single-GPU check.
    "small": ModelConfig(vocab_size=8192, seq_len=256, d_model=256, n_heads=8, n_layers=6, d_ff=1024, num_experts=8),
    # Quality studies (docs/quality.md): the smallest shapes with >= 100M parameters, 8 experts and top-2, that a
    # single GPU trains on tens of millions of tokens in minutes. MoE in every other block, as GShard.
    "gpt-moe-135m": ModelConfig(vocab_size=16384, seq_len=512, d_model=512, n_heads=8, n_layers=12, d_ff=2048,
                                num_experts=8, top_k=2),
    # The top-1 shape of the quality study: 16 experts of one at a time (Switch-style routing) in the same blocks.
    "gpt-moe-top1-16e": ModelConfig(vocab_size=16384, seq_len=512, d_model=512, n_heads=8, n_layers=12, d_ff=2048,
                                    num_experts=16, top_k=1),
    "t5-moe-140m": ModelConfig(vocab_size=16384, seq_len=512, d_model=512, n_heads=8, n_layers=6, d_ff=2048,
                               num_experts=8, top_k=2),
    # The long-schedule testbed (lshmoe_pretrain.testbed, docs/quality.md): shapes small enough that one H200 trains
    # several runs of >= 3,500 optimizer steps at once. Narrow GPT (the shape of issue 22's reference runs), a GPT
    # with d_model 512, and a T5; 8 experts, top-2, MoE in every other block, like the presets above.
    "gpt-moe-25m": ModelConfig(vocab_size=16384, seq_len=256, d_model=256, n_heads=8, n_layers=8, d_ff=1024,
                               num_experts=8, top_k=2),
    "gpt-moe-72m": ModelConfig(vocab_size=16384, seq_len=256, d_model=512, n_heads=8, n_layers=6, d_ff=2048,
                               num_experts=8, top_k=2),
    "t5-moe-26m": ModelConfig(vocab_size=16384, seq_len=256, d_model=256, n_heads=8, n_layers=4, d_ff=1024,
                              num_experts=8, top_k=2),
    # Twice gpt-moe-72m's width at two thirds of its depth: does a wire format's cost grow with d_model (FP6
    # forward ends +0.4% at 512 and within 0.1% at 256 on the single-pass shapes)?
    "gpt-moe-185m": ModelConfig(vocab_size=16384, seq_len=256, d_model=1024, n_heads=16, n_layers=4, d_ff=4096,
                                num_experts=8, top_k=2),
    # Paper-scale shapes (GPT-3 medium / XL widths, GShard-style expert counts).
    "gpt-moe-350m": ModelConfig(vocab_size=50304, seq_len=1024, d_model=1024, n_heads=16, n_layers=24, d_ff=4096,
                                num_experts=16, top_k=2),
    "gpt-moe-1.3b": ModelConfig(vocab_size=50304, seq_len=2048, d_model=2048, n_heads=32, n_layers=24, d_ff=8192,
                                num_experts=64, top_k=2),
    "t5-moe-base": ModelConfig(vocab_size=32128, seq_len=512, d_model=768, n_heads=12, n_layers=12, d_ff=3072,
                               num_experts=8, top_k=2),
    "t5-moe-large": ModelConfig(vocab_size=32128, seq_len=512, d_model=1024, n_heads=16, n_layers=24, d_ff=4096,
                                num_experts=32, top_k=2),
}


def resolve_config(preset_or_config: Union[str, ModelConfig], **overrides) -> ModelConfig:
    """A `ModelConfig` from a preset name or itself, with keyword overrides (e.g. ``vocab_size=...``)."""
    if isinstance(preset_or_config, ModelConfig):
        config = preset_or_config
    elif preset_or_config in PRESETS:
        config = PRESETS[preset_or_config]
    else:
        raise ValueError(f"unknown model preset {preset_or_config!r}; allowed: {sorted(PRESETS)}")
    return dataclasses.replace(config, **overrides) if overrides else config
