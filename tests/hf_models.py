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


def tiny_hf(kind: str = "llama", **overrides: Any) -> Any:
    """A seeded random ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``), eval mode, float32; biases
    random too (HF zero-initialises them), so that the bias path counts."""
    import transformers

    torch.manual_seed(0)
    fields = {**SMALL_HF, **overrides}
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()
