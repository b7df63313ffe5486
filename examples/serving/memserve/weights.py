"""Load Llama / Qwen2-style checkpoints (``config.json`` + ``*.safetensors``) from a local folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ModelConfig, ModelConfigError
from .model import LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's ``*.safetensors`` files in ``folder``: those that
    ``model.safetensors.index.json`` names where there is one (sharded checkpoints), else all.

    Raises:
        ModelConfigError: no file, an unreadable or corrupt one, or a tensor two files hold.
    """
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelConfigError("loading checkpoints needs safetensors: pip install 'mempool[serving]'") from exc
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelConfigError(f"cannot read {index}: {exc!r}") from exc
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"no *.safetensors file in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file))
        except (OSError, SafetensorError) as exc:
            raise ModelConfigError(f"cannot read {file}: {exc}") from exc
        twice = sorted(part.keys() & tensors.keys())
        if twice:
            raise ModelConfigError(f"{file.name} holds tensors another file also holds: {twice[:5]}")
        tensors.update(part)
    return tensors


def to_memserve(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to :class:`LlamaModel`'s and fuse q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer = _LAYER.match(name)
        if layer is None:
            if name.startswith("model."):
                out[name.removeprefix("model.")] = tensor
            elif name == "lm_head.weight":
                out[name] = tensor
            continue
        index, rest = layer.groups()
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            fused, slot = _FUSED[module]
            parts.setdefault(f"layers.{index}.{fused}.{kind}", {})[slot] = tensor
        else:
            out[f"layers.{index}.{rest}"] = tensor
    for name, pieces in parts.items():
        want = 3 if "qkv" in name else 2
        if sorted(pieces) != list(range(want)):
            raise ModelConfigError(f"checkpoint is missing pieces of {name}")
        out[name] = torch.cat([pieces[i] for i in range(want)])
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_pretrained(folder: str | Path, *, device: torch.device | str = "cpu", dtype: str | None = None) -> LlamaModel:
    """Build a :class:`LlamaModel` from a Hugging Face-style folder; every weight must be present.

    Raises:
        ModelConfigError: unreadable config or weights, unsupported architecture, missing, misshapen or
            non-floating-point tensors.
    """
    folder = Path(folder)
    config = ModelConfig.from_hf(folder, **({"dtype": dtype} if dtype else {}))
    model = LlamaModel(config, device=device)
    state = to_memserve(read_safetensors(folder), config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    not_float = sorted(k for k in state if not state[k].is_floating_point())
    if missing or unexpected or wrong or not_float:
        raise ModelConfigError(
            f"checkpoint does not fit: missing={missing[:5]} unexpected={unexpected[:5]} shape={wrong[:5]} "
            f"not floating-point={not_float[:5]}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
