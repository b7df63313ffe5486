"""Copies of block runs between the device and host tiers.

On CUDA the copies run on a dedicated stream that first waits for the work already queued on
the current stream (so KV being written is complete), with pinned host memory, and signal an
event; a :class:`CopyJob` waits on that event. On CPU the same API runs the copy on one worker
thread (torch releases the GIL inside the copy, so it overlaps Python work and compute).

Runs adjacent in both tiers move as single slice copies; scattered blocks move through one
vectorised gather and one scatter (``mempool.alloc.storage.copy_blocks``), never per layer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from mempool.alloc.storage import KVStorage, copy_blocks
from mempool.types import IdArray, Tier

__all__ = ["CopyJob", "SwapEngine"]


class CopyJob(Protocol):
    """An in-flight copy."""

    def done(self) -> bool:
        """Whether the copy has finished (never blocks)."""
        ...

    def wait(self) -> None:
        """Block until the copy has finished; re-raises an error the copy hit."""
        ...


class DoneJob:
    """A copy that has already landed."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class _FutureJob:
    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()


class _EventJob:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        self._event.synchronize()


class SwapEngine:
    """Moves KV blocks between tiers of one pool.

    Args:
        storages: the pool's tier storages (``Tier.HOST`` may be absent).
    """

    def __init__(self, storages: dict[Tier, KVStorage]) -> None:
        self._storages = storages
        device = storages[Tier.DEVICE].device
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def copy(self, src_tier: Tier, src_ids: IdArray, dst_tier: Tier, dst_ids: IdArray) -> None:
        """Copy blocks pairwise and return when the data has landed."""
        if self._stream is None:  # on CPU the calling thread copies: no hand-off to the worker
            copy_blocks(self._storages[src_tier], src_ids, self._storages[dst_tier], dst_ids)
        else:
            self.copy_async(src_tier, src_ids, dst_tier, dst_ids).wait()

    def copy_async(self, src_tier: Tier, src_ids: IdArray, dst_tier: Tier, dst_ids: IdArray) -> CopyJob:
        """Start copying blocks pairwise; the returned job says when the data has landed.

        Until then the caller must keep both the source and destination blocks referenced and
        must neither write the source nor read the destination.
        """
        src, dst = self._storages[src_tier], self._storages[dst_tier]
        if len(src_ids) == 0:
            return DoneJob()
        if self._stream is not None:
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream(src.device if src.device.type == "cuda" else dst.device))
            with torch.cuda.stream(stream):
                copy_blocks(src, src_ids, dst, dst_ids, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            return _EventJob(event)
        return _FutureJob(self._pool().submit(copy_blocks, src, src_ids, dst, dst_ids))

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mempool-swap")
            return self._executor

    def close(self) -> None:
        """Finish queued copies and stop the worker thread."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
