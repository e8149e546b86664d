"""GPT-MoE: a decoder-only transformer with DeepSpeed MoE FFNs in every other block, trained with causal LM loss."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, resolve_config
from .layers import Attention, FeedForward, init_weights


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool, ep_size: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, causal=True)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config, moe, ep_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln_attn(x))
        out, aux_loss = self.ffn(self.ln_ffn(x))
        return x + out, aux_loss


class GPTMoE(nn.Module):
    """forward(input_ids, labels=None) -> scalar loss = LM loss + aux_loss_coef * sum of gate losses.

    labels (B, T) are the next tokens already aligned with input_ids; without them the model predicts
    input_ids[:, 1:] from input_ids[:, :-1]. The last LM and aux losses stay readable as `last_lm_loss`
    and `last_aux_loss` (detached), so callers can log perplexity without the gate term.
    """

    def __init__(self, config: ModelConfig, ep_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i), ep_size) for i in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        self.lm_head.weight = self.token_embedding.weight  # tied, as in GPT-2
        self.last_lm_loss = self.last_aux_loss = None

    def logits(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> logits (B, T, vocab), summed gate loss."""
        length = input_ids.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than seq_len={self.config.seq_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        aux_loss = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            aux_loss = aux_loss + block_aux
        return self.lm_head(self.ln_final(x)), aux_loss

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
        logits, aux_loss = self.logits(input_ids)
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        self.last_lm_loss, self.last_aux_loss = lm_loss.detach(), aux_loss.detach()
        return lm_loss + self.config.aux_loss_coef * aux_loss


def build_gpt_moe(preset_or_config: Union[str, ModelConfig], ep_size: int = 1, **overrides) -> GPTMoE:
    """GPT-MoE from a preset name (see `PRESETS`) or a `ModelConfig`; ep_size must divide num_experts."""
    config = resolve_config(preset_or_config, **overrides)
    if config.num_experts % ep_size:
        raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}")
    return GPTMoE(config, ep_size)
