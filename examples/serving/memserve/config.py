"""Model configuration: the Llama-architecture shapes memserve runs, and their presets."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from mempool.errors import MemPoolError

#: RoPE variants we implement; a checkpoint asking for another one is refused, not approximated.
ROPE_TYPES = ("default", "llama3")


class ModelConfigError(MemPoolError, ValueError):
    """A model configuration or checkpoint that memserve cannot run faithfully."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and numerics of a Llama-architecture decoder (Llama 2/3, Qwen2 style).

    ``attention_bias`` adds biases to the q/k/v projections (Qwen2). ``rope_scaling`` holds the
    ``llama3`` frequency-scaling parameters when ``rope_type == "llama3"``.
    """

    vocab_size: int = 128_256
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1376
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 500_000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(
                    f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"rope_type={self.rope_type!r} is not supported; known: {ROPE_TYPES}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ModelConfigError(f"dtype={self.dtype!r} is not a torch dtype name")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameters' and activations' dtype."""
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        if "head_dim" not in changes and ({"hidden_size", "num_heads"} & changes.keys()):
            changes["head_dim"] = 0
        return replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + h

    @classmethod
    def from_hf(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        """Read a Hugging Face ``config.json`` (Llama or Qwen2 style) from ``path`` (file or folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"cannot read {path}: {exc}") from exc
        model_type = raw.get("model_type", "llama")
        if model_type not in ("llama", "qwen2"):
            raise ModelConfigError(f"model_type={model_type!r} is not a Llama/Qwen2-style model")
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10_000.0))
        scaling = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, int | float)))
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        values: dict[str, Any] = {
            "vocab_size": int(raw["vocab_size"]),
            "hidden_size": hidden,
            "num_layers": int(raw["num_hidden_layers"]),
            "num_heads": heads,
            "num_kv_heads": int(raw.get("num_key_value_heads") or heads),
            "intermediate_size": int(raw["intermediate_size"]),
            "head_dim": int(raw.get("head_dim") or hidden // heads),
            "rope_theta": float(theta),
            "rope_type": rope_type,
            "rope_scaling": scaling if rope_type != "default" else (),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "attention_bias": bool(raw.get("attention_bias", model_type == "qwen2")),
        }
        if raw.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=True is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act={raw['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
        layers = int(raw["num_hidden_layers"])
        windowed = [kind for kind in raw.get("layer_types") or () if kind != "full_attention"]
        if raw.get("use_sliding_window") and int(raw.get("max_window_layers", layers)) < layers:
            windowed.append("sliding_attention")  # Qwen2: the layers from max_window_layers on
        if windowed:
            raise ModelConfigError(f"layers of {sorted(set(windowed))} are not supported: attention here is full")
        values.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ModelConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**values)


#: Presets by name: ``default`` is the demo model (no download), ``tiny`` is for unit tests.
PRESETS: dict[str, ModelConfig] = {
    "default": ModelConfig(),
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
    ),
    # the tiny shapes with the llama3 vocabulary: servers in tests take text and real token ids
    "tiny-llama3": ModelConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, init_std=0.1
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].with_(**overrides) if overrides else PRESETS[name]
