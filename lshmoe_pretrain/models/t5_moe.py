"""T5-MoE: an encoder-decoder trained on span corruption, with DeepSpeed MoE FFNs in every other block of both.

Simplifications against T5 (documented in docs/pretraining.md): learned absolute positions instead of relative
position buckets, pre-norm RMSNorm, GELU FFN. The MoE placement and the span-corruption objective follow T5/GShard.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, resolve_config
from .layers import Attention, FeedForward, init_weights


class EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool, ep_size: int) -> None:
        super().__init__()
        self.norm_attn, self.norm_ffn = nn.RMSNorm(config.d_model), nn.RMSNorm(config.d_model)
        self.attn = Attention(config, causal=False)
        self.ffn = FeedForward(config, moe, ep_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm_attn(x))
        out, aux_loss = self.ffn(self.norm_ffn(x))
        return x + out, aux_loss


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool, ep_size: int) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = (nn.RMSNorm(config.d_model) for _ in range(3))
        self.self_attn = Attention(config, causal=True)
        self.cross_attn = Attention(config, causal=False)
        self.ffn = FeedForward(config, moe, ep_size)

    def forward(self, x: torch.Tensor, encoded: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.norm_self(x))
        x = x + self.cross_attn(self.norm_cross(x), context=encoded)
        out, aux_loss = self.ffn(self.norm_ffn(x))
        return x + out, aux_loss


class T5MoE(nn.Module):
    """forward(input_ids, labels) -> scalar loss = LM loss on the targets + aux_loss_coef * sum of gate losses.

    input_ids (B, S): the corrupted text with sentinels; labels (B, T): sentinels followed by the dropped spans.
    The decoder reads labels shifted right behind `decoder_start_id` (teacher forcing).
    """

    def __init__(self, config: ModelConfig, ep_size: int = 1, decoder_start_id: int = 0) -> None:
        super().__init__()
        self.config, self.decoder_start_id = config, decoder_start_id
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder_positions = nn.Embedding(config.seq_len, config.d_model)
        self.decoder_positions = nn.Embedding(config.seq_len, config.d_model)
        moe = config.is_moe_layer
        self.encoder = nn.ModuleList(EncoderBlock(config, moe(i), ep_size) for i in range(config.n_layers))
        self.decoder = nn.ModuleList(DecoderBlock(config, moe(i), ep_size) for i in range(config.n_layers))
        self.encoder_norm, self.decoder_norm = nn.RMSNorm(config.d_model), nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        self.lm_head.weight = self.token_embedding.weight
        self.last_lm_loss = self.last_aux_loss = None

    def _embed(self, ids: torch.Tensor, positions: nn.Embedding) -> torch.Tensor:
        if ids.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than seq_len={self.config.seq_len}")
        return self.token_embedding(ids) + positions(torch.arange(ids.shape[1], device=ids.device))

    def logits(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        aux_loss = input_ids.new_zeros((), dtype=torch.float32)
        x = self._embed(input_ids, self.encoder_positions)
        for block in self.encoder:
            x, block_aux = block(x)
            aux_loss = aux_loss + block_aux
        encoded = self.encoder_norm(x)
        y = self._embed(decoder_input_ids, self.decoder_positions)
        for block in self.decoder:
            y, block_aux = block(y, encoded)
            aux_loss = aux_loss + block_aux
        return self.lm_head(self.decoder_norm(y)), aux_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = labels.new_full((labels.shape[0], 1), self.decoder_start_id)
        logits, aux_loss = self.logits(input_ids, torch.cat([start, labels[:, :-1]], dim=1))
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        self.last_lm_loss, self.last_aux_loss = lm_loss.detach(), aux_loss.detach()
        return lm_loss + self.config.aux_loss_coef * aux_loss


def build_t5_moe(preset_or_config: Union[str, ModelConfig], ep_size: int = 1, decoder_start_id: int = 0,
                 **overrides) -> T5MoE:
    """T5-MoE from a preset name (see `PRESETS`) or a `ModelConfig`; ep_size must divide num_experts."""
    config = resolve_config(preset_or_config, **overrides)
    if config.num_experts % ep_size:
        raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}")
    return T5MoE(config, ep_size, decoder_start_id)
