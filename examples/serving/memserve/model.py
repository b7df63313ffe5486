"""A Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) whose KV lives in MemPool blocks.

Parameter names follow the Hugging Face layout minus the ``model.`` prefix, except that q/k/v and
gate/up are stored fused (``qkv_proj``, ``gate_up_proj``) so each is one matmul;
:mod:`memserve.weights` maps checkpoints onto them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .paged import StepInput, Workspace, paged_attention
from .sampling import argmax_rows

# oneDNN's prepacked-weight linear: the op torch's own CPU compiler emits for frozen linears
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACK_FOR_ROWS = 16  # oneDNN picks a packed layout for this many input rows; any count then works
# int8 dot products in hardware (AVX512-VNNI: u8 x s8 summed exactly in int32) behind oneDNN's
# quantized linear, the op torch's own CPU compiler emits for int8 models: what makes a screen pay
_INT8_DOT = (
    _ONEDNN
    and hasattr(torch.ops.onednn, "qlinear_pointwise")
    and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
)
_MAX_CANDIDATES = 1024  # a row whose screen keeps more than this is computed whole
_SCREEN_BLOCK = 128  # outputs screened a block at a time: block maxima first, then inside the few that pass


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
    _screening = False
    _packed: tuple[tuple[int, int], Any] | None = None
    _screened: tuple[tuple[int, int], _Screen | None] | None = None

    def pack(self, enabled: bool = True, *, screen: bool = False) -> None:
        """Use (and build now) the packed copy, or with ``enabled=False`` drop it; with ``screen``,
        also the int8 copy :meth:`argmax` screens with (where the CPU has int8 dot products)."""
        self._packing, self._screening = enabled, enabled and screen
        if enabled:
            self._current()
        else:
            self._packed = None
        if self._screening:
            self._screen()
        else:
            self._screened = None

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

    def argmax(self, x: torch.Tensor) -> list[int]:
        """Each row of ``x`` ``[rows, in]``: the index of its largest output, as
        ``argmax_rows(forward(x))`` picks it (float32 outputs; the first index on ties, a NaN wins).

        Packed with ``screen``, on a CPU with int8 dot products and for a bias-free float32 layer,
        it screens instead of computing every output in float32: it reads an int8 copy of the
        weight (a quarter of the bytes; for the 128k x 512 vocabulary projection 2.0-2.7 vs
        4.1-7.4 ms for one row, 3.5-4.1 vs 8.2-8.6 ms for 16, measured interleaved on 2 cores),
        keeps the outputs whose int8 value lies within a proven error bound of the
        best one (the only ones that can be the largest), and computes those few in float32 from
        the float32 weight. The bound covers the rounding of weight and input to int8 and the
        float32 arithmetic on both sides, so the pick is the float32 one up to rounding-level
        ties. A row is computed whole instead where the screen cannot decide cheaply (more than
        ``_MAX_CANDIDATES`` outputs pass, or magnitudes near float32's range), as is every row of
        an input that is not all finite.
        """
        rows = x.reshape(-1, x.shape[-1])
        screen = self._screen() if rows.dtype == torch.float32 and len(rows) else None
        if screen is None or not bool(torch.isfinite(rows).all()):
            return argmax_rows(self.forward(rows).float())
        n, fan_in = rows.shape
        # a row scaled by a positive factor keeps its argmax: scale each to peak at 127, so that
        # one uint8 encoding around 128 (the op takes one input scale) fits every row
        peak = rows.abs().amax(dim=1, keepdim=True)
        scaled = rows * torch.where(peak > 0, 127 / peak, 1.0)
        levels = torch.round(scaled)
        approx = torch.ops.onednn.qlinear_pointwise(
            (levels + 128).to(torch.uint8),
            1.0,
            128,
            screen.weight,
            screen.scales,
            screen.zeros,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )  # [rows, outputs padded to whole blocks]: the exact integer sums, scaled by the weight's scales
        approx[:, self.out_features :] = float("-inf")  # the padding's zeros must not count
        # |int8 output - float32 output (of the scaled row)| <= bound, for every output i of a row:
        #   weight rounding  |sum_j (w_ij - w^_ij) x_j| <= max_i |w_i - w^_i|_2 * |x|_2
        #   input rounding   |sum_j w^_ij (x_j - x^_j)| <= max_i |w^_i|_2 * |x - x^|_2
        #   float32 rounding of the scaling, of the scaled int8 sums and of the float32 output's own
        #                    sum, each relative to sum_j |w_ij| |x_j| <= max_i |w_i|_1 * 127.5
        tiny = (6 + 2.1 * fan_in) * 2.0**-24 * screen.l1 * 127.5
        bound = (
            screen.weight_error * torch.linalg.vector_norm(scaled, dim=1)
            + screen.l2 * torch.linalg.vector_norm(scaled - levels, dim=1)
            + tiny
        )
        blocks = approx.view(n, -1, _SCREEN_BLOCK)
        block_max = blocks.amax(dim=2)
        floor = block_max.amax(dim=1) - 2 * ((1.001 + 4 * fan_in * 2.0**-24) * bound + 1e-30)  # + norms' rounding
        whole = ~torch.isfinite(floor) | ~(peak[:, 0] * screen.l1 < 1e30)  # no overflow anywhere
        sel = (block_max >= floor[:, None]).nonzero()  # (row, block) pairs that hold candidates
        whole |= torch.bincount(sel[:, 0], minlength=n) > _MAX_CANDIDATES
        sel = sel[~whole[sel[:, 0]]]
        picked = blocks.reshape(-1, _SCREEN_BLOCK).index_select(0, sel[:, 0] * blocks.shape[1] + sel[:, 1])
        hit = (picked >= floor[sel[:, 0], None]).nonzero()
        row_of, col = sel[hit[:, 0], 0], sel[hit[:, 0], 1] * _SCREEN_BLOCK + hit[:, 1]
        counts = torch.bincount(row_of, minlength=n)
        whole |= (counts > _MAX_CANDIDATES) | (counts == 0)  # none: cannot happen, but never guess
        keep = ~whole[row_of]
        row_of, col = row_of[keep], col[keep]
        # every candidate against every row (a small matmul), then each candidate's own row
        exact = (self.weight.detach().index_select(0, col) @ rows.T).gather(1, row_of[:, None])[:, 0]
        best = torch.full((n,), float("-inf")).scatter_reduce(0, row_of, exact, "amax")
        first = torch.where(exact == best[row_of], col, self.out_features)
        out: list[int] = torch.full((n,), self.out_features).scatter_reduce(0, row_of, first, "amin").tolist()
        redo = whole.nonzero()[:, 0].tolist()
        if redo:
            for i, pick in zip(redo, argmax_rows(self.forward(rows[redo]).float())):
                out[i] = pick
        return out

    def _screen(self) -> _Screen | None:
        """The int8 copy :meth:`argmax` screens with, rebuilt if stale; ``None`` where it computes
        whole outputs."""
        if not (self._screening and _INT8_DOT) or self.bias is not None or self._current() is None:
            return None
        assert self._packed is not None
        key = self._packed[0]
        if self._screened is None or self._screened[0] != key:
            self._screened = (key, _Screen.build(self.weight.detach()))
        return self._screened[1]


@dataclass(frozen=True)
class _Screen:
    """An int8 copy of a linear's weight (a scale per row, zero rows appended up to whole blocks,
    packed for oneDNN), with the norms the screen's error bound needs (over every row ``i``, of
    the weight ``w_i`` and its int8 copy ``w^_i = scale_i * q_i``)."""

    weight: Any
    scales: torch.Tensor  # [padded outputs] float32
    zeros: torch.Tensor  # [padded outputs] int64
    weight_error: float  # max_i |w_i - w^_i|_2
    l2: float  # max_i |w^_i|_2
    l1: float  # max_i max(|w_i|_1, |w^_i|_1)

    @staticmethod
    def build(w: torch.Tensor) -> _Screen | None:
        """The screen of float32 weight ``w``, or ``None`` where it cannot serve: a weight that is not
        finite, or a kernel whose int8 sums turn out inexact (checked here on a worst case)."""
        outputs, fan_in = w.shape
        padded = outputs + -outputs % _SCREEN_BLOCK
        q = torch.zeros(padded, fan_in, dtype=torch.int8)
        scales = torch.ones(padded)
        sums = torch.zeros(padded, dtype=torch.float64)  # each row's sum of its int8 levels
        error = l2 = l1 = 0.0
        for lo in range(0, outputs, 4096):  # a slice of rows at a time: no weight-sized temporaries
            rows = w[lo : lo + 4096]
            if not bool(torch.isfinite(rows).all()):
                return None
            scale = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1)) / 127
            scale = torch.where(scale > 0, scale, 1.0)
            levels = torch.round(rows / scale[:, None]).clamp_(-127, 127)
            copy = levels * scale[:, None]
            error = max(error, float(torch.linalg.vector_norm(rows - copy, dim=1).max()))
            l2 = max(l2, float(torch.linalg.vector_norm(copy, dim=1).max()))
            l1 = max(l1, float(rows.abs().sum(dim=1).max()), float(copy.abs().sum(dim=1).max()))
            q[lo : lo + len(rows)] = levels.to(torch.int8)
            scales[lo : lo + len(rows)] = scale
            sums[lo : lo + len(rows)] = levels.sum(dim=1)  # exact: integers below 2^24 in float32
        # float32 norms: each within 2 * n * 2^-24 of the exact one; |fl(scale * q) - scale * q| is
        # at most 2^-24 * 128 * scale an element
        slack = 1 + 4 * fan_in * 2.0**-24
        error = error * slack + fan_in**0.5 * 2.0**-17 * float(scales.max())
        zeros = torch.zeros(padded, dtype=torch.int64)
        packed = torch.ops.onednn.qlinear_prepack(q, None)
        # every input at 255: each row's largest pair products meet, where a kernel that sums pairs in
        # int16 (no VNNI) saturates; the result must be the exact integer sum, scaled
        probe = torch.full((1, fan_in), 255, dtype=torch.uint8)
        got = torch.ops.onednn.qlinear_pointwise(
            probe, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        want = (sums * 127 * scales.to(torch.float64))[None]
        if not torch.allclose(got.to(torch.float64), want, rtol=1e-6, atol=1e-30):
            return None
        return _Screen(packed, scales, zeros, error, l2 * slack, l1 * slack)


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
        kv: torch.Tensor,
        layer: int,
        step: StepInput,
        ws: Workspace,
        in_place: bool = True,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk, v = qkv.split([(self.heads + self.kv_heads) * self.dim, self.kv_heads * self.dim], dim=-1)
        # q and k side by side: one rotation for both (elementwise, so the same values)
        q, k = _rotate(qk.view(t, self.heads + self.kv_heads, self.dim), cos, sin).split([self.heads, self.kv_heads], 1)
        return self.o_proj(paged_attention(q, k, v.view(t, self.kv_heads, self.dim), kv, layer, step, ws, in_place))


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

    def fingerprint(self) -> str:
        """A digest naming this model's numerics: instances whose fingerprints differ compute
        other K/V and must not share it. It covers the config (but its seed and init scale, which
        only the weights carry) and, for speed, up to 4,096 evenly spaced values of each parameter:
        another checkpoint or seed changes it; a change to a few single weights may not."""
        digest = hashlib.blake2b(digest_size=16)
        numerics = {k: v for k, v in sorted(vars(self.config).items()) if k not in ("seed", "init_std")}
        digest.update(repr(numerics).encode())
        for name, param in self.named_parameters():
            flat = param.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].contiguous()
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()

    def pack(self, enabled: bool = True, *, screen: bool = False) -> LlamaModel:
        """Run the CPU float32 linears on oneDNN-packed weight copies (see :class:`Linear`),
        built now (~0.5 s for the default model); ``enabled=False`` drops them. ``screen`` also
        builds the vocabulary projection's int8 copy that :meth:`greedy` screens with (~0.5 s more).
        The engine calls it per ``EngineConfig.pack_weights`` and ``screen_greedy``."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(enabled, screen=screen and module is self.lm_head)
        return self

    @torch.inference_mode()
    def warm_up(self, rows: int, sequences: int) -> LlamaModel:
        """Run every packed linear once for each step size up to ``rows`` tokens, and the
        vocabulary screen for each count up to ``sequences`` rows, so that steps of those sizes
        never pay oneDNN's set-up for a row count it has not seen (measured on the default model,
        over 500 cached tokens: a step of 30-37 new tokens 36 ms the first time, 22 ms after; of
        400, 130 and 110 ms). oneDNN keeps what it set up for the process (up to 1,024 shapes), so
        a second model of the same shapes warms up quickly. A no-op where nothing is packed."""
        gen = torch.Generator().manual_seed(0)
        seen: set[tuple[int, int]] = set()
        for module in self.modules():
            if not isinstance(module, Linear) or module._current() is None:
                continue
            if module is self.lm_head:
                if module._screen() is not None:
                    for m in range(1, sequences + 1):
                        module.argmax(torch.randn(m, module.in_features, generator=gen))
            elif (module.in_features, module.out_features) not in seen:
                seen.add((module.in_features, module.out_features))
                for m in range(1, rows + 1):
                    module(torch.randn(m, module.in_features, generator=gen))
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
    def forward(
        self,
        step: StepInput,
        kv: torch.Tensor,
        *,
        all_logits: bool = False,
        hidden_only: bool = False,
        in_place: bool = True,
    ) -> torch.Tensor:
        """Run ``step``; returns float32 logits ``[sequences, vocab]`` (``[tokens, vocab]`` if
        ``all_logits``), or with ``hidden_only`` the final (normalised) hidden states those logits
        come from, ``[sequences, hidden]``: what :meth:`logits` and :meth:`greedy` take.
        ``in_place``: decode attention reads the blocks in place where it can (see
        :func:`memserve.paged.paged_attention`)."""
        x = self.embed_tokens(step.input_ids)
        cos, sin = self.rope(step.positions)
        layers: list[DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        for i, layer in enumerate(layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn(h, cos, sin, kv, i, step, self.workspace, in_place)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not all_logits:
            x = x[step.last]
        hidden: torch.Tensor = self.norm(x)
        return hidden if hidden_only else self.logits(hidden)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[rows, vocab]`` of final hidden states ``h``.

        The vocabulary projection dominates a decode step of a small model; on CPU it runs on
        oneDNN's packed weight (see :class:`Linear`).
        """
        return self.lm_head(h).float()

    @torch.inference_mode()
    def greedy(self, h: torch.Tensor) -> list[int]:
        """The greedy token of each row of ``h``: ``argmax_rows(logits(h))``, without the whole float32
        vocabulary projection where :meth:`Linear.argmax` can screen it."""
        return self.lm_head.argmax(h)
