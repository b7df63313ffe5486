"""The engine thread of an instance: every engine call runs there, one step after another.

Other threads (the HTTP server's event loop, transfer threads) hand it work with :meth:`call`
and receive each request's outputs through a per-request callback.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .engine import Engine, RequestOutput

T = TypeVar("T")
#: How long a stalled engine (requests wait for room that blocks held elsewhere, a transfer's say,
#: must free) waits between steps: room is noticed this late at most.
STALL_WAIT_S = 0.002


class WorkerStopped(RuntimeError):
    """A call posted to a worker that has stopped: it did not run."""


class EngineWorker:
    """Owns ``engine``; steps it whenever it has work, runs posted calls between steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._calls: queue.SimpleQueue[tuple[Callable[[Engine], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._listeners: dict[str, Callable[[RequestOutput], None]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stopped = False
        self._thread.start()

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread; its result (or exception) lands in the future."""
        fut: Future[T] = Future()
        if self._stopped:
            fut.set_exception(WorkerStopped("the engine worker has stopped"))
        else:
            self._calls.put((fn, fut))
        return fut

    def listen(self, request_id: str, callback: Callable[[RequestOutput], None]) -> None:
        """Deliver ``request_id``'s outputs to ``callback`` (on the engine thread) until it finishes.

        Register from the engine thread (inside :meth:`call`), before the request can produce output.
        """
        self._listeners[request_id] = callback

    def stop(self) -> None:
        """Abort everything, release held KV and end the thread."""
        if not self._stopped:
            self._stopped = True
            self._calls.put(None)
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        stalled = False  # the last step could start nothing and nothing runs: room comes from elsewhere
        while True:
            try:  # pending calls first (they may add or release requests), then a step
                if not self.engine.has_work():
                    item = self._calls.get()
                elif stalled:  # wait a little, not a spin (it held a core and the GIL the transfers need)
                    item = self._calls.get(timeout=STALL_WAIT_S)
                else:
                    item = self._calls.get_nowait()
            except queue.Empty:
                stalled = self._step()
                continue
            if item is None:
                break
            stalled = False
            self._run(*item)
        self.engine.close()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (``/health`` reports an instance whose thread died as down)."""
        return self._thread.is_alive() and not self._stopped

    def _step(self) -> bool:
        """One step and its outputs delivered; whether it found the engine stalled."""
        try:
            outputs = self.engine.step()
        except Exception:  # a failed step loses the requests it ran, never the engine or the others
            logging.getLogger(__name__).exception("an engine step failed; its requests end with 'error'")
            outputs = self._fail_running()
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if out.finished:
                self._listeners.pop(out.request_id, None)
            if listener is not None:
                try:
                    listener(out)
                except Exception:  # a broken listener loses its own request, never the engine
                    logging.getLogger(__name__).exception("listener of %s failed", out.request_id)
        return not outputs and self.engine.stalled

    def _fail_running(self) -> list[RequestOutput]:
        """Abort the requests of the failed step (every running one if it failed before its batch
        was formed: the same failure would recur); a finished ``error`` output for each."""
        failed = []
        for seq in self.engine.in_step or list(self.engine.running):
            self.engine.abort(seq.id)
            failed.append(RequestOutput(seq.id, [], True, "error", seq.metrics))
        self.engine.in_step = []
        return failed

    def _run(self, fn: Callable[[Engine], Any], fut: Future[Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except BaseException as exc:  # handed to the caller, never kills the engine thread
            fut.set_exception(exc)
