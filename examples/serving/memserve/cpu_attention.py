"""Decode attention on CPU that reads K/V in place from the pool's blocks (no gather).

A decode step's attention is memory-bound: every context token's K and V are read once per
step. The portable path (:func:`memserve.paged.paged_attention`) first gathers each sequence's
blocks into a contiguous buffer for SDPA, so it moves the context three times (read, write,
read again). This kernel walks each sequence's block table itself and reads every K/V row once,
straight from the pool tensor, in one pass: block by block, the block's scores, an online
softmax (what came before is rescaled when the maximum grows), and its values; its
exponentials are vectorised (libm's are scalar calls). Inside a decode step of the default model
at batch 16 and 256 tokens of context, its 8 layers take 3.4 ms against 4.75 ms for the two-pass
kernel it replaced (all scores, then all values), measured interleaved on this 2-core machine.

It is compiled by numba (the ``serving`` extra) on first use and cached on disk; where numba is
missing, its threading layer is not thread-safe, or the tensors are not CPU float32 with the
pool C-contiguous, :func:`decode_attention` returns ``None`` and the caller uses the portable path.

A (sequence, head)'s arithmetic, and its order, depend neither on the rest of the batch nor on
how the work is split into tasks, so a sequence's output has the same bits whatever it is batched
with.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Any

import numpy as np
import torch

from mempool.errors import InvalidArgumentError

_kernels: tuple[Any, Any] = (None, None)  # tasks of one KV head, tasks of a whole sequence
_threads = 1  # numba's thread pool size
_ready: bool | None = None  # None: not tried yet
_lock = threading.Lock()


def available() -> bool:
    """Whether the kernel can serve here: compiles it (or loads it from numba's cache) on the first
    call, and checks that numba runs it on a thread-safe threading layer."""
    global _kernels, _ready, _threads
    if _ready is None:
        with _lock:
            if _ready is None:
                _ready = False
                try:
                    import numba
                except ImportError:  # the serving extra is not installed: the portable path serves
                    return False
                # numba's OpenMP pool is a second libgomp beside torch's; by default its idle
                # workers spin on the cores torch's next op needs. That runtime reads its wait
                # policy when it loads, i.e. on the first launch below: passive makes them sleep
                # (batch 16 steps ~10% faster and steadier here). torch's runtime is loaded already.
                ours = "OMP_WAIT_POLICY" not in os.environ  # a user's own setting stands
                if ours:
                    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
                try:
                    kernels = _compile()
                except Exception as e:  # numba present but unable to build here: say so, use the portable path
                    warnings.warn(f"memserve: the in-place decode attention kernel is off ({e!r})", stacklevel=2)
                    return False
                finally:
                    if ours:
                        os.environ.pop("OMP_WAIT_POLICY", None)
                _kernels, _threads = kernels, numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
                _ready = numba.threading_layer() in ("omp", "tbb")  # type: ignore[attr-defined]
    return _ready


def _compile() -> tuple[Any, Any]:
    """Both kernels, each run once on a tiny input."""
    from ._attend_numba import build

    kernels = (build(False), build(True))
    one = np.ones((1, 1), np.int64)
    out = np.zeros((1, 1, 1), np.float32)
    for kernel in kernels:
        kernel(out.copy(), np.zeros((1, 1, 2, 1, 1, 1), np.float32), 0, one * 0, one[0], 1.0, out)
    return kernels


def decode_attention(
    q: torch.Tensor, kv: torch.Tensor, layer: int, tables: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor | None:
    """Attention of one new token per sequence over its context, or ``None`` where this kernel
    cannot serve (see the module's docstring).

    Args:
        q: ``[B, heads, head_dim]``, RoPE applied.
        kv: the pool's whole device tensor ``[blocks, layers, 2, block_size, kv_heads, head_dim]``,
            already holding the new tokens' K/V.
        tables: ``[B, width]`` block tables; lens: ``[B]`` context lengths (new token included).
    Returns:
        ``[B, heads * head_dim]``.
    Raises:
        InvalidArgumentError: shapes that do not fit, or block ids, a layer or context lengths
            outside the pool or the tables (nothing is read or written).
    """
    if not (
        q.device.type == kv.device.type == "cpu"
        and q.dtype == kv.dtype == torch.float32
        and kv.is_contiguous()
        and available()
    ):
        return None
    import numba

    batch, heads, dim = q.shape
    blocks, layers, _, block, kv_heads, kv_dim = kv.shape
    tab = tables.to(torch.int64).contiguous().numpy()
    n = lens.to(torch.int64).contiguous().numpy()
    # the kernel trusts its indices (no bounds checks): prove them here, it is a few microseconds
    if not (
        dim == kv_dim
        and heads % kv_heads == 0
        and 0 <= layer < layers
        and tab.shape[0] == n.shape[0] == batch
        and tab.size
        and 0 <= tab.min()
        and tab.max() < blocks
        and 1 <= n.min()
        and n.max() <= tab.shape[1] * block
    ):
        raise InvalidArgumentError("decode_attention: shapes, block ids or context lengths out of range")
    threads = max(1, min(torch.get_num_threads(), _threads))
    numba.set_num_threads(threads)
    # a task a sequence streams each block row once; a task a KV head keeps every thread busy on
    # small batches. Both do the same arithmetic in the same order, so the bits agree
    kernel = _kernels[batch >= 2 * threads]
    out = torch.empty_like(q)
    kernel(q.contiguous().numpy(), kv.numpy(), layer, tab, n, 1.0 / math.sqrt(dim), out.numpy())
    return out.view(batch, -1)
