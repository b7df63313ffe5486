"""Data-plane backends: a :class:`Link` moves tensors between two connected agents.

::

    backend            connect                                  data messages
    ucx (ucxx)         ucxx endpoint to the peer's listener       ep.send / ep.recv, tag per message
    torch (gloo/NCCL)  a 2-rank process group over a PrefixStore   pg.send / pg.recv, tag per message

A link is created after the control handshake: the client connects with the connection id the
server handed out, the server's listener matches it to the waiting handshake. Optional
dependencies are imported lazily, with the extra to install named when missing.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from mempool.errors import BackendUnavailableError, PeerLostError

__all__ = ["DataBackend", "Link", "TorchBackend", "UcxBackend", "make_backend"]

_ID_BYTES = 32  # connection ids are 32 hex chars


class Link(Protocol):
    """One peer's data path. ``send``/``recv`` take contiguous tensors and a per-message tag."""

    #: receive into staging, then copy into KV storage (a backend whose abort is not known to end
    #: posted receives)
    receive_via_staging: bool
    calls: int

    async def send(self, buf: torch.Tensor, tag: int) -> None: ...

    async def recv(self, buf: torch.Tensor, tag: int) -> None: ...

    async def abort(self) -> None:
        """Tear the link down; once it returns, no posted receive writes and no posted send reads
        anything more."""
        ...


class DataBackend(Protocol):
    name: str

    async def start(self, host: str) -> dict[str, Any]:
        """Start listening; returns what a client needs to connect."""
        ...

    async def connect(self, info: dict[str, Any], conn_id: str, timeout: float) -> Link: ...

    async def accept(self, conn_id: str, timeout: float) -> Link: ...

    async def close(self) -> None: ...


def make_backend(name: str, *, device: torch.device, shared_memory: bool, host: str) -> DataBackend:
    if name == "ucx":
        return UcxBackend(shared_memory=shared_memory, loopback_only=_is_loopback(host))
    if name == "torch":
        return TorchBackend(device=device)
    raise ValueError(f"unknown backend {name!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_buffer(t: torch.Tensor) -> Any:
    return t.numpy() if t.device.type == "cpu" else t  # CUDA tensors carry __cuda_array_interface__


# -- UCX -----------------------------------------------------------------------------------------
def _import_ucxx() -> Any:
    try:
        import ucxx  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            "the ucx backend needs ucxx: pip install 'mempool[ucx]' (ucxx-cu12), or 'mempool[ucx-cu13]' beside a CUDA 13 torch"
        ) from exc
    return ucxx


class _UcxLink:
    receive_via_staging = False  # aborting the endpoint cancels pending receives

    def __init__(self, ep: Any) -> None:
        self._ep = ep
        self.calls = 0

    async def send(self, buf: torch.Tensor, tag: int) -> None:
        self.calls += 1
        try:
            await self._ep.send(_as_buffer(buf), tag=tag)
        except Exception as exc:
            raise PeerLostError(f"ucx send failed: {exc}") from exc

    async def recv(self, buf: torch.Tensor, tag: int) -> None:
        try:
            await self._ep.recv(_as_buffer(buf), tag=tag)
        except Exception as exc:
            raise PeerLostError(f"ucx receive failed: {exc}") from exc

    async def abort(self) -> None:
        try:
            self._ep.abort()
        except Exception:
            pass


# ucxx's blocking mode also progresses the worker on a timer, for events that never reach its fd:
# over shared memory a sender whose FIFO is full is not woken when it drains (1,024 messages of
# 4 KiB in flight took 4.3 s with ucxx's 1 s timer, 0.2 s with 50 ms). 10 ms costs ~100 idle
# wake-ups a second.
PROGRESS_TIMEOUT_S = 0.01
#: UCX TCP segment sizes the UCX backend asks for (UCX's defaults: 8K and 64K)
TCP_SEGMENTS = {"TCP_TX_SEG_SIZE": "64K", "TCP_RX_SEG_SIZE": "256K"}


def _rearm_blocking_progress() -> None:
    """Make ucxx's blocking progress mode re-arm the UCX worker after each wake-up, and progress
    it every PROGRESS_TIMEOUT_S without one.

    UCX's wake-up protocol is: progress, ``ucp_worker_arm`` (retried while busy), wait on the
    worker's fd, and again. ucxx 0.52's ``BlockingMode`` arms once; after the first event its fd
    callback only progresses, the fd stays readable, and asyncio's loop calls it back-to-back:
    a connected, idle process burns a whole core on its agent thread. Here the callback starts
    the library's own arming task again once the last one has ended. Applied once per process;
    left alone if ucxx no longer looks like that.
    """
    try:
        from ucxx._lib_async import continuous_ucx_progress as progress  # type: ignore[import-untyped]
    except ImportError:
        return
    mode: Any = getattr(progress, "BlockingMode", None)
    if mode is None or getattr(mode, "_mempool_rearms", False) or not hasattr(mode, "_arm_worker"):
        return

    def fd_reader_callback(self: Any) -> None:
        self.worker.progress()
        task = getattr(self, "arm_task", None)
        if task is None or task.done():
            self.arm_task = self.event_loop.create_task(self._arm_worker())

    init = mode.__init__

    def init_with_timeout(self: Any, worker: Any, event_loop: Any, progress_timeout: float = 1.0) -> None:
        init(self, worker, event_loop, progress_timeout=min(progress_timeout, PROGRESS_TIMEOUT_S))

    mode._fd_reader_callback = fd_reader_callback
    mode.__init__ = init_with_timeout
    mode._mempool_rearms = True


