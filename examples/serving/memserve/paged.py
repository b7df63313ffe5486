"""Paged attention over MemPool blocks: the step's metadata and the attention that uses it.

A step runs a *chunk* of new tokens for each scheduled sequence (a whole prompt suffix for
prefill, one token for decode) over the KV already in that sequence's blocks::

    MemPool device tensor  [num_blocks, layers, 2, block_size, kv_heads, head_dim]
    layer view kv[:, l]    [num_blocks,         2, block_size, kv_heads, head_dim]
    sequence s             block table [b0, b1, b2]  ->  token at position p lives in
                           block table[p // block_size], slot p % block_size

New K/V are written into their slots first; attention then reads every context token back
through the block table, so a cached prefix, a swapped-in prefix and a fresh prefill all attend
over exactly the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mempool.alloc import gather_view

from .cpu_attention import decode_attention


@dataclass(frozen=True)
class Chunk:
    """One sequence's work in a step: ``tokens`` at positions ``start..start+len-1``."""

    tokens: Sequence[int]
    start: int
    table: Sequence[int]  # the sequence's block ids, covering at least start + len(tokens) tokens


@dataclass(frozen=True)
class StepInput:
    """Flattened tokens of a step plus what attention needs to find each sequence's KV."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] block id receiving each new token's K/V
    slot_offsets: torch.Tensor  # [T] slot within that block
    last: torch.Tensor  # [B] index into T of each sequence's last token
    spans: tuple[tuple[int, int, int], ...]  # per sequence: (first index into T, new tokens, context length)
    tables: torch.Tensor  # [B, max_blocks] padded block tables (padding repeats a real block, masked out)
    context_lens: torch.Tensor  # [B] int64: each sequence's context after the step (its new tokens included)
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] when every sequence has exactly one new token
    # additive masks of sequences that attend to cached context, built by the first layer that
    # needs one and reused by the others: (sequence, query heads per KV head, dtype) -> mask
    masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.spans)

    @classmethod
    def build(cls, chunks: Sequence[Chunk], block_size: int, device: torch.device | str = "cpu") -> StepInput:
        """Vectorised metadata for ``chunks`` (one Python iteration per sequence, none per token)."""
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        lens = np.fromiter((len(c.tokens) for c in chunks), dtype=np.int64, count=len(chunks))
        if (lens <= 0).any():
            raise ValueError("every chunk needs at least one token")
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
        offsets = np.concatenate(([0], np.cumsum(lens)))
        ids = np.concatenate([np.asarray(c.tokens, dtype=np.int64) for c in chunks])
        positions = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
        ctx = starts + lens
        nblocks = -(-ctx // block_size)
        width = int(nblocks.max())
        tables = np.empty((len(chunks), width), dtype=np.int64)
        for i, c in enumerate(chunks):
            row = np.asarray(c.table[: nblocks[i]], dtype=np.int64)
            if row.size < nblocks[i]:
                raise ValueError(f"chunk {i} needs {nblocks[i]} blocks, its table has {row.size}")
            tables[i, : row.size] = row
            tables[i, row.size :] = row[0]
        seq_of = np.repeat(np.arange(len(chunks)), lens)
        slot_blocks = tables[seq_of, positions // block_size]
        decode_mask = None
        if (lens == 1).all():
            span = np.arange(width * block_size)
            decode_mask = torch.from_numpy(span[None, :] < ctx[:, None]).view(len(chunks), 1, 1, -1).to(device)
        as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return cls(
            input_ids=as_t(ids),
            positions=as_t(positions),
            slot_blocks=as_t(slot_blocks),
            slot_offsets=as_t(positions % block_size),
            last=as_t(offsets[1:] - 1),
            spans=tuple(zip(offsets[:-1].tolist(), lens.tolist(), ctx.tolist())),
            tables=as_t(tables),
            context_lens=as_t(ctx),
            decode_mask=decode_mask,
        )


class Workspace:
    """Reusable gather buffers: a fresh multi-MiB tensor per layer would fault its pages in every
    time (about 2 GB/s here, slower than the copy itself)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (contents undefined), reused across calls."""
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    step: StepInput,
    ws: Workspace,
    in_place: bool = True,
) -> torch.Tensor:
    """Write ``k``/``v`` into their slots of ``layer`` in ``kv``, then attend over each sequence's context.

    Args:
        q: ``[T, heads, head_dim]``; k, v: ``[T, kv_heads, head_dim]`` (RoPE applied).
        kv: the pool's KV, ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``.
        in_place: a decode step (one new token per sequence) reads its context straight from the
            blocks where :mod:`memserve.cpu_attention` can serve; ``False``: always gather + SDPA.
    Returns:
        ``[T, heads * head_dim]`` in ``q``'s dtype.
    """
    kv_layer = kv[:, layer]
    kc, vc = kv_layer[:, 0], kv_layer[:, 1]
    kc[step.slot_blocks, step.slot_offsets] = k.to(kc.dtype)
    vc[step.slot_blocks, step.slot_offsets] = v.to(vc.dtype)
    t, heads, dim = q.shape
    if in_place and step.decode_mask is not None:  # one new token per sequence: read the blocks in place
        out = decode_attention(q, kv, layer, step.tables, step.context_lens)
        if out is not None:
            return out
    per_block = kc[0].numel()
    kbuf = ws.get("k", step.tables.numel() * per_block, kc.dtype, kc.device)
    vbuf = ws.get("v", step.tables.numel() * per_block, vc.dtype, vc.device)
    if step.decode_mask is not None:  # one new token per sequence: one batched SDPA call
        keys = gather_view(kc, step.tables, kbuf).flatten(1, 2).transpose(1, 2).to(q.dtype)  # [B, kv_heads, S, D]
        values = gather_view(vc, step.tables, vbuf).flatten(1, 2).transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.view(t, heads, 1, dim), keys, values, attn_mask=step.decode_mask, enable_gqa=True
        )
        return out.reshape(t, heads * dim)
    outs = []
    for i, (first, n, ctx) in enumerate(step.spans):  # one iteration per sequence
        nb = -(-ctx // kc.shape[1])
        table = step.tables[i, :nb]
        # 4-D operands: torch's CPU flash kernel only takes [batch, heads, len, dim]
        keys = (
            gather_view(kc, table, kbuf).flatten(0, 1)[:ctx].transpose(0, 1)[None].to(q.dtype)
        )  # [1, kv_heads, ctx, D]
        values = gather_view(vc, table, vbuf).flatten(0, 1)[:ctx].transpose(0, 1)[None].to(q.dtype)
        query = q[first : first + n].transpose(0, 1)[None]  # [1, heads, n, D]
        group = heads // keys.shape[1]
        if n == ctx:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
        elif group * n * ctx > PACKED_MASK_MAX:
            seen = _causal_tail(n, ctx, q.device)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=seen, enable_gqa=True)
        else:
            # The query heads that share a KV head go as one head of group * n rows (enable_gqa's
            # head order: head h reads KV head h // group): fewer, taller problems, the same math
            # (the same bits in our tests but for one-token chunks, a last-ulp difference). On
            # CPU, up to 15% faster a call for a few dozen new tokens over hundreds cached.
            packed = query.reshape(1, keys.shape[1], group * n, dim)
            mask = _cached_mask(step, i, group, n, ctx, q)
            # reshape, not view: CUDA's kernels may return the heads strided (a copy there)
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask).reshape(1, heads, n, dim)
        outs.append(out[0].transpose(0, 1).reshape(n, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# the most elements a step's packed mask of one sequence may have (16 MiB in float32): a bigger
# chunk attends head by head with a boolean mask built per layer (packing gains 3-5% there)
PACKED_MASK_MAX = 1 << 22


def _causal_tail(n: int, ctx: int, device: torch.device) -> torch.Tensor:
    """``[n, ctx]`` booleans: new token j (the last ``n`` of ``ctx``) sees positions <= ctx - n + j."""
    return torch.arange(ctx, device=device)[None, :] <= torch.arange(ctx - n, ctx, device=device)[:, None]


def _cached_mask(step: StepInput, seq: int, group: int, n: int, ctx: int, q: torch.Tensor) -> torch.Tensor:
    """:func:`_causal_tail` as an additive mask in ``q``'s dtype, repeated for ``group`` query heads
    (``[group * n, ctx]``); built once per step."""
    key = (seq, group, q.dtype)
    mask = step.masks.get(key)
    if mask is None:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        mask = torch.where(_causal_tail(n, ctx, q.device), zero, float("-inf")).repeat(group, 1)
        step.masks[key] = mask
    return mask
