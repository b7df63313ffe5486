"""Paged attention of prefill chunks over cached context, against attention written out by hand."""

from __future__ import annotations

import pytest
import torch

from memserve import paged
from memserve.paged import Chunk, StepInput, Workspace, paged_attention

SHAPES = [  # heads, kv_heads, head_dim, block_size
    (8, 4, 64, 16),  # the default model's attention
    (4, 4, 32, 4),  # no grouping
    (8, 2, 16, 8),  # four query heads a KV head
    (6, 1, 8, 3),  # one KV head, a block size that is not a power of two
]
SPANS = [(40, 7), (9, 9), (23, 1), (31, 16)]  # (context after the step, new tokens): cached, fresh, one token


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int) -> torch.Tensor:
    """Causal attention of ``q`` ``[n, heads, dim]``, the last ``n`` positions of ``ctx``, over
    ``keys``/``values`` ``[ctx, kv_heads, dim]``, in float64; ``[n, heads * dim]``."""
    n, heads, dim = q.shape
    group = heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1).transpose(0, 1)  # [heads, ctx, dim]
    v = values.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) / dim**0.5  # [heads, n, ctx]
    seen = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1).reshape(n, heads * dim)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-head"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), SHAPES)
def test_prefill_chunks_over_cached_context_match_reference(
    heads: int, kv_heads: int, dim: int, block: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not packed:  # every chunk over the packed mask's size limit: the per-head path
        monkeypatch.setattr(paged, "PACKED_MASK_MAX", 0)
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads)
    need = [-(-ctx // block) for ctx, _ in SPANS]
    pool = torch.randn(sum(need) + 4, 2, 2, block, kv_heads, dim, generator=gen)
    ids = torch.randperm(len(pool), generator=gen).tolist()
    chunks, at = [], 0
    for (ctx, n), k in zip(SPANS, need):
        chunks.append(Chunk(list(range(n)), ctx - n, ids[at : at + k]))
        at += k
    step = StepInput.build(chunks, block)
    total = sum(n for _, n in SPANS)
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen)
    v = torch.randn(total, kv_heads, dim, generator=gen)
    out = paged_attention(q, k, v, pool, 1, step, Workspace())
    again = paged_attention(q, k, v, pool, 1, step, Workspace())  # a second layer reuses the masks
    assert torch.equal(out, again)
    assert len(step.masks) == (sum(n < ctx for ctx, n in SPANS) if packed else 0)  # once a sequence that needs one
    first = 0
    for (ctx, n), chunk in zip(SPANS, chunks):
        rows = torch.tensor(chunk.table)
        keys = pool[rows, 1, 0].flatten(0, 1)[:ctx]  # the context's K/V, the new tokens' written by the call
        values = pool[rows, 1, 1].flatten(0, 1)[:ctx]
        assert torch.equal(keys[ctx - n :], k[first : first + n])
        want = reference(q[first : first + n], keys, values, ctx)
        torch.testing.assert_close(out[first : first + n].double(), want, rtol=1e-5, atol=1e-5)
        first += n
