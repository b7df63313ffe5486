"""A Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) whose KV lives in MemPool blocks.

Parameter names follow the Hugging Face layout minus the ``model.`` prefix, except that q/k/v and
gate/up are stored fused (``qkv_proj``, ``gate_up_proj``) so each is one matmul;
:mod:`memserve.weights` maps checkpoints onto them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .paged import StepInput, Workspace, paged_attention

# oneDNN's prepacked-weight linear: the op torch's own CPU compiler emits for frozen linears
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACK_FOR_ROWS = 16  # oneDNN picks a packed layout for this many input rows; any count then works


class Linear(nn.Linear):
    """``nn.Linear`` that, once packed (:meth:`pack`), multiplies on CPU in float32 by a
    oneDNN-packed copy of its weight.

    Measured on a 2-core AVX-512 VM against ``F.linear`` (MKL): the 128k x 512 vocabulary
    projection takes 3.7 vs 17 ms for one row and 8 vs 27 ms for 16, the layers' projections
    about half as long at 16 rows and up; a row's result is the same (to a few ulps) whatever
    else is in its call. The price is a second copy of the weight in memory. The copy is rebuilt
    when the weight changes (new storage or an in-place write, e.g. loading a checkpoint); it is
    not part of the state dict. Unpacked, or elsewhere (CUDA, other dtypes): ``F.linear``.
    """

    _packing = False
    _packed: tuple[tuple[int, int], Any] | None = None

    def pack(self, enabled: bool = True) -> None:
        """Use (and build now) the packed copy, or with ``enabled=False`` drop it."""
        self._packing = enabled
        if enabled:
            self._current()
        else:
            self._packed = None

    def _current(self) -> Any | None:
        """The packed weight, rebuilt if stale; ``None`` where ``F.linear`` is used."""
        w = self.weight
        if not (self._packing and _ONEDNN and w.device.type == "cpu" and w.dtype == torch.float32):
            return None
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_FOR_ROWS))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._current() if x.dtype == torch.float32 else None
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies (float32), with Llama 3 frequency scaling when configured."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "llama3":
        p = dict(config.rope_scaling)
        factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
        old_ctx = p.get("original_max_position_embeddings", 8192.0)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(is_mid, mid, scaled)
    return inv


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = config.num_heads, config.num_kv_heads, config.head_dim
        out = (self.heads + 2 * self.kv_heads) * self.dim
        self.qkv_proj = Linear(config.hidden_size, out, bias=config.attention_bias)
        self.o_proj = Linear(self.heads * self.dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        step: StepInput,
        ws: Workspace,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], dim=-1)
        q = _rotate(q.view(t, self.heads, self.dim), cos, sin)
        k = _rotate(k.view(t, self.kv_heads, self.dim), cos, sin)
        return self.o_proj(paged_attention(q, k, v.view(t, self.kv_heads, self.dim), kv_layer, step, ws))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the "rotate half" convention of the Hugging Face Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = Linear(self.inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class LlamaModel(nn.Module):
    """The decoder. ``forward(step, kv)`` runs one engine step and returns next-token logits.

    ``kv`` is the pool's device tensor ``[blocks, layers, 2, block_size, kv_heads, head_dim]``;
    the step writes its new tokens' K/V there and reads context K/V from there. One forward at a
    time per model object (its gather buffers are reused); engines on separate threads need
    separate models.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        with torch.device(device):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(config.torch_dtype)
        self.workspace = Workspace()
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)  # float32, as HF
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def pack(self, enabled: bool = True) -> LlamaModel:
        """Run the CPU float32 linears on oneDNN-packed weight copies (see :class:`Linear`),
        built now (~0.5 s for the default model); ``enabled=False`` drops them. The engine calls
        it per ``EngineConfig.pack_weights``."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(enabled)
        return self

    def init_random(self, seed: int | None = None) -> LlamaModel:
        """Deterministic random weights from ``seed`` (default: the config's), the same on any device."""
        gen = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.empty(param.shape).normal_(0.0, self.config.init_std, generator=gen))
        return self

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, 1, head_dim]`` for ``positions`` (computed in float32, as HF does)."""
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.config.torch_dtype
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, step: StepInput, kv: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``step``; returns float32 logits ``[sequences, vocab]`` (``[tokens, vocab]`` if ``all_logits``)."""
        x = self.embed_tokens(step.input_ids)
        cos, sin = self.rope(step.positions)
        layers: list[DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        for i, layer in enumerate(layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn(h, cos, sin, kv[:, i], step, self.workspace)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not all_logits:
            x = x[step.last]
        return self.logits(self.norm(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[rows, vocab]`` of final hidden states ``h``.

        The vocabulary projection dominates a decode step of a small model; on CPU it runs on
        oneDNN's packed weight (see :class:`Linear`).
        """
        return self.lm_head(h).float()
