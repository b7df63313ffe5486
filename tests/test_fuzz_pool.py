"""Fuzz the public MemPool API with random valid and invalid calls (hypothesis state machine).

Every call either succeeds or raises a typed error (a ``MemPoolError``; misuse ones are also
``ValueError``), and the pool's invariants hold after every call, errors included. At times every
copy between tiers fails (as a device error would): the calls that copy raise it, and still
nothing leaks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mempool.transport.swap as swap_module
from mempool import Blocks, MemPool, PoolConfig, Tier
from mempool.errors import MemPoolError
from tests.conftest import examples

TOKENS = st.one_of(
    st.lists(st.integers(0, 5), max_size=12),  # small alphabet: prefixes collide often
    st.lists(st.integers(-3, 2**31 + 5), max_size=6),  # out-of-range ids
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),
    st.just("not tokens"),
    st.just([[1, 2], [3, 4]]),
)
TIERS = st.sampled_from([Tier.DEVICE, Tier.HOST, "device", "host", "gpu", 3])
COUNTS = st.one_of(st.integers(-2, 12), st.just(1.5), st.just(True), st.just("2"))


class _CopyFailed(RuntimeError):
    pass


class PoolFuzz(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False  # every copy between tiers raises while set (swaps, promotions, demotions)
        real = self._real_copy = swap_module.copy_blocks

        def copy_blocks(*args: Any, **kwargs: Any) -> None:
            if self.failing:
                raise _CopyFailed("injected")
            real(*args, **kwargs)

        swap_module.copy_blocks = copy_blocks  # type: ignore[assignment]
        self.pool = MemPool(
            PoolConfig(
                num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, device_blocks=8, host_blocks=4, dtype="float32"
            )
        )
        self.refs: Counter[tuple[Tier, int]] = Counter()  # references we own, per block
        self.matches: list[Any] = []

    def call(self, fn: Any, *args: Any, **kw: Any) -> tuple[bool, Any]:
        try:
            return True, fn(*args, **kw)
        except MemPoolError:
            return False, None  # typed: fine (a ValueError too where it is misuse)
        except _CopyFailed:
            assert self.failing
            return False, None  # what the failed copy had taken was given back (the invariants say)

    def pick(self, data: st.DataObject) -> Blocks:
        """Some of our blocks (one tier), or ids we may not hold at all."""
        tier = data.draw(st.sampled_from([Tier.DEVICE, Tier.HOST]))
        ours = sorted({i for t, i in self.refs if t is tier})
        if ours and data.draw(st.booleans()):
            return Blocks(tier, data.draw(st.lists(st.sampled_from(ours), min_size=1, max_size=3, unique=True)))
        return Blocks(tier, data.draw(st.lists(st.integers(-1, 9), max_size=3)))

    def own(self, blocks: Blocks, k: int) -> None:
        for i in blocks.tolist():
            self.refs[(blocks.tier, i)] += k
            assert self.refs[(blocks.tier, i)] >= 0

    @rule(n=COUNTS, tier=TIERS)
    def alloc(self, n: Any, tier: Any) -> None:
        _, got = self.call(self.pool.alloc, n, tier)
        if got is not None:
            assert len(got) == n
            self.own(got, 1)

    def ours(self, blocks: Blocks) -> bool:
        """Whether we hold a reference for every entry of ``blocks`` (a block given twice: two)."""
        return all(self.refs[(blocks.tier, i)] >= k for i, k in Counter(blocks.tolist()).items())

    def free_(self, blocks: Blocks) -> None:
        # every reference is ours or the index's, so what we hold frees and anything else is
        # refused: the index's references are not the caller's to drop
        ok, _ = self.call(self.pool.free, blocks)
        assert ok == self.ours(blocks), blocks
        if ok:
            self.own(blocks, -1)

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.free_(self.pick(data))

    @precondition(lambda self: self.matches)
    @rule(data=st.data(), host=st.booleans())
    def free_matched(self, data: st.DataObject, host: bool) -> None:
        """A Match's blocks are locked, not referenced: freeing them is refused unless we also
        happen to hold references to them (then it drops ours, as any free of those ids would)."""
        m = data.draw(st.sampled_from(self.matches))
        self.free_(m.host_blocks if host else m.blocks)

    @rule(data=st.data(), tokens=TOKENS, namespace=st.sampled_from([None, "a", ("t", 1), []]))
    def insert(self, data: st.DataObject, tokens: Any, namespace: Any) -> None:
        self.call(self.pool.insert, tokens, self.pick(data), namespace)

    @rule(data=st.data(), tokens=TOKENS, namespace=st.sampled_from([None, "a", []]))
    def insert_tail(self, data: st.DataObject, tokens: Any, namespace: Any) -> None:
        self.call(self.pool.insert_tail, tokens, self.pick(data), namespace)

    @rule(data=st.data(), tokens=TOKENS, namespace=st.sampled_from([None, "a", []]))
    def insert_sequence(self, data: st.DataObject, tokens: Any, namespace: Any) -> None:
        before = self.pool.stats(), [a._refs.tolist() for a in self.pool._alloc.values()]
        ok, _ = self.call(self.pool.insert_sequence, tokens, self.pick(data), namespace)
        if not ok:  # all or nothing
            assert (self.pool.stats(), [a._refs.tolist() for a in self.pool._alloc.values()]) == before

    @rule(data=st.data(), tokens=TOKENS, start=st.one_of(st.integers(-2, 8), st.just(1.5), st.just(None)))
    def copy_tail(self, data: st.DataObject, tokens: Any, start: Any) -> None:
        ok, n = self.call(self.pool.copy_tail, tokens, start, self.pick(data))
        if ok:
            assert n in (0, 1)  # block size 2: a tail holds one token

    @rule(tokens=TOKENS, promote=st.booleans())
    def match(self, tokens: Any, promote: bool) -> None:
        ok, m = self.call(self.pool.match, tokens, promote=promote)
        if ok:
            assert m.num_tokens % 2 == 0 and len(m.blocks) * 2 == m.num_tokens
            self.matches.append(m)

    @precondition(lambda self: self.matches)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(self.matches))
        self.matches.remove(m)
        m.release()
        self.call(m.release)  # twice: a typed error or a no-op, never a negative lock

    @rule(tokens=TOKENS)
    def delete(self, tokens: Any) -> None:
        self.call(self.pool.delete, tokens)

    @rule(n=COUNTS, tier=TIERS)
    def evict(self, n: Any, tier: Any) -> None:
        self.call(self.pool.evict, n, tier)

    @rule(data=st.data(), out=st.booleans())
    def swap(self, data: st.DataObject, out: bool) -> None:
        blocks = self.pick(data)
        ok, moved = self.call(self.pool.swap_out if out else self.pool.swap_in, blocks)
        assert not ok or self.ours(blocks), blocks  # a move never takes a reference we do not hold
        if moved is not None:
            self.own(blocks, -1)
            self.own(moved, 1)

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        blocks = self.pick(data)
        ok, _ = self.call(self.pool.share, blocks)
        if ok:
            self.own(blocks, 1)

    @rule(on=st.booleans())
    def copies_fail(self, on: bool) -> None:
        self.failing = on

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()

    def teardown(self) -> None:
        swap_module.copy_blocks = self._real_copy  # type: ignore[assignment]
        for m in self.matches:
            m.release()
        for (tier, i), k in self.refs.items():
            for _ in range(k):
                self.pool.free(Blocks(tier, [i]))
        self.pool.check_invariants()
        stats = self.pool.stats()
        for tier in ("device", "host"):
            assert stats[tier]["used"] == stats[tier]["cached"]  # nothing but the index holds blocks
        self.pool.close()


PoolFuzz.TestCase.settings = settings(max_examples=examples(150), stateful_step_count=30, deadline=None)
TestPoolFuzz = PoolFuzz.TestCase
