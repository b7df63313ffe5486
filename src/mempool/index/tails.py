"""Partly filled last blocks of finished sequences ("tails"), reused token by token.

The radix tree caches whole blocks only. A sequence's last block usually holds the K/V of a few
more tokens (``block_size - 1`` at most); a later prompt that continues the sequence, such as the
next turn of a chat, would compute them again. A tail keeps that block, keyed by the exact tokens
before it, and a request whose prompt continues those tokens copies it into a block of its own
(copy on write: a tail is never written) and computes only what follows.

The K/V of a position depends on the tokens up to it only, so a tail serves any prompt that
shares its first ``j`` tokens: the copy's first ``j`` slots are valid, whatever the rest holds.

Tails live on the device tier, hold one allocator reference each, and are what the tier gives up
first when it is short (least recently used first, before any indexed block is evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedList

from mempool.alloc.allocator import BlockAllocator
from mempool.index.keys import TOKEN_BYTES, common_prefix_tokens
from mempool.types import Blocks, Tier

__all__ = ["TailStore"]

_Key = tuple[Hashable, bytes]


class TailStore:
    """Tails by ``(namespace, key of the tokens before them)``; at most one per key (the latest).

    Plain bookkeeping: the caller (:class:`~mempool.index.radix.RadixIndex`) validates blocks,
    copies K/V and serialises calls.
    """

    def __init__(self, alloc: BlockAllocator) -> None:
        self._alloc = alloc
        # (namespace, prefix key) -> (the tail's token key, its block); oldest use first
        self._tails: OrderedDict[_Key, tuple[bytes, int]] = OrderedDict()
        self._blocks: dict[int, _Key] = {}  # block id -> the tail holding it
        self.mask = np.zeros(alloc.capacity, dtype=bool)  # block id -> held by a tail
        # per namespace holding tails, their prefix keys in byte order: the tails after any given
        # prefix are one range of it (what a delete drops)
        self._prefixes: dict[Hashable, SortedList[bytes]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def holds(self, block: int) -> _Key | None:
        """The key of the tail holding ``block``, if one does."""
        return self._blocks.get(block)

    def put(self, namespace: Hashable, prefix: bytes, tail: bytes, block: int) -> None:
        """Keep ``block`` (the caller's, validated, not another key's tail) as the K/V of ``tail`` after
        ``prefix``; a tail already kept there is dropped."""
        key = (namespace, prefix)
        self._alloc._retain(np.array([block], dtype=np.int64))  # first: the drop may release the same block
        self.drop_key(key)
        self._tails[key] = (tail, block)
        prefixes = self._prefixes.get(namespace)
        if prefixes is None:
            prefixes = self._prefixes[namespace] = SortedList()
        prefixes.add(prefix)
        self._blocks[block] = key
        self.mask[block] = True

    def tail(self, key: _Key) -> bytes:
        """The token key of the tail at ``key`` (which must exist)."""
        return self._tails[key][0]

    def find(self, namespace: Hashable, prefix: bytes, following: bytes) -> tuple[int, int]:
        """The tail after ``prefix`` and how many of its tokens ``following`` starts with:
        ``(block, tokens)``, or ``(-1, 0)`` when none serves. A hit counts as a use."""
        key = (namespace, prefix)
        got = self._tails.get(key)
        if got is None:
            return -1, 0
        tail, block = got
        shared = common_prefix_tokens(tail, following[: len(tail)])
        if shared:
            self._tails.move_to_end(key)
        return block, shared

    def drop_key(self, key: _Key) -> int:
        """Drop the tail at ``key`` if any; returns how many blocks became free (0 or 1)."""
        got = self._tails.pop(key, None)
        if got is None:
            return 0
        prefixes = self._prefixes[key[0]]
        prefixes.remove(key[1])
        if not prefixes:  # a namespace without tails keeps no entry
            del self._prefixes[key[0]]
        del self._blocks[got[1]]
        self.mask[got[1]] = False
        return self._alloc.free(Blocks._trusted(Tier.DEVICE, np.array([got[1]], dtype=np.int64), None))

    def drop(self, free: int) -> int:
        """Drop the least recently used tails whose block only the store references until ``free``
        blocks became free (or none is left); returns how many did. A tail whose sequence still
        holds its block stays: dropping it would free nothing."""
        doomed = self._freeable_keys(free)
        for key in doomed:
            self.drop_key(key)
        return len(doomed)

    def _freeable_keys(self, limit: int) -> list[_Key]:
        """The keys of the (at most ``limit``) least recently used tails whose block only the store
        references: a walk from the oldest that stops once it has them, not a pass over every tail."""
        out: list[_Key] = []
        if limit <= 0:
            return out
        refs = self._alloc._refs
        for key, (_, block) in self._tails.items():
            if refs[block] == 1:
                out.append(key)
                if len(out) >= limit:
                    break
        return out

    def drop_under(self, namespace: Hashable, prefix: bytes, kept: int) -> int:
        """Drop every tail of ``namespace`` whose tokens run past the first ``kept`` bytes of
        ``prefix`` and agree with it that far (so continue it, or end inside it); returns how
        many tails were dropped. ``kept`` is a whole number of blocks and ``prefix`` one block
        more: so the tails after ``prefix`` or a longer prefix, and the tail after exactly
        ``prefix[:kept]`` where that block starts with it. O(log tails + dropped)."""
        doomed = []
        prefixes = self._prefixes.get(namespace)
        if prefixes is not None and len(prefix) > kept:
            for p in prefixes.irange(minimum=prefix):  # every key that starts with prefix, in a row
                if not p.startswith(prefix):
                    break
                doomed.append((namespace, p))
            key = (namespace, prefix[:kept])
            got = self._tails.get(key)
            if got is not None and prefix.startswith(got[0], kept):
                doomed.append(key)
        for key in doomed:
            self.drop_key(key)
        return len(doomed)

    def freeable(self, limit: int) -> int:
        """Tails whose block only the store references (dropping them frees that many blocks),
        counted up to ``limit``."""
        return len(self._freeable_keys(limit))

    def check(self, where: npt.NDArray[np.int64]) -> None:
        """Assert the store's invariants; ``where``: the tree's device block -> node map."""
        assert len(self._blocks) == len(self._tails), "a block held by two tails, or a stale block map"
        for key, (tail, block) in self._tails.items():
            assert self._blocks.get(block) == key and self.mask[block], (key, block)
            assert 0 < len(tail) and len(tail) % TOKEN_BYTES == 0, key
            assert self._alloc._refs[block] >= 1, f"tail block {block} is free in the allocator"
            assert where[block] == 0, f"tail block {block} is also indexed as a whole block"
        assert int(np.count_nonzero(self.mask)) == len(self._blocks), "stale tail mask"
        listed = [(ns, p) for ns, ps in self._prefixes.items() for p in ps]
        assert all(self._prefixes.values()), "a namespace without tails keeps an entry"
        assert len(listed) == len(self._tails) and set(listed) == set(self._tails), "stale prefix order"
