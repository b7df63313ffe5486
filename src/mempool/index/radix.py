"""Token radix tree at block granularity, with locks, tier residency and eviction.

Edges are whole blocks of ``block_size`` tokens; a node's edge may span many blocks and is
split at a block boundary when a prefix diverges or part of it is evicted. A sequence's partly
filled last block is not in the tree: it can be kept as a *tail* (``tails.py``). See
``node.py`` for the residency rules and ``eviction.py`` for the candidate heaps. The index holds
one allocator reference per block it indexes.

Not thread-safe on its own: :class:`~mempool.pool.MemPool` serialises calls, and ``guard``
(the pool's lock) is what a :class:`Match` takes when it is released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from mempool.alloc.allocator import BlockAllocator
from mempool.errors import (
    BlockInUseError,
    BlockLockedError,
    DoubleFreeError,
    HandleReleasedError,
    InvalidArgumentError,
    LockUnderflowError,
    TierUnavailableError,
    WrongTierError,
)
from mempool.index.eviction import CandidateHeap, make_policy
from mempool.index.keys import TOKEN_BYTES, common_prefix_tokens, encode_tokens
from mempool.index.match import Match
from mempool.index.node import Node
from mempool.index.tails import TailStore
from mempool.types import Blocks, IdArray, Tier

__all__ = ["Mover", "RadixIndex"]

# copies KV of blocks ``src_ids`` of one tier into blocks ``dst_ids`` of another
Mover = Callable[[Tier, IdArray, Tier, IdArray], None]
_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


class RadixIndex:
    """Maps token prefixes to the KV blocks that hold them, on the device and host tiers.

    Args:
        block_size: tokens per block.
        device: the device tier's allocator.
        host: the host tier's allocator, or ``None`` (then eviction drops instead of demoting).
        mover: copies blocks between tiers (needed for demotion and promotion).
        policy: eviction policy name (``mempool.index.eviction.POLICIES``).
        guard: lock taken by ``Match.release`` (the owning pool's lock).
    """

    def __init__(
        self,
        *,
        block_size: int,
        device: BlockAllocator,
        host: BlockAllocator | None = None,
        mover: Mover | None = None,
        policy: str = "lru",
        guard: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.block_size = block_size
        self._tb = block_size * TOKEN_BYTES
        self._alloc: dict[Tier, BlockAllocator | None] = {Tier.DEVICE: device, Tier.HOST: host}
        # uid of the node holding each block (0: not indexed), per tier
        self._where = {t: np.zeros(a.capacity if a else 0, dtype=np.int64) for t, a in self._alloc.items()}
        self._nodes: dict[int, Node] = {}
        self._count = {Tier.DEVICE: 0, Tier.HOST: 0}  # blocks the index holds
        self._locked = {Tier.DEVICE: 0, Tier.HOST: 0}  # of those, blocks in locked nodes
        self._mover = mover
        self._guard: AbstractContextManager[Any] = guard if guard is not None else nullcontext()
        # one root per namespace that caches anything (dropped when its last prefix goes), and back
        self._roots: dict[Hashable, Node] = {}
        self._root_ns: dict[int, Hashable] = {}  # root uid -> its namespace
        self._uid = 0
        self._clock = 0
        self.num_nodes = 0
        policy_obj = make_policy(policy)
        self._dev_heap = CandidateHeap(0, policy_obj, _device_candidate)
        self._host_heap = CandidateHeap(1, policy_obj, _host_candidate)
        self._heaps = {Tier.DEVICE: self._dev_heap, Tier.HOST: self._host_heap}
        self._empty = {
            t: Blocks._trusted(t, _EMPTY, a._owner if a is not None else None) for t, a in self._alloc.items()
        }
        self.tails = TailStore(device)
        self.counters = {
            "inserted": 0,
            "demoted": 0,
            "promoted": 0,
            "dropped_device": 0,
            "dropped_host": 0,
            "tail_hits": 0,
            "tail_tokens": 0,
            "dropped_tails": 0,
        }
        #: called as ``on_removed(namespace, tokens)`` when a prefix stops being cached on every tier
        #: (evicted or deleted): ``tokens`` (int32 array) ends with the first block no longer cached;
        #: every longer prefix through it is gone too. Runs under the pool's lock: keep it short and
        #: never call back into the pool.
        self.on_removed: Callable[[Hashable, npt.NDArray[np.int32]], None] | None = None

    # -- public API ------------------------------------------------------------------------
    def insert(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> int:
        """Index the first ``len(blocks)`` full blocks of ``tokens`` with ``blocks``.

        Where a prefix is cached already on ``blocks.tier``, the caller's block for it is not
        referenced (the caller frees its own blocks as usual); where it is cached on the other
        tier only, the caller's block is attached as this tier's copy.

        Returns:
            how many blocks the index newly references.
        Raises:
            InvalidTokensError, InvalidArgumentError (more blocks than full token blocks),
            BlockNotAllocatedError, ForeignBlockError, WrongTierError, TierUnavailableError,
            BlockInUseError (a block held by the index for another prefix, or given twice, or
            kept as the tail of other tokens; a tail that ``tokens`` fill up becomes a whole
            block). On any error nothing changes.
        Complexity: O(n) to encode tokens, O(depth) dict probes, O(log n) per heap update.
        """
        key = encode_tokens(tokens)
        tier = self._tier(blocks)
        ids = self._alloc_of(tier).validate(blocks, held=True)
        nb = len(ids)
        ntok = len(key) // TOKEN_BYTES
        if nb * self.block_size > ntok:
            raise InvalidArgumentError(f"{nb} blocks need {nb * self.block_size} tokens but only {ntok} were given")
        _check_namespace(namespace)
        if nb == 0:
            return 0
        key = key[: nb * self._tb]
        segs, pos = self._walk(self._roots.get(namespace), key, nb)
        on_device = tier is Tier.DEVICE
        # positions whose node lacks a copy on this tier take the caller's blocks as that copy
        bare = [(node, m, p) for node, m, p in segs if (node.device if on_device else node.host) is None]
        parts = [ids[p : p + m] for _, m, p in bare]
        fresh = ids[pos:] if not parts else np.concatenate((*parts, ids[pos:]))
        if fresh.size:
            # count_nonzero: a C call, where .any()/.all() go through numpy's Python wrappers
            if np.count_nonzero(self._where[tier][fresh]):
                taken = fresh[self._where[tier][fresh] != 0]
                raise BlockInUseError(f"{tier.value} blocks {taken[:8].tolist()} are indexed for another prefix")
            if np.count_nonzero(fresh[1:] <= fresh[:-1]) and np.unique(fresh).size != fresh.size:
                raise BlockInUseError("the same block is given for two positions")
        grown = []  # tails this insert fills up: their blocks become whole blocks of the same tokens
        if on_device and fresh.size and len(self.tails) and np.count_nonzero(self.tails.mask[fresh]):
            grown = self._grown_tails(fresh[self.tails.mask[fresh]], ids, key, namespace)
        # -- validated: mutations below cannot fail --
        self._clock += 1
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = Node(self._next_uid(), None, b"", 0, self._clock)
            self._root_ns[root.uid] = namespace
        if segs:
            node, m, p = segs[-1]
            if m < node.nblocks and (pos < nb or (bare and bare[-1][0] is node)):
                segs[-1] = head = (self._split(node, m), m, p)
                if bare and bare[-1][0] is node:
                    bare[-1] = head
        if fresh.size:  # the index's references to every block it takes, in one call
            self._alloc_of(tier)._retain(fresh)
        for tail_key in grown:  # after the index's own reference: dropping the tail's frees nothing
            self.tails.drop_key(tail_key)
        added = 0
        for node, m, p in bare:
            self._attach(node, tier, ids[p : p + m])
            added += m
        parent = segs[-1][0] if segs else root
        touched = [node for node, _, _ in segs]
        if pos < nb:
            leaf = self._new_node(parent, key[pos * self._tb :], nb - pos)
            parent.children[key[pos * self._tb : (pos + 1) * self._tb]] = leaf
            self._attach(leaf, tier, ids[pos:])
            added += nb - pos
            touched.append(leaf)
        for node in touched:  # the parent is among them (or is the root, never a candidate)
            node.stamp = self._clock
            if node.dev_children == 0 or node.host is not None:  # else it cannot be a candidate
                self._offer(node)
        self.counters["inserted"] += added
        return added

    def match(self, tokens: Any, namespace: Hashable = None) -> Match:
        """Longest cached whole-block prefix of ``tokens``; its blocks stay locked until released.

        The device-resident part comes first (``Match.blocks``), then the host-only part
        (``Match.host_blocks``). A match ending inside an edge splits it there, so the lock
        covers exactly the matched blocks. Raises ``InvalidTokensError`` for bad tokens.
        Complexity: O(n) to encode tokens, O(depth) dict probes and lock updates.
        """
        key = encode_tokens(tokens)
        _check_namespace(namespace)
        nb = len(key) // self._tb
        segs, total = self._walk(self._roots.get(namespace), key[: nb * self._tb], nb)
        if not segs:
            return Match(self, None, 0, self._blocks(Tier.DEVICE, []), self._blocks(Tier.HOST, []), self._guard)
        self._clock += 1
        last, m, _ = segs[-1]
        if m < last.nblocks:  # lock exactly what matched, not the rest of the edge
            last = self._split(last, m)
        self._lock(last, self._clock)
        dev, host = self._collect(last, total)
        return Match(self, last, total, dev, host, self._guard)

    def delete(self, tokens: Any, namespace: Hashable = None) -> int:
        """Remove the cached prefix of ``tokens`` and every cached continuation of it.

        Nodes the prefix shares with other cached sequences stay. Returns the number of
        blocks (positions) removed from the index; 0 if nothing of ``tokens`` is cached.
        Raises:
            BlockLockedError: part of it is locked by a live match; nothing changes.
        """
        key = encode_tokens(tokens)
        _check_namespace(namespace)
        nb = len(key) // self._tb
        segs, _ = self._walk(self._roots.get(namespace), key[: nb * self._tb], nb)
        if not segs:
            return 0
        top = segs[-1][0]
        for node, _, _ in reversed(segs[:-1]):
            if len(node.children) != 1:
                break
            top = node
        if top.lock:
            raise BlockLockedError(f"the prefix is locked by {top.lock} live match(es)")
        removed = sum(n.nblocks for n in _subtree(top))
        kept = b"".join(n.key for n in top.path()[:-1])  # what stays cached: the tails past it go
        self._remove_subtree(top)
        if len(self.tails):
            self.tails.drop_under(namespace, kept + top.key[: self._tb], len(kept))
        return removed

    def promote(self, match: Match) -> bool:
        """Copy the host-only part of ``match`` to the device and attach it; keep it locked.

        Returns:
            ``True`` when ``match.blocks`` now covers the whole match; ``False`` when the device
            tier has no room (back-pressure; nothing changes).
        Raises:
            HandleReleasedError: the match was released.
        """
        if match.released:
            raise HandleReleasedError("cannot promote a released Match")
        if match._index is not self:
            raise InvalidArgumentError("the Match belongs to another index")
        need = len(match.host_blocks)
        if need == 0:
            return True
        if self._mover is None:
            raise TierUnavailableError("promotion needs a mover between tiers")
        got = self.allocate(Tier.DEVICE, need)
        if got is None:
            return False
        last = match._last
        assert last is not None
        todo = [n for n in last.path() if n.device is None]  # a match ends at a node's end
        src = np.concatenate([n.host for n in todo if n.host is not None])
        assert src.size == need, (src.size, need)
        self._move(Tier.HOST, src, Tier.DEVICE, got)
        off = 0
        for node in todo:  # top first, so device residency stays prefix-closed
            self._attach(node, Tier.DEVICE, got.ids[off : off + node.nblocks])
            off += node.nblocks
            self._offer(node)
        self.counters["promoted"] += need
        match.blocks, match.host_blocks = self._collect(last, match._num_blocks)
        return True

    def insert_tail(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> bool:
        """Keep ``blocks`` (one device block) as the K/V of ``tokens``' partly filled last block:
        its last ``len(tokens) % block_size`` tokens (see ``tails.py``).

        The index takes its own reference; the caller keeps (and later frees) theirs and must not
        write the block's first ``len(tokens) % block_size`` slots again. A tail kept after the
        same tokens already is replaced (keeping a tail's block again, with more tokens, updates
        it). Returns ``False`` (nothing changes) when ``tokens`` end on a block boundary: there is
        no partly filled block (``blocks`` may then be empty).
        Raises:
            InvalidTokensError, InvalidArgumentError (not exactly one block), WrongTierError,
            BlockNotAllocatedError, ForeignBlockError, BlockInUseError (the block is indexed,
            or is a tail already). On any error nothing changes.
        """
        key = encode_tokens(tokens)
        block = self._tail_block(key, blocks, namespace)
        if block is None:
            return False
        cut = len(key) - len(key) % self._tb
        self.tails.put(namespace, key[:cut], key[cut:], block)
        return True

    def insert_sequence(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> int:
        """Cache a sequence that is done writing, all or nothing: :meth:`insert` its whole blocks
        and keep the partly filled last one as a tail (:meth:`insert_tail`). ``blocks`` hold the
        K/V of every token: ``ceil(len(tokens) / block_size)`` of them. Returns how many whole
        blocks were newly indexed.

        Raises:
            what :meth:`insert` and :meth:`insert_tail` raise; InvalidArgumentError for a block
            count that does not cover ``tokens`` exactly. On any error nothing changes.
        """
        key = encode_tokens(tokens)
        full, part = divmod(len(key) // TOKEN_BYTES, self.block_size)
        if not isinstance(blocks, Blocks) or len(blocks) != full + bool(part):
            got = len(blocks) if isinstance(blocks, Blocks) else blocks
            raise InvalidArgumentError(f"{len(key) // TOKEN_BYTES} tokens need {full + bool(part)} blocks, got {got}")
        block = self._tail_block(key, blocks[full:], namespace) if part else None
        if block is not None and block in blocks.ids[:full]:  # checked before the insert: after it nothing may fail
            raise BlockInUseError(f"device block {block} is given for a whole block and the tail")
        added = self.insert(np.frombuffer(key, dtype=np.int32)[: full * self.block_size], blocks[:full], namespace)
        if block is not None:
            self.tails.put(namespace, key[: full * self._tb], key[full * self._tb :], block)
        return added

    def _tail_block(self, key: bytes, blocks: Blocks, namespace: Hashable) -> int | None:
        """The one device block ``blocks`` may keep as the tail of ``key``; ``None`` when ``key``
        ends on a block boundary and ``blocks`` is at most one block. Raises as :meth:`insert_tail`."""
        tier = self._tier(blocks)
        if tier is not Tier.DEVICE:
            raise WrongTierError(f"tails live on the device tier, got {tier.value} blocks")
        ids = self._alloc_of(tier).validate(blocks, held=True)
        _check_namespace(namespace)
        cut = len(key) - len(key) % self._tb
        if cut == len(key) and len(ids) <= 1:
            return None
        if len(ids) != 1:
            raise InvalidArgumentError(f"a tail is one block, got {len(ids)}")
        block = int(ids[0])
        holder = self.tails.holds(block)
        if self._where[tier][block] or (holder is not None and holder != (namespace, key[:cut])):
            raise BlockInUseError(f"device block {block} is cached already")
        return block

    def copy_tail(self, tokens: Any, start: int, blocks: Blocks, namespace: Hashable = None) -> int:
        """Copy the kept tail that follows ``tokens[:start]`` into ``blocks`` (one device block of the
        caller's, for positions ``start`` on) and return how many tokens of ``tokens[start:]`` its
        first slots now hold; 0 (nothing copied) when no tail serves.

        Raises:
            InvalidTokensError, InvalidArgumentError (``start`` not a block boundary within
            ``tokens``, not exactly one block), WrongTierError, BlockNotAllocatedError,
            ForeignBlockError, BlockInUseError (the block is cached: it is not the caller's to
            write). On any error nothing changes.
        """
        key = encode_tokens(tokens)
        tier = self._tier(blocks)
        if tier is not Tier.DEVICE:
            raise WrongTierError(f"tails live on the device tier, got {tier.value} blocks")
        ids = self._alloc_of(tier).validate(blocks, held=True)
        if len(ids) != 1:
            raise InvalidArgumentError(f"a tail is copied into one block, got {len(ids)}")
        _check_namespace(namespace)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start % self.block_size:
            raise InvalidArgumentError(f"start must be a multiple of the block size ({self.block_size}), got {start!r}")
        if start * TOKEN_BYTES > len(key):
            raise InvalidArgumentError(f"start {start} lies past the {len(key) // TOKEN_BYTES} tokens given")
        dst = int(ids[0])
        if self._where[tier][dst] or self.tails.holds(dst) is not None:
            raise BlockInUseError(f"device block {dst} is cached: copy into a block of your own")
        if not len(self.tails):
            return 0
        cut = start * TOKEN_BYTES
        src, shared = self.tails.find(namespace, key[:cut], key[cut:])
        if not shared:
            return 0
        if self._mover is None:
            raise TierUnavailableError("copying a tail needs a mover")
        self._mover(Tier.DEVICE, np.array([src], dtype=np.int64), Tier.DEVICE, ids)
        self.counters["tail_hits"] += 1
        self.counters["tail_tokens"] += shared
        return shared

    def _grown_tails(self, blocks: IdArray, ids: IdArray, key: bytes, namespace: Hashable) -> list[Any]:
        """The keys of the tails held by ``blocks`` (among ``ids``, given for ``key``) that an insert
        fills up: each kept after exactly the tokens before its position, with tokens that ``key``
        continues. Raises ``BlockInUseError`` for a tail of anything else."""
        out = []
        for block in blocks.tolist():
            holder = self.tails.holds(block)
            start = int(np.flatnonzero(ids == block)[0]) * self._tb
            if (
                holder is None
                or holder != (namespace, key[:start])
                or not key[start:].startswith(self.tails.tail(holder))
            ):
                raise BlockInUseError(f"device block {block} is kept as the partly filled block of other tokens")
            out.append(holder)
        return out

    def allocate(self, tier: Tier, n: int) -> Blocks | None:
        """Allocate ``n`` blocks of ``tier``, evicting unlocked cached blocks if needed.

        Returns ``None`` (after evicting nothing) when even evicting every unlocked cached
        block could not make room. The caller owns one reference to each block returned.
        """
        alloc = self._alloc_of(tier)
        short = n - alloc.num_free if isinstance(n, int) else 0
        if short > 0:
            room = self._count[tier] - self._locked[tier]  # unlocked indexed blocks: all evictable
            if short > room and (tier is not Tier.DEVICE or short > room + self.tails.freeable(short - room)):
                return None
            self.evict(tier, short)
        return alloc.allocate(n)

    def evict(self, tier: Tier, n: int) -> int:
        """Free at least ``n`` blocks of ``tier`` from unlocked cached prefixes, by policy.

        Tails go first (dropped, least recently used first). Device blocks are demoted to the
        host tier when it has (or can make) room, else dropped; host blocks are dropped. Returns
        how many blocks became free (may be fewer than ``n`` when too little is evictable).
        O(log n) amortised per evicted node.
        """
        heap = self._heaps[tier]
        freed = 0
        if tier is Tier.DEVICE and len(self.tails):
            before = len(self.tails)
            freed = self.tails.drop(n)
            self.counters["dropped_tails"] += before - len(self.tails)
        while freed < n:
            node = heap.pop()
            if node is None:
                break
            need = n - freed
            if node.nblocks > need:
                self._split(node, node.nblocks - need)
            parent = node.parent
            freed += self._evict_device(node) if tier is Tier.DEVICE else self._evict_host(node)
            for n_ in (node, parent):
                if n_ is not None:
                    self._offer(n_)
        return freed

    # -- statistics and checks -------------------------------------------------------------
    def cached_blocks(self, tier: Tier) -> int:
        """Blocks of ``tier`` the index references, tails included. O(1)."""
        return self._count[tier] + (len(self.tails) if tier is Tier.DEVICE else 0)

    def evictable_blocks(self, tier: Tier) -> int:
        """Cached blocks of ``tier`` in unlocked nodes, and tails (they may still be shared with
        requests). O(1)."""
        return self.cached_blocks(tier) - self._locked[tier]

    def stats(self) -> dict[str, int]:
        """Counts of nodes, of namespaces caching anything, of cached, locked and evictable blocks
        per tier (tails included), of tails, and event counters."""
        out = {"nodes": self.num_nodes, "namespaces": len(self._roots), "tails": len(self.tails), **self.counters}
        for tier in Tier:
            out[f"{tier.value}_cached"] = self.cached_blocks(tier)
            out[f"{tier.value}_locked"] = self._locked[tier]
            out[f"{tier.value}_evictable"] = self.evictable_blocks(tier)
        return out

    def check_invariants(self) -> None:
        """Assert the tree's structure, residency rules and references against the allocators."""
        from mempool.index.checks import check_index

        check_index(self)
        self.tails.check(self._where[Tier.DEVICE])

    def format_tree(self, namespace: Hashable = None, max_tokens: int = 8) -> str:
        """A printable picture of one namespace's tree."""
        from mempool.index.show import format_tree

        return format_tree(self, namespace, max_tokens)

    # -- internals -------------------------------------------------------------------------
    def _tier(self, blocks: Blocks) -> Tier:
        if not isinstance(blocks, Blocks):
            raise InvalidArgumentError(f"expected a Blocks handle, got {type(blocks).__name__}")
        return blocks.tier

    def _alloc_of(self, tier: Tier) -> BlockAllocator:
        alloc = self._alloc[tier]
        if alloc is None:
            raise TierUnavailableError(f"this pool has no {tier.value} tier")
        return alloc

    def _next_uid(self) -> int:
        self._uid += 1
        return self._uid

    def _new_node(self, parent: Node, key: bytes, nblocks: int) -> Node:
        node = Node(self._next_uid(), parent, key, nblocks, self._clock)
        self._nodes[node.uid] = node
        self.num_nodes += 1
        return node

    def check_release(self, tier: Tier, ids: IdArray) -> None:
        """Refuse to drop one caller reference per entry of ``ids`` (validated ids of ``tier``)
        where that would take a reference the index holds: the caller has none left to give.

        A :class:`Match`'s blocks are locked, not referenced, so freeing them takes some other
        owner's reference; the check catches it at the latest when the index's own would go.

        Raises:
            DoubleFreeError: nothing changes.
        """
        if not ids.size:
            return
        held = self._where[tier][ids] != 0
        if tier is Tier.DEVICE and len(self.tails):
            held |= self.tails.mask[ids]
        if not held.any():
            return
        uniq, count = np.unique(ids[held], return_counts=True)
        short = uniq[self._alloc_of(tier)._refs[uniq] <= count]
        if short.size:
            raise DoubleFreeError(
                f"{tier.value} blocks {short[:8].tolist()} are cached and hold no reference of the caller's to "
                "drop (a Match's blocks are locked, not referenced: free only what alloc, share or a swap gave)"
            )

    def release_guard(self, tier: Tier) -> Callable[[IdArray], None] | None:
        """:meth:`check_release` for ``tier`` where the index holds blocks of it, else ``None``."""
        if self._count[tier] or (tier is Tier.DEVICE and len(self.tails)):
            return partial(self.check_release, tier)
        return None

    def locked_among(self, tier: Tier, ids: IdArray) -> bool:
        """Whether any of the blocks ``ids`` of ``tier`` is indexed in a locked node."""
        where = self._where[tier]
        if not where.size or not len(ids):
            return False
        uids = np.unique(where[ids])
        return any(self._nodes[u].lock for u in uids.tolist() if u)

    def _blocks(self, tier: Tier, parts: list[IdArray]) -> Blocks:
        if not parts:
            return self._empty[tier]
        alloc = self._alloc[tier]
        ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return Blocks._trusted(tier, ids, alloc._owner if alloc is not None else None)

    def _walk(self, root: Node | None, key: bytes, nb: int) -> tuple[list[tuple[Node, int, int]], int]:
        """Follow ``key`` (``nb`` whole blocks) from ``root``: ``([(node, blocks matched, start)], end)``."""
        segs: list[tuple[Node, int, int]] = []
        pos = 0
        node = root
        tb, bs = self._tb, self.block_size
        while node is not None and pos < nb:
            child = node.children.get(key[pos * tb : (pos + 1) * tb])
            if child is None:
                break
            edge = child.key
            if key.startswith(edge, pos * tb):  # compares in place: no copy of the key's slice
                m = child.nblocks
            else:
                m = common_prefix_tokens(edge, key[pos * tb : pos * tb + len(edge)]) // bs
            segs.append((child, m, pos))
            pos += m
            if m < child.nblocks:
                break
            node = child
        return segs, pos

    def _collect(self, last: Node, total: int) -> tuple[Blocks, Blocks]:
        """Device prefix and host continuation of the first ``total`` blocks of ``last``'s path."""
        dev: list[IdArray] = []
        host: list[IdArray] = []
        left = total
        for node in last.path():
            m = min(node.nblocks, left)
            left -= m
            if node.device is not None and not host:
                dev.append(node.device[:m])
            else:
                assert node.host is not None, node
                host.append(node.host[:m])
        return self._blocks(Tier.DEVICE, dev), self._blocks(Tier.HOST, host)

    def _lock(self, last: Node, stamp: int) -> None:
        node: Node | None = last
        while node is not None and node.parent is not None:
            if node.lock == 0:
                self._lock_delta(node, +1)
            node.lock += 1
            node.stamp = stamp
            node.hits += 1
            node = node.parent

    def _unlock(self, last: Node) -> None:
        node: Node | None = last
        while node is not None and node.parent is not None:
            if node.lock <= 0:
                raise LockUnderflowError(f"lock of {node!r} would go below zero")
            node.lock -= 1
            if node.lock == 0:
                self._lock_delta(node, -1)
                self._offer(node)
            node = node.parent

    def _lock_delta(self, node: Node, sign: int) -> None:
        if node.device is not None:
            self._locked[Tier.DEVICE] += sign * node.nblocks
        if node.host is not None:
            self._locked[Tier.HOST] += sign * node.nblocks

    def _offer(self, node: Node) -> None:
        if node.parent is None or node.lock:
            return  # the root and locked nodes are never candidates
        if node.device is not None and node.dev_children == 0:
            self._dev_heap.offer(node)
        if node.host is not None:
            self._host_heap.offer(node)

    def _attach(self, node: Node, tier: Tier, ids: IdArray) -> None:
        """Make ``ids`` the node's copy on ``tier``, taking over one reference the caller holds to each."""
        if tier is Tier.DEVICE:
            assert node.device is None, node
            node.device = ids
            if node.parent is not None:
                node.parent.dev_children += 1
        else:
            assert node.host is None, node
            node.host = ids
        self._where[tier][ids] = node.uid
        self._count[tier] += len(ids)
        if node.lock:
            self._locked[tier] += len(ids)

    def _detach(self, node: Node, tier: Tier) -> int:
        """Drop the node's copy on ``tier``; returns how many blocks became free."""
        if tier is Tier.DEVICE:
            ids, node.device = node.device, None
            if node.parent is not None and ids is not None:
                node.parent.dev_children -= 1
        else:
            ids, node.host = node.host, None
        assert ids is not None, node
        self._where[tier][ids] = 0
        self._count[tier] -= len(ids)
        if node.lock:
            self._locked[tier] -= len(ids)
        return self._alloc_of(tier).free(Blocks._trusted(tier, ids, None))

    def _split(self, node: Node, k: int) -> Node:
        """Move the first ``k`` blocks of ``node``'s edge into a new parent; return that parent.

        ``node`` keeps its identity (and the tail), so matches that locked it stay valid.
        """
        assert 0 < k < node.nblocks, (k, node)
        parent = node.parent
        assert parent is not None
        tb = self._tb
        head = self._new_node(parent, node.key[: k * tb], k)
        head.lock, head.hits, head.stamp = node.lock, node.hits, node.stamp
        parent.children[node.key[:tb]] = head
        node.key, node.nblocks, node.parent = node.key[k * tb :], node.nblocks - k, head
        head.children[node.key[:tb]] = node
        if node.device is not None:
            head.device, node.device = node.device[:k], node.device[k:]
            head.dev_children = 1
            self._where[Tier.DEVICE][head.device] = head.uid
        if node.host is not None:
            head.host, node.host = node.host[:k], node.host[k:]
            self._where[Tier.HOST][head.host] = head.uid
        self._offer(head)
        return head

    def _move(self, src: Tier, ids: IdArray, dst: Tier, got: Blocks) -> None:
        """Copy blocks ``ids`` into ``got`` (just allocated); if the copy fails, free ``got`` and raise."""
        assert self._mover is not None
        try:
            self._mover(src, ids, dst, got.ids)
        except BaseException:
            self._alloc_of(dst).free(got)
            raise

    def _evict_device(self, node: Node) -> int:
        host = self._alloc[Tier.HOST]
        k = node.nblocks
        if node.host is None and host is not None and self._mover is not None:
            if host.num_free < k:
                self.evict(Tier.HOST, k - host.num_free)
            got = host.allocate(k)
            if got is not None:
                assert node.device is not None
                try:
                    self._move(Tier.DEVICE, node.device, Tier.HOST, got)
                except BaseException:
                    self._offer(node)  # still cached as it was: a candidate again
                    raise
                self._attach(node, Tier.HOST, got.ids)
        if node.host is not None:
            self.counters["demoted"] += k
            return self._detach(node, Tier.DEVICE)
        self.counters["dropped_device"] += k
        return self._remove_subtree(node)[0]

    def _evict_host(self, node: Node) -> int:
        self.counters["dropped_host"] += node.nblocks
        if node.device is not None:
            return self._detach(node, Tier.HOST)
        return self._remove_subtree(node)[1]

    def _remove_subtree(self, top: Node) -> tuple[int, int]:
        """Unlink ``top`` and free everything below it; returns blocks freed (device, host)."""
        parent = top.parent
        assert parent is not None and top.lock == 0, top
        if self.on_removed is not None:
            path = top.path()
            prefix = b"".join(n.key for n in path[:-1]) + top.key[: self._tb]
            root = path[0].parent
            assert root is not None
            namespace = self._root_ns[root.uid]
            try:
                self.on_removed(namespace, np.frombuffer(prefix, dtype=np.int32))
            except Exception:  # an observer's bug must never stop (or half-do) an eviction
                logging.getLogger(__name__).exception("the on_removed callback failed")
        freed = [0, 0]
        for node in _subtree(top):
            if node.device is not None:
                freed[0] += self._detach(node, Tier.DEVICE)
            if node.host is not None:
                freed[1] += self._detach(node, Tier.HOST)
            node.removed = True
            self._dev_heap.forget(node)
            self._host_heap.forget(node)
            del self._nodes[node.uid]
            self.num_nodes -= 1
        del parent.children[top.key[: self._tb]]
        if parent.parent is not None:
            self._offer(parent)
        elif not parent.children:  # a namespace that caches nothing keeps no root
            del self._roots[self._root_ns.pop(parent.uid)]
        return freed[0], freed[1]


def _subtree(top: Node) -> list[Node]:
    out, stack = [], [top]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def _device_candidate(node: Node) -> bool:
    return node.device is not None and node.lock == 0 and node.dev_children == 0


def _host_candidate(node: Node) -> bool:
    return node.host is not None and node.lock == 0 and (node.device is not None or not node.children)


def _check_namespace(namespace: Hashable) -> None:
    try:
        hash(namespace)
    except TypeError:
        raise InvalidArgumentError(f"namespace must be hashable, got {type(namespace).__name__}") from None
    if not _equals_itself(namespace):  # NaN: what is cached under it no later lookup finds
        raise InvalidArgumentError(f"namespace must equal itself, got {namespace!r}")


def _equals_itself(value: object) -> bool:
    """Whether ``value`` equals itself, part by part (a tuple equals itself by identity even
    when a NaN in it does not, and a copy of it would not)."""
    if isinstance(value, tuple | frozenset):
        return all(_equals_itself(part) for part in value)
    try:
        return bool(value == value)
    except Exception:  # an equality that raises is no usable key either
        return False


if __name__ == "__main__":
    from mempool.index.show import demo

    demo()
