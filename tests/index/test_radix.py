"""Radix index through the MemPool facade: exact ids, eviction order, locks, tiers, misuse."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch

from mempool import Blocks, MemPool, Tier
from mempool.errors import (
    BlockInUseError,
    BlockLockedError,
    BlockNotAllocatedError,
    DoubleFreeError,
    ForeignBlockError,
    HandleReleasedError,
    InvalidArgumentError,
    InvalidBlockError,
    InvalidTokensError,
    LockUnderflowError,
    TierUnavailableError,
)
from mempool.index.keys import token_list
from tests.conftest import fill_random, make_pool

B = 4  # block size of make_pool


def toks(*blocks: int) -> list[int]:
    """Tokens of whole blocks, block i being [i*10, i*10+1, i*10+2, i*10+3]."""
    return [b * 10 + j for b in blocks for j in range(B)]


def cache(pool: MemPool, tokens: list[int], namespace: object = None) -> Blocks:
    """What an engine does: match, allocate the rest, insert, free its own, release."""
    with pool.match(tokens, namespace) as m:
        own = pool.alloc(len(tokens) // B - len(m.blocks) - len(m.host_blocks))
        assert own is not None
        if len(m.host_blocks):
            assert pool.promote(m)
        full = m.blocks.concat(own)
        pool.insert(tokens, full, namespace)
        pool.free(own)
        return full


def snapshot(pool: MemPool) -> tuple[object, ...]:
    return (
        pool.stats(),
        pool.index.format_tree(),
        pool._alloc[Tier.DEVICE]._refs.tolist(),
        pool._alloc[Tier.HOST]._refs.tolist(),
    )


def test_insert_then_match_exact_ids(pool: MemPool) -> None:
    blocks = pool.alloc(3)
    assert blocks.tolist() == [0, 1, 2]
    assert pool.insert(toks(1, 2, 3) + [99], blocks) == 3
    assert pool.free(blocks) == 0  # the index holds its own reference
    with pool.match(toks(1, 2, 3, 4)) as m:
        assert m.blocks.tolist() == [0, 1, 2] and m.num_tokens == 12 and len(m.host_blocks) == 0
    with pool.match(toks(1, 2) + [5, 5]) as m:  # partial block never matches
        assert m.blocks.tolist() == [0, 1] and m.num_tokens == 8
    with pool.match(toks(1, 7)) as m:
        assert m.blocks.tolist() == [0]
    with pool.match(toks(9)) as m:
        assert m.blocks.tolist() == [] and m.total_tokens == 0
    with pool.match(toks(1)[:3]) as m:
        assert m.num_tokens == 0


def test_match_accepts_arrays_and_tensors(pool: MemPool) -> None:
    cache(pool, toks(1, 2))
    for form in (np.array(toks(1, 2), dtype=np.int32), torch.tensor(toks(1, 2)), tuple(toks(1, 2))):
        with pool.match(form) as m:
            assert m.blocks.tolist() == [0, 1]


def test_diverging_prefixes_split_at_block_boundary(pool: MemPool) -> None:
    cache(pool, toks(1, 2, 3))  # blocks 0 1 2
    cache(pool, toks(1, 2, 5, 6))  # shares 0 1, new 3 4
    with pool.match(toks(1, 2, 5, 6)) as m:
        assert m.blocks.tolist() == [0, 1, 3, 4]
    with pool.match(toks(1, 2, 3)) as m:
        assert m.blocks.tolist() == [0, 1, 2]
    assert pool.index.num_nodes == 3
    assert pool.stats()["device"]["cached"] == 5


def test_duplicate_prefix_is_not_referenced_twice(pool: MemPool) -> None:
    first = pool.alloc(2)
    pool.insert(toks(1, 2), first)
    dup = pool.alloc(3)  # caller recomputed blocks 1, 2 and has a new third one
    assert pool.insert(toks(1, 2, 3), dup) == 1
    assert pool._alloc[Tier.DEVICE].refcounts(dup) == [1, 1, 2]
    pool.free(first)
    assert pool.free(dup) == 2  # the duplicates go back; the new block stays cached
    with pool.match(toks(1, 2, 3)) as m:
        assert m.blocks.tolist() == [0, 1, 4]


def test_namespaces_never_share(pool: MemPool) -> None:
    cache(pool, toks(1, 2), namespace="tenant-a")
    with pool.match(toks(1, 2), namespace="tenant-b") as m:
        assert m.total_tokens == 0
    with pool.match(toks(1, 2)) as m:
        assert m.total_tokens == 0
    with pool.match(toks(1, 2), namespace="tenant-a") as m:
        assert m.blocks.tolist() == [0, 1]
    cache(pool, toks(1, 2), namespace=("model", 7))
    with pool.match(toks(1, 2), namespace=("model", 7)) as m:
        assert m.blocks.tolist() == [2, 3]


@pytest.mark.parametrize("namespace", [[1], {}, float("nan"), ("model", float("nan"))], ids=repr)
def test_a_namespace_no_lookup_could_find_is_refused(pool: MemPool, namespace: object) -> None:
    """Unhashable, or unequal to itself (NaN: each lookup's NaN is another key, so what was cached
    under it was never found again)."""
    blocks = pool.alloc(2)
    for call in (lambda: pool.insert(toks(1, 2), blocks, namespace=namespace), lambda: pool.match(toks(1), namespace)):
        with pytest.raises(InvalidArgumentError, match="namespace must"):
            call()
    assert pool.stats()["index"]["namespaces"] == 0
    pool.free(blocks)
    pool.check_invariants()


def test_a_namespace_whose_last_prefix_leaves_keeps_nothing() -> None:
    """Per-tenant namespaces come and go: one whose cache is evicted or deleted leaves no trace,
    so a pool serving an unbounded stream of tenants does not grow (nor slow its evictions)."""
    from mempool import PoolConfig

    pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, device_blocks=6, dtype="float32"))
    seen: list[object] = []
    pool.watch_removals(lambda ns, _: seen.append(ns))
    for i in range(40):  # room for 3 tenants at a time: each insert evicts the oldest tenant
        a = pool.alloc(2)
        assert a is not None
        pool.insert([1, 2, 3, 4], a, namespace=("tenant", i))
        pool.free(a)
        assert pool.stats()["index"]["namespaces"] == min(i + 1, 3)
        pool.check_invariants()
    assert seen == [("tenant", i) for i in range(37)]  # each removal names its own namespace
    assert pool.delete([1, 2], namespace=("tenant", 38)) == 2
    assert pool.stats()["index"]["namespaces"] == 2
    for i in (37, 39):  # the tenants left still hit; one deleted starts afresh
        with pool.match([1, 2, 3, 4], namespace=("tenant", i)) as m:
            assert m.num_tokens == 4
    cache(pool, [1, 2, 3, 4], namespace=("tenant", 38))
    assert pool.stats()["index"]["namespaces"] == 3
    pool.check_invariants()


def test_lru_eviction_order_without_host() -> None:
    pool = make_pool(device_blocks=6, host_blocks=0)
    cache(pool, toks(1, 2))  # 0 1
    cache(pool, toks(3, 4))  # 2 3
    cache(pool, toks(5, 6))  # 4 5
    with pool.match(toks(1, 2)):
        pass  # touch: (1, 2) becomes most recent
    got = pool.alloc(3)  # evicts all of (3, 4), then the tail of (5, 6)
    assert got.tolist() == [2, 3, 5]
    with pool.match(toks(5, 6)) as m:
        assert m.blocks.tolist() == [4]
    with pool.match(toks(1, 2)) as m:
        assert m.blocks.tolist() == [0, 1]
    with pool.match(toks(3)) as m:
        assert m.total_tokens == 0
    assert pool.stats()["index"]["dropped_device"] == 3
    pool.check_invariants()


def test_eviction_takes_leaves_before_their_parents() -> None:
    pool = make_pool(device_blocks=4, host_blocks=0)
    cache(pool, toks(1, 2))  # 0 1
    cache(pool, toks(1, 2, 3, 4))  # 2 3 under it; (1, 2) is touched by this call too
    got = pool.alloc(1)
    assert got.tolist() == [3]  # the tail block of the leaf goes first
    with pool.match(toks(1, 2, 3, 4)) as m:
        assert m.blocks.tolist() == [0, 1, 2]


def test_locked_blocks_survive_pressure() -> None:
    pool = make_pool(device_blocks=4, host_blocks=0)
    cache(pool, toks(1, 2))
    cache(pool, toks(3, 4))
    with pool.match(toks(1, 2)) as held:
        assert pool.stats()["device"]["evictable"] == 2
        assert pool.alloc(3) is None  # only 2 are evictable: refuse without evicting
        assert pool.index.format_tree().count("device=") == 2
        got = pool.alloc(2)
        assert got.tolist() == [2, 3]
        assert pool.alloc(1) is None
        assert held.blocks.tolist() == [0, 1]
        with pool.match(toks(1, 2)) as again:
            assert again.blocks.tolist() == [0, 1]
        pool.free(got)
    pool.check_invariants()


def test_demotion_to_host_keeps_prefix_matchable_and_bits_exact() -> None:
    pool = make_pool(device_blocks=4, host_blocks=8)
    full = cache(pool, toks(1, 2, 3))
    written = fill_random(pool, full, seed=3)
    cache(pool, toks(8))  # block 3
    assert pool.evict(2) == 2  # LRU: the tail of (1, 2, 3), then ... by stamp
    stats = pool.stats()
    assert stats["index"]["demoted"] == 2 and stats["host"]["cached"] == 2
    with pool.match(toks(1, 2, 3)) as m:
        assert m.blocks.tolist() == [0] and m.host_blocks.tolist() == [0, 1]
        assert m.num_tokens == 4 and m.num_host_tokens == 8
        host = pool.kv(Tier.HOST)[torch.from_numpy(m.host_blocks.ids.copy())]
        assert torch.equal(host, written[1:])
        assert pool.promote(m)
        assert m.num_tokens == 12 and len(m.host_blocks) == 0
        dev = pool.kv()[torch.from_numpy(m.blocks.ids.copy())]
        assert torch.equal(dev, written)
    assert pool.stats()["index"]["promoted"] == 2
    pool.check_invariants()


def test_node_on_both_tiers_keeps_both_until_space_is_needed() -> None:
    pool = make_pool(device_blocks=4, host_blocks=4)
    cache(pool, toks(1, 2))
    pool.evict(2)  # both demoted
    with pool.match(toks(1, 2), promote=True) as m:
        assert m.blocks.tolist() == [0, 1]
    s = pool.stats()
    assert s["device"]["cached"] == 2 and s["host"]["cached"] == 2
    pool.evict(2)  # already on host: device copy dropped, no copy needed
    assert pool.stats()["index"]["demoted"] == 4 and pool.stats()["host"]["cached"] == 2
    pool.check_invariants()


def test_host_full_drops_least_recent_host_blocks() -> None:
    pool = make_pool(device_blocks=2, host_blocks=2)
    cache(pool, toks(1, 2))
    pool.evict(2)  # (1, 2) to host: host full
    cache(pool, toks(3, 4))
    pool.evict(2)  # (3, 4) must go to host: (1, 2) is dropped from host first
    with pool.match(toks(1, 2)) as m:
        assert m.total_tokens == 0
    with pool.match(toks(3, 4)) as m:
        assert m.host_blocks.tolist() == [0, 1]
    pool.check_invariants()


def test_promote_without_room_is_back_pressure() -> None:
    pool = make_pool(device_blocks=2, host_blocks=4)
    cache(pool, toks(1, 2))
    pool.evict(2)
    own = pool.alloc(2)
    with pool.match(toks(1, 2)) as m:
        before = snapshot(pool)
        assert not pool.promote(m)
        assert snapshot(pool) == before
    pool.free(own)
    with pool.match(toks(1, 2)) as m:
        assert pool.promote(m) and m.blocks.tolist() == [0, 1]


def test_promote_partial_node_splits_it() -> None:
    pool = make_pool(device_blocks=8, host_blocks=8)
    cache(pool, toks(1, 2, 3, 4))
    pool.evict(4)
    with pool.match(toks(1, 2)) as m:
        assert pool.promote(m) and len(m.blocks) == 2
    with pool.match(toks(1, 2, 3, 4)) as m:
        assert len(m.blocks) == 2 and len(m.host_blocks) == 2
    pool.check_invariants()


def test_insert_device_blocks_under_host_only_prefix_attaches_them() -> None:
    pool = make_pool(device_blocks=8, host_blocks=8)
    cache(pool, toks(1, 2))
    pool.evict(2)
    fresh = pool.alloc(3)
    assert pool.insert(toks(1, 2, 3), fresh) == 3  # device copies of (1, 2) attached, 3 new
    pool.free(fresh)
    with pool.match(toks(1, 2, 3)) as m:
        assert m.blocks.tolist() == fresh.tolist() and len(m.host_blocks) == 0
    pool.check_invariants()


def test_delete_removes_prefix_and_continuations_but_keeps_shared() -> None:
    pool = make_pool()
    cache(pool, toks(1, 2, 3))
    cache(pool, toks(1, 2, 3, 4))
    cache(pool, toks(1, 5))
    assert pool.delete(toks(1, 2)) == 3  # (2, 3) and (4) go; (1) is shared with (1, 5)
    with pool.match(toks(1, 2)) as m:
        assert m.blocks.tolist() == [0]
    with pool.match(toks(1, 5)) as m:
        assert len(m.blocks) == 2
    assert pool.delete(toks(9)) == 0
    assert pool.delete(toks(1)) == 2
    assert pool.stats()["device"]["used"] == 0
    pool.check_invariants()


def test_a_pool_that_deletes_what_it_caches_keeps_nothing_of_it() -> None:
    """An application that deletes conversations as they end, on a pool never short enough to
    evict: the eviction queues forget each removed node (they held every one, with its token key,
    for the life of the pool: ~1.2 KB a deleted 4-block prefix)."""
    pool = make_pool(device_blocks=16, host_blocks=16)
    for i in range(300):
        cache(pool, toks(i, i + 1000, i + 2000))
        if i % 3 == 0:  # some on both tiers: a demoted prefix is queued for eviction on each
            assert pool.evict(3) == 3
            with pool.match(toks(i, i + 1000, i + 2000), promote=True) as m:
                assert m.num_tokens == 3 * B and len(m.host_blocks) == 0
        assert pool.delete(toks(i)) == 3
    assert pool.stats()["index"]["nodes"] == 0
    for heap in pool.index._heaps.values():
        assert len(heap) <= 64  # the compaction bound over an empty tree
    pool.check_invariants()


def test_delete_of_locked_prefix_raises_and_changes_nothing(pool: MemPool) -> None:
    cache(pool, toks(1, 2, 3))
    with pool.match(toks(1, 2, 3)):
        before = snapshot(pool)
        with pytest.raises(BlockLockedError):
            pool.delete(toks(1, 2))
        assert snapshot(pool) == before
    assert pool.delete(toks(1, 2)) == 3


def test_the_index_references_are_not_the_callers_to_free(pool: MemPool) -> None:
    """A Match's blocks are locked, not referenced, and a cached block the caller freed is the
    index's alone: freeing or swapping them out is refused and changes nothing. (Before, the
    index kept ids of free blocks, which the next alloc handed to another request.)"""
    tail = pool.alloc(1)
    cache(pool, toks(1, 2))
    assert pool.insert_tail(toks(1, 2) + [7], tail)
    pool.free(tail)
    before = snapshot(pool)
    m = pool.match(toks(1, 2))
    wrongs = (m.blocks, m.blocks[1:], tail, Blocks(Tier.DEVICE, m.blocks.tolist()))
    for wrong in wrongs:
        with pytest.raises(DoubleFreeError, match="cached"):
            pool.free(wrong)
    m.release()
    for wrong in wrongs:
        with pytest.raises(DoubleFreeError, match="cached"):
            pool.free(wrong)
        with pytest.raises(DoubleFreeError, match="cached"):
            pool.swap_out(wrong)
    assert snapshot(pool) == before
    own = pool.alloc(2)
    assert set(own.tolist()).isdisjoint(m.blocks.tolist() + tail.tolist())
    pool.share(m.blocks)  # a reference of the caller's own: that one it may drop
    assert pool.free(m.blocks) == 0
    with pytest.raises(DoubleFreeError):  # a block given twice drops two references
        pool.free(Blocks(Tier.DEVICE, m.blocks.tolist()[:1] * 2))
    pool.free(own)
    assert snapshot(pool) == before
    pool.check_invariants()


def test_check_held_names_what_is_wrong_with_a_handle_and_changes_nothing(pool: MemPool) -> None:
    own, other = pool.alloc(2), make_pool()
    before = snapshot(pool)
    pool.check_held(own)
    pool.check_held(Blocks(Tier.DEVICE, own.tolist()))  # built by hand: checked by id
    for bad, error in (
        (other.alloc(1), ForeignBlockError),
        (Blocks(Tier.DEVICE, [pool.config.device_blocks]), InvalidBlockError),
        (Blocks(Tier.DEVICE, [pool.config.device_blocks - 1]), BlockNotAllocatedError),
        ([1, 2], InvalidArgumentError),
    ):
        with pytest.raises(error):
            pool.check_held(bad)  # type: ignore[arg-type]
    assert snapshot(pool) == before
    pool.free(own)
    other.close()


def test_release_twice_is_a_lock_underflow(pool: MemPool) -> None:
    cache(pool, toks(1))
    m = pool.match(toks(1))
    m.release()
    with pytest.raises(LockUnderflowError):
        m.release()
    with pytest.raises(HandleReleasedError):
        pool.promote(m)
    assert pool.stats()["device"]["evictable"] == 1


def test_a_match_dropped_unreleased_says_so_and_keeps_its_lock(pool: MemPool) -> None:
    """A leaked lock makes its prefix unevictable for good: the match warns when it is collected
    (a ResourceWarning, as an unclosed file does) and does not release, since its caller may
    still read the blocks it handed out."""
    cache(pool, toks(1, 2))
    m = pool.match(toks(1, 2))
    blocks = m.blocks
    with pytest.warns(ResourceWarning, match="dropped without release"):
        del m
        gc.collect()
    assert pool.stats()["device"]["evictable"] == 0 and pool.evict(2) == 0
    assert blocks.tolist() == [0, 1]
    with warnings.catch_warnings(record=True) as seen:  # released, or matching nothing: no warning
        warnings.simplefilter("always")
        with pool.match(toks(1, 2)):
            pass
        pool.match(toks(7))
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize(
    "bad",
    [
        [1.5, 2.0, 3.0, 4.0],
        [-1, 2, 3, 4],
        [2**31, 1, 2, 3],
        [[1, 2, 3, 4]],
        "abcd",
        None,
        [1, "a", 3, 4],
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        np.array([True, False, True, False]),
        np.array([3, -1, 2, 4], dtype=np.int32),  # the native int32 fast path checks the sign
        np.array([[1, 2], [3, 4]], dtype=np.int32),
        np.array([1, 2, 3, 2**31], dtype=np.int64),
    ],
)
def test_bad_tokens_raise_and_change_nothing(pool: MemPool, bad: object) -> None:
    cache(pool, toks(1))
    own = pool.alloc(1)
    before = snapshot(pool)
    for call in (lambda: pool.insert(bad, own), lambda: pool.match(bad), lambda: pool.delete(bad)):
        with pytest.raises(InvalidTokensError):
            call()
        assert snapshot(pool) == before
    pool.free(own)
    with pytest.raises(InvalidTokensError):  # what engines validate prompts with
        token_list(bad)


def test_token_list_takes_what_the_index_takes_and_any_iterable_of_ints() -> None:
    want = [3, 1, 4, 1]
    for given in (want, tuple(want), np.array(want), torch.tensor(want), (t for t in want), iter(want)):
        assert token_list(given) == want
    assert token_list(range(2, 5)) == [2, 3, 4] and token_list([]) == []
    for unordered in ({3, 1}, frozenset({3}), {3: 1}):
        with pytest.raises(InvalidTokensError):
            token_list(unordered)


def test_bad_blocks_raise_and_change_nothing(pool: MemPool) -> None:
    cache(pool, toks(1, 2))  # blocks 0 1
    own = pool.alloc(2)  # 2 3
    freed = pool.alloc(1)
    pool.free(freed)
    other = make_pool().alloc(2)
    before = snapshot(pool)
    cases = [
        (lambda: pool.insert(toks(3), own), InvalidArgumentError),  # 2 blocks, 1 block of tokens
        (lambda: pool.insert(toks(3, 4), freed.concat(own[:1])), BlockNotAllocatedError),
        (lambda: pool.insert(toks(3, 4), other), ForeignBlockError),
        (lambda: pool.insert(toks(3, 4), Blocks(Tier.DEVICE, [0, 2])), BlockInUseError),  # 0 is cached for (1)
        (lambda: pool.insert(toks(3, 4), Blocks(Tier.DEVICE, [2, 2])), BlockInUseError),
        (lambda: pool.insert(toks(3, 4), Blocks(Tier.DEVICE, [2, 99])), InvalidArgumentError),
        (lambda: pool.insert(toks(3, 4), [2, 3]), InvalidArgumentError),
        (lambda: pool.match(toks(1), namespace=["unhashable"]), InvalidArgumentError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
        assert snapshot(pool) == before
    pool.free(own)


def test_host_insert_without_host_tier_raises() -> None:
    pool = make_pool(host_blocks=0)
    with pytest.raises(TierUnavailableError):
        pool.insert(toks(1), Blocks(Tier.HOST, [0]))
    with pytest.raises(TierUnavailableError):
        pool.alloc(1, Tier.HOST)


def test_lru_order_holds_across_many_touches_and_heap_compactions() -> None:
    """Every touch queues a fresh heap entry and leaves the old one stale; once stale entries
    pile up the heap is compacted. Eviction must still follow the last touches exactly."""
    n = 8
    pool = make_pool(device_blocks=n, host_blocks=0)
    for i in range(n):
        cache(pool, toks(i + 1))
    rng = np.random.default_rng(0)
    last: dict[int, int] = {}
    for t, i in enumerate(rng.integers(0, n, size=600).tolist()):
        with pool.match(toks(i + 1)):
            pass
        last[i] = t
        assert len(pool.index._dev_heap) <= 2 * n + 64  # compacted, not growing with every touch
    order = sorted(range(n), key=lambda i: last.get(i, -1))
    for k in range(n):
        assert pool.evict(1) == 1
        for j in order[: k + 1]:  # the least recent ones are gone, in order, and only they
            with pool.match(toks(j + 1)) as m:
                assert m.total_tokens == 0, (k, j)
        for j in order[k + 1 :]:
            with pool.match(toks(j + 1)) as m:
                assert m.total_tokens == B, (k, j)
        pool.check_invariants()


def test_lfu_policy_keeps_frequently_matched_prefixes() -> None:
    pool = make_pool(device_blocks=4, host_blocks=0, eviction="lfu")
    cache(pool, toks(1, 2))
    for _ in range(3):
        with pool.match(toks(1, 2)):
            pass
    cache(pool, toks(3, 4))  # most recent, but matched fewer times
    pool.alloc(2)
    with pool.match(toks(1, 2)) as m:
        assert m.blocks.tolist() == [0, 1]


def test_demo_prints_a_tree() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mempool.index.radix"], check=True, capture_output=True, text=True)
    assert "host=" in out.stdout and "device=" in out.stdout and out.stderr == ""


def test_removal_watcher_sees_each_prefix_that_leaves_every_tier() -> None:
    from mempool import MemPool, PoolConfig

    pool = MemPool(
        PoolConfig(
            num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, device_blocks=4, host_blocks=2, dtype="float32"
        )
    )
    seen: list[tuple[object, list[int]]] = []
    pool.watch_removals(lambda ns, toks: seen.append((ns, toks.tolist())))
    a = pool.alloc(3)
    pool.insert([1, 2, 3, 4, 5, 6], a, namespace="m")
    pool.free(a)
    assert pool.evict(3) == 3  # one 3-block node, the host has room for 2: dropped whole
    assert seen == [("m", [1, 2])]  # ends with the first block no longer cached
    b = pool.alloc(2)
    pool.insert([7, 8, 9, 10], b)
    pool.free(b)
    assert pool.evict(2) == 2 and len(seen) == 1  # demoted to the host: still cached, not reported
    with pool.match([7, 8, 9, 10]) as hit:
        assert hit.total_tokens == 4
    assert pool.delete([7, 8]) == 2
    assert seen[-1] == (None, [7, 8])
    pool.watch_removals(None)
    pool.check_invariants()


def test_a_failing_removal_watcher_changes_nothing_it_should_not() -> None:
    from mempool import MemPool, PoolConfig

    pool = MemPool(PoolConfig(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, device_blocks=2, dtype="float32"))

    def broken(namespace: object, tokens: object) -> None:
        raise RuntimeError("observer bug")

    pool.watch_removals(broken)
    a = pool.alloc(2)
    pool.insert([1, 2, 3, 4], a)
    pool.free(a)
    assert pool.alloc(2) is not None  # the eviction went through despite the observer
    pool.check_invariants()


def test_a_device_insert_ending_inside_a_host_only_edge_attaches_to_its_head() -> None:
    """An engine that recomputed the first blocks of a demoted prefix (without promoting it)
    inserts them on the device: the host-only edge splits where they end, the device blocks attach
    to the head only, and the rest stays on the host."""
    pool = make_pool(device_blocks=8, host_blocks=8)
    seq = toks(1, 2, 3, 4)
    cache(pool, seq)
    assert pool.evict(4) == 4  # the one 4-block edge now has a host copy only
    assert pool.stats()["device"]["cached"] == 0
    own = pool.alloc(2)
    assert own is not None
    written = fill_random(pool, own, seed=4)
    assert pool.insert(seq[: 2 * B], own) == 2
    pool.free(own)
    pool.check_invariants()
    with pool.match(seq) as m:
        assert m.blocks.tolist() == own.tolist() and len(m.host_blocks) == 2  # head on device, rest host
        assert torch.equal(pool.kv()[torch.from_numpy(m.blocks.ids.copy())], written)
    with pool.match(seq[: 2 * B]) as m:
        assert m.blocks.tolist() == own.tolist() and len(m.host_blocks) == 0
    assert pool.evict(2) == 2  # the head demotes: its host copy is already there, only dropped
    s = pool.stats()
    assert s["device"]["cached"] == 0 and s["host"]["cached"] == 4
    pool.check_invariants()