class UcxBackend:
    """ucxx endpoints with peer error handling on; shared memory allowed when configured."""

    name = "ucx"

    def __init__(self, *, shared_memory: bool, loopback_only: bool = True) -> None:
        self._ucxx = _import_ucxx()
        # With peer error handling on, UCX uses shared memory only if MM_ERROR_HANDLING is set;
        # otherwise it falls back to TCP loopback (4-6 GB/s here with the segments below, against
        # ~10 GB/s over shared memory).
        options = {"MM_ERROR_HANDLING": "y"} if shared_memory else {}
        # UCX's own TCP segments (8 KiB sent, 64 KiB received per call) cap a message over
        # loopback at ~2.1-2.4 GB/s here; these reach ~5.6-6 GB/s for 8 MiB (docs/transport.md).
        # A UCX_TCP_* variable in the environment still wins.
        options |= {k: v for k, v in TCP_SEGMENTS.items() if f"UCX_{k}" not in os.environ}
        if loopback_only:
            # UCX's TCP transport otherwise listens on every network device. (Its connection
            # listener binds all interfaces whatever we do: ucxx has no bind address. A client
            # there must present a conn_id from an authenticated handshake, or it is aborted.)
            options["NET_DEVICES"] = "lo"
        try:
            # "blocking" wakes asyncio's own epoll on UCX events (no progress thread between
            # UCX and the loop); _rearm_blocking_progress keeps it from spinning.
            _rearm_blocking_progress()
            self._ucxx.init(options=options, progress_mode="blocking")
        except RuntimeError:
            pass  # initialised already in this process (one UCX context per process)
        self._listener: Any = None
        self._waiting: dict[str, asyncio.Future[_UcxLink]] = {}

    async def start(self, host: str) -> dict[str, Any]:
        self._listener = self._ucxx.create_listener(self._on_endpoint, port=0, endpoint_error_handling=True)
        return {"host": host, "port": int(self._listener.port)}

    async def _on_endpoint(self, ep: Any) -> None:
        ident = np.zeros(_ID_BYTES, dtype=np.uint8)
        try:
            await asyncio.wait_for(ep.recv(ident, tag=0), 10.0)
        except Exception:
            ep.abort()
            return
        fut = self._waiting.pop(ident.tobytes().decode("ascii", "replace"), None)
        if fut is None or fut.done():
            ep.abort()  # nobody handshook under that id
            return
        fut.set_result(_UcxLink(ep))

    async def connect(self, info: dict[str, Any], conn_id: str, timeout: float) -> Link:
        ep = await asyncio.wait_for(
            self._ucxx.create_endpoint(info["host"], int(info["port"]), endpoint_error_handling=True), timeout
        )
        await asyncio.wait_for(ep.send(np.frombuffer(conn_id.encode("ascii"), dtype=np.uint8), tag=0), timeout)
        return _UcxLink(ep)

    async def accept(self, conn_id: str, timeout: float) -> Link:
        fut: asyncio.Future[_UcxLink] = asyncio.get_running_loop().create_future()
        self._waiting[conn_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(conn_id, None)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


# -- torch.distributed ---------------------------------------------------------------------------
# A gloo group's abort() (and shutdown()) leaves posted operations running (torch 2.13): a message
# the peer sends afterwards still lands in a posted receive's buffer, and a posted send still
# reads its buffer when the peer's receive comes. What does end them is gloo's own timeout: a
# wait that times out signals every pair of its context ("Application timeout caused pair
# closure"), failing each pending operation, before it returns; after that nothing moves on the
# group. So the link aborts a gloo group by waiting 1 ms on a receive that no message can match.
_ABORT_TAG = 0x7FFFFFFF  # data tags are reduced below it


class _TorchLink:
    # gloo: abort() ends posted operations (above), so receives may target KV storage. NCCL: its
    # abort is ncclCommAbort, not verified here (no GPU): receive into staging to be safe.
    receive_via_staging: bool

    def __init__(self, pg: Any, rank: int, executor: ThreadPoolExecutor, timeout: float, *, gloo: bool) -> None:
        self._pg = pg
        self._peer = 1 - rank
        self._executor = executor
        self._timeout = datetime.timedelta(seconds=timeout)
        self._gloo = gloo
        self.receive_via_staging = not gloo
        self.calls = 0
        self._ops: set[Future[None]] = set()  # posted operations whose thread has not returned yet
        self._ops_lock = threading.Lock()

    async def _run(self, what: str, post: Callable[[Any], Any], buf: torch.Tensor) -> None:
        pg = self._pg
        if pg is None:
            raise PeerLostError(f"torch.distributed {what}: the link was aborted")

        def post_and_wait() -> None:
            post(pg).wait(self._timeout)
            if buf.is_cuda:  # pragma: no cover - needs two GPUs (NCCL)
                # NCCL's wait only orders the current stream after the operation (and for
                # point-to-point operations not always: pytorch/pytorch#68866), returning before
                # the bytes have moved. The agent confirms and frees on the CPU's word, so wait for
                # the device itself, as the UCX path waits for its copies.
                torch.cuda.synchronize(buf.device)

        try:
            op = self._executor.submit(post_and_wait)
        except RuntimeError as exc:  # the backend is closed
            raise PeerLostError(f"torch.distributed {what}: the backend is closed") from exc
        with self._ops_lock:
            self._ops.add(op)
        op.add_done_callback(self._op_ended)
        try:
            await asyncio.wrap_future(op)
        except Exception as exc:
            raise PeerLostError(f"torch.distributed {what} failed: {exc}") from exc

    def _op_ended(self, op: Future[None]) -> None:
        with self._ops_lock:
            self._ops.discard(op)

    async def send(self, buf: torch.Tensor, tag: int) -> None:
        self.calls += 1
        await self._run("send", lambda pg: pg.send([buf], self._peer, tag % _ABORT_TAG), buf)

    async def recv(self, buf: torch.Tensor, tag: int) -> None:
        await self._run("recv", lambda pg: pg.recv([buf], self._peer, tag % _ABORT_TAG), buf)

    async def abort(self) -> None:
        """End the group and every operation posted on it; returns once none can move a byte."""
        pg, self._pg = self._pg, None
        loop = asyncio.get_running_loop()
        if pg is not None:
            try:
                await loop.run_in_executor(self._executor, self._end, pg)
            except RuntimeError:  # the backend closed its executor already: end it here (~1 ms)
                self._end(pg)
        with self._ops_lock:
            ops = list(self._ops)
        if ops:  # their waits fail at once now; let their threads return
            await asyncio.wait([asyncio.wrap_future(op) for op in ops], timeout=self._timeout.total_seconds())

    def _end(self, pg: Any) -> None:
        if self._gloo:
            try:
                pg.recv([torch.zeros(1, dtype=torch.uint8)], self._peer, _ABORT_TAG).wait(
                    datetime.timedelta(milliseconds=1)
                )
            except Exception:
                pass  # timed out, as meant (or the group had failed already): every pair is closed
        try:
            pg.abort()
        except Exception:
            pass


class TorchBackend:
    """A 2-rank gloo (CPU) or NCCL (CUDA) process group per peer, rendezvous on our TCPStore."""

    name = "torch"

    def __init__(self, *, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_available():  # pragma: no cover - depends on the torch build
            raise BackendUnavailableError("this torch build has no torch.distributed")
        self._dist = dist
        self._device = device
        self._store: Any = None
        self._host = "127.0.0.1"
        # Each gloo send/recv blocks a thread in wait() until the peer posts its side (gloo work
        # has no future, and is_completed() stays false until wait()). With too few threads,
        # transfers in both directions starve each other's counterparts and deadlock until the
        # deadline; a transfer keeps at most ~6 operations in flight per side, so 256 threads
        # (created on demand) cover 40+ concurrent transfers per process.
        self._executor = ThreadPoolExecutor(max_workers=256, thread_name_prefix="mempool-torchdist")

    async def start(self, host: str) -> dict[str, Any]:
        self._host = host
        # TCPStore's own listener binds every interface whatever host_name says; hand it a socket
        # bound to the configured host instead (detached: the store owns the descriptor now).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self._store = self._dist.TCPStore(  # type: ignore[attr-defined]
            host, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach()
        )
        return {"host": host, "port": int(port)}

    def _group(self, store: Any, rank: int, timeout: float) -> Any:
        dist = self._dist
        prefix = dist.PrefixStore("mempool", store)
        if self._device.type == "cuda":  # pragma: no cover - needs a GPU
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = datetime.timedelta(seconds=timeout)
            return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=timeout)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._host)]
        return dist.ProcessGroupGloo(prefix, rank, 2, opts)

    async def connect(self, info: dict[str, Any], conn_id: str, timeout: float) -> Link:
        dist = self._dist
        self._host = info["host"]

        def build() -> Any:
            store = dist.TCPStore(
                info["host"], int(info["port"]), is_master=False, timeout=datetime.timedelta(seconds=timeout)
            )
            return self._group(dist.PrefixStore(conn_id, store), 1, timeout)

        pg = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._executor, build), timeout + 1)
        return _TorchLink(pg, 1, self._executor, timeout, gloo=self._device.type != "cuda")

    async def accept(self, conn_id: str, timeout: float) -> Link:
        store = self._dist.PrefixStore(conn_id, self._store)  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        pg = await asyncio.wait_for(loop.run_in_executor(self._executor, self._group, store, 0, timeout), timeout + 1)
        return _TorchLink(pg, 0, self._executor, timeout, gloo=self._device.type != "cuda")

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._store = None
