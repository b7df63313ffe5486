"""Handles of in-flight tier copies."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

from mempool.transport.swap import CopyJob
from mempool.types import Blocks

__all__ = ["SwapHandle"]


class SwapHandle:
    """An asynchronous ``swap_out`` / ``swap_in``.

    Owns the caller's references to the source blocks until the copy has landed, then drops
    them. ``wait()`` returns the destination blocks, whose references belong to the caller;
    they must not be read before ``wait()`` has returned them. If the copy failed,
    ``wait()`` raises its error, every time: the destination blocks are freed and the source
    blocks, untouched, are the caller's again, as before the swap. Dropped before its copy was
    seen to end, it warns (``ResourceWarning``) and releases nothing.
    """

    def __init__(self, job: CopyJob, src: Blocks, dst: Blocks, release: Callable[[Blocks], None]) -> None:
        self._job = job
        self._src = src
        self.blocks = dst
        self._release = release
        self._finished = False
        self._error: BaseException | None = None
        self._mutex = threading.Lock()

    def done(self) -> bool:
        """Whether the copy has ended, landed or failed (finishes the handle if so; ``wait()`` says
        which). Never blocks on the copy."""
        if self._finished:
            return True
        if self._job.done():
            self._finish()
            return True
        return False

    def wait(self) -> Blocks:
        """Block until the copy has landed; return the destination blocks."""
        if not self._finished:
            try:
                self._job.wait()
            except BaseException:
                if not self._job.done():
                    raise  # interrupted while waiting (Ctrl-C): the copy goes on, the handle stands
                # the copy's own error: _finish takes it up, once, whichever thread gets there first
            self._finish()
        if self._error is not None:
            raise self._error
        return self.blocks

    def _finish(self) -> None:
        with self._mutex:
            if self._finished:
                return
            try:
                self._job.wait()  # already complete; surfaces a copy error, if any
            except BaseException as exc:  # nothing landed that counts: undo the swap
                self._error = exc
                self._release(self.blocks)
            else:
                self._release(self._src)
            self._finished = True

    def __del__(self) -> None:
        # A handle dropped before its copy was seen to end (``wait()``, or ``done()`` returning
        # True) keeps the source blocks referenced for the life of the pool, and its destination
        # blocks, the caller's, are lost with it. Finishing here would call into the pool from the
        # garbage collector, which may run while this thread holds the pool's lock; so it only
        # says so, as an unclosed file does (``python -X dev`` or ``-W default`` shows it).
        if not getattr(self, "_finished", True):  # (True: __init__ did not get that far)
            try:
                warnings.warn(
                    f"{self!r} was dropped before wait(): its blocks stay referenced", ResourceWarning, stacklevel=2
                )
            except Exception:  # interpreter shutdown
                pass

    def __repr__(self) -> str:
        return f"SwapHandle({self._src!r} -> {self.blocks!r}, done={self._finished})"
