"""The transport's pieces in one process: segment plans, tags, proofs, framing, config, misuse."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import torch

from mempool import Blocks, Tier
from mempool.config import CHUNK_BYTES, TransportConfig
from mempool.errors import (
    BlockNotAllocatedError,
    InvalidArgumentError,
    InvalidTokensError,
    TransferTimeoutError,
    UnknownPeerError,
)
from mempool.transport import auth
from mempool.transport.plan import plan_segments, segment_tag
from mempool.transport.wire import MAX_FRAME, Channel, ChannelClosed
from tests.conftest import fill_random, make_pool
from tests.transport.inproc import connected

SECRET = b"0123456789abcdef0123"


@pytest.mark.parametrize(
    ("ids", "chunk", "staging", "expected"),
    [
        ([], 4, False, []),
        ([7], 4, False, [1]),
        (list(range(10)), 4, False, [4, 4, 2]),  # one run, chunked
        ([0, 1, 2, 10, 11, 20], 8, False, [3, 2, 1]),  # follows destination runs
        ([0, 1, 2, 10, 11, 20], 8, True, [6]),  # a staging link: plain chunks
        (list(range(0, 40, 2)), 8, False, [8, 8, 4]),  # 20 runs of 1: too fragmented, plain chunks
    ],
)
def test_plan_segments(ids: list[int], chunk: int, staging: bool, expected: list[int]) -> None:
    got = plan_segments(np.array(ids, dtype=np.int64), chunk, staging)
    assert got == expected and sum(got) == len(ids)


def test_segment_tags_are_distinct_and_fit_31_bits() -> None:
    tags = {segment_tag(x, i) for x in range(1, 200) for i in range(64)}
    assert len(tags) == 199 * 64
    assert all(0 <= t < 2**31 for t in tags)


def test_proofs_bind_secret_role_nonces_and_names() -> None:
    p = auth.proof(SECRET, "server", "c", "s", "alice", "bob")
    assert auth.verify(SECRET, p, "server", "c", "s", "alice", "bob")
    assert not auth.verify(b"another-secret-0000", p, "server", "c", "s", "alice", "bob")
    assert not auth.verify(SECRET, p, "client", "c", "s", "alice", "bob")  # no reflection
    assert not auth.verify(SECRET, p, "server", "s", "c", "alice", "bob")  # nonces bound in order
    assert not auth.verify(SECRET, p, "server", "c", "s", "mallory", "bob")
    assert not auth.verify(SECRET, None, "server", "c", "s", "alice", "bob")
    assert auth.new_nonce() != auth.new_nonce()


async def _pair() -> tuple[Channel, asyncio.StreamWriter, asyncio.StreamReader, asyncio.base_events.Server]:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer_reader, peer_writer = await accepted
    return Channel(reader, writer), peer_writer, peer_reader, server


def test_channel_round_trip_and_bad_frames() -> None:
    async def run() -> None:
        ch, raw_w, raw_r, server = await _pair()
        other = Channel(raw_r, raw_w)
        await other.send({"type": "hello", "n": 3})
        assert await ch.recv() == {"type": "hello", "n": 3}
        with pytest.raises(ValueError, match="exceeds"):
            await ch.send({"type": "x", "blob": "a" * MAX_FRAME})
        raw_w.write(struct.pack(">I", 5) + b"nojsn")  # malformed JSON
        await raw_w.drain()
        with pytest.raises(ChannelClosed, match="malformed"):
            await ch.recv()
        ch2, raw_w2, _, server2 = await _pair()
        body = json.dumps([1, 2]).encode()  # JSON, but not an object with a type
        raw_w2.write(struct.pack(">I", len(body)) + body)
        await raw_w2.drain()
        with pytest.raises(ChannelClosed, match="without a type"):
            await ch2.recv()
        ch3, raw_w3, _, server3 = await _pair()
        raw_w3.write(struct.pack(">I", MAX_FRAME + 1))
        await raw_w3.drain()
        with pytest.raises(ChannelClosed, match="exceeds"):
            await ch3.recv()
        ch4, raw_w4, _, server4 = await _pair()
        raw_w4.close()
        with pytest.raises(ChannelClosed, match="closed"):
            await ch4.recv()
        for c in (ch, ch2, ch3, ch4, other):
            await c.close()
        for w in (raw_w2, raw_w3):  # the accepting ends no channel wraps
            w.close()
            await w.wait_closed()
        for s in (server, server2, server3, server4):
            s.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("secret", "short"),
        ("backend", "tcp"),
        ("host", ""),
        ("port", 70000),
        ("deadline_s", 0),
        ("deadline_s", float("inf")),  # an OverflowError as the data link set its timeout, mid-connect
        ("deadline_s", float("nan")),
        ("receipt_ttl_s", -1),
        ("receipt_ttl_s", float("inf")),  # unclaimed receipts never freed
        ("heartbeat_s", float("inf")),
        ("chunk_bytes", 0),
        ("heartbeat_s", True),
        ("ucx_shared_memory", "yes"),
        ("same_host_pull", 1),
    ],
)
def test_transport_config_validation(field: str, value: object) -> None:
    fields: dict[str, object] = {"name": "a", "secret": SECRET}
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        TransportConfig(**fields)  # type: ignore[arg-type]


def test_messages_are_sized_by_where_the_blocks_are_unless_chunk_bytes_says() -> None:
    """Host tiers pipeline 8 MiB pieces; GPU tiers send up to 64 MiB in one message (each more
    message there is one more rendezvous); a chunk_bytes given holds for both."""
    auto = TransportConfig(name="a", secret=SECRET)
    assert auto.chunk_for(torch.device("cpu")) == CHUNK_BYTES["cpu"] == 8 << 20
    assert auto.chunk_for(torch.device("cuda")) == auto.chunk_for(torch.device("cuda", 1)) == CHUNK_BYTES["cuda"]
    assert CHUNK_BYTES["cuda"] == 64 << 20
    fixed = TransportConfig(name="a", secret=SECRET, chunk_bytes=4096)
    assert fixed.chunk_for(torch.device("cpu")) == fixed.chunk_for(torch.device("cuda")) == 4096


def test_a_transfer_cuts_its_messages_at_its_tiers_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent asks where the blocks are: a host tier's default here is 2 blocks, so 6 take 3."""
    with connected(pull=False) as (a, b):
        monkeypatch.setitem(CHUNK_BYTES, "cpu", 2 * a.config.layout.block_bytes)
        blocks = a.alloc(6)
        assert blocks is not None
        fill_random(a, blocks, seed=5)
        result = a.transfer("b", blocks, key="k")
        assert result is not None and result.messages == 3
        got = b.claim("k")
        assert got is not None
        assert torch.equal(b.storage().tensor[got.ids.tolist()], a.storage().tensor[blocks.ids.tolist()])
        a.free(blocks)
        b.free(got)
        for pool in (a, b):
            pool.check_invariants()
            assert pool.stats()["device"]["used"] == 0


