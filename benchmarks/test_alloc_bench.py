"""alloc + free of n blocks: MemPool and its allocator against a naive per-block free list.

The MemServe paper reports about 800 ns per block for its memory APIs; the goal is 10x below
that for batched calls. Run with ``make bench``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from mempool import MemPool, PoolConfig, Tier
from mempool.alloc.allocator import BlockAllocator

CAPACITY = 8192
SIZES = [1, 16, 256, 4096]
PAPER_NS = 800.0


class NaiveAllocator:
    """The textbook design: a deque of free block ids and a refcount per block, one at a time."""

    def __init__(self, capacity: int) -> None:
        self.free_ids = deque(range(capacity))
        self.refs = [0] * capacity

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self.free_ids):
            return None
        out = []
        for _ in range(n):
            b = self.free_ids.popleft()
            self.refs[b] = 1
            out.append(b)
        return out

    def free(self, ids: list[int]) -> None:
        for b in ids:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_ids.append(b)


def make_impl(name: str) -> tuple[Any, Any]:
    if name == "mempool":
        pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, device_blocks=CAPACITY))
        return pool.alloc, pool.free
    if name == "allocator":
        a = BlockAllocator(Tier.DEVICE, CAPACITY, owner=None)
        return a.allocate, a.free
    naive = NaiveAllocator(CAPACITY)
    return naive.alloc, naive.free


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["mempool", "allocator", "naive"])
def test_alloc_free(benchmark: Any, report: Any, impl: str, n: int) -> None:
    alloc, free = make_impl(impl)
    # fragment the pool a little, as a running server's would be
    held = [alloc(3) for _ in range(200)]
    for h in held[::2]:
        free(h)

    def cycle() -> None:
        free(alloc(n))

    benchmark.pedantic(cycle, rounds=200 if n < 4096 else 60, iterations=5, warmup_rounds=5)
    ns = benchmark.stats.stats.median * 1e9 / n
    report.add("alloc_free", impl=impl, blocks=n, ns_per_block=ns, paper_ns=PAPER_NS, below_paper=PAPER_NS / ns)
    if impl == "naive":
        rows = {r["impl"]: r for r in report.tables["alloc_free"] if r["blocks"] == n}
        if "mempool" in rows:
            report.add(
                "alloc_free_ratio",
                blocks=n,
                mempool_ns=rows["mempool"]["ns_per_block"],
                naive_ns=ns,
                speedup_vs_naive=ns / rows["mempool"]["ns_per_block"],
                below_paper_800ns=PAPER_NS / rows["mempool"]["ns_per_block"],
            )

    def draw(rows: list[dict[str, Any]], ax: Any) -> None:
        for name in ("mempool", "allocator", "naive"):
            pts = [(r["blocks"], r["ns_per_block"]) for r in rows if r["impl"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(PAPER_NS, color="gray", ls="--", label="paper (800 ns)")
        ax.set(xscale="log", yscale="log", xlabel="blocks per call", ylabel="ns per block (alloc + free)")
        ax.legend()

    report.plot("alloc_free", draw)
