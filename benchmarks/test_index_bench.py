"""Prefix index under a multi-turn chat replay with continuous eviction, and the paper's micro-
benchmarks (insert of a 4K-token prompt; match latency as the cached fraction grows).

Baseline in the same run: a chained block-hash prefix cache of the kind today's engines use
(each block keyed by a hash of its parent's key and its tokens, LRU over unreferenced blocks),
written here in plain Python. Reported: µs per token for match and insert, evictions per
second, hit ratio and index memory per cached token. Run with ``make bench``.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

from benchmarks.workloads import chat_turns
from mempool import MemPool, PoolConfig

BLOCK = 16
DEVICE_BLOCKS = 6000  # ~96K tokens: far less than the replay's working set
ROUNDS = 3


class HashChainCache:
    """The baseline: block hash chain + LRU of cached blocks, as in block-hash prefix caches."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.table: OrderedDict[int, int] = OrderedDict()  # chain hash -> block id (LRU order)
        self.free = list(range(capacity))
        self.evictions = 0

    def _hashes(self, tokens: list[int], nb: int) -> list[int]:
        out, h = [], 0
        for i in range(nb):
            h = hash((h, tuple(tokens[i * BLOCK : (i + 1) * BLOCK])))
            out.append(h)
        return out

    def match(self, tokens: list[int]) -> int:
        hit = 0
        for h in self._hashes(tokens, len(tokens) // BLOCK):
            if h not in self.table:
                break
            self.table.move_to_end(h)
            hit += 1
        return hit

    def insert(self, tokens: list[int]) -> None:
        for h in self._hashes(tokens, len(tokens) // BLOCK):
            if h in self.table:
                self.table.move_to_end(h)
                continue
            if not self.free:
                _, b = self.table.popitem(last=False)
                self.free.append(b)
                self.evictions += 1
            self.table[h] = self.free.pop()


def replay_mempool(turns: list[Any], as_list: bool, host_blocks: int, tails: bool = False) -> dict[str, float]:
    """``tails``: cache each finished sequence as an engine does (``insert_sequence``: its whole
    blocks and its partly filled last block), so eviction under pressure drops tails first."""
    pool = MemPool(
        PoolConfig(
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            block_size=BLOCK,
            dtype="float16",
            device_blocks=DEVICE_BLOCKS,
            host_blocks=host_blocks,
        )
    )
    t_match = t_insert = 0.0
    tok_match = tok_insert = hit = 0
    t0 = time.perf_counter()
    for turn in turns:
        prompt = turn.prompt.tolist() if as_list else turn.prompt
        full = (turn.prompt.tolist() + turn.answer.tolist()) if as_list else np.concatenate((turn.prompt, turn.answer))
        a = time.perf_counter()
        m = pool.match(prompt)
        t_match += time.perf_counter() - a
        tok_match += len(prompt)
        hit += m.num_tokens
        own = pool.alloc(-(-len(full) // BLOCK) - len(m.blocks) if tails else len(full) // BLOCK - len(m.blocks))
        assert own is not None
        blocks = m.blocks.concat(own)
        a = time.perf_counter()
        if tails:
            pool.insert_sequence(full, blocks)
        else:
            pool.insert(full, blocks)
        t_insert += time.perf_counter() - a
        tok_insert += len(full)
        pool.free(own)
        m.release()
    wall = time.perf_counter() - t0
    s = pool.stats()["index"]
    evicted = s["dropped_device"] + s["demoted"]
    pool.check_invariants()
    return {
        "match_us_per_token": t_match / tok_match * 1e6,
        "insert_us_per_token": t_insert / tok_insert * 1e6,
        "hit_ratio": hit / tok_match,
        "evictions_per_s": evicted / wall,
        "bytes_per_cached_token": index_bytes(pool) / max(1, (s["device_cached"] + s["host_cached"]) * BLOCK),
    }


def index_bytes(pool: MemPool) -> int:
    """Memory the tree itself holds (nodes, keys, id arrays, child maps, block->node maps)."""
    idx = pool.index
    total = sum(a.nbytes for a in idx._where.values()) + sys.getsizeof(idx._nodes)
    for node in idx._nodes.values():
        total += sys.getsizeof(node) + sys.getsizeof(node.key) + sys.getsizeof(node.children) + 56
        for ids in (node.device, node.host):
            if ids is not None:
                total += ids.nbytes + 112
    return total


def replay_baseline(turns: list[Any]) -> dict[str, float]:
    cache = HashChainCache(DEVICE_BLOCKS)
    t_match = t_insert = 0.0
    tok_match = tok_insert = hit = 0
    t0 = time.perf_counter()
    for turn in turns:
        prompt = turn.prompt.tolist()
        full = prompt + turn.answer.tolist()
        a = time.perf_counter()
        h = cache.match(prompt)
        t_match += time.perf_counter() - a
        hit += h * BLOCK
        tok_match += len(prompt)
        a = time.perf_counter()
        cache.insert(full)
        t_insert += time.perf_counter() - a
        tok_insert += len(full)
    wall = time.perf_counter() - t0
    per_entry = sys.getsizeof(0) * 2 + 100  # key int, value int, OrderedDict link + slot
    return {
        "match_us_per_token": t_match / tok_match * 1e6,
        "insert_us_per_token": t_insert / tok_insert * 1e6,
        "hit_ratio": hit / tok_match,
        "evictions_per_s": cache.evictions / wall,
        "bytes_per_cached_token": per_entry / BLOCK,
    }


# what peer engines' prefix indexes take per token (us, fastest and slowest); goal: 5x below the fastest
PEER_US = {"match": (0.09, 0.29), "insert": (0.06, 0.11)}
PEERS = (
    "peer engines: "
    + ", ".join(f"{k} {lo}-{hi} us/token" for k, (lo, hi) in PEER_US.items())
    + " (goal: 5x below the best)"
)


@pytest.mark.parametrize(
    "impl",
    [
        "mempool (numpy tokens)",
        "mempool (list tokens)",
        "mempool + host tier",
        "mempool + tails",
        "hash chain (baseline)",
    ],
)
def test_chat_replay(benchmark: Any, report: Any, impl: str) -> None:
    turns = chat_turns(conversations=300, seed=1)
    if impl.startswith("hash"):
        run = lambda: replay_baseline(turns)  # noqa: E731
    else:
        run = lambda: replay_mempool(  # noqa: E731
            turns, as_list="list" in impl, host_blocks=12000 if "host" in impl else 0, tails="tails" in impl
        )
    # three replays, each on a fresh pool; the median of each figure (this shared 2-core machine
    # drifts by tens of percent between runs, mostly on the first)
    runs = [benchmark.pedantic(run, rounds=1, iterations=1)] + [run() for _ in range(ROUNDS - 1)]
    out = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    report.note(
        "index_chat_replay",
        f"{len(turns)} requests, {sum(len(t.prompt) for t in turns):,} prompt tokens, "
        f"median of {ROUNDS} replays; {PEERS}",
    )
    report.add(
        "index_chat_replay",
        impl=impl,
        **out,
        match_goal_met=out["match_us_per_token"] <= PEER_US["match"][0] / 5,
        insert_goal_met=out["insert_us_per_token"] <= PEER_US["insert"][0] / 5,
    )
    report.plot("index_chat_replay", draw_chat_replay)


def draw_chat_replay(rows: list[dict[str, Any]], ax: Any) -> None:
    """Match and insert time per token of each index, beside the peer engines' range and the goal."""
    for j, op in enumerate(PEER_US):
        xs = [i + (j - 0.5) * 0.4 for i in range(len(rows))]
        bars = ax.bar(xs, [r[f"{op}_us_per_token"] for r in rows], 0.4, label=op)
        colour = bars.patches[0].get_facecolor()
        lo, hi = PEER_US[op]
        ax.axhspan(lo, hi, color=colour, alpha=0.15, label=f"peer engines: {op}")
        ax.axhline(lo / 5, color=colour, ls="--", lw=1, label=f"goal: {op}")
    ax.set_xticks(range(len(rows)), [r["impl"].replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set(yscale="log", ylabel="us per prompt token")
    ax.legend(fontsize=7, ncol=3)


def test_paper_microbenchmarks(report: Any) -> None:
    """Insert of a 4K-token prompt (paper: up to 0.7 ms) and match latency vs cached fraction (paper: flat)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 128_000, 4096, dtype=np.int32)
    reps = 200
    for form in ("numpy", "list"):
        tokens = prompt if form == "numpy" else prompt.tolist()
        times = []
        for _ in range(reps):
            pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BLOCK, device_blocks=512))
            blocks = pool.alloc(256)
            a = time.perf_counter()
            pool.insert(tokens, blocks)
            times.append(time.perf_counter() - a)
        report.add("paper_insert_4k", tokens=form, median_ms=float(np.median(times)) * 1e3, paper_ms=0.7)
    pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BLOCK, device_blocks=512))
    pool.insert(prompt, pool.alloc(256))
    other = rng.integers(0, 128_000, 4096, dtype=np.int32)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        cut = int(4096 * frac)
        query = np.concatenate((prompt[:cut], other[cut:]))
        times = []
        for _ in range(reps):
            a = time.perf_counter()
            pool.match(query).release()
            times.append(time.perf_counter() - a)
        report.add("paper_match_vs_cached_fraction", cached_fraction=frac, median_us=float(np.median(times)) * 1e6)

    def draw(rows: list[dict[str, Any]], ax: Any) -> None:
        ax.plot([r["cached_fraction"] for r in rows], [r["median_us"] for r in rows], marker="o")
        ax.set(xlabel="cached fraction of a 4K-token prompt", ylabel="match latency (us)", ylim=(0, None))

    report.plot("paper_match_vs_cached_fraction", draw)


def _pressed_pool(sequences: int, tails: bool) -> MemPool:
    """A device tier full of finished two-block sequences, cached with their partly filled last
    block as a tail (an engine's ``insert_sequence``) or as whole blocks only; no free block."""
    pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BLOCK, device_blocks=2 * sequences))
    for i in range(sequences):
        blocks = pool.alloc(2)
        assert blocks is not None
        tokens = [i, *range(1, BLOCK)] + [7] * (BLOCK // 2 if tails else BLOCK)
        pool.insert_sequence(tokens, blocks)
        pool.free(blocks)
    assert pool.stats()["device"]["free"] == 0 and pool.stats()["index"]["tails"] == (sequences if tails else 0)
    return pool


def test_tails_at_scale(report: Any) -> None:
    """With every cached sequence's tail kept, against the same sequences as whole blocks only, as
    the number of cached sequences grows: one block allocated on a full device tier (each
    allocation evicts; tails go first), and a sequence deleted (its tail goes with it).
    Goal: flat in the number of tails (neither may walk all of them)."""
    ops = 500  # at most half the sequences of the smaller pool
    for sequences in (1_000, 20_000):
        row: dict[str, Any] = {"cached_sequences": sequences}
        for tails in (False, True):
            alloc_s, delete_s = [], []
            for _ in range(ROUNDS):
                pool = _pressed_pool(sequences, tails)
                a = time.perf_counter()
                for i in range(ops):
                    assert pool.delete([sequences - 1 - i, *range(1, BLOCK)]) == (1 if tails else 2)
                delete_s.append((time.perf_counter() - a) / ops)
                pool = _pressed_pool(sequences, tails)
                a = time.perf_counter()
                for _ in range(ops):
                    assert pool.alloc(1) is not None
                alloc_s.append((time.perf_counter() - a) / ops)
                pool.check_invariants()
            which = "tails" if tails else "whole_blocks"
            row[f"alloc_{which}_us"] = float(np.median(alloc_s)) * 1e6
            row[f"delete_{which}_us"] = float(np.median(delete_s)) * 1e6
        row["alloc_ratio"] = row["alloc_tails_us"] / row["alloc_whole_blocks_us"]
        row["delete_ratio"] = row["delete_tails_us"] / row["delete_whole_blocks_us"]
        report.add("index_tails_at_scale", **row)
    report.note("index_tails_at_scale", f"median of {ROUNDS} pools, {ops} one-block allocations or deletes each")
