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
#: The parameters of Llama 3's RoPE frequency scaling (defaults in :func:`memserve.model.rope_inv_freq`).
_LLAMA3_SCALING = frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})


def _is_number(value: object) -> bool:
    """A finite real number (an int or float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: The fields a Hugging Face ``config.json`` must give (the rest have HF's defaults).
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


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
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ModelConfigError(f"head_dim must be an int >= 0 (0: hidden_size // num_heads), got {self.head_dim!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ModelConfigError(f"seed must be an int, got {self.seed!r}")
        for name in ("tie_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
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
        if not (_is_number(self.rope_theta) and self.rope_theta > 0):
            raise ModelConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ModelConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (_is_number(self.init_std) and self.init_std >= 0):
            raise ModelConfigError(f"init_std must be a number >= 0, got {self.init_std!r}")
        self._check_rope_scaling()
        if not isinstance(self.dtype, str) or not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ModelConfigError(f"dtype={self.dtype!r} is not a torch dtype name")

    def _check_rope_scaling(self) -> None:
        try:
            scaling = dict(self.rope_scaling)
        except (TypeError, ValueError):
            raise ModelConfigError(f"rope_scaling must be (name, number) pairs, got {self.rope_scaling!r}") from None
        if self.rope_type == "default":
            if scaling:
                raise ModelConfigError(f"rope_type='default' takes no rope_scaling, got {scaling}")
            return
        unknown = scaling.keys() - _LLAMA3_SCALING
        bad = [k for k, v in scaling.items() if not (_is_number(v) and v > 0)]
        if unknown or bad or "factor" not in scaling:
            raise ModelConfigError(
                f"llama3 rope_scaling needs a positive factor and takes positive {sorted(_LLAMA3_SCALING)}; "
                f"got {scaling}"
            )
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        if high <= low:
            raise ModelConfigError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {scaling}")

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
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object")
        model_type = raw.get("model_type", "llama")
        if model_type not in ("llama", "qwen2"):
            raise ModelConfigError(f"model_type={model_type!r} is not a Llama/Qwen2-style model")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelConfigError(f"rope_parameters / rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10_000.0))
        partial = rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial != 1:
            raise ModelConfigError(f"partial_rotary_factor={partial!r} is not supported: RoPE here turns every dim")
        scaling = tuple(sorted((k, float(v) if _is_number(v) else v) for k, v in rope.items()))
        missing = [name for name in _HF_REQUIRED if raw.get(name) is None]
        if missing:
            raise ModelConfigError(f"{path} lacks {missing}")
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        sizes = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads))
        values: dict[str, Any] = {
            "vocab_size": raw["vocab_size"],
            "hidden_size": hidden,
            "num_layers": raw["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": raw.get("num_key_value_heads") or heads,
            "intermediate_size": raw["intermediate_size"],
            "head_dim": raw.get("head_dim") or (hidden // heads if sizes else 0),  # as HF derives it
            "rope_theta": float(theta) if _is_number(theta) else theta,
            "rope_type": rope_type,
            "rope_scaling": scaling if rope_type != "default" else (),
            "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
            "tie_embeddings": raw.get("tie_word_embeddings", False),
            "attention_bias": raw.get("attention_bias", model_type == "qwen2"),
        }
        if raw.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=True is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act={raw['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
        layers, kinds = raw["num_hidden_layers"], raw.get("layer_types") or []
        if not isinstance(kinds, list):
            raise ModelConfigError(f"layer_types must be a list, got {kinds!r}")
        windowed = [kind for kind in kinds if kind != "full_attention"]
        first_windowed = raw.get("max_window_layers", layers)  # Qwen2: the layers from there on slide
        if raw.get("use_sliding_window") and not (_is_number(first_windowed) and first_windowed >= layers):
            windowed.append("sliding_attention")
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
