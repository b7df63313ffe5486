"""swap_out / swap_in bandwidth against memcpy of the same bytes and a naive per-block,
per-layer copy loop, measured in the same run.

Goal (CPU): at least 80% of memcpy bandwidth for batches of 256+ blocks and at least 20x the
naive loop. Blocks are the default memserve model's: 8 layers x K,V x 16 tokens x 4 heads x
64 dims, fp16 = 128 KiB each. Run with ``make bench``. Where CUDA exists the same runs also
swap between GPU memory and the pinned host tier, next to one plain ``copy_`` of the same bytes
from GPU memory into pinned memory.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.timing import best
from mempool import Blocks, MemPool, PoolConfig, Tier

SIZES = [1, 16, 256, 2048]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def make_pool(n: int, device: str = "cpu") -> MemPool:
    pool = MemPool(
        PoolConfig(
            num_layers=8,
            num_kv_heads=4,
            head_dim=64,
            block_size=16,
            dtype="float16",
            device_blocks=2 * n + 8,
            host_blocks=2 * n + 8,
            device=device,
        )
    )
    pool.kv().normal_()  # touch every page: untouched memory reads from the zero page and flatters
    pool.kv(Tier.HOST).fill_(1)
    return pool


def blocks_for(pool: MemPool, n: int, layout: str) -> Blocks:
    if layout == "run":
        got = pool.alloc(n)
        assert got is not None
        return got
    run = pool.alloc(2 * n)  # every other block: n runs of one
    assert run is not None
    pool.free(run[1::2])
    return run[::2]


def naive_copy(pool: MemPool, src: Blocks, dst: Blocks) -> None:
    """One copy per block and per layer, K and V apart: what a per-layer KV layout forces."""
    s, d = pool.kv(Tier.DEVICE), pool.kv(Tier.HOST)
    for a, b in zip(src.tolist(), dst.tolist()):
        for layer in range(s.shape[1]):
            d[b, layer, 0].copy_(s[a, layer, 0])
            d[b, layer, 1].copy_(s[a, layer, 1])


@pytest.mark.parametrize("layout", ["run", "scattered"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_swap_bandwidth(report: Any, device: str, n: int, layout: str) -> None:
    pool = make_pool(n, device)
    blocks = blocks_for(pool, n, layout)
    nbytes = n * pool.config.layout.block_bytes
    reps = 30 if n <= 256 else 8
    state = {"dev": blocks}

    def out_and_in() -> None:
        host = pool.swap_out(state["dev"])
        state["dev"] = pool.swap_in(host)

    t_pair = best(out_and_in, reps)
    # swap_out alone, timed separately (swap_in of the result restores the state untimed)
    outs = []
    for _ in range(reps):
        a = time.perf_counter()
        host = pool.swap_out(state["dev"])
        outs.append(time.perf_counter() - a)
        state["dev"] = pool.swap_in(host)
    t_out = float(np.median(outs))
    t_in = max(t_pair - t_out, 1e-9)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.ones(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")  # what the host tier is

    def memcpy() -> None:
        dst.copy_(src, non_blocking=True)
        if device == "cuda":  # pragma: no cover - needs a GPU
            torch.cuda.synchronize()

    t_memcpy = best(memcpy, reps)
    host = pool.alloc(n, Tier.HOST)
    t_naive = best(lambda: naive_copy(pool, state["dev"], host), max(2, reps // 4))
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731
    report.note(
        "swap_bandwidth",
        "GB/s; memcpy = one torch copy_ of the same bytes, touched memory, same run "
        "(device cuda: from GPU memory into pinned host memory)",
    )
    report.add(
        "swap_bandwidth",
        device=device,
        blocks=n,
        layout=layout,
        swap_out=gbs(t_out),
        swap_in=gbs(t_in),
        memcpy=gbs(t_memcpy),
        naive_loop=gbs(t_naive),
        out_vs_memcpy=t_memcpy / t_out,
        in_vs_memcpy=t_memcpy / t_in,
        out_vs_naive=t_naive / t_out,
    )
    pool.check_invariants()

    def draw(rows: list[dict[str, Any]], ax: Any) -> None:
        for dev in dict.fromkeys(r["device"] for r in rows):
            for key, style in (("swap_out", "-o"), ("swap_in", "-s"), ("memcpy", "--"), ("naive_loop", ":")):
                for lay in ("run", "scattered"):
                    pts = [(r["blocks"], r[key]) for r in rows if r["layout"] == lay and r["device"] == dev]
                    if not pts or (key == "memcpy" and lay == "scattered"):
                        continue
                    ax.plot(*zip(*pts), style, label=f"{dev}: {key}" + ("" if key == "memcpy" else f" ({lay})"))
        ax.set(xscale="log", xlabel="blocks per swap (128 KiB each)", ylabel="GB/s")
        ax.legend(fontsize=7)

    report.plot("swap_bandwidth", draw)
