"""Tails: a sequence's partly filled last block, kept and copied token by token (``index/tails.py``)."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given

from mempool import Blocks, MemPool, Tier
from mempool.alloc.allocator import BlockAllocator
from mempool.errors import (
    BlockInUseError,
    BlockNotAllocatedError,
    InvalidArgumentError,
    InvalidTokensError,
    WrongTierError,
)
from mempool.index.tails import TailStore
from tests.conftest import fill_random, make_pool

B = 4  # block size of make_pool


def snapshot(pool: MemPool) -> tuple[object, ...]:
    return pool.stats(), [a._refs.tolist() for a in pool._alloc.values()]


def finished(pool: MemPool, tokens: list[int], namespace: object = None) -> tuple[Blocks, torch.Tensor]:
    """What an engine does when a sequence with K/V for ``tokens`` finishes: whole blocks into the
    index, the partly filled last one kept as a tail, its own references freed. Returns its blocks
    and the K/V written into them."""
    blocks = pool.alloc(-(-len(tokens) // B))
    assert blocks is not None
    kv = fill_random(pool, blocks, seed=len(tokens))
    pool.insert_sequence(tokens, blocks, namespace)
    assert (pool.index.tails.holds(int(blocks.ids[-1])) is not None) == bool(len(tokens) % B)
    pool.free(blocks)
    pool.check_invariants()
    return blocks, kv


def test_a_continuing_prompt_gets_the_tail_bit_for_bit() -> None:
    pool = make_pool()
    turn1 = list(range(100, 111))  # 2 whole blocks and 3 tokens
    _, kv = finished(pool, turn1)
    assert pool.stats()["device"]["cached"] == pool.stats()["device"]["used"] == 3
    turn2 = turn1 + [7, 8, 9]
    with pool.match(turn2[:-1]) as m:
        assert m.num_tokens == 8
        own = pool.alloc(2)
        assert own is not None
        assert pool.copy_tail(turn2[:-1], m.num_tokens, own[:1]) == 3
        got = pool.storage(Tier.DEVICE).gather(own.ids[:1])
        assert torch.equal(got[0], kv[2])  # the whole block moved; its first 3 slots are what counts
        assert pool.stats()["index"]["tail_hits"] == 1 and pool.stats()["index"]["tail_tokens"] == 3
        pool.free(own)
    pool.check_invariants()
    assert pool.stats()["device"]["used"] == 3  # the tail still kept; nothing else held


def test_only_the_tokens_a_prompt_shares_with_the_tail_count() -> None:
    pool = make_pool()
    finished(pool, list(range(100, 111)))  # tail: 108 109 110
    own = pool.alloc(1)
    assert own is not None
    base = list(range(100, 108))
    assert pool.copy_tail(base + [108, 109, 5, 6], 8, own) == 2  # K/V of a position needs only the tokens before it
    assert pool.copy_tail(base + [108], 8, own) == 1  # no more than the tokens given
    assert pool.copy_tail(base + [1, 109, 110], 8, own) == 0
    assert pool.copy_tail(base, 8, own) == 0
    assert pool.copy_tail(base[:4] + [0] * 4 + [108], 8, own) == 0  # another prefix
    assert pool.copy_tail(base + [108, 109], 4, own) == 0  # the tail follows 8 tokens, not 4
    assert pool.copy_tail(base + [108], 8, own, namespace="other") == 0
    pool.free(own)
    pool.check_invariants()


def test_keeping_a_tail_again_replaces_it() -> None:
    pool = make_pool()
    tokens = list(range(100, 109))
    blocks = pool.alloc(3)
    assert blocks is not None
    pool.insert(tokens, blocks[:2])
    assert pool.insert_tail(tokens, blocks[2:])
    assert pool.insert_tail(tokens + [109, 110], blocks[2:])  # the same block, 2 tokens more: updated
    assert pool.stats()["index"]["tails"] == 1
    other = pool.alloc(1)
    assert other is not None
    assert pool.insert_tail(tokens[:8] + [5], other)  # another block after the same tokens: it wins
    pool.free(blocks)
    pool.free(other)
    assert pool.stats()["index"]["tails"] == 1 and pool.stats()["device"]["used"] == 3
    own = pool.alloc(1)
    assert own is not None
    assert pool.copy_tail(tokens[:8] + [5, 5], 8, own) == 1
    pool.free(own)
    pool.check_invariants()


def test_misuse_raises_and_changes_nothing() -> None:
    pool = make_pool()
    blocks, _ = finished(pool, list(range(100, 111)))
    own = pool.alloc(2)
    host = pool.alloc(1, Tier.HOST)
    gone = pool.alloc(1)
    assert own is not None and host is not None and gone is not None
    pool.free(gone)
    tokens = list(range(100, 110))
    before = snapshot(pool)
    for call, error in [
        (lambda: pool.copy_tail(tokens, 6, own[:1]), InvalidArgumentError),  # not a block boundary
        (lambda: pool.copy_tail(tokens, 12, own[:1]), InvalidArgumentError),  # past the tokens
        (lambda: pool.copy_tail(tokens, -4, own[:1]), InvalidArgumentError),
        (lambda: pool.copy_tail(tokens, True, own[:1]), InvalidArgumentError),
        (lambda: pool.copy_tail(tokens, 8, own), InvalidArgumentError),  # two blocks
        (lambda: pool.copy_tail(tokens, 8, host), WrongTierError),
        (lambda: pool.copy_tail(tokens, 8, gone), BlockNotAllocatedError),
        (lambda: pool.copy_tail(tokens, 8, blocks[:1]), BlockInUseError),  # indexed: not the caller's to write
        (lambda: pool.copy_tail(tokens, 8, blocks[2:]), BlockInUseError),  # a tail itself
        (lambda: pool.copy_tail([1.5], 0, own[:1]), InvalidTokensError),
        (lambda: pool.insert_tail(tokens, own), InvalidArgumentError),
        (lambda: pool.insert_tail(tokens, host), WrongTierError),
        (lambda: pool.insert_tail(tokens, gone), BlockNotAllocatedError),
        (lambda: pool.insert_tail(tokens, blocks[:1]), BlockInUseError),  # indexed whole
        (lambda: pool.insert_tail([1, 2, 3], blocks[2:]), BlockInUseError),  # the tail of other tokens
        (lambda: pool.insert_tail([-1], own[:1]), InvalidTokensError),
        (lambda: pool.insert(list(range(50, 54)), blocks[2:]), BlockInUseError),  # a tail is never whole
    ]:
        with pytest.raises(error):
            call()
        assert snapshot(pool) == before
    assert pool.insert_tail(list(range(8)), own[:1]) is False  # ends on a block boundary: nothing to keep
    assert pool.insert_tail(list(range(8)), own[:0]) is False  # (so the empty slice past the last block does)
    assert snapshot(pool) == before
    pool.free(own)
    pool.free(host)
    pool.check_invariants()


def test_tails_are_dropped_first_when_the_device_is_short() -> None:
    pool = make_pool(device_blocks=8, host_blocks=8)
    finished(pool, list(range(100, 111)))  # 2 indexed + 1 tail
    finished(pool, list(range(200, 206)))  # 1 indexed + 1 tail
    assert pool.stats()["device"]["free"] == 3
    got = pool.alloc(5)  # 2 short: both tails go, no indexed block moves
    assert got is not None
    s = pool.stats()
    assert s["index"]["dropped_tails"] == 2 and s["index"]["tails"] == 0
    assert s["index"]["demoted"] == 0 and s["device"]["cached"] == 3
    pool.free(got)
    finished(pool, list(range(300, 303)))  # a tail of 3 tokens after no whole block
    assert pool.evict(2) == 2  # the tail, then one indexed block (demoted)
    assert pool.stats()["index"]["tails"] == 0 and pool.stats()["index"]["demoted"] == 1
    pool.check_invariants()


def test_a_tail_still_in_use_by_its_sequence_frees_nothing() -> None:
    pool = make_pool(device_blocks=4, host_blocks=0)
    block = pool.alloc(1)
    assert block is not None
    pool.insert_tail([100, 101], block)  # the caller keeps its reference for now
    before = snapshot(pool)
    assert pool.alloc(4) is None  # 3 free; the tail's block is the caller's too: dropping it frees nothing
    assert snapshot(pool) == before
    pool.free(block)
    got = pool.alloc(4)  # now the tail's block is the tail's only: dropping it frees one
    assert got is not None and pool.stats()["index"]["dropped_tails"] == 1
    pool.free(got)
    pool.check_invariants()


def test_delete_drops_the_tails_of_what_it_removes() -> None:
    pool = make_pool()
    finished(pool, list(range(100, 111)))  # tail after 100..107
    finished(pool, list(range(100, 104)) + list(range(200, 206)))  # shares block 1, tail after 100..103 200..203
    finished(pool, list(range(300, 302)))  # a tail at the root
    assert pool.stats()["index"]["tails"] == 3
    assert pool.delete(list(range(100, 108))) == 1  # the second block of the first; the shared head stays
    assert pool.stats()["index"]["tails"] == 2
    own = pool.alloc(1)
    assert own is not None
    assert pool.copy_tail(list(range(100, 104)) + list(range(200, 206)), 8, own) == 2
    assert pool.copy_tail([300, 301, 9], 0, own) == 2
    pool.free(own)
    pool.check_invariants()


def test_delete_drops_every_tail_below_the_node_it_removes() -> None:
    pool = make_pool()
    finished(pool, list(range(100, 114)))  # one edge of 3 blocks, tail 112 113
    # this prompt shares 2 blocks of that edge, then differs: the whole edge goes, and its tail
    assert pool.delete(list(range(100, 108)) + [1, 2, 3, 4]) == 3
    assert pool.stats()["index"]["tails"] == 0 and pool.stats()["device"]["used"] == 0
    pool.check_invariants()


def test_eviction_keeps_a_tail_whose_sequence_still_holds_its_block() -> None:
    pool = make_pool(device_blocks=4, host_blocks=0)
    finished(pool, list(range(100, 104)))  # one indexed block, nobody else's
    block = pool.alloc(1)
    assert block is not None
    pool.insert_tail([200, 201], block)  # its sequence still holds the block
    got = pool.alloc(3)  # 1 short: dropping the tail would free nothing, so the indexed block goes
    assert got is not None
    s = pool.stats()["index"]
    assert s["tails"] == 1 and s["dropped_tails"] == 0 and s["dropped_device"] == 1
    pool.free(got)
    pool.free(block)
    pool.check_invariants()


def test_allocation_counts_the_tails_it_can_free_past_one_still_in_use() -> None:
    """The least recently used tail is still its sequence's: a short allocation skips it, counts the
    tails behind it and the indexed blocks, and is refused (changing nothing) only past all of them."""
    pool = make_pool(device_blocks=8, host_blocks=0)
    held = pool.alloc(1)
    assert held is not None
    pool.insert_tail([100, 101], held)  # the oldest tail; its sequence keeps the block
    finished(pool, [*range(200, 204), 210, 211])  # an indexed block and a tail only the index holds
    finished(pool, [*range(300, 304), 310, 311])  # the same again
    assert pool.stats()["device"]["free"] == 3
    before = snapshot(pool)
    assert pool.alloc(8) is None  # 5 short; 2 free tails + 2 indexed blocks make 4
    assert snapshot(pool) == before
    got = pool.alloc(7)  # 4 short: exactly those four
    assert got is not None
    s = pool.stats()["index"]
    assert s["dropped_tails"] == 2 and s["dropped_device"] == 2 and s["tails"] == 1
    pool.free(got)
    pool.free(held)
    pool.check_invariants()


def test_a_tail_that_its_sequence_fills_up_becomes_a_whole_block() -> None:
    pool = make_pool()
    tokens = list(range(100, 106))  # one whole block, and a tail of 2
    blocks = pool.alloc(2)
    assert blocks is not None
    pool.insert(tokens, blocks[:1])
    pool.insert_tail(tokens, blocks[1:])
    more = tokens + [106, 107]  # the same sequence, on: the tail's block is whole now
    assert pool.insert(more, blocks) == 1
    s = pool.stats()
    assert s["index"]["tails"] == 0 and s["device"]["cached"] == 2
    other = pool.alloc(2)
    assert other is not None
    pool.insert(list(range(200, 206)), other[:1])
    pool.insert_tail(list(range(200, 206)), other[1:])
    before = pool.stats()
    with pytest.raises(BlockInUseError):  # the tail of other tokens: never indexed as these
        pool.insert(
            list(range(100, 104)) + [204, 205, 9, 9], Blocks(Tier.DEVICE, [blocks.tolist()[0], other.tolist()[1]])
        )
    with pytest.raises(BlockInUseError):  # its own tokens, but diverging from what the tail holds
        pool.insert(list(range(200, 204)) + [204, 7, 9, 9], other)
    assert pool.stats() == before
    pool.free(blocks)
    pool.free(other)
    pool.check_invariants()
    assert pool.stats()["device"]["used"] == 4


def test_insert_sequence_caches_whole_blocks_and_the_tail_all_or_nothing() -> None:
    pool = make_pool()
    tokens = list(range(100, 110))  # 2 whole blocks and 2 tokens
    blocks = pool.alloc(3)
    other = pool.alloc(1)
    assert blocks is not None and other is not None
    kv = fill_random(pool, blocks, seed=3)
    before = snapshot(pool)
    for call, error in [
        (lambda: pool.insert_sequence(tokens, blocks[:2]), InvalidArgumentError),  # the tail's block missing
        (lambda: pool.insert_sequence(tokens, blocks.concat(other)), InvalidArgumentError),  # one too many
        (lambda: pool.insert_sequence(tokens, Blocks(Tier.DEVICE, [*blocks.ids[:2], blocks.ids[0]])), BlockInUseError),
        (lambda: pool.insert_sequence([1.5] * 10, blocks), InvalidTokensError),
    ]:
        with pytest.raises(error):
            call()
        assert snapshot(pool) == before  # nothing indexed, no tail kept, no reference taken
    assert pool.insert_sequence(tokens, blocks) == 2
    with pool.match(tokens) as m:
        assert m.num_tokens == 8 and m.blocks.tolist() == blocks.tolist()[:2]
    own = pool.alloc(1)
    assert own is not None
    assert pool.copy_tail([*tokens, 5], 8, own) == 2
    assert torch.equal(pool.storage(Tier.DEVICE).gather(own.ids)[0], kv[2])
    assert pool.insert_sequence(tokens[:8], blocks[:2]) == 0  # a block boundary: nothing new, no tail
    pool.free(own)
    pool.free(other)
    pool.free(blocks)
    pool.check_invariants()
    assert pool.stats()["device"]["used"] == pool.stats()["device"]["cached"] == 3  # 2 indexed + the tail


_BLOCK = st.lists(st.integers(0, 1), min_size=2, max_size=2)  # block size 2, two token values: prefixes collide
_TAILS = st.lists(st.tuples(st.sampled_from([None, "a"]), st.lists(_BLOCK, max_size=3), st.integers(0, 1)), max_size=24)


@given(tails=_TAILS, namespace=st.sampled_from([None, "a"]), kept=st.lists(_BLOCK, max_size=2), block=_BLOCK)
def test_a_delete_drops_exactly_the_tails_that_continue_or_end_in_what_it_removes(
    tails: list[tuple[object, list[list[int]], int]], namespace: object, kept: list[list[int]], block: list[int]
) -> None:
    """``drop_under`` finds its tails through the sorted prefixes; the oracle is the definition,
    checked against every tail one by one."""

    def key(blocks: list[list[int]]) -> bytes:
        return np.array([t for b in blocks for t in b], dtype=np.int32).tobytes()

    alloc = BlockAllocator(Tier.DEVICE, 32, owner=None)
    store = TailStore(alloc)
    for ns, blocks, token in tails:
        own = alloc.allocate(1)
        assert own is not None
        store.put(ns, key(blocks), key([[token]]), int(own.ids[0]))
        alloc.free(own)
    prefix, cut = key([*kept, block]), len(key(kept))
    doomed = {  # the definition: the tail's tokens run past kept and agree with prefix that far
        k
        for k, (tail, _) in store._tails.items()
        if k[0] == namespace and len(k[1] + tail) > cut and (k[1] + tail)[: len(prefix)] == prefix[: len(k[1] + tail)]
    }
    before = set(store._tails)
    assert store.drop_under(namespace, prefix, cut) == len(doomed)
    assert set(store._tails) == before - doomed
    store.check(np.zeros(32, dtype=np.int64))
    assert alloc.num_used == len(store)  # a dropped tail's block went back
