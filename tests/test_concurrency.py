"""Many threads on one MemPool at once, as engines and transfer agents use it: request
lifecycles over shared prefixes (match with and without promotion, copy_tail, insert_sequence),
synchronous and asynchronous swaps, evictions on both tiers and deletes, on a pool small enough
that they keep evicting and demoting each other's prefixes. Every block a thread reads through
a match holds exactly the K/V of its tokens; no call deadlocks; the pool's invariants hold and
nothing is leaked at the end. Seeded per thread (the interleaving itself is the OS's)."""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
from typing import Any

import numpy as np
import torch

from mempool import MemPool, Tier
from mempool.errors import BlockLockedError

from .conftest import BLOCK_SIZE, make_pool

THREADS = 4
OPERATIONS = 250  # per thread
SEED = os.environ.get("MEMPOOL_CONCURRENCY_SEED", "0")


def kv_of(tokens: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Stand-in K/V of the block ending at ``len(tokens)``: a function of those tokens alone."""
    seed = int.from_bytes(hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).digest()[:8], "little")
    return torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))


def expected(tokens: list[int], blocks: int, shape: tuple[int, ...]) -> torch.Tensor:
    """What the first ``blocks`` whole blocks of ``tokens`` must hold."""
    return torch.stack([kv_of(tokens[: (i + 1) * BLOCK_SIZE], shape) for i in range(blocks)])


class Worker:
    def __init__(self, pool: MemPool, index: int, shared: list[int]) -> None:
        self.pool, self.rng = pool, random.Random(f"{SEED}-{index}")
        self.shape = pool.config.layout.block_shape
        self.shared = shared  # every thread's conversations may start with it
        self.ns = None if index % 2 else "odd"  # two namespaces, two threads each
        self.convs: list[list[int]] = [[] for _ in range(3)]
        self.seen: dict[str, int] = {}
        self.error: BaseException | None = None

    def note(self, what: str) -> None:
        self.seen[what] = self.seen.get(what, 0) + 1

    def run(self) -> None:
        try:
            for _ in range(OPERATIONS):
                op = self.rng.choices([self.request, self.swap, self.evict, self.delete], [8, 2, 1, 1])[0]
                op()
        except BaseException as exc:  # reported by the test, with the thread's history
            self.error = exc

    def check(self, tokens: list[int], match: Any) -> None:
        """The matched blocks (both tiers) hold exactly the K/V of ``tokens``' blocks."""
        n_dev, n_host = len(match.blocks), len(match.host_blocks)
        if n_dev:
            got = self.pool.storage(Tier.DEVICE).gather(match.blocks.ids)
            assert torch.equal(got, expected(tokens, n_dev, self.shape)), "device blocks hold other K/V"
        if n_host:
            got = self.pool.storage(Tier.HOST).gather(match.host_blocks.ids)
            want = expected(tokens, n_dev + n_host, self.shape)[n_dev:]
            assert torch.equal(got, want), "host blocks hold other K/V"

    def request(self) -> None:
        """One turn: reuse what is cached, compute (write) the rest, cache the whole sequence."""
        rng, bs = self.rng, BLOCK_SIZE
        c = rng.randrange(len(self.convs))
        if not self.convs[c] or len(self.convs[c]) > 60:
            self.convs[c] = (self.shared[:] if rng.random() < 0.5 else []) + [rng.randrange(1, 1000)]
        tokens = self.convs[c] = self.convs[c] + [rng.randrange(1, 1000) for _ in range(rng.randint(1, 10))]
        with self.pool.match(tokens[:-1], self.ns, promote=rng.random() < 0.5) as m:
            self.check(tokens, m)
            hit = len(m.blocks)
            own = self.pool.alloc(-(-len(tokens) // bs) - hit)
            if own is None:
                self.note("no room")
                return
            try:
                if rng.random() < 0.5:  # a kept tail: its first slots are valid; we write it all anyway
                    self.pool.copy_tail(tokens[:-1], hit * bs, own[:1], self.ns)
                rows = [kv_of(tokens[: min(len(tokens), (hit + i + 1) * bs)], self.shape) for i in range(len(own))]
                self.pool.storage().scatter(own.ids, torch.stack(rows))
                self.pool.insert_sequence(tokens, m.blocks.concat(own), self.ns)
                self.note("cached" if not hit else "reused")
            finally:
                self.pool.free(own)

    def swap(self) -> None:
        """A sequence's own blocks out to the host and back, bit exact."""
        n = self.rng.randint(1, 6)
        blocks = self.pool.alloc(n)
        if blocks is None:
            return self.note("no room")
        data = torch.rand((n, *self.shape))
        self.pool.storage().scatter(blocks.ids, data)
        asynchronous = self.rng.random() < 0.5
        if asynchronous:
            handle = self.pool.swap_out_async(blocks)
            out = None if handle is None else handle.wait()
        else:
            out = self.pool.swap_out(blocks)
        if out is None:  # the host had no room: still ours, on the device
            self.note("host full")
            self.pool.free(blocks)
            return
        assert torch.equal(self.pool.storage(Tier.HOST).gather(out.ids), data)
        back = self.pool.swap_in(out)
        if back is None:
            self.note("device full")
            self.pool.free(out)
            return
        assert torch.equal(self.pool.storage().gather(back.ids), data)
        self.pool.free(back)
        self.note("swapped async" if asynchronous else "swapped")

    def evict(self) -> None:
        self.pool.evict(self.rng.randint(1, 8), self.rng.choice([Tier.DEVICE, Tier.HOST]))
        self.note("evicted")

    def delete(self) -> None:
        tokens = self.rng.choice(self.convs)
        if len(tokens) < BLOCK_SIZE:
            return
        try:
            self.pool.delete(tokens[: self.rng.randint(1, len(tokens) // BLOCK_SIZE) * BLOCK_SIZE], self.ns)
            self.note("deleted")
        except BlockLockedError:  # another thread's request holds that prefix right now
            self.note("delete refused: locked")


def test_threads_share_one_pool_without_corrupting_or_leaking() -> None:
    pool = make_pool(device_blocks=48, host_blocks=32)
    shared = [random.Random(SEED).randrange(1, 1000) for _ in range(6)]
    workers = [Worker(pool, i, shared) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run, name=f"worker-{i}") for i, w in enumerate(workers)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every few bytecodes, not every 5 ms: more interleavings
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    for w in workers:
        if w.error is not None:
            raise w.error
    pool.check_invariants()
    for w in workers:  # what is cached at the end is still exactly its tokens' K/V
        for tokens in w.convs:
            with pool.match(tokens, w.ns) as m:
                w.check(tokens, m)
    stats = pool.stats()
    assert stats["device"]["used"] == stats["device"]["cached"], stats["device"]  # only the cache holds blocks
    assert stats["host"]["used"] == stats["host"]["cached"], stats["host"]
    seen = {k: sum(w.seen.get(k, 0) for w in workers) for k in ("cached", "reused", "swapped", "swapped async")}
    print(f"threads: {seen}, index: {stats['index']}")
    assert all(seen.values()), seen  # every kind of work really ran, concurrently
    assert stats["index"]["demoted"] and stats["index"]["dropped_host"], stats["index"]  # under pressure
    pool.close()


def test_the_stand_in_kv_is_a_function_of_the_tokens_alone() -> None:
    shape = (2, 2, BLOCK_SIZE, 2, 4)
    assert torch.equal(kv_of([1, 2, 3], shape), kv_of([1, 2, 3], shape))
    assert not torch.equal(kv_of([1, 2, 3], shape), kv_of([1, 2, 4], shape))
    assert expected([5, 6, 7, 8, 9, 10, 11, 12, 13], 2, shape).shape == (2, *shape)
