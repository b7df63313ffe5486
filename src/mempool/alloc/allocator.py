"""Block allocator of one tier: free extents, reference counts, contiguous runs.

Free space is kept as maximal runs of adjacent free blocks (extents), indexed three ways::

    by_start: dict        start -> length      (the right neighbour of a freed run)
    by_end:   dict        end   -> start       (the left neighbour of a freed run)
    by_len:   SortedList  (length, start)      (best fit on alloc)

    ids:    0   1   2   3   4   5   6   7   8   9
    refs:   1   1   0   0   0   2   0   0   1   0
    runs:          [2, 3)        [6, 2)     [9, 1)

``alloc(n)`` takes the smallest free run that holds ``n`` blocks (lowest start on ties), so a
request gets one contiguous run whenever one exists; otherwise it takes the largest runs
first, which yields the fewest runs. ``free`` coalesces released blocks with their neighbours.
Per call the cost is O(r log R) for r runs touched out of R free runs, plus O(n) work on the
ids, vectorised above ``SMALL`` blocks and plain Python below it (numpy's per-call overhead
dominates tiny arrays): no operation scans the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedList

from mempool.errors import (
    BlockNotAllocatedError,
    DoubleFreeError,
    ForeignBlockError,
    InvalidArgumentError,
    InvalidBlockError,
    WrongTierError,
)
from mempool.types import Blocks, IdArray, Tier, find_runs

__all__ = ["AllocatorStats", "BlockAllocator"]

AllocatorStats = dict[str, int]
SMALL = 32  # calls on at most this many blocks take the plain-Python path


class BlockAllocator:
    """Hands out and takes back blocks of one tier; counts references.

    Not thread-safe: :class:`~mempool.pool.MemPool` serialises calls.

    >>> a = BlockAllocator(Tier.DEVICE, 8, owner=None)
    >>> a.allocate(3).tolist(), a.allocate(2).tolist()
    ([0, 1, 2], [3, 4])
    """

    def __init__(self, tier: Tier, capacity: int, owner: object | None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.tier = tier
        self.capacity = capacity
        self._owner = owner
        self._refs: npt.NDArray[np.int32] = np.zeros(capacity, dtype=np.int32)
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._by_len: SortedList[tuple[int, int]] = SortedList()
        self._num_free = capacity
        if capacity:
            self._add_run(0, capacity)

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with no reference. O(1)."""
        return self._num_free

    @property
    def num_used(self) -> int:
        """Blocks with at least one reference. O(1)."""
        return self.capacity - self._num_free

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now. O(1)."""
        return 0 <= n <= self._num_free

    def refcounts(self, blocks: Blocks) -> list[int]:
        """Reference count of each block (validated like ``free``, except free blocks are allowed)."""
        ids = self.validate(blocks, held=False)
        return [int(x) for x in self._refs[ids]]

    def num_runs(self) -> int:
        """Number of free runs (fragmentation). O(1)."""
        return len(self._by_start)

    def stats(self) -> AllocatorStats:
        """``capacity``, ``free``, ``used`` and ``free_runs`` of this tier."""
        return {
            "capacity": self.capacity,
            "free": self._num_free,
            "used": self.capacity - self._num_free,
            "free_runs": len(self._by_start),
        }

    # -- validation ------------------------------------------------------------------------
    def validate(self, blocks: Blocks, *, held: bool = True) -> IdArray:
        """Check that ``blocks`` belong to this tier (and are allocated, if ``held``); return ids.

        Raises:
            WrongTierError, ForeignBlockError, InvalidBlockError, BlockNotAllocatedError.
        """
        if not isinstance(blocks, Blocks):
            raise InvalidArgumentError(f"expected a Blocks handle, got {type(blocks).__name__}")
        if blocks.tier is not self.tier:
            raise WrongTierError(f"expected {self.tier!r} blocks, got {blocks.tier!r} blocks")
        if blocks.owner is not None and blocks.owner is not self._owner:
            raise ForeignBlockError(f"{blocks!r} was issued by another pool")
        ids = blocks.ids
        n = ids.size
        if n and not (blocks.checked and blocks.owner is self._owner and self._owner is not None):
            if n <= SMALL:
                lst = ids.tolist()
                lo, hi = min(lst), max(lst)
            else:
                lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.capacity:
                bad = lo if lo < 0 else hi
                raise InvalidBlockError(f"block id {bad} is outside {self.tier.value} tier [0, {self.capacity})")
        if n and held and np.count_nonzero(self._refs[ids]) != n:
            free = ids[self._refs[ids] == 0]
            raise BlockNotAllocatedError(f"{self.tier.value} blocks {free[:8].tolist()} are not allocated")
        return ids

    # -- mutation --------------------------------------------------------------------------
    def allocate(self, n: int) -> Blocks | None:
        """Take ``n`` free blocks, each with reference count 1.

        Returns:
            the blocks, ascending, as few runs as possible; ``None`` if fewer than ``n`` are free
            (nothing changes). The caller owns one reference to each block.
        Raises:
            InvalidArgumentError: ``n`` is not an int >= 0.
        Complexity: O(r log R + n) for r runs taken out of R free runs.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidArgumentError(f"n must be an int >= 0, got {n!r}")
        n = int(n)
        if n > self._num_free:
            return None
        if n == 0:
            return Blocks._trusted(self.tier, np.empty(0, dtype=np.int64), self._owner)
        i = self._by_len.bisect_left((n, -1))
        if i < len(self._by_len):
            length, start = self._by_len[i]
            self._take(start, length, n)
            ids: IdArray = np.arange(start, start + n, dtype=np.int64)
            self._refs[start : start + n] = 1
        else:
            pieces: list[tuple[int, int]] = []
            need = n
            while need:
                length, start = self._by_len[-1]
                k = min(length, need)
                self._take(start, length, k)
                pieces.append((start, k))
                need -= k
            pieces.sort()
            ids = np.concatenate([np.arange(s, s + k, dtype=np.int64) for s, k in pieces])
            for s0, k in pieces:
                self._refs[s0 : s0 + k] = 1
        self._num_free -= n
        return Blocks._trusted(self.tier, ids, self._owner)

    def incref(self, blocks: Blocks) -> None:
        """Add one reference to each block (a block given twice gets two).

        Raises:
            BlockNotAllocatedError: a block is free; nothing changes.
        """
        ids = self.validate(blocks, held=True)
        np.add.at(self._refs, ids, 1)

    def _retain(self, ids: IdArray) -> None:
        """``incref`` for ids the caller validated as held and distinct (the index's hot path)."""
        self._refs[ids] += 1

    def free(self, blocks: Blocks, guard: Callable[[IdArray], None] | None = None) -> int:
        """Drop one reference to each block; blocks left with none become free.

        ``guard``, if given, sees the validated ids first and may raise to refuse the call.

        Returns:
            how many blocks became free.
        Raises:
            DoubleFreeError: a block would go below zero references (also when it is given
                more times than it has references); nothing changes.
        Complexity: O(n log n) vectorised, plus O(r log R) for r released runs.
        """
        ids = self.validate(blocks, held=False)
        if guard is not None:
            guard(ids)
        n = ids.size
        if n == 0:
            return 0
        if n <= SMALL:
            return self._free_small(ids)
        step = np.diff(ids)
        if (step == 1).all():  # one run, as alloc hands them out: slice arithmetic only
            start = int(ids[0])
            view = self._refs[start : start + n]
            if not view.all():
                raise DoubleFreeError(f"{self.tier.value} blocks {ids[view == 0][:8].tolist()} are not allocated")
            view -= 1
            zero = view == 0
            if zero.all():
                self._release_run(start, n)
                self._num_free += n
                return n
            return self._release_sorted(ids[zero])
        counts: npt.NDArray[np.signedinteger[Any]]  # int64 here, intp from np.unique
        if (step > 0).all():
            uniq, counts = ids, np.ones(1, dtype=np.int64)
        else:
            uniq, counts = np.unique(ids, return_counts=True)
        refs = self._refs[uniq]
        short = uniq[refs < counts]
        if short.size:
            raise DoubleFreeError(f"{self.tier.value} blocks {short[:8].tolist()} are freed more often than referenced")
        refs = refs - counts
        self._refs[uniq] = refs
        return self._release_sorted(uniq[refs == 0])

    def _release_sorted(self, released: IdArray) -> int:
        """Return ascending, already dereferenced ``released`` blocks to the free runs."""
        if released.size:
            starts, lengths = find_runs(released)
            for s, k in zip(starts.tolist(), lengths.tolist()):
                self._release_run(s, k)
            self._num_free += int(released.size)
        return int(released.size)

    def _free_small(self, ids: IdArray) -> int:
        lst = ids.tolist()
        counts: dict[int, int] = {}
        for b in lst:
            counts[b] = counts.get(b, 0) + 1
        uniq = sorted(counts)
        refs = self._refs[uniq].tolist()
        short = [b for b, r in zip(uniq, refs) if r < counts[b]]
        if short:
            raise DoubleFreeError(f"{self.tier.value} blocks {short[:8]} are freed more often than referenced")
        released = []
        for b, r in zip(uniq, refs):
            left = r - counts[b]
            self._refs[b] = left
            if left == 0:
                released.append(b)
        if released:
            start = prev = released[0]
            for b in released[1:]:
                if b != prev + 1:
                    self._release_run(start, prev + 1 - start)
                    start = b
                prev = b
            self._release_run(start, prev + 1 - start)
            self._num_free += len(released)
        return len(released)

    # -- extents ---------------------------------------------------------------------------
    def _add_run(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        self._by_len.add((length, start))

    def _drop_run(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        self._by_len.remove((length, start))

    def _take(self, start: int, length: int, k: int) -> None:
        """Take the first ``k`` blocks of the free run ``(start, length)``."""
        self._drop_run(start, length)
        if k < length:
            self._add_run(start + k, length - k)

    def _release_run(self, start: int, length: int) -> None:
        """Return ``[start, start+length)`` to the free runs, merging with adjacent runs."""
        end = start + length
        right = self._by_start.get(end)
        if right is not None:
            self._drop_run(end, right)
            length += right
        lstart = self._by_end.get(start)
        if lstart is not None:
            llen = start - lstart
            self._drop_run(lstart, llen)
            start, length = lstart, llen + length
        self._add_run(start, length)

    # -- invariants ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the allocator's internal consistency. O(capacity)."""
        refs = self._refs
        assert refs.shape == (self.capacity,), refs.shape
        assert (refs >= 0).all(), f"negative refcount at {np.flatnonzero(refs < 0)[:8]}"
        free_mask = np.zeros(self.capacity, dtype=bool)
        prev_end = -1
        total = 0
        for start, length in sorted(self._by_start.items()):
            assert length > 0, (start, length)
            assert start > prev_end, f"run {start} overlaps or touches the previous run ending {prev_end}"
            free_mask[start : start + length] = True
            prev_end = start + length
            total += length
        assert prev_end <= self.capacity, prev_end
        assert sorted(self._by_len) == sorted((v, k) for k, v in self._by_start.items())
        assert self._by_end == {k + v: k for k, v in self._by_start.items()}
        assert total == self._num_free, (total, self._num_free)
        assert np.array_equal(free_mask, refs == 0), "free runs disagree with refcounts"
        assert self._num_free + int((refs > 0).sum()) == self.capacity
