"""GPT-MoE and T5-MoE built on DeepSpeed's MoE layer, for pretraining with and without LSH compression."""
from .config import PRESETS, ModelConfig, resolve_config
from .gpt_moe import GPTMoE, build_gpt_moe
from .t5_moe import T5MoE, build_t5_moe

__all__ = ["GPTMoE", "ModelConfig", "PRESETS", "T5MoE", "build_gpt_moe", "build_t5_moe", "resolve_config"]
