"""The handle ``match`` returns: a cached prefix whose blocks stay locked until released."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

from mempool.errors import LockUnderflowError
from mempool.types import Blocks

if TYPE_CHECKING:
    from mempool.index.node import Node
    from mempool.index.radix import RadixIndex

__all__ = ["Match"]


class Match:
    """Longest cached whole-block prefix of a token sequence.

    ``blocks`` (device tier) cover the first ``num_tokens`` tokens; ``host_blocks`` (host tier)
    continue them for ``num_host_tokens`` more tokens that are cached on the host only (use
    ``MemPool.promote`` to bring them to the device). Every block stays locked (never evicted,
    swapped or freed) until :meth:`release`, which a ``with`` block calls on exit.

    The index owns the blocks: the caller holds a lock, not a reference, and must not free them
    (``MemPool.free`` refuses them with ``DoubleFreeError`` where the index's reference is the
    last one; where a request also references them, it drops that request's reference).
    """

    __slots__ = ("_guard", "_index", "_last", "_num_blocks", "_released", "blocks", "host_blocks")

    def __init__(
        self,
        index: RadixIndex,
        last: Node | None,
        num_blocks: int,
        blocks: Blocks,
        host_blocks: Blocks,
        guard: AbstractContextManager[object],
    ) -> None:
        self._index = index
        self._last = last
        self._num_blocks = num_blocks
        self.blocks = blocks
        self.host_blocks = host_blocks
        self._released = False
        self._guard = guard

    @property
    def block_size(self) -> int:
        return self._index.block_size

    @property
    def num_tokens(self) -> int:
        """Tokens covered by device-resident ``blocks``."""
        return len(self.blocks) * self._index.block_size

    @property
    def num_host_tokens(self) -> int:
        """Tokens after ``num_tokens`` that are cached on the host tier only."""
        return len(self.host_blocks) * self._index.block_size

    @property
    def total_tokens(self) -> int:
        """All matched tokens, on either tier."""
        return self._num_blocks * self._index.block_size

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Unlock the matched blocks.

        Raises:
            LockUnderflowError: the match was released already.
        """
        with self._guard:
            if self._released:
                raise LockUnderflowError("this Match was released already")
            self._released = True
            if self._last is not None:
                self._index._unlock(self._last)

    def __enter__(self) -> Match:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._released:
            self.release()

    def __del__(self) -> None:
        # A match dropped unreleased keeps its blocks locked (never evictable) for the life of the
        # pool. Releasing here could free blocks a caller still reads through ``blocks``, so it
        # only says so, as an unclosed file does (``python -X dev`` or ``-W default`` shows it).
        if not self._released and self._last is not None:
            try:
                warnings.warn(
                    f"{self!r} was dropped without release(): its blocks stay locked", ResourceWarning, stacklevel=2
                )
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self) -> str:
        state = "released" if self._released else "locked"
        return (
            f"Match(num_tokens={self.num_tokens}, num_host_tokens={self.num_host_tokens}, "
            f"blocks={self.blocks!r}, host_blocks={self.host_blocks!r}, {state})"
        )
