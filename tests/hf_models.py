"""Tiny seeded Hugging Face models, the reference the model and integration tests compare against."""

from __future__ import annotations

from typing import Any

import torch

SMALL_HF = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)


#: Other HF architectures the integration is tested on: (config class, model class, fields beyond
#: SMALL_HF's). Windows are 8 tokens, so that the tests' prompts outgrow them.
OTHER_HF: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),  # head_dim not hidden / heads
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8}),  # alternating
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}
_NO_KV_HEADS = {"falcon", "gpt2", "gpt-neox"}  # multi-head (or their own field): no num_key_value_heads


def tiny_hf(kind: str = "llama", **overrides: Any) -> Any:
    """A seeded random ``LlamaForCausalLM`` (``"llama"``), ``Qwen2ForCausalLM`` (``"qwen2"``) or
    model of ``OTHER_HF``, eval mode, float32; biases random too (HF zero-initialises them), so
    that the bias path counts."""
    import transformers

    torch.manual_seed(0)
    fields = {**SMALL_HF, **overrides}
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    elif kind in OTHER_HF:
        config_class, model_class, extra = OTHER_HF[kind]
        fields = {**SMALL_HF, "bos_token_id": 1, "eos_token_id": 2, **extra, **overrides}
        if kind in _NO_KV_HEADS:
            del fields["num_key_value_heads"]
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()
