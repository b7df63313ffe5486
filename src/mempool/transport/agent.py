"""The transfer agent: a pool's connection to other pools.

One asyncio loop on a daemon thread runs the control listener, one reader per peer, heartbeats,
receipt expiry and both halves of every transfer. A transfer of ``n`` blocks::

    sender                                   receiver
    share(blocks)  (the transfer's lock)
    begin {xid, n, key | tokens}      --->   match(tokens) -> k cached; alloc(n - k)
                                      <---   ready {skip: k, segments}   (or fail {code})
    per segment: storage view, or a          per segment: receive into its KV storage
      gather into staging; one message  ==>    (or staging, then one scatter)
                                             insert_sequence(tokens, cached + new) | receipt[key]
                                      <---   done {skipped, received}
    free(shared reference)

On one host, with both pools' CPU tiers in shared memory, a transfer is a pull instead
(``transport/mapped.py``)::

    begin {xid, n, key | tokens, pull {tier, ids | run, until}}  --->  match, alloc; copy the missing
                                                                 blocks out of the sender's tier
                                                                 (mapped read-only) into its own
                                      <---   done {skipped, received, pulled}

Any failure (peer closed, crashed, stalled past the deadline, protocol error) tears the whole
link down first, so no late byte can land in a block that is then freed, and the receiver frees
what it allocated for unfinished transfers and indexes nothing. A peer that comes back is a new
incarnation and must connect again. A receiver that fails before any of the sender's data can be
on the link (bad request, no room, an error of its own such as a failed copy between its tiers)
answers ``fail`` instead: that transfer alone fails and the link stays.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard, TypeVar

import numpy as np
import torch

from mempool.alloc.storage import KVStorage, copy_rows, copy_rows_pieces
from mempool.config import PoolConfig, TransportConfig
from mempool.errors import (
    HandshakeError,
    InvalidArgumentError,
    MemPoolError,
    PeerLostError,
    TransferError,
    TransferTimeoutError,
    UnknownPeerError,
)
from mempool.index.match import Match
from mempool.transport import mapped
from mempool.transport.handshake import Identity, PeerInfo, client_handshake, serve_handshake
from mempool.transport.links import DataBackend, Link, make_backend
from mempool.transport.plan import plan_segments, segment_tag
from mempool.transport.wire import Channel, ChannelClosed, pack_bytes, unpack_bytes
from mempool.types import Blocks, IdArray, Tier

__all__ = ["PoolOps", "TransferAgent", "TransferResult"]

log = logging.getLogger("mempool.transport")
T = TypeVar("T")
WINDOW = 4  # data messages in flight per transfer and direction, beyond the one being prepared
PIECE_BYTES = 1 << 20  # a same-host pull's copy is shared between two threads in pieces of this size


class PoolOps(Protocol):
    """What the agent needs of its pool (``MemPool`` provides it)."""

    config: PoolConfig

    def alloc(self, n: int, tier: Tier = ...) -> Blocks | None: ...
    def free(self, blocks: Blocks) -> int: ...
    def share(self, blocks: Blocks) -> None: ...
    def match(self, tokens: Any, namespace: Hashable = ..., *, promote: bool = ...) -> Match: ...
    def insert_sequence(self, tokens: Any, blocks: Blocks, namespace: Hashable = ...) -> int: ...
    def storage(self, tier: Tier = ...) -> KVStorage: ...


@dataclass(frozen=True)
class TransferResult:
    """What a finished transfer did."""

    peer: str
    sent_blocks: int  # blocks whose bytes travelled
    skipped_blocks: int  # blocks the receiver had cached already (transfer_with_insert)
    bytes: int
    messages: int  # data-plane sends (one per run or staged chunk; never per block or layer)
    seconds: float  # end to end: begin, the receiver's answer, data, confirmation
    data_seconds: float = 0.0  # from the receiver's "ready" until the last data message was sent
    pulled: bool = False  # the receiver copied the blocks out of this pool's mapped tier itself


@dataclass(eq=False)
class _Peer:
    name: str
    incarnation: str
    channel: Channel
    link: Link
    waiting: dict[int, asyncio.Queue[dict[str, Any]]] = field(default_factory=dict)
    serving: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    alive: bool = True
    near: bool = False  # shares our host and clock, and offered its tiers: it may pull from ours
    mapped: dict[Tier, torch.Tensor] = field(default_factory=dict)  # its tiers, mapped read-only
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set once the link is aborted


class TransferAgent:
    """Connects a pool to named peers and moves KV blocks to and from them."""

    def __init__(self, pool: PoolOps, config: TransportConfig) -> None:
        self._pool = pool
        self.config = config
        self.name = config.name
        self.incarnation = secrets.token_hex(8)
        self._secret = config.secret if isinstance(config.secret, bytes) else config.secret.encode()
        layout = pool.config.layout  # (built anew on each access: read once)
        self._layout = layout.describe()
        self._block_size = pool.config.block_size
        self._block_bytes = layout.block_bytes
        self._loop = asyncio.new_event_loop()
        device = pool.storage(Tier.DEVICE).device
        self._thread = threading.Thread(
            target=self._run, args=(device,), name=f"mempool-agent-{self.name}", daemon=True
        )
        self._peers: dict[str, _Peer] = {}
        self._receipts: dict[str, tuple[Blocks, float]] = {}
        self._receipts_lock = threading.Lock()
        self._incoming: set[str] = set()  # keys of transfers still landing
        self._xid = itertools.count(1)
        self._staging: list[torch.Tensor] = []
        # Block copies (gathers, scatters, CUDA pulls) run on one thread of their own: torch's
        # OpenMP keeps one worker team per calling thread, and teams of several threads take turns
        # spinning on 2 cores (a pull of 32 MiB copied ~15% faster on one thread than on many).
        # A pull into a CPU tier copies on the loop itself, and this thread takes pieces of that
        # copy alongside whenever it is free (_pull_rows).
        self._copier = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"mempool-copy-{self.name}", initializer=_use_device, initargs=(device,)
        )
        self._share: dict[str, Any] | None = None  # what peers need to map our tiers
        self._held: list[tuple[float, Blocks]] = []  # blocks a peer may still pull, until when
        self._backend: DataBackend | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._teardowns: set[asyncio.Task[None]] = set()  # peers being dropped (see _drop)
        self._closing = False
        self._receiving = 0  # transfers to this agent not yet cleaned up (a dropped peer's included)
        self.address: tuple[str, int] | None = None
        #: fault-injection hooks for tests: pause after each data message this agent sends, and
        #: pace the data sent to a peer (by name) to at most that many bytes per second
        self.segment_delay_s = 0.0
        self.link_rate: dict[str, float] = {}
        #: test hook: pause between a pull's copy and its commit
        self.pull_delay_s = 0.0
        self.refusals: list[str] = []
        self.stats = dict.fromkeys(
            (
                "sent",
                "received",
                "blocks_sent",
                "blocks_received",
                "blocks_skipped",
                "bytes_sent",
                "bytes_received",
                "messages_sent",
                "failed",
                "pulled",
                "refused",
                "receipts_expired",
            ),
            0,
        )

    # -- life cycle (any thread) ------------------------------------------------------------
    def _run(self, device: torch.device) -> None:
        _use_device(device)  # before the backend starts: UCX's CUDA transports use this thread's context
        self._loop.run_forever()

    def start(self) -> tuple[str, int]:
        """Start listening; returns the control address ``(host, port)``."""
        self._thread.start()
        self.address = self._call(self._start(), 30.0)
        return self.address

    def close(self) -> None:
        """Say goodbye to every peer, free unclaimed receipts and stop the loop thread."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._close(), 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            self._copier.shutdown(wait=True)
            self._server = None  # it holds our accept callback: a cycle that would keep the pool alive
            if not self._thread.is_alive():
                self._loop.close()
        with self._receipts_lock:
            receipts, self._receipts = self._receipts, {}
        for blocks, _ in receipts.values():
            self._pool.free(blocks)
        held, self._held = self._held, []
        for until, blocks in sorted(held, key=lambda h: h[0]):
            time.sleep(max(0.0, until - time.monotonic()))  # a peer may pull them until then
            self._pool.free(blocks)

    def peers(self) -> dict[str, str]:
        """Connected peers: name -> incarnation."""
        return {p.name: p.incarnation for p in list(self._peers.values()) if p.alive}

    def in_flight(self) -> dict[str, int]:
        """Transfers under way now: ``sending`` (this agent's) and ``receiving`` (peers' to it)."""
        peers = list(self._peers.values())
        return {"sending": sum(len(p.waiting) for p in peers), "receiving": self._receiving}

    def connect(self, name: str, host: str, port: int) -> None:
        """Handshake with the pool listening at ``host:port``, which must call itself ``name``.

        Raises:
            AuthenticationError, LayoutMismatchError, HandshakeError, TransferError (unreachable).
        """
        self._call(self._connect(name, host, port), self.config.deadline_s + 5)

    def disconnect(self, name: str) -> None:
        peer = self._peer(name)
        self._call(self._drop(peer, PeerLostError(f"disconnected from {name}"), goodbye=True), 10.0)

    def transfer(
        self, peer: str, ids: IdArray, tier: Tier, key: str | None, tokens: bytes | None, namespace: Hashable
    ) -> TransferResult | None:
        """Send blocks ``ids`` of ``tier`` (the caller holds a reference on each until this returns)."""
        target = self._peer(peer)
        if tokens is not None and len(ids) == 0:  # nothing to cache there: no need to ask
            return TransferResult(peer, 0, 0, 0, 0, 0.0)
        budget = self.config.deadline_s * (3 + len(ids) // 256)  # a backstop: every wait inside has a deadline
        try:
            return self._call(self._send(target, ids, tier, key, tokens, namespace), budget)
        except TransferTimeoutError:
            # Abort the link before the caller lets go of its blocks: a send the cancelled
            # coroutine left behind must not read them once they are reused.
            self._call(self._drop(target, TransferTimeoutError(f"transfer to {peer} gave up")), 15.0)
            raise

    def claim(self, key: str) -> Blocks | None:
        """Take the blocks received under ``key``; the caller then owns one reference to each."""
        with self._receipts_lock:
            entry = self._receipts.pop(key, None)
        return None if entry is None else entry[0]

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("agent calls must not come from the agent's own thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            fut.cancel()
            raise TransferTimeoutError(f"no answer within {timeout:.0f} s") from None

    def _peer(self, name: str) -> _Peer:
        peer = self._peers.get(name)
        if peer is None or not peer.alive:
            raise UnknownPeerError(f"no connected peer named {name!r} (connected: {sorted(self.peers())})")
        return peer

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _take_staging(self, rows: int, like: KVStorage) -> torch.Tensor:
        for i, buf in enumerate(self._staging):
            if buf.shape[0] >= rows and buf.device == like.device and buf.shape[1] == like.flat.shape[1]:
                return self._staging.pop(i)
        return torch.empty((rows, like.flat.shape[1]), dtype=like.flat.dtype, device=like.device)

    def _give_staging(self, buf: torch.Tensor) -> None:
        if len(self._staging) < 4:
            self._staging.append(buf)

    def _chunk_blocks(self, storage: KVStorage) -> int:
        """The most blocks of ``storage`` one data message carries."""
        return max(1, self.config.chunk_for(storage.device) // self._block_bytes)

    # -- start / stop (agent thread) ---------------------------------------------------------
    async def _start(self) -> tuple[str, int]:
        cfg = self.config
        if cfg.same_host_pull:
            tiers = {Tier.DEVICE: self._pool.storage(Tier.DEVICE)}
            if self._pool.config.host_blocks:
                tiers[Tier.HOST] = self._pool.storage(Tier.HOST)
            self._share = mapped.advertise(tiers)
        self._backend = make_backend(
            cfg.backend,
            device=self._pool.storage(Tier.DEVICE).device,
            shared_memory=cfg.ucx_shared_memory,
            host=cfg.host,
        )
        self._data_info = await self._backend.start(cfg.host)
        self._server = await asyncio.start_server(self._accept, cfg.host, cfg.port)
        port = int(self._server.sockets[0].getsockname()[1])
        self._spawn(self._housekeeping())
        log.info("agent %s listening on %s:%d (%s)", self.name, cfg.host, port, cfg.backend)
        return cfg.host, port

    async def _close(self) -> None:
        self._closing = True  # from here on no peer registers (see _register)
        for peer in list(self._peers.values()):
            await self._drop(peer, PeerLostError(f"{self.name} is shutting down"), goodbye=True)
        if self._server is not None:
            self._server.close()
        me = asyncio.current_task()
        pending = [t for t in self._tasks if t is not me]
        for task in pending:
            task.cancel()
        if pending:  # let receivers run their cleanup (free what they allocated)
            await asyncio.wait(pending, timeout=5.0)
        if self._teardowns:  # peers whose teardown a task cancelled above had begun
            await asyncio.wait(list(self._teardowns), timeout=5.0)
        if self._backend is not None:
            await self._backend.close()

    # -- handshake (the exchange itself lives in handshake.py) --------------------------------
    def _identity(self) -> Identity:
        return Identity(self.name, self.incarnation, self.config.backend, self._layout, self._secret, self._share)

    def _record_refusal(self, who: str, why: str) -> None:
        self.stats["refused"] += 1
        self.refusals = [*self.refusals[-31:], f"{who}: {why}"]
        log.warning("agent %s refused %s: %s", self.name, who, why)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handshake runs in a task of ours, which closing cancels and awaits. asyncio's own task
        # for this callback must end normally: Python 3.11 reports a cancelled one as an error, whose
        # frames then stay in a cycle with the agent.
        if self._closing:
            writer.close()
        else:
            self._spawn(self._handshake(Channel(reader, writer)))

    async def _handshake(self, channel: Channel) -> None:
        got, registered = None, False
        try:
            assert self._backend is not None
            got = await serve_handshake(
                channel, self._identity(), self._data_info, self._backend, self.config.deadline_s, self._record_refusal
            )
            if got is not None:
                await self._register(got, channel)
                registered = True
        except (ChannelClosed, asyncio.TimeoutError, MemPoolError, OSError) as exc:
            log.info("agent %s: handshake from %s failed: %s", self.name, channel.peer_address, exc)
        finally:
            if not registered:  # (cancelled by closing too: an open channel would outlive the agent)
                if got is not None:
                    await got.link.abort()
                await channel.close()

    async def _connect(self, name: str, host: str, port: int) -> None:
        timeout = self.config.deadline_s
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise PeerLostError(f"cannot reach {name} at {host}:{port}: {exc}") from exc
        channel = Channel(reader, writer)
        try:
            assert self._backend is not None
            got = await client_handshake(
                channel, self._identity(), name, f"{host}:{port}", self._backend, timeout, self._record_refusal
            )
            await self._register(got, channel)
        except BaseException as exc:
            await channel.close()
            if isinstance(exc, (ChannelClosed, asyncio.TimeoutError)):
                raise HandshakeError(f"handshake with {name} at {host}:{port} failed: {exc!r}") from exc
            raise

    async def _register(self, got: PeerInfo, channel: Channel) -> None:
        name = got.name
        old = self._peers.get(name)
        if old is not None:  # a restarted peer (new incarnation) replaces the old connection
            await self._drop(old, PeerLostError(f"{name} reconnected as a new incarnation"))
        if self._closing:  # a handshake that ended while the agent closes: its peers are dropped already
            raise ChannelClosed(f"{self.name} is shutting down")
        peer = _Peer(name, got.incarnation, channel, got.link)
        if self._share is not None:  # pulls are on here: map what the peer offers
            peer.near = mapped.near(got.share)
            peer.mapped = mapped.open_peer(got.share, self._pool.storage(Tier.DEVICE))
        self._peers[name] = peer
        peer.reader = self._spawn(self._read(peer))
        log.info("agent %s connected to %s (incarnation %s)", self.name, name, got.incarnation)

    # -- per-peer reader, heartbeats, receipts --------------------------------------------------
    async def _read(self, peer: _Peer) -> None:
        try:
            while True:
                msg = await peer.channel.recv()
                peer.last_seen = time.monotonic()
                kind, xid = msg["type"], msg.get("xid")
                if kind in ("begin", "ready", "done", "fail"):
                    if not _is_int(xid):
                        raise ChannelClosed(f"{kind} with a bad transfer id {xid!r}")
                    if kind != "begin":
                        queue = peer.waiting.get(xid)
                        if queue is not None:
                            queue.put_nowait(msg)
                    elif xid in peer.serving:
                        raise ChannelClosed(f"begin reusing the running transfer id {xid}")
                    else:
                        peer.serving[xid] = self._spawn(self._serve(peer, msg))
                elif kind == "ping":
                    await peer.channel.send({"type": "pong"})
                elif kind == "bye":
                    raise ChannelClosed(f"{peer.name} said goodbye")
                elif kind != "pong":
                    raise ChannelClosed(f"unexpected frame {kind!r}")
        except ChannelClosed as exc:
            await self._drop(peer, PeerLostError(f"lost {peer.name}: {exc}"))
        except Exception as exc:  # a frame nothing above foresaw: a peer no one reads is a dead one
            log.exception("agent %s: reading from %s failed", self.name, peer.name)
            await self._drop(peer, PeerLostError(f"lost {peer.name}: {exc!r}"))

    async def _housekeeping(self) -> None:
        cfg = self.config
        period = min(cfg.heartbeat_s, cfg.receipt_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            with self._receipts_lock:
                expired = [k for k, (_, until) in self._receipts.items() if until <= now]
                gone = [self._receipts.pop(k)[0] for k in expired]
            for blocks in gone:
                self._pool.free(blocks)
                self.stats["receipts_expired"] += 1
            due = [h for h in self._held if h[0] <= now]
            self._held = [h for h in self._held if h[0] > now]
            for _, blocks in due:
                self._pool.free(blocks)
            for peer in list(self._peers.values()):
                if now - peer.last_seen > cfg.deadline_s:
                    await self._drop(peer, PeerLostError(f"{peer.name} stopped answering for {cfg.deadline_s:.0f} s"))
                elif now - peer.last_seen > cfg.heartbeat_s:
                    try:
                        await peer.channel.send({"type": "ping"})
                    except ChannelClosed:
                        await self._drop(peer, PeerLostError(f"lost {peer.name}"))

    async def _drop(self, peer: _Peer, error: TransferError, *, goodbye: bool = False) -> None:
        """Tear down a peer: link first (no late writes), then fail and clean up its transfers.

        The teardown runs to its end even when the caller is cancelled meanwhile (say a reader
        dropping its peer while the agent closes): a half teardown left the link not aborted and
        the channel open, its socket and the agent held until Python's cyclic collector ran."""
        if not peer.alive:
            await peer.down.wait()  # another caller is tearing it down: wait for the abort
            return
        peer.alive = False
        teardown = asyncio.ensure_future(self._teardown(peer, error, goodbye, asyncio.current_task()))
        self._teardowns.add(teardown)
        teardown.add_done_callback(self._teardowns.discard)
        await asyncio.shield(teardown)

    async def _teardown(
        self, peer: _Peer, error: TransferError, goodbye: bool, caller: asyncio.Task[Any] | None
    ) -> None:
        peer.mapped = {}  # copies running now keep their mapping until they end
        if self._peers.get(peer.name) is peer:
            del self._peers[peer.name]
        if goodbye:
            try:
                await peer.channel.send({"type": "bye"})
            except ChannelClosed:
                pass
        try:
            await peer.link.abort()
        finally:
            peer.down.set()
        for queue in peer.waiting.values():
            queue.put_nowait({"type": "lost", "error": error})
        for task in list(peer.serving.values()):
            if task is not caller:
                task.cancel()
        await peer.channel.close()
        if peer.reader is not None and peer.reader is not caller:
            peer.reader.cancel()
        # the peer no longer names its tasks: a task that ends cancelled keeps its error, whose
        # frames name the peer (a cycle only the cyclic collector would free)
        peer.reader, peer.serving = None, {}
        log.info("agent %s dropped %s: %s", self.name, peer.name, error)

    # -- sender ----------------------------------------------------------------------------------
    async def _expect(
        self, peer: _Peer, queue: asyncio.Queue[dict[str, Any]], *kinds: str, refused: list[bool] | None = None
    ) -> dict[str, Any] | None:
        """The next answer of ``peer`` on ``queue``, one of ``kinds``; None for "no room".

        Raises:
            TransferTimeoutError (no answer in time), PeerLostError, TransferError (refused,
            or an unexpected answer). A refusal also appends to ``refused``.
        """
        try:
            msg = await asyncio.wait_for(queue.get(), self.config.deadline_s)
        except asyncio.TimeoutError:
            error = TransferTimeoutError(f"{peer.name} did not answer within {self.config.deadline_s:.0f} s")
            await self._drop(peer, error)
            raise error from None
        if msg["type"] == "lost":
            raise msg["error"]
        if msg["type"] == "fail":
            if refused is not None:
                refused.append(True)
            if msg.get("code") == "no_space":
                return None
            raise TransferError(f"{peer.name} refused the transfer: {msg.get('reason')}")
        if msg["type"] not in kinds:
            raise TransferError(f"{peer.name} answered {msg['type']!r}, expected {' or '.join(kinds)}")
        return msg

    def _offers_pull(self, peer: _Peer, storage: KVStorage) -> bool:
        """Whether ``peer`` may copy blocks of ``storage`` itself (same host, a shared tier, and
        no fault hook that only the data link honours)."""
        return (
            peer.near
            and storage.share_info is not None
            and not self.segment_delay_s
            and not self.link_rate.get(peer.name)
        )

    def _hold(self, ids: IdArray, tier: Tier, until: float) -> None:
        """Keep blocks referenced until ``until``: a peer may still be pulling them."""
        blocks = Blocks(tier, ids)
        self._pool.share(blocks)
        self._held.append((until, blocks))

    async def _send(
        self, peer: _Peer, ids: IdArray, tier: Tier, key: str | None, tokens: bytes | None, namespace: Hashable
    ) -> TransferResult | None:
        started = time.perf_counter()
        xid = next(self._xid)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        peer.waiting[xid] = queue
        storage = self._pool.storage(tier)
        staging: list[torch.Tensor] | None = None
        tasks: list[asyncio.Task[None]] = []
        sent = messages = 0
        streaming = False  # data may be on the wire: any failure must abort the link
        pull_until: float | None = None  # set while the receiver may be copying out of our tier
        try:
            begin: dict[str, Any] = {
                "type": "begin",
                "xid": xid,
                "n": len(ids),
                "key": key,
                "chunk": self._chunk_blocks(storage),
            }
            if tokens is not None:
                begin["tokens"] = pack_bytes(tokens)
                begin["ns"] = namespace
            if self._offers_pull(peer, storage):
                pull_until = time.monotonic() + self.config.deadline_s  # our _expect waits that long
                offer: dict[str, Any] = {"tier": tier.value, "until": pull_until}
                if _is_run(ids):  # the first id says it all (base64 of 1,024 ids costs ~0.1 ms a side)
                    offer["run"] = int(ids[0])
                else:
                    offer["ids"] = pack_bytes(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
                begin["pull"] = offer
            await peer.channel.send(begin)
            # "done" first is only an answer to a pull offer: otherwise no byte has moved yet
            refused: list[bool] = []  # a "fail" answer: the receiver reads nothing of ours any more
            try:
                kinds = ("ready", "done") if pull_until else ("ready",)
                ready = await self._expect(peer, queue, *kinds, refused=refused)
            finally:
                if refused:
                    pull_until = None
            if ready is None:
                return None
            pull_until = None  # answered: it copied already, or it takes the data link
            if ready["type"] == "done":
                return self._pulled(peer, ready, len(ids), started)
            streaming = True
            data_started = time.perf_counter()
            chunk = self._chunk_blocks(storage)
            skip, segments = _plan_of(peer.name, ready, len(ids), chunk)
            # Runs go straight from KV storage, up to WINDOW messages in flight; scattered parts are
            # gathered (on a worker thread, so the loop keeps driving the link) into two staging
            # buffers, one filling while the other is on the wire.
            staging = [] if staging is None else staging
            direct: collections.deque[asyncio.Task[None]] = collections.deque()
            users: dict[int, asyncio.Task[None]] = {}
            nstaged = 0
            pos = skip
            for i, length in enumerate(segments):
                src = ids[pos : pos + length]
                slot = -1
                if _is_run(src):
                    buf = storage.flat[int(src[0]) : int(src[0]) + length]
                else:
                    slot, nstaged = nstaged % 2, nstaged + 1
                    if slot in users:
                        await users.pop(slot)  # the send that used this buffer is done
                    if len(staging) <= slot:
                        staging.append(self._take_staging(chunk, storage))
                    buf = staging[slot][:length]
                    await _in_thread(self._copier, _copy_out, storage, src, buf)
                task = asyncio.ensure_future(self._timed(peer, peer.link.send(buf, segment_tag(xid, i))))
                tasks.append(task)
                if slot >= 0:
                    users[slot] = task
                else:
                    direct.append(task)
                    if len(direct) > WINDOW:
                        await direct.popleft()
                messages += 1
                pos += length
                if self.segment_delay_s:
                    await asyncio.sleep(self.segment_delay_s)
                rate = self.link_rate.get(peer.name)
                if rate:  # a slow link: this message takes its size / rate on the wire
                    await asyncio.sleep(buf.numel() * buf.element_size() / rate)
            for task in tasks:
                await task
            data_seconds = time.perf_counter() - data_started
            sent = len(ids) - skip
            done = await self._expect(peer, queue, "done")
            assert done is not None
            streaming = False
            return self._finished(peer, sent, skip, messages, started, data_seconds)
        except BaseException as exc:
            self.stats["failed"] += 1
            if pull_until is not None:  # no answer: it may be copying our blocks still
                self._hold(ids, tier, pull_until)
            if streaming and peer.alive:
                error = TransferError(f"transfer {xid} to {peer.name} aborted: {exc!r}")
                await asyncio.shield(self._drop(peer, error))
            raise
        finally:
            try:
                if any(not t.done() for t in tasks):  # sends still posted: no staging goes back before they end
                    await _to_the_end(self._abandon(peer, tasks, f"transfer {xid} to {peer.name} abandoned mid-flight"))
            finally:
                _retrieve(tasks)
                peer.waiting.pop(xid, None)
                for buf in staging or ():
                    self._give_staging(buf)

    async def _abandon(self, peer: _Peer, tasks: list[asyncio.Task[None]], why: str) -> None:
        """End a transfer's unfinished sends or receives: the link is aborted first (or the abort
        another task began is waited for), so that none can still touch their buffers."""
        await self._drop(peer, TransferError(why))
        await _settle(tasks)

    def _pulled(self, peer: _Peer, done: dict[str, Any], n: int, started: float) -> TransferResult:
        """The result of a transfer the receiver pulled."""
        skip, got = done.get("skipped"), done.get("received")
        if not _is_int(skip) or not _is_int(got) or skip < 0 or skip + got != n:
            raise TransferError(f"{peer.name} confirmed an impossible pull: skipped {skip!r}, received {got!r}")
        copy_s = done.get("copy_s")
        data_s = float(copy_s) if isinstance(copy_s, (int, float)) else 0.0
        return self._finished(peer, got, skip, 0, started, data_s, pulled=True)

    def _finished(
        self, peer: _Peer, sent: int, skip: int, messages: int, started: float, data_s: float, *, pulled: bool = False
    ) -> TransferResult:
        """Count a confirmed transfer and describe it."""
        nbytes = sent * self._block_bytes
        self.stats["sent"] += 1
        self.stats["blocks_sent"] += sent
        self.stats["blocks_skipped"] += skip
        self.stats["bytes_sent"] += nbytes
        self.stats["messages_sent"] += messages
        elapsed = time.perf_counter() - started
        return TransferResult(peer.name, sent, skip, nbytes, messages, elapsed, data_s, pulled=pulled)

    async def _timed(self, peer: _Peer, op: Coroutine[Any, Any, None]) -> None:
        try:
            await asyncio.wait_for(op, self.config.deadline_s)
        except asyncio.TimeoutError:
            error = TransferTimeoutError(f"data to/from {peer.name} stalled past {self.config.deadline_s:.0f} s")
            await self._drop(peer, error)
            raise error from None
        except PeerLostError as exc:
            await self._drop(peer, exc)
            raise

    # -- receiver --------------------------------------------------------------------------------
    async def _serve(self, peer: _Peer, msg: dict[str, Any]) -> None:
        xid = int(msg["xid"])
        dst: Blocks | None = None
        match: Match | None = None
        staging: list[torch.Tensor] = []
        inflight: list[asyncio.Task[None]] = []
        reserved: str | None = None
        streaming = False  # "ready" is sent: the sender's data may be on the link
        self._receiving += 1  # until every block of it is back: a dropped peer's transfers still count
        try:
            n, key, ns = msg.get("n"), msg.get("key"), msg.get("ns")
            if not _is_int(n) or n <= 0 or (key is not None and not isinstance(key, str)):
                return await self._fail(peer, xid, "bad_request", "n must be a positive int and key a str")
            if "tokens" in msg and not isinstance(msg["tokens"], str):
                return await self._fail(peer, xid, "bad_request", "tokens must be base64 text")
            check_namespace(ns)
            pull = self._pull_source(peer, msg.get("pull"), n)
            skip = 0
            tokens = None
            if "tokens" in msg:
                tokens = np.frombuffer(unpack_bytes(msg["tokens"]), dtype=np.int32)
                if len(tokens) <= (n - 1) * self._block_size:
                    return await self._fail(
                        peer, xid, "bad_request", f"{n} blocks need > {(n - 1) * self._block_size} tokens"
                    )
                # a partly filled last block is kept as a tail (MemPool.insert_tail)
                tokens = tokens[: n * self._block_size]
                whole = len(tokens) // self._block_size
                match = self._pool.match(tokens[: whole * self._block_size], ns, promote=True)
                skip = len(match.blocks)
            elif key is None:
                return await self._fail(peer, xid, "bad_request", "a transfer needs a key or tokens")
            else:
                with self._receipts_lock:
                    taken = key in self._receipts or key in self._incoming
                    if not taken:
                        self._incoming.add(key)  # reserved until this transfer ends, either way
                        reserved = key
                if taken:
                    return await self._fail(peer, xid, "bad_request", f"key {key!r} is in use")
            need = n - skip
            if need:
                dst = self._pool.alloc(need)
                if dst is None:
                    return await self._fail(peer, xid, "no_space", "no room on the device tier")
            storage = self._pool.storage(Tier.DEVICE)
            ids = dst.ids if dst is not None else np.empty(0, dtype=np.int64)
            copy_s = 0.0
            if pull is not None:
                rows, src, until = pull
                t0 = time.perf_counter()
                await self._pull_rows(rows, src[skip:], storage, ids)
                copy_s = time.perf_counter() - t0
                if self.pull_delay_s:
                    await asyncio.sleep(self.pull_delay_s)
                if time.monotonic() >= until:  # the sender may have let go of its blocks meanwhile
                    raise TransferTimeoutError(f"pull from {peer.name} ended after the sender's deadline")
            else:
                streaming = True
                await self._receive(peer, msg, xid, skip, ids, storage, staging, inflight)
            # every byte has landed: only now does anything become visible
            if tokens is not None:
                assert match is not None
                self._pool.insert_sequence(tokens, match.blocks if dst is None else match.blocks.concat(dst), ns)
            else:
                assert dst is not None and key is not None
                with self._receipts_lock:
                    self._receipts[key] = (dst, time.monotonic() + self.config.receipt_ttl_s)
                dst = None  # the receipt owns the references now
            self.stats["received"] += 1
            self.stats["pulled"] += pull is not None
            self.stats["blocks_received"] += need
            self.stats["bytes_received"] += need * self._block_bytes
            done = {"type": "done", "xid": xid, "skipped": skip, "received": need}
            if pull is not None:
                done.update(pulled=True, copy_s=copy_s)
            await peer.channel.send(done)
        except (TransferError, ChannelClosed) as exc:
            if peer.alive:
                await self._drop(peer, exc if isinstance(exc, TransferError) else PeerLostError(str(exc)))
        except asyncio.CancelledError:
            pass  # the peer was dropped: its link is aborted already
        except (MemPoolError, ValueError) as exc:  # e.g. bad tokens or a malformed field from the peer
            if peer.alive:
                await self._fail(peer, xid, "bad_request", str(exc))
        except Exception as exc:  # nothing above foresaw it (a failed copy here, say)
            log.exception("agent %s: serving transfer %d from %s failed", self.name, xid, peer.name)
            if peer.alive and not streaming:  # nothing of the sender's is on the link: refuse, keep it
                await self._fail(peer, xid, "receiver_error", f"{self.name} failed: {exc!r}")
            elif peer.alive:  # data may be on its way: end the link rather than leave the sender waiting
                await self._drop(peer, PeerLostError(f"transfer {xid} from {peer.name} failed: {exc!r}"))
        finally:
            try:
                if any(not t.done() for t in inflight):
                    # receives still posted: nothing is freed before they end, whoever drops the link,
                    # and a close of the agent meanwhile does not cut that short (it would leak)
                    why = f"transfer {xid} from {peer.name} abandoned mid-flight"
                    await _to_the_end(self._abandon(peer, inflight, why))
            finally:
                self._give_back(peer, xid, inflight, staging, dst, match, reserved)

    def _give_back(
        self,
        peer: _Peer,
        xid: int,
        inflight: list[asyncio.Task[None]],
        staging: list[torch.Tensor],
        dst: Blocks | None,
        match: Match | None,
        reserved: str | None,
    ) -> None:
        """Free what a served transfer took (no receive may still write into it)."""
        try:
            _retrieve(inflight)
            if dst is not None:
                self._pool.free(dst)
            if match is not None:
                match.release()
            if reserved is not None:
                with self._receipts_lock:
                    self._incoming.discard(reserved)
            for buf in staging:
                self._give_staging(buf)
            peer.serving.pop(xid, None)
        finally:
            self._receiving -= 1

    def _pull_source(self, peer: _Peer, pull: Any, n: int) -> tuple[torch.Tensor, IdArray, float] | None:
        """The sender's mapped rows, block ids and deadline, if this transfer can be pulled.

        Raises:
            ValueError: a malformed offer (answered as a bad request).
        """
        if pull is None:
            return None
        tier = next((t for t in Tier if isinstance(pull, dict) and t.value == pull.get("tier")), None)
        until = pull.get("until") if isinstance(pull, dict) else None
        first = pull.get("run") if isinstance(pull, dict) else None
        if (
            tier is None
            or not isinstance(until, float)
            or not (isinstance(pull.get("ids"), str) or (_is_int(first) and first >= 0))
        ):
            raise ValueError(f"malformed pull offer {str(pull)[:80]}")
        rows = peer.mapped.get(tier)
        if rows is None:
            return None  # not mapped here: the data link it is
        if first is not None:  # blocks first .. first + n - 1
            if first + n > rows.shape[0]:
                raise ValueError(f"a pull offer of blocks {first}..{first + n - 1} of {peer.name}'s {rows.shape[0]}")
            src: IdArray = np.arange(first, first + n, dtype=np.int64)
        else:
            raw = unpack_bytes(pull["ids"])
            if len(raw) != 8 * n:
                raise ValueError(f"a pull offer of {len(raw) // 8} ids for {n} blocks")
            src = np.frombuffer(raw, dtype=np.int64)
        if n and (int(src.min()) < 0 or int(src.max()) >= rows.shape[0]):
            raise ValueError(f"pull ids outside {peer.name}'s {rows.shape[0]} blocks")
        return rows, src, until

    async def _pull_rows(self, rows: torch.Tensor, rows_ids: IdArray, storage: KVStorage, ids: IdArray) -> None:
        """Copy a pull's rows into blocks ``ids``, landed when it returns.

        On a CPU tier the loop copies them itself, yielding to its other tasks after each
        ``chunk_bytes`` it copied, and the copier thread takes pieces (``PIECE_BYTES``) of the
        same copy meanwhile, whenever it runs. Neither waits for the other, so a thread that runs
        late costs only what it has not copied. (torch splits a copy into fixed shares, one per
        OpenMP thread; on this shared 2-core VM one of two threads often stops for milliseconds,
        and the copy then waited for its share: 32 MiB pulls took ~5.5 ms in such rounds, ~3.6 ms
        in others, and ~5.3 ms in every round with one OpenMP thread.)
        No copy runs once this returns or raises, a cancellation included.
        """
        if storage.flat.device.type != "cpu":  # queued on a stream: the worker waits for it to land
            await _in_thread(self._copier, _copy_in, rows, rows_ids, storage, ids)
            return
        step = self._chunk_blocks(storage)
        piece = min(step, max(1, PIECE_BYTES // self._block_bytes))
        pieces = copy_rows_pieces(rows, rows_ids, storage, ids, piece) if len(ids) > piece else None
        if pieces is None:  # one piece, or a destination in many short runs: chunks, on the loop alone
            for start in range(0, len(ids), step):
                if start:
                    await asyncio.sleep(0)
                copy_rows(rows, rows_ids[start : start + step], storage, ids[start : start + step])
            return
        job = _SharedCopy(pieces)
        if len(pieces) > 1:
            self._copier.submit(job.help)
        try:
            per_turn = max(1, step * self._block_bytes // PIECE_BYTES)
            while job.run(per_turn):
                await asyncio.sleep(0)
        finally:
            job.stop()  # returns once the copier's piece in flight (if any) has landed
        job.check()

    async def _receive(
        self,
        peer: _Peer,
        msg: dict[str, Any],
        xid: int,
        skip: int,
        ids: IdArray,
        storage: KVStorage,
        staging: list[torch.Tensor],
        inflight: list[asyncio.Task[None]],
    ) -> None:
        """Plan the segments, answer ``ready``, and wait until every byte has landed in ``ids``.

        ``staging`` and ``inflight`` collect the buffers and receives used, for the caller to
        settle and give back whatever happens.
        """
        chunk = self._chunk_blocks(storage)
        if _is_int(msg.get("chunk")) and msg["chunk"] > 0:
            chunk = min(chunk, msg["chunk"])  # both sides' message limits hold
        segments = plan_segments(ids, chunk, peer.link.receive_via_staging)
        await peer.channel.send({"type": "ready", "xid": xid, "skip": skip, "segments": segments})
        # Runs land straight in KV storage, up to WINDOW receives posted at once; a link that
        # must receive into staging alternates two buffers, scattering one (on a worker
        # thread) while the other fills.
        direct_rx: collections.deque[asyncio.Task[None]] = collections.deque()
        landing: dict[int, tuple[asyncio.Task[None], torch.Tensor, IdArray]] = {}
        nstaged = 0
        pos = 0
        for i, length in enumerate(segments):
            part = ids[pos : pos + length]
            if _is_run(part) and not peer.link.receive_via_staging:
                d0 = int(part[0])
                task = asyncio.ensure_future(
                    self._timed(peer, peer.link.recv(storage.flat[d0 : d0 + length], segment_tag(xid, i)))
                )
                inflight.append(task)
                direct_rx.append(task)
                if len(direct_rx) > WINDOW:
                    await direct_rx.popleft()
            else:
                slot, nstaged = nstaged % 2, nstaged + 1
                if slot in landing:
                    await self._land(*landing.pop(slot), storage)
                if len(staging) <= slot:
                    staging.append(self._take_staging(chunk, storage))
                buf = staging[slot][:length]
                task = asyncio.ensure_future(self._timed(peer, peer.link.recv(buf, segment_tag(xid, i))))
                inflight.append(task)
                landing[slot] = (task, buf, part)
            pos += length
        for slot in list(landing):
            await self._land(*landing.pop(slot), storage)
        for task in direct_rx:
            await task

    async def _land(self, task: asyncio.Task[None], landing: torch.Tensor, part: IdArray, storage: KVStorage) -> None:
        """Wait for one segment received into staging, then scatter it into its blocks."""
        await task
        await _in_thread(self._copier, _copy_in, landing, np.arange(len(part), dtype=np.int64), storage, part)

    async def _fail(self, peer: _Peer, xid: int, code: str, reason: str) -> None:
        try:
            await peer.channel.send({"type": "fail", "xid": xid, "code": code, "reason": reason})
        except ChannelClosed:
            await self._drop(peer, PeerLostError(f"lost {peer.name}"))


def _is_int(value: object) -> TypeGuard[int]:
    """Whether a field from the wire is an integer (JSON ``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _plan_of(peer: str, ready: dict[str, Any], n: int, chunk: int) -> tuple[int, list[int]]:
    """The receiver's plan in ``ready`` for ``n`` blocks: blocks it has already and the lengths
    of the data messages, each at most ``chunk`` blocks.

    Raises:
        TransferError: a plan that is malformed or does not cover exactly ``n`` blocks.
    """
    skip, segments = ready.get("skip"), ready.get("segments")
    if (
        _is_int(skip)
        and isinstance(segments, list)
        and all(_is_int(x) and 0 < x <= chunk for x in segments)
        and 0 <= skip == n - sum(segments)
    ):
        return skip, segments
    raise TransferError(f"{peer} sent an impossible plan: skip {skip!r}, segments {str(segments)[:80]}")


def _is_run(ids: IdArray) -> bool:
    """Whether ``ids`` are consecutive (one contiguous region of KV storage)."""
    n = len(ids)
    return n > 0 and int(ids[-1]) - int(ids[0]) == n - 1 and (n == 1 or bool((np.diff(ids) == 1).all()))


def _use_device(device: torch.device) -> None:
    """Make ``device`` this thread's current one (for CUDA, its context: UCX's CUDA transports
    copy in the context current on the thread that drives them)."""
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        torch.cuda.set_device(device)


class _SharedCopy:
    """The pieces of one host copy, each taken by whichever thread asks next: the agent's loop
    and, alongside it, the copier thread."""

    def __init__(self, pieces: Sequence[Callable[[], None]]) -> None:
        self._pieces = pieces
        self._next = 0  # the next piece to take
        self._taking = threading.Lock()  # guards _next
        self._lock = threading.Lock()  # held by the copier while it copies a piece
        self._stopped = False
        self._error: BaseException | None = None

    def run(self, most: int) -> bool:
        """Copy up to ``most`` pieces on this thread; False once none is left."""
        for _ in range(most):
            k = self._take()
            if k >= len(self._pieces) or self._error is not None:
                return False
            self._pieces[k]()
        return True

    def help(self) -> None:
        """The copier's part: pieces until none is left or the copy is stopped."""
        while True:
            with self._lock:
                if self._stopped:
                    return
                k = self._take()
                if k >= len(self._pieces):
                    return
                try:
                    self._pieces[k]()
                except BaseException as exc:  # the loop's check() raises it
                    self._error, self._stopped = exc, True
                    return

    def _take(self) -> int:
        with self._taking:
            k, self._next = self._next, self._next + 1
        return k

    def stop(self) -> None:
        """No piece is copied once this returns."""
        self._stopped = True  # the copier takes no piece after this...
        with self._lock:  # ...and the one it may be copying has landed
            pass

    def check(self) -> None:
        """Raise what a piece on the copier raised."""
        if self._error is not None:
            raise self._error


def _copy_out(storage: KVStorage, ids: IdArray, rows: torch.Tensor) -> None:
    """Blocks ``ids`` into ``rows`` (staging), landed before it returns: a link may read them next."""
    storage.read_rows(ids, rows)
    storage.synchronize()


def _copy_in(rows: torch.Tensor, rows_ids: IdArray, storage: KVStorage, ids: IdArray) -> None:
    """Rows ``rows_ids`` of ``rows`` (staging, or a peer's mapped tier) into blocks ``ids``, landed
    before it returns: the transfer may be confirmed, and the blocks read, next."""
    copy_rows(rows, rows_ids, storage, ids)
    storage.synchronize()


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on ``executor``; when cancelled, first wait until it has returned (a
    copy still running must not outlive the blocks it reads or writes)."""
    await _to_the_end(asyncio.get_running_loop().run_in_executor(executor, fn, *args))


async def _to_the_end(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end, even through cancellations of the caller; a cancellation that
    came meanwhile is raised after it (so cleanup cannot be cut short half-way)."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not fut.cancelled():
            fut.exception()  # retrieved, so not reported as lost: the cancellation wins
        raise asyncio.CancelledError
    return fut.result()


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the unfinished tasks and wait (briefly) until every one has ended."""
    live = [t for t in tasks if not t.done()]
    for t in live:
        t.cancel()
    if live:
        await asyncio.wait(live, timeout=5.0)
    _retrieve(tasks)


def _retrieve(tasks: list[asyncio.Task[None]]) -> None:
    """Mark the failures of ended tasks seen: each was handled (or re-raised) already."""
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()


def check_namespace(namespace: Hashable) -> None:
    """Namespaces cross the wire as JSON: only ``None``, ``str`` and ``int`` are allowed."""
    if namespace is not None and not (isinstance(namespace, str) or _is_int(namespace)):
        raise InvalidArgumentError(f"a transferred namespace must be None, a str or an int, got {namespace!r}")
