"""Property test: the radix index against a reference model of cached prefixes.

The model is a dict ``{(namespace, prefix tokens): set of tiers}``. Insert, match, promote,
delete and rejected calls are predicted exactly; eviction (chosen by policy) is checked for
what it may do: only unlocked prefixes disappear or move to the host, prefixes stay closed.
Every cached block's KV holds a value derived from its prefix, so each step also proves that
no block ever serves KV of other tokens, across demotion and promotion.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mempool import Blocks, Match, Tier
from mempool.errors import MemPoolError
from mempool.index.keys import decode_key
from tests.conftest import make_pool

B = 4
WORDS = 3  # distinct block contents: small, so prefixes are shared often
NAMESPACES = (None, "t1")
Prefix = tuple[object, tuple[int, ...]]


def block_tokens(word: int) -> list[int]:
    return [word * 10 + j for j in range(B)]


def tag(ns: object, prefix: tuple[int, ...]) -> float:
    """The KV value every element of the block ending ``prefix`` holds."""
    return float(zlib.crc32(repr((ns, prefix)).encode()) % (1 << 20))


sequences = st.lists(st.integers(0, WORDS - 1), min_size=1, max_size=4).map(
    lambda ws: [t for w in ws for t in block_tokens(w)]
)
tails = st.lists(st.integers(0, 99), max_size=B - 1)


def extract(pool) -> dict[Prefix, dict[Tier, int]]:
    """Every cached whole-block prefix with its block id per tier, read off the tree."""
    out: dict[Prefix, dict[Tier, int]] = {}
    for ns, root in pool.index._roots.items():
        stack = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                toks = decode_key(child.key)
                p = prefix
                for i in range(child.nblocks):
                    p = p + tuple(toks[i * B : (i + 1) * B])
                    where = {}
                    if child.device is not None:
                        where[Tier.DEVICE] = int(child.device[i])
                    if child.host is not None:
                        where[Tier.HOST] = int(child.host[i])
                    out[(ns, p)] = where
                stack.append((child, p))
    return out


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(device_blocks=8, host_blocks=6, num_layers=1, num_kv_heads=1, head_dim=2)
        self.model: dict[Prefix, set[Tier]] = {}
        self.held: list[tuple[Match, object, tuple[int, ...]]] = []

    # -- helpers ---------------------------------------------------------------------------
    def tiers(self) -> dict[Prefix, set[Tier]]:
        return {p: set(w) for p, w in extract(self.pool).items()}

    def snapshot(self) -> tuple[object, ...]:
        p = self.pool
        return (extract(p), p._alloc[Tier.DEVICE]._refs.tolist(), p._alloc[Tier.HOST]._refs.tolist(), p.stats())

    def locked_prefixes(self) -> set[Prefix]:
        out = set()
        for m, ns, toks in self.held:
            for k in range(1, m.total_tokens // B + 1):
                out.add((ns, toks[: k * B]))
        return out

    def after_eviction(self, before: dict[Prefix, set[Tier]], added: set[Prefix]) -> None:
        """Adopt the tree's state after a step that may evict, checking what eviction may do."""
        now = self.tiers()
        locked = self.locked_prefixes()
        for p, tiers in now.items():
            if p in added:
                continue
            assert p in before, f"{p} appeared from nowhere"
            if Tier.HOST in tiers and Tier.HOST not in before[p]:
                assert Tier.DEVICE in before[p], f"{p} reached the host without a device copy"
            if Tier.DEVICE in tiers:
                assert Tier.DEVICE in before[p], f"{p} gained a device copy by eviction"
        for p in locked - added:
            assert now.get(p) == before.get(p, now.get(p)), f"locked {p} changed under eviction"
        self.model = now

    def expect_rejected(self, call) -> None:
        before = self.snapshot()
        try:
            call()
        except MemPoolError:
            pass
        else:
            raise AssertionError("a bad call was accepted")
        assert self.snapshot() == before, "a rejected call changed the pool"

    # -- rules -----------------------------------------------------------------------------
    @rule(seq=sequences, tail=tails, ns=st.sampled_from(NAMESPACES), promote=st.booleans())
    def serve(self, seq: list[int], tail: list[int], ns: object, promote: bool) -> None:
        """An engine's request: match, (promote,) allocate the rest, write KV, insert, free."""
        tokens = seq + tail
        nb = len(seq) // B
        before = self.tiers()
        promoted: set[Prefix] = set()
        with self.pool.match(tokens, ns) as m:
            if promote and len(m.host_blocks) and self.pool.promote(m):
                promoted = {(ns, tuple(tokens[: k * B])) for k in range(1, m.total_tokens // B + 1)}
            need = nb - len(m.blocks)
            own = self.pool.alloc(need)
            if own is None:  # the promotion stands, the rest is not served
                self.after_eviction(before, promoted)
                for p in promoted:
                    assert Tier.DEVICE in self.model[p], f"{p} not on the device after promotion"
                return
            for i, b in enumerate(own.tolist()):
                k = len(m.blocks) + i + 1
                self.pool.kv()[b].fill_(tag(ns, tuple(tokens[: k * B])))
            self.pool.insert(tokens, m.blocks.concat(own), ns)
            self.pool.free(own)
        added = {(ns, tuple(tokens[: k * B])) for k in range(1, nb + 1)}
        self.after_eviction(before, added)
        for p in added:
            assert Tier.DEVICE in self.model[p], f"{p} not on the device after insert"

    @rule(seq=sequences, tail=tails, ns=st.sampled_from(NAMESPACES))
    def match_is_longest_prefix(self, seq: list[int], tail: list[int], ns: object) -> None:
        tokens = seq + tail
        with self.pool.match(tokens, ns) as m:
            k = 0
            while (ns, tuple(tokens[: (k + 1) * B])) in self.model and (k + 1) * B <= len(tokens):
                k += 1
            assert m.total_tokens == k * B
            dev = 0
            while dev < k and Tier.DEVICE in self.model[(ns, tuple(tokens[: (dev + 1) * B]))]:
                dev += 1
            assert m.num_tokens == dev * B and m.num_host_tokens == (k - dev) * B

    @precondition(lambda self: len(self.held) < 3)
    @rule(seq=sequences, ns=st.sampled_from(NAMESPACES))
    def hold(self, seq: list[int], ns: object) -> None:
        self.held.append((self.pool.match(seq, ns), ns, tuple(seq)))

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 2))
    def release(self, i: int) -> None:
        m, _, _ = self.held.pop(i % len(self.held))
        m.release()
        self.expect_rejected(m.release)

    @rule(n=st.integers(1, 6), tier=st.sampled_from([Tier.DEVICE, Tier.HOST]))
    def evict(self, n: int, tier: Tier) -> None:
        before = self.tiers()
        freed = self.pool.evict(n, tier)
        assert 0 <= freed
        self.after_eviction(before, set())

    @rule(seq=sequences, ns=st.sampled_from(NAMESPACES))
    def delete(self, seq: list[int], ns: object) -> None:
        locked = self.locked_prefixes()
        path = [(ns, tuple(seq[: (k + 1) * B])) for k in range(len(seq) // B)]
        path = [p for p in path if p in self.model][: len(path)]
        matched = []
        for p in path:
            if p not in self.model:
                break
            matched.append(p)
        if not matched:
            assert self.pool.delete(seq, ns) == 0
            return
        gone = {p for p in self.model if p[0] == ns and p[1][: len(matched[-1][1])] == matched[-1][1]}
        for p in reversed(matched[:-1]):  # shared ancestors stay; exclusive ones go
            kids = {q for q in self.model if q[0] == ns and len(q[1]) == len(p[1]) + B and q[1][: len(p[1])] == p[1]}
            if len(kids) != 1:
                break
            gone.add(p)
        if gone & locked:
            self.expect_rejected(lambda: self.pool.delete(seq, ns))
            return
        assert self.pool.delete(seq, ns) == len(gone)
        for p in gone:
            del self.model[p]

    @rule(n=st.integers(1, 3), seed=st.integers(0, 1000))
    def swap_round_trip(self, n: int, seed: int) -> None:
        """A request's own blocks go to the host and back bit for bit; eviction it causes is legal."""
        before = self.tiers()
        own = self.pool.alloc(n)
        if own is None:
            self.after_eviction(before, set())
            return
        values = [float(seed * 7 + i) for i in range(n)]
        for b, v in zip(own.tolist(), values):
            self.pool.kv()[b].fill_(v)
        host = self.pool.swap_out(own)
        if host is not None:
            for b, v in zip(host.tolist(), values):
                assert torch.all(self.pool.kv(Tier.HOST)[b] == v)
            back = self.pool.swap_in(host)
            if back is None:
                self.pool.free(host)
            else:
                for b, v in zip(back.tolist(), values):
                    assert torch.all(self.pool.kv()[b] == v)
                self.pool.free(back)
        else:
            self.pool.free(own)
        self.after_eviction(before, set())

    @precondition(lambda self: any(len(m.blocks) for m, _, _ in self.held))
    @rule()
    def swap_of_locked_prefix_is_refused(self) -> None:
        m = next(m for m, _, _ in self.held if len(m.blocks))
        self.expect_rejected(lambda: self.pool.swap_out(m.blocks))

    @rule(kind=st.sampled_from(["tokens", "too_many", "freed", "foreign", "in_use", "host_tier", "namespace"]))
    def bad_call(self, kind: str) -> None:
        pool = self.pool
        if kind == "tokens":
            self.expect_rejected(lambda: pool.insert([1.5] * B, Blocks(Tier.DEVICE, [])))
        elif kind == "too_many":
            before = self.tiers()
            own = pool.alloc(2)  # may evict
            self.after_eviction(before, set())
            if own is not None:
                self.expect_rejected(lambda: pool.insert(block_tokens(0), own))
                pool.free(own)
        elif kind == "freed":
            free = np.flatnonzero(pool._alloc[Tier.DEVICE]._refs == 0)
            if free.size:
                self.expect_rejected(lambda: pool.insert(block_tokens(1), Blocks(Tier.DEVICE, free[:1])))
        elif kind == "foreign":
            self.expect_rejected(lambda: pool.insert(block_tokens(1), Blocks(Tier.DEVICE, [0], owner=object())))
        elif kind == "in_use":
            cached = np.flatnonzero(pool.index._where[Tier.DEVICE])
            if cached.size:
                self.expect_rejected(lambda: pool.insert([77] * B, Blocks(Tier.DEVICE, cached[:1])))
        elif kind == "host_tier":
            self.expect_rejected(lambda: pool.swap_out(Blocks(Tier.HOST, [0])))
        else:
            self.expect_rejected(lambda: pool.match(block_tokens(0), namespace={}))

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        found = extract(self.pool)
        assert {p: set(w) for p, w in found.items()} == self.model
        dev, host = self.pool.kv(Tier.DEVICE), self.pool.kv(Tier.HOST)
        for (ns, prefix), where in found.items():
            want = tag(ns, prefix)
            for tier, b in where.items():
                kv = dev[b] if tier is Tier.DEVICE else host[b]
                assert torch.all(kv == want), f"{tier.value} block {b} holds KV of other tokens"
        for m, ns, toks in self.held:
            for i, b in enumerate(m.blocks.tolist()):
                assert torch.all(dev[b] == tag(ns, toks[: (i + 1) * B])), "a locked block changed"

    def teardown(self) -> None:
        for m, _, _ in self.held:
            m.release()
        self.pool.check_invariants()
        # once every lock is gone, deleting everything leaves no block referenced
        for ns in NAMESPACES:
            for w in range(WORDS):
                self.pool.delete(block_tokens(w), ns)
        s = self.pool.stats()
        assert s["device"]["used"] == 0 and s["host"]["used"] == 0, s
        self.pool.close()


TestIndexMachine = IndexMachine.TestCase


def test_a_promotion_stands_when_the_rest_of_the_request_finds_no_room() -> None:
    """Found by the deep profile: ``serve`` promotes a host-only prefix, then cannot allocate the
    rest of its blocks. The promoted prefix stays on the device (still correct KV), nothing else
    is inserted, and the model checks agree."""
    words = lambda *ws: [t for w in ws for t in block_tokens(w)]  # noqa: E731
    state = IndexMachine()
    steps = [
        lambda: state.serve(ns=None, promote=False, seq=words(1, 1, 0, 0), tail=[]),
        lambda: state.hold(ns=None, seq=words(1, 1, 0, 0)),
        lambda: state.serve(ns=None, promote=False, seq=words(0), tail=[]),
        lambda: state.serve(ns="t1", promote=False, seq=words(0, 0, 0, 0), tail=[]),
        lambda: state.hold(ns="t1", seq=words(0)),
    ]
    for step in steps:
        step()
        state.consistent()
    assert state.model[(None, tuple(words(0)))] == {Tier.HOST}  # the case: host only, device full
    state.serve(ns=None, promote=True, seq=words(0, 0, 0, 0), tail=[])
    state.consistent()
    assert Tier.DEVICE in state.model[(None, tuple(words(0)))]  # promoted ...
    assert (None, tuple(words(0, 0))) not in state.model  # ... and the rest not served
    state.teardown()
