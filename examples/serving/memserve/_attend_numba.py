"""The numba parts of :mod:`memserve.cpu_attention` (imported only where numba is installed)."""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

# reassociation lets LLVM vectorise the dot products and the exponentials; the order is still
# fixed per (sequence, head), so results are reproducible
FASTMATH = {"reassoc", "nsz", "contract"}


@numba.njit(inline="always", fastmath=FASTMATH)  # type: ignore[misc]
def _exp(x: Any) -> Any:
    """``exp(x)`` in float32 for ``x <= 0`` in operations LLVM vectorises (libm's ``expf`` is a
    scalar call); NaN stays NaN, below -87 (under float32's normal range) gives 0. Inlined, it
    takes the kernel's fastmath flags, whose reassociation merges the two-part reduction: within
    5 ulp of the exact value (sampled: 4.4 at most, near -86)."""
    c = x if x > np.float32(-87.0) else np.float32(-87.0)  # NaN and -inf: a value fptosi may take
    k = np.float32(math.floor(c * np.float32(1.4426950408889634) + np.float32(0.5)))
    f = c - k * np.float32(0.693145751953125)  # Cody-Waite: ln 2 in two parts
    f = f - k * np.float32(1.428606765330187e-06)
    p = np.float32(1.9875691500e-4)
    p = p * f + np.float32(1.3981999507e-3)
    p = p * f + np.float32(8.3334519073e-3)
    p = p * f + np.float32(4.1665795894e-2)
    p = p * f + np.float32(1.6666665459e-1)
    p = p * f + np.float32(5.0000001201e-1)
    p = p * f * f + f + np.float32(1.0)
    y = p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)
    return y if x > np.float32(-87.0) else (x if x != x else np.float32(0.0))


def build(whole: bool) -> Any:
    """The kernel ``attend(q, kv, layer, tables, lens, scale, out)`` (see :mod:`memserve.cpu_attention`)
    whose tasks take all KV heads of a sequence (``whole``) or one."""

    @numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)  # type: ignore[misc]
    def attend(q: Any, kv: Any, layer: int, tables: Any, lens: Any, scale: float, out: Any) -> None:
        # q, out [B, H, D]; kv [blocks, layers, 2, block_size, KVH, D]; tables [B, W]; lens [B]
        batch, heads, dim = q.shape
        block, kv_heads = kv.shape[3], kv.shape[4]
        group = heads // kv_heads
        span = kv_heads if whole else 1  # `whole` is a compile-time constant: two kernels
        tasks = 1 if whole else kv_heads
        rows = span * group
        for job in numba.prange(batch * tasks):
            b = job // tasks
            h0 = (job - b * tasks) * span
            r0 = h0 * group
            n = lens[b]
            nb = (n + block - 1) // block
            s = np.empty((rows, block), np.float32)
            o = np.zeros((rows, dim), np.float32)
            top = np.full(rows, -np.inf, np.float32)
            total = np.zeros(rows, np.float32)
            for j in range(nb):
                kb = kv[tables[b, j], layer, 0]
                vb = kv[tables[b, j], layer, 1]
                m = min(block, n - j * block)
                for t in range(m):  # scores of this block's tokens
                    for h in range(span):
                        k = kb[t, h0 + h]
                        for g in range(group):
                            qr = q[b, r0 + h * group + g]
                            acc = np.float32(0.0)
                            for d in range(dim):
                                acc += qr[d] * k[d]
                            s[h * group + g, t] = acc * scale
                for r in range(rows):  # online softmax: rescale what came before to the new maximum
                    peak = top[r]
                    for t in range(m):
                        peak = max(peak, s[r, t])
                    if peak > top[r]:
                        shrink = _exp(top[r] - peak)
                        total[r] *= shrink
                        for d in range(dim):
                            o[r, d] *= shrink
                        top[r] = peak
                    acc = np.float32(0.0)
                    for t in range(m):
                        e = _exp(s[r, t] - peak)
                        s[r, t] = e
                        acc += e
                    total[r] += acc
                for t in range(m):
                    for h in range(span):
                        v = vb[t, h0 + h]
                        for g in range(group):
                            r = h * group + g
                            p = s[r, t]
                            for d in range(dim):
                                o[r, d] += p * v[d]
            for r in range(rows):
                inv = np.float32(1.0) / total[r]
                for d in range(dim):
                    out[b, r0 + r, d] = o[r, d] * inv

    return attend
