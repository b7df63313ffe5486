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


def hf_qwen2_0_5b(*, attn: str = "sdpa", seed: int = 0) -> Any:
    """A seeded random ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's published shape (24 layers, hidden
    896, 14 / 2 heads, FFN 4,864, tied 151,936-token vocabulary; 494M parameters), float32: a
    model whose layers, not its vocabulary projection, take most of a token's work, as in
    released checkpoints."""
    import transformers

    hf_config = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(hf_config).eval()
