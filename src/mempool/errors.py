"""Typed errors of mempool.

Three kinds of failure, three styles (see docs/architecture.md):

* shortage (no free blocks, target tier full) is not an error: calls return ``None``; only
  adapters inside engines that cannot take a ``None`` (``mempool.integrations``) raise
  :class:`OutOfBlocksError`, after releasing what they held;
* misuse (a bad argument, a block that is not yours, a lock released twice) raises a
  subclass of :class:`MemPoolError` and changes nothing;
* a broken internal invariant is an ``AssertionError`` with context.

Argument errors also subclass ``ValueError``, so callers that only know Python's builtins still
catch them.
"""

from __future__ import annotations

__all__ = [
    "BlockInUseError",
    "BlockLockedError",
    "BlockNotAllocatedError",
    "DoubleFreeError",
    "ForeignBlockError",
    "ForkedPoolError",
    "HandleReleasedError",
    "InvalidArgumentError",
    "InvalidBlockError",
    "InvalidTokensError",
    "LayoutMismatchError",
    "LockUnderflowError",
    "MemPoolError",
    "OutOfBlocksError",
    "TierTooLargeError",
    "TierUnavailableError",
    "WrongTierError",
]


class MemPoolError(Exception):
    """Base class of every error mempool raises on misuse."""


class InvalidArgumentError(MemPoolError, ValueError):
    """An argument has the wrong type or value (negative count, bad namespace, ...)."""


class InvalidTokensError(InvalidArgumentError):
    """Tokens are not a 1-D sequence of integers in ``[0, 2**31)``."""


class InvalidBlockError(InvalidArgumentError):
    """A block id is not an integer in ``[0, capacity)`` of its tier."""


class ForeignBlockError(InvalidArgumentError):
    """A :class:`~mempool.types.Blocks` handle was issued by another pool."""


class BlockNotAllocatedError(InvalidArgumentError):
    """A block is free (was never allocated, or was freed already) but the call needs it held."""


class DoubleFreeError(BlockNotAllocatedError):
    """``free`` would drop a block's reference count below zero."""


class BlockInUseError(InvalidArgumentError):
    """A block is already held by the index for another prefix, or is given twice in one call."""


class WrongTierError(InvalidArgumentError):
    """Blocks of one tier were given where another tier's blocks are needed."""


class TierUnavailableError(InvalidArgumentError):
    """The pool was configured without that tier (for example ``host_blocks=0``)."""


class TierTooLargeError(InvalidArgumentError):
    """A CPU tier larger than the memory this process can still use (the machine's available
    memory, and its memory cgroup's room): refused before any page is touched, since filling it
    would get the process, or another, killed by the kernel."""


class BlockLockedError(MemPoolError):
    """The blocks are locked by a live :class:`~mempool.index.radix.Match` and cannot be changed."""


class LockUnderflowError(MemPoolError):
    """A lock was released more times than it was taken."""


class HandleReleasedError(MemPoolError):
    """A handle was used after it was released."""


class LayoutMismatchError(InvalidArgumentError):
    """Two KV layouts (layers, heads, head_dim, dtype, block_size) differ where they must agree."""


class UnknownPeerError(InvalidArgumentError):
    """No connected peer has that name."""


class TransferError(MemPoolError):
    """A transfer between pools failed; on both sides nothing of it remains (no blocks, no index entries)."""


class PeerLostError(TransferError):
    """The peer closed, crashed or stopped answering heartbeats."""


class TransferTimeoutError(TransferError):
    """A wait of the transfer ran past its deadline (the link to the peer is torn down)."""


class HandshakeError(TransferError):
    """The peers could not agree to connect (protocol, backend or layout)."""


class AuthenticationError(HandshakeError):
    """The peer does not know the shared secret (or we do not know its)."""


class ForkedPoolError(MemPoolError):
    """A pool used in a process forked from the one that made it (its KV memory is shared with
    that process, its allocator and index are copies that no longer agree with it)."""


class OutOfBlocksError(MemPoolError):
    """An adapter needed blocks the device tier could not supply even after eviction (shortage
    where the host engine has no way to wait); the adapter released everything it held."""


class BackendUnavailableError(MemPoolError, ImportError):
    """The transport backend's optional dependency is missing; the message names the extra to install."""
