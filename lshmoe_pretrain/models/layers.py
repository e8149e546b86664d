"""Building blocks shared by GPT-MoE and T5-MoE: attention, the dense FFN and its MoE replacement."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.causal = config.n_heads, causal
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, d), context (B, S, d) or None -> (B, T, d)."""
        batch, length, d_model = x.shape
        source = x if context is None else context
        q = self.q(x)
        k, v = self.kv(source).split(d_model, dim=-1)
        q, k, v = (t.view(batch, -1, self.n_heads, d_model // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and context is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, d_model))


class MLP(nn.Module):
    """The dense FFN; also the expert that DeepSpeed's MoE layer copies `num_experts / ep_size` times."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class FeedForward(nn.Module):
    """Dense MLP or DeepSpeed MoE; always returns (output, aux_loss) so blocks need not care which."""

    def __init__(self, config: ModelConfig, moe: bool, ep_size: int) -> None:
        super().__init__()
        if not moe:
            self.mlp, self.moe = MLP(config), None
            return
        from deepspeed.moe.layer import MoE
        # use_rts draws random priorities when a buffer overflows: training seeds the RNG per step for resumes.
        self.mlp = None
        self.moe = MoE(hidden_size=config.d_model, expert=MLP(config), num_experts=config.num_experts,
                       ep_size=ep_size, k=config.top_k, capacity_factor=config.capacity_factor,
                       eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.moe is None:
            return self.mlp(x), x.new_zeros(())
        out, aux_loss, _ = self.moe(x)
        return out, aux_loss


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
