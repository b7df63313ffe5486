"""The Hugging Face twin of a memserve model configuration, for benchmarks against transformers."""

from __future__ import annotations

from typing import Any

import torch

from memserve import ModelConfig


def hf_llama(c: ModelConfig, *, attn: str = "eager", seed: int = 0) -> Any:
    """A seeded random ``LlamaForCausalLM`` shaped like ``c`` (eval mode, float32)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        max_position_embeddings=8192,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_config).eval()