def test_transport_config_never_prints_the_secret() -> None:
    cfg = TransportConfig(name="a", secret="a-very-secret-value-123")
    assert "secret-value" not in repr(cfg) and cfg.secret == b"a-very-secret-value-123"
    assert cfg.host == "127.0.0.1" and cfg.port == 0  # loopback and any free port by default


def test_transfer_api_misuse_changes_nothing() -> None:
    pool = make_pool()
    blocks = pool.alloc(2)
    with pytest.raises(InvalidArgumentError, match="not serving"):
        pool.transfer("b", blocks, key="k")
    host, port = pool.serve(TransportConfig(name="a", secret=SECRET, backend="torch"))
    try:
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(InvalidArgumentError, match="serving already"):
            pool.serve(TransportConfig(name="a", secret=SECRET, backend="torch"))
        refs = pool._alloc[Tier.DEVICE]._refs.tolist()
        cases = [
            (lambda: pool.transfer("nobody", blocks, key="k"), UnknownPeerError),
            (lambda: pool.transfer("nobody", blocks, key=""), InvalidArgumentError),
            (lambda: pool.transfer("nobody", Blocks(Tier.DEVICE, [9]), key="k"), BlockNotAllocatedError),
            (lambda: pool.transfer_with_insert("nobody", list(range(4)), blocks), InvalidArgumentError),
            (lambda: pool.transfer_with_insert("nobody", [1.5] * 8, blocks), InvalidTokensError),
            (
                lambda: pool.transfer_with_insert("nobody", list(range(8)), blocks, namespace=("t", 1)),
                InvalidArgumentError,
            ),
            (lambda: pool.transfer_with_insert("nobody", list(range(8)), blocks), UnknownPeerError),
        ]
        for call, error in cases:
            with pytest.raises(error):
                call()
            assert pool._alloc[Tier.DEVICE]._refs.tolist() == refs  # the transfer's lock was let go
        assert pool.claim("never-sent") is None
        assert pool.peers() == {}
    finally:
        pool.close()
    pool.free(blocks)
    pool.check_invariants()


def test_an_agent_call_past_its_budget_is_a_transfer_timeout_and_is_cancelled() -> None:
    # The backstop behind every blocking call into the agent: on Python 3.10 the future's timeout
    # is not the builtin TimeoutError, and catching that one let it escape untyped, uncancelled.
    pool = make_pool()
    pool.serve(TransportConfig(name="a", secret=SECRET, backend="torch"))
    agent = pool._agent
    assert agent is not None
    ended = asyncio.Event()

    async def stalls() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ended.set()

    try:
        with pytest.raises(TransferTimeoutError, match="no answer within"):
            agent._call(stalls(), 0.1)
        assert agent._call(asyncio.wait_for(ended.wait(), 5), 10) is True  # cancelled, not left running
    finally:
        pool.close()
    pool.check_invariants()


def test_a_clean_up_runs_to_its_end_through_cancellations_then_raises_them() -> None:
    """What a transfer's give-back runs under (``agent._to_the_end``)."""
    from mempool.transport.agent import _to_the_end

    async def main() -> None:
        started, go = asyncio.Event(), asyncio.Event()
        steps: list[str] = []

        async def clean_up() -> str:
            started.set()
            await go.wait()
            steps.append("ran to its end")
            return "done"

        task = asyncio.ensure_future(_to_the_end(clean_up()))
        await started.wait()
        for _ in range(2):  # cancelled twice while it runs
            task.cancel()
            await asyncio.sleep(0)
        assert not task.done() and not steps
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["ran to its end"]
        assert await _to_the_end(clean_up()) == "done"  # not cancelled: its result

        async def failing() -> None:
            raise ValueError("a failed copy")

        with pytest.raises(ValueError, match="a failed copy"):
            await _to_the_end(failing())

    asyncio.run(main())
