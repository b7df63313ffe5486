"""The :class:`MemPool` facade: wires storage, allocators, index and swap; holds no algorithms."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mempool.alloc.allocator import BlockAllocator
from mempool.alloc.storage import KVStorage
from mempool.config import PoolConfig, TransportConfig
from mempool.errors import (
    BlockLockedError,
    ForkedPoolError,
    InvalidArgumentError,
    TierUnavailableError,
    WrongTierError,
)
from mempool.index.keys import encode_tokens
from mempool.index.match import Match
from mempool.index.radix import RadixIndex
from mempool.transport.agent import TransferAgent, TransferResult, check_namespace
from mempool.transport.handles import SwapHandle
from mempool.transport.swap import CopyJob, DoneJob, SwapEngine
from mempool.types import Blocks, Tier

__all__ = ["MemPool"]


class _ForkedLock:
    """Stands in for the lock of a pool inherited by a forked child: whatever takes it is refused.

    A CPU tier lives in shared memory, so the child would write into blocks that the parent's
    allocator and index still own (reproduced: a child's ``alloc`` reused a block the parent had
    cached, and its writes changed the parent's cached K/V)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def refuse(self, *args: object) -> None:
        raise ForkedPoolError(
            f"this MemPool was made in process {self.pid} and this process ({os.getpid()}) was forked "
            "from it: it cannot be used here (make a pool in this process)"
        )

    __enter__ = __exit__ = acquire = release = refuse


_POOLS: weakref.WeakSet[MemPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._lock = _ForkedLock(pool._pid)  # type: ignore[assignment]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _as_tier(tier: Tier | str) -> Tier:
    if isinstance(tier, Tier):
        return tier
    try:
        return Tier(tier)
    except ValueError:
        raise InvalidArgumentError(f"tier must be Tier.DEVICE, Tier.HOST, 'device' or 'host', got {tier!r}") from None


class MemPool:
    """An elastic KV-cache memory pool: blocks on device and host tiers, a prefix index over them.

    Every public method is thread-safe (one re-entrant lock per pool) and either succeeds or
    changes nothing. Shortage is not an error: ``alloc``, ``swap_out`` and ``swap_in`` return
    ``None`` when the target tier cannot supply the blocks even after evicting unlocked
    cached prefixes.

    >>> from mempool import MemPool, PoolConfig
    >>> pool = MemPool(PoolConfig(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
    ...                           device_blocks=16, host_blocks=16, dtype="float32"))
    >>> blocks = pool.alloc(2)
    >>> pool.insert(list(range(10)), blocks)      # 10 tokens: 2 full blocks of 4
    2
    >>> pool.free(blocks)                          # the index keeps its own reference
    0
    >>> with pool.match(list(range(9))) as m:
    ...     m.num_tokens, m.blocks.tolist()
    (8, [0, 1])
    >>> pool.check_invariants()
    """

    def __init__(self, config: PoolConfig) -> None:
        if not isinstance(config, PoolConfig):
            raise InvalidArgumentError(f"config must be a PoolConfig, got {type(config).__name__}")
        self.config = config
        self._lock = threading.RLock()
        self._pid = os.getpid()
        # What this pool's Blocks handles record as their owner: a token, not the pool itself.
        # The index keeps handles, so a handle naming the pool would make every pool a reference
        # cycle, freed only when the cyclic collector next ran: up to GiBs of KV memory given back
        # at an arbitrary later moment (measured: a 0.25-1.5 s stall in some other request's step).
        self._owner = object()
        layout = config.layout
        self._storage: dict[Tier, KVStorage] = {
            Tier.DEVICE: KVStorage(layout, config.device_blocks, config.torch_device)
        }
        self._alloc: dict[Tier, BlockAllocator] = {
            Tier.DEVICE: BlockAllocator(Tier.DEVICE, config.device_blocks, owner=self._owner)
        }
        if config.host_blocks:
            pin = config.pin_host and config.torch_device.type == "cuda"
            self._storage[Tier.HOST] = KVStorage(layout, config.host_blocks, torch.device("cpu"), pin=pin)
            self._alloc[Tier.HOST] = BlockAllocator(Tier.HOST, config.host_blocks, owner=self._owner)
        self._swap = SwapEngine(self._storage)
        self.index = RadixIndex(
            block_size=config.block_size,
            device=self._alloc[Tier.DEVICE],
            host=self._alloc.get(Tier.HOST),
            mover=self._swap.copy,
            policy=config.eviction,
            guard=self._lock,
        )
        self._agent: TransferAgent | None = None
        _POOLS.add(self)

    # -- memory ----------------------------------------------------------------------------
    def alloc(self, n: int, tier: Tier | str = Tier.DEVICE) -> Blocks | None:
        """Allocate ``n`` blocks of ``tier``, evicting unlocked cached prefixes if needed.

        Returns:
            ``Blocks`` (as few adjacent runs as possible), each with one reference owned by the
            caller; ``None`` when the tier cannot supply ``n`` blocks (back-pressure).
        Raises:
            InvalidArgumentError: ``n`` is not an int >= 0 or ``tier`` is not a tier.
            TierUnavailableError: the pool has no such tier.
        """
        tier = _as_tier(tier)
        with self._lock:
            self._alloc_of(tier)
            return self.index.allocate(tier, n)

    def free(self, blocks: Blocks) -> int:
        """Drop the caller's reference to each block; returns how many blocks became free.

        Raises:
            DoubleFreeError (also for cached blocks the caller holds no reference to, such as a
            ``Match``'s), ForeignBlockError, InvalidBlockError, TierUnavailableError.
        """
        with self._lock:
            tier = self._tier_of(blocks)
            return self._alloc_of(tier).free(blocks, self.index.release_guard(tier))

    def share(self, blocks: Blocks) -> None:
        """Add one reference to each block (for a second owner, who must ``free`` it too)."""
        with self._lock:
            self._alloc_of(self._tier_of(blocks)).incref(blocks)

    def check_held(self, blocks: Blocks) -> None:
        """Raise unless ``blocks`` are this pool's and every one is allocated (referenced by
        someone): what an engine checks of a handle it did not allocate. Changes nothing.

        Raises:
            ForeignBlockError, InvalidBlockError, BlockNotAllocatedError, TierUnavailableError.
        """
        with self._lock:
            self._alloc_of(self._tier_of(blocks)).validate(blocks, held=True)

    # -- index -----------------------------------------------------------------------------
    def insert(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> int:
        """Cache ``blocks`` as the KV of the first ``len(blocks)`` full blocks of ``tokens``.

        See :meth:`RadixIndex.insert`. The index takes its own references; the caller keeps
        (and later frees) theirs. Returns the number of newly indexed blocks.
        """
        with self._lock:
            return self.index.insert(tokens, blocks, namespace)

    def match(self, tokens: Any, namespace: Hashable = None, *, promote: bool = False) -> Match:
        """Longest cached whole-block prefix of ``tokens``, locked until the match is released.

        With ``promote=True`` host-only parts are copied to the device first when room can be
        made (otherwise they stay reported as ``host_blocks``).
        """
        with self._lock:
            m = self.index.match(tokens, namespace)
            if promote and len(m.host_blocks):
                try:
                    self.index.promote(m)
                except BaseException:  # (a failed copy) the caller never gets the match: unlock it
                    m.release()
                    raise
            return m

    def insert_tail(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> bool:
        """Keep ``blocks`` (one device block) as the K/V of the partly filled last block of ``tokens``,
        for a later prompt that continues ``tokens`` (:meth:`copy_tail`).

        Call it when a sequence is done writing, with the tokens that have K/V: the index takes
        its own reference and the caller frees theirs as usual. ``False``: ``tokens`` end on a
        block boundary (nothing to keep). See :meth:`RadixIndex.insert_tail`.
        """
        with self._lock:
            return self.index.insert_tail(tokens, blocks, namespace)

    def insert_sequence(self, tokens: Any, blocks: Blocks, namespace: Hashable = None) -> int:
        """Cache a sequence that is done writing, all or nothing: its whole blocks (:meth:`insert`)
        and its partly filled last block as a tail (:meth:`insert_tail`).

        ``tokens``: those with K/V; ``blocks``: the device blocks holding them, one per
        ``block_size`` tokens started. Returns how many whole blocks were newly indexed. See
        :meth:`RadixIndex.insert_sequence`.
        """
        with self._lock:
            return self.index.insert_sequence(tokens, blocks, namespace)

    def copy_tail(self, tokens: Any, start: int, blocks: Blocks, namespace: Hashable = None) -> int:
        """Copy a kept tail that continues ``tokens[:start]`` into ``blocks`` (one device block of the
        caller's, the one for positions ``start`` on); returns how many tokens of
        ``tokens[start:]`` its first slots now hold (0: none).

        Typically ``start = match.num_tokens`` after :meth:`match`, and ``tokens`` what was matched,
        so that the prompt's last token stays to be computed. See :meth:`RadixIndex.copy_tail`.
        """
        with self._lock:
            return self.index.copy_tail(tokens, start, blocks, namespace)

    def promote(self, match: Match) -> bool:
        """Bring the host-only part of ``match`` to the device, keeping it locked.

        Returns ``False`` (nothing changes) when the device tier has no room.
        """
        with self._lock:
            return self.index.promote(match)

    def delete(self, tokens: Any, namespace: Hashable = None) -> int:
        """Remove the cached prefix of ``tokens`` and its continuations; see :meth:`RadixIndex.delete`."""
        with self._lock:
            return self.index.delete(tokens, namespace)

    def watch_removals(self, callback: Callable[[Hashable, npt.NDArray[np.int32]], None] | None) -> None:
        """Call ``callback(namespace, tokens)`` whenever a cached prefix leaves the pool on every tier
        (evicted or deleted; a demotion to the host is not a removal). ``tokens`` ends with the first
        block no longer cached; longer prefixes through it are gone as well. The callback runs under
        the pool's lock: it must be quick and must not call the pool. ``None`` stops watching."""
        with self._lock:
            self.index.on_removed = callback

    def evict(self, n: int, tier: Tier | str = Tier.DEVICE) -> int:
        """Free up to ``n`` blocks of ``tier``: tails first, then unlocked cached prefixes (device
        blocks demoted to the host tier where it has room); returns how many."""
        tier = _as_tier(tier)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"n must be an int >= 0, got {n!r}")
        with self._lock:
            self._alloc_of(tier)
            return self.index.evict(tier, n)

    # -- tiers -----------------------------------------------------------------------------
    def swap_out(self, blocks: Blocks) -> Blocks | None:
        """Move the caller's device blocks to new host blocks; see :meth:`swap_out_async`."""
        handle = self._swap_blocks(blocks, Tier.DEVICE, Tier.HOST, wait=True)
        return None if handle is None else handle.wait()

    def swap_in(self, blocks: Blocks) -> Blocks | None:
        """Move the caller's host blocks to new device blocks; see :meth:`swap_in_async`."""
        handle = self._swap_blocks(blocks, Tier.HOST, Tier.DEVICE, wait=True)
        return None if handle is None else handle.wait()

    def swap_out_async(self, blocks: Blocks) -> SwapHandle | None:
        """Start moving device ``blocks`` to the host tier.

        The caller's references to ``blocks`` pass to the handle, which drops them once the
        copy has landed; ``handle.wait()`` returns the new host blocks (one reference each,
        owned by the caller). Returns ``None`` when the host tier has no room (nothing changes).
        If the copy fails, ``handle.wait()`` raises its error and the caller keeps ``blocks``
        (the new blocks are freed).

        Raises:
            WrongTierError, BlockNotAllocatedError, ForeignBlockError, InvalidBlockError,
            BlockLockedError (a block is part of a locked cached prefix), DoubleFreeError (a
            reference the index holds, not the caller), TierUnavailableError,
            InvalidArgumentError (a block given twice).
        """
        return self._swap_blocks(blocks, Tier.DEVICE, Tier.HOST, wait=False)

    def swap_in_async(self, blocks: Blocks) -> SwapHandle | None:
        """Start moving host ``blocks`` to the device tier; the mirror of :meth:`swap_out_async`."""
        return self._swap_blocks(blocks, Tier.HOST, Tier.DEVICE, wait=False)

    def _swap_blocks(self, blocks: Blocks, src: Tier, dst: Tier, *, wait: bool) -> SwapHandle | None:
        with self._lock:
            if self._tier_of(blocks) is not src:
                raise WrongTierError(f"expected {src.value} blocks, got {blocks.tier.value} blocks")
            ids = self._alloc_of(src).validate(blocks, held=True)
            self._alloc_of(dst)
            if ids.size > 1 and np.unique(ids).size != ids.size:  # one block cannot move twice
                raise InvalidArgumentError(f"{src.value} blocks to move must be distinct, got {blocks!r}")
            if self.index.locked_among(src, ids):
                raise BlockLockedError(f"{src.value} blocks of a locked cached prefix cannot be swapped")
            self.index.check_release(src, ids)  # the move drops the caller's reference to each
            got = self.index.allocate(dst, len(ids))
            if got is None:
                return None
            try:
                if wait:
                    self._swap.copy(src, ids, dst, got.ids)
                    job: CopyJob = DoneJob()
                else:
                    job = self._swap.copy_async(src, ids, dst, got.ids)
            except BaseException:  # the copy failed (or could not start): the caller keeps its blocks
                self._alloc_of(dst).free(got)
                raise
            return SwapHandle(job, blocks, got, self._release)

    def _release(self, blocks: Blocks) -> None:
        with self._lock:
            self._alloc[blocks.tier].free(blocks)

    # -- transfer between pools ------------------------------------------------------------
    def serve(self, transport: TransportConfig) -> tuple[str, int]:
        """Start this pool's transfer agent; returns the control address ``(host, port)``.

        Raises:
            InvalidArgumentError: already serving. BackendUnavailableError: the backend's extra
            is not installed. OSError: the port cannot be bound. On failure nothing keeps running.
        """
        if not isinstance(transport, TransportConfig):
            raise InvalidArgumentError(f"transport must be a TransportConfig, got {type(transport).__name__}")
        with self._lock:
            if self._agent is not None:
                raise InvalidArgumentError("this pool is serving already")
            agent = TransferAgent(self, transport)
            self._agent = agent
        try:
            return agent.start()
        except BaseException:
            with self._lock:
                self._agent = None
            with contextlib.suppress(Exception):  # the caller learns of the first failure, not of this
                agent.close()  # its loop thread runs already: stop it (it would keep this pool alive)
            raise

    def connect(self, name: str, host: str, port: int) -> None:
        """Connect to the pool called ``name`` listening at ``host:port`` (mutual authentication).

        Raises:
            AuthenticationError (secret), LayoutMismatchError (KV layout), HandshakeError,
            PeerLostError (unreachable).
        """
        self._transport().connect(name, host, port)

    def disconnect(self, name: str) -> None:
        """Close the connection to peer ``name`` (its in-flight transfers fail cleanly)."""
        self._transport().disconnect(name)

    def peers(self) -> dict[str, str]:
        """Connected peers: name -> incarnation (a restarted peer has a new one)."""
        return {} if self._agent is None else self._agent.peers()

    def transfer(self, peer: str, blocks: Blocks, *, key: str) -> TransferResult | None:
        """Copy ``blocks`` into ``peer``'s device tier, held there under ``key`` until claimed.

        The receiver allocates, the bytes land in its KV storage, it confirms; then ``peer``'s
        ``claim(key)`` hands them over (unclaimed, they are freed after the receipt TTL). The
        blocks stay referenced (locked) here until this returns, either way. On CUDA the blocks
        are read once the work queued on the caller's current stream (the KV it wrote) is done.

        Returns:
            what moved; ``None`` when the receiver has no room (back-pressure).
        Raises:
            UnknownPeerError, InvalidArgumentError (bad key, no blocks), BlockNotAllocatedError and the
            other block errors, TransferError (peer lost, deadline passed, refused).
        """
        if not isinstance(key, str) or not key or len(key) > 256:
            raise InvalidArgumentError(f"key must be a non-empty str of at most 256 chars, got {key!r}")
        if isinstance(blocks, Blocks) and not len(blocks):  # the receiver would refuse it: say so here
            raise InvalidArgumentError("no blocks to transfer")
        agent = self._transport()
        self.share(blocks)  # validates, and locks the blocks for the transfer
        try:
            self.storage(blocks.tier).synchronize()  # the KV the caller's stream still writes
            return agent.transfer(peer, blocks.ids, blocks.tier, key, None, None)
        finally:
            self.free(blocks)

    def transfer_with_insert(
        self, peer: str, tokens: Any, blocks: Blocks, namespace: Hashable = None
    ) -> TransferResult | None:
        """Send the KV of ``tokens``' first ``len(blocks)`` blocks to ``peer`` and cache it there.

        The receiver first matches the prefix it already caches (``skipped_blocks``), so only
        the missing blocks travel; it inserts them only after every byte has landed. A last
        block that ``tokens`` fill only partly (``len(blocks) == ceil(len(tokens) / block_size)``)
        travels too and is kept there as a tail (:meth:`insert_tail`): a prompt that continues
        ``tokens`` then reuses every token of it. Read as :meth:`transfer` reads them.

        Returns:
            what moved; ``None`` when the receiver has no room (back-pressure).
        Raises:
            InvalidTokensError, InvalidArgumentError (more blocks than ``tokens`` reach into, or a
            namespace that is not None/str/int), the block errors, UnknownPeerError, TransferError.
        """
        key = encode_tokens(tokens)
        check_namespace(namespace)
        n = len(blocks) if isinstance(blocks, Blocks) else 0
        bs = self.config.block_size
        if n and len(key) <= (n - 1) * bs * 4:
            raise InvalidArgumentError(f"{n} blocks need more than {(n - 1) * bs} tokens, got {len(key) // 4}")
        agent = self._transport()
        self.share(blocks)
        try:
            self.storage(blocks.tier).synchronize()
            return agent.transfer(peer, blocks.ids, blocks.tier, None, key[: n * bs * 4], namespace)
        finally:
            self.free(blocks)

    def claim(self, key: str) -> Blocks | None:
        """Take the blocks a peer transferred under ``key`` (``None`` if none or expired).

        The caller then owns one reference to each block and frees them as usual.
        """
        agent = self._transport()
        return agent.claim(key)

    def transport_stats(self) -> dict[str, int]:
        """Transfers, blocks, bytes and messages sent and received, failures, refusals, expiries
        (counts since ``serve``), and the transfers ``sending`` / ``receiving`` right now."""
        return {} if self._agent is None else {**self._agent.stats, **self._agent.in_flight()}

    def _transport(self) -> TransferAgent:
        self._check_process()
        agent = self._agent
        if agent is None:
            raise InvalidArgumentError("this pool is not serving: call serve(TransportConfig(...)) first")
        return agent

    # -- storage for engines ---------------------------------------------------------------
    def kv(self, tier: Tier | str = Tier.DEVICE) -> torch.Tensor:
        """The tier's KV tensor ``[blocks, layers, 2, block_size, kv_heads, head_dim]`` (shared, not a copy)."""
        return self._storage_of(_as_tier(tier)).tensor

    def storage(self, tier: Tier | str = Tier.DEVICE) -> KVStorage:
        """The tier's :class:`KVStorage` (layer views, gather and scatter of blocks)."""
        return self._storage_of(_as_tier(tier))

    # -- stats and checks ------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, int]]:
        """Per tier: ``capacity``, ``free``, ``used``, ``free_runs``, ``cached`` (by the index),
        ``evictable`` (cached in unlocked prefixes); plus ``index`` counters."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for tier, alloc in self._alloc.items():
                s = alloc.stats()
                s["cached"] = self.index.cached_blocks(tier)
                s["evictable"] = self.index.evictable_blocks(tier)
                out[tier.value] = s
            out["index"] = self.index.stats()
            return out

    def check_invariants(self) -> None:
        """Assert every allocator and index invariant (tests call this after every step)."""
        with self._lock:
            for alloc in self._alloc.values():
                alloc.check_invariants()
            self.index.check_invariants()

    def close(self) -> None:
        """Stop the transfer agent (if serving) and background copy workers (in a forked child,
        where neither runs, only forget them)."""
        agent, self._agent = self._agent, None
        if isinstance(self._lock, _ForkedLock):
            return
        if agent is not None:
            agent.close()
        self._swap.close()

    # -- helpers ---------------------------------------------------------------------------
    def _tier_of(self, blocks: Blocks) -> Tier:
        if not isinstance(blocks, Blocks):
            raise InvalidArgumentError(f"expected a Blocks handle, got {type(blocks).__name__}")
        return blocks.tier

    def _alloc_of(self, tier: Tier) -> BlockAllocator:
        alloc = self._alloc.get(tier)
        if alloc is None:
            raise TierUnavailableError(f"this pool has no {tier.value} tier (host_blocks=0)")
        return alloc

    def _check_process(self) -> None:
        if isinstance(self._lock, _ForkedLock):
            self._lock.refuse()

    def _storage_of(self, tier: Tier) -> KVStorage:
        self._check_process()
        self._alloc_of(tier)
        return self._storage[tier]

    def __repr__(self) -> str:
        c = self.config
        return f"MemPool(device_blocks={c.device_blocks}, host_blocks={c.host_blocks}, device={c.device!r})"
