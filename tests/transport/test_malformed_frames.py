"""A peer that authenticates and then speaks the control protocol wrong (a bug, version skew, or
an insider): every malformed frame gets a typed answer or ends the link at once, and neither
side allocates, indexes or leaks anything for it.

Two pools in this process; frames are written straight onto the sender's control channel, and
a hostile receiver is one whose agent answers ``begin`` with a frame the test chose.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from mempool import Blocks, MemPool, Tier
from mempool.errors import InvalidArgumentError, TransferError

from ..conftest import fill_random, make_tokens
from .inproc import DEADLINE_S, connected, unchanged, wait_until


@pytest.fixture(params=[False, True], ids=["link", "pull"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[MemPool, MemPool]]:
    with connected(request.param) as (a, b):
        yield a, b


def _frame(pool: MemPool, to: str, frame: dict[str, Any], *, answer: bool = True) -> dict[str, Any] | None:
    """Send ``frame`` to ``to`` on ``pool``'s control channel; return the answer filed under the
    frame's ``xid`` (or ``None`` without ``answer``)."""
    agent = pool._agent
    assert agent is not None
    peer = agent._peers[to]

    async def go() -> dict[str, Any] | None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if answer:
            peer.waiting[frame["xid"]] = queue
        try:
            await peer.channel.send(frame)
            return await asyncio.wait_for(queue.get(), 10.0) if answer else None
        finally:
            if answer:
                peer.waiting.pop(frame["xid"], None)

    return agent._call(go(), 15.0)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _tokens(n: int) -> str:
    return _b64(np.arange(n, dtype=np.int32).tobytes())


XID = 1 << 30  # far above the sender's own transfer ids

# begin frames a receiver must refuse as bad requests, keeping the link
BAD_BEGINS: list[tuple[str, dict[str, Any]]] = [
    ("n zero", {"n": 0, "key": "k"}),
    ("n negative", {"n": -3, "key": "k"}),
    ("n a string", {"n": "2", "key": "k"}),
    ("n a float", {"n": 2.0, "key": "k"}),
    ("n a bool", {"n": True, "key": "k"}),
    ("n missing", {"key": "k"}),
    ("key not a str", {"n": 1, "key": 7}),
    ("neither key nor tokens", {"n": 1}),
    ("namespace a list", {"n": 1, "tokens": _tokens(8), "ns": [1]}),
    ("namespace a bool", {"n": 1, "tokens": _tokens(8), "ns": True}),
    ("tokens not a str", {"n": 1, "tokens": 12345}),
    ("tokens a list", {"n": 1, "tokens": [1, 2, 3, 4]}),
    ("tokens not base64", {"n": 1, "tokens": "not base64 at all!"}),
    ("tokens not whole int32s", {"n": 1, "tokens": _b64(b"\x01\x02\x03")}),
    ("too few tokens for n", {"n": 3, "tokens": _tokens(8)}),
    ("pull not a dict", {"n": 1, "key": "k", "pull": "yes"}),
    ("pull of no tier", {"n": 1, "key": "k", "pull": {"tier": "disk", "ids": _b64(b"\0" * 8), "until": 1e9}}),
    ("pull without a deadline", {"n": 1, "key": "k", "pull": {"tier": "device", "ids": _b64(b"\0" * 8)}}),
    ("pull ids not a str", {"n": 1, "key": "k", "pull": {"tier": "device", "ids": [0], "until": 1e9}}),
    ("pull run not an int", {"n": 1, "key": "k", "pull": {"tier": "device", "run": "0", "until": 1e9}}),
    ("pull run a bool", {"n": 1, "key": "k", "pull": {"tier": "device", "run": True, "until": 1e9}}),
    ("pull run negative", {"n": 1, "key": "k", "pull": {"tier": "device", "run": -1, "until": 1e9}}),
]


@pytest.mark.parametrize(("case", "fields"), BAD_BEGINS, ids=[c for c, _ in BAD_BEGINS])
def test_a_bad_begin_is_answered_as_a_bad_request_and_changes_nothing(
    pair: tuple[MemPool, MemPool], case: str, fields: dict[str, Any]
) -> None:
    a, b = pair
    before = b.stats()
    got = _frame(a, "b", {"type": "begin", "xid": XID, **fields})
    assert got is not None and got["type"] == "fail" and got["code"] == "bad_request", (case, got)
    assert got["reason"]
    unchanged(b, before)
    assert "a" in b.peers() and "b" in a.peers()  # a bad request is not a broken link
    # the link still works: a real transfer after it
    blocks = a.alloc(2)
    assert blocks is not None
    fill_random(a, blocks, seed=5)
    sent = a.transfer_with_insert("b", make_tokens(2 * a.config.block_size, seed=6), blocks)
    assert sent is not None and sent.sent_blocks == 2
    a.free(blocks)


def test_pull_ids_and_runs_that_do_not_fit_are_refused() -> None:
    with connected(pull=True) as (a, b):
        assert b._agent is not None and b._agent._peers["a"].mapped  # b can read a's tiers
        before = b.stats()
        capacity = a.config.device_blocks
        for ids in ([0, 1], [capacity], [-1]):  # two ids for one block; outside a's tier, both ways
            raw = np.array(ids, dtype=np.int64).tobytes()
            pull = {"tier": "device", "ids": _b64(raw), "until": time.monotonic() + 60}
            got = _frame(a, "b", {"type": "begin", "xid": XID, "n": 1, "key": "k", "pull": pull})
            assert got is not None and got["type"] == "fail" and got["code"] == "bad_request", (ids, got)
            unchanged(b, before)
        for first, n in ((capacity - 1, 2), (capacity, 1), (2**70, 1)):  # runs past the end of a's tier
            pull = {"tier": "device", "run": first, "until": time.monotonic() + 60}
            got = _frame(a, "b", {"type": "begin", "xid": XID, "n": n, "key": "k", "pull": pull})
            assert got is not None and got["type"] == "fail" and got["code"] == "bad_request", (first, got)
            unchanged(b, before)


def test_no_room_is_back_pressure_not_an_error(pair: tuple[MemPool, MemPool]) -> None:
    a, b = pair
    before = b.stats()
    got = _frame(a, "b", {"type": "begin", "xid": XID, "n": 10**9, "key": "k"})
    assert got is not None and got["type"] == "fail" and got["code"] == "no_space"
    unchanged(b, before)


def test_a_key_in_use_is_refused(pair: tuple[MemPool, MemPool]) -> None:
    a, b = pair
    blocks = a.alloc(1)
    assert blocks is not None
    assert a.transfer("b", blocks, key="k") is not None
    before = b.stats()
    got = _frame(a, "b", {"type": "begin", "xid": XID, "n": 1, "key": "k"})
    assert got is not None and got["type"] == "fail" and got["code"] == "bad_request" and "in use" in got["reason"]
    unchanged(b, before)
    received = b.claim("k")
    assert received is not None and len(received) == 1
    b.free(received)
    a.free(blocks)


def test_bad_transfer_arguments_are_refused_before_anything_is_sent(pair: tuple[MemPool, MemPool]) -> None:
    """Misuse is the caller's InvalidArgumentError, raised here: no blocks (it reached the
    receiver and came back as its refusal, a TransferError), a key that is no str or too long."""
    a, b = pair
    before_a, before_b, sent = a.stats(), b.stats(), a.transport_stats()
    for blocks, key in ((Blocks(Tier.DEVICE, []), "k"), (a.alloc(0), "k")) + tuple(
        (a.alloc(1), bad) for bad in ("", 5, "x" * 257)
    ):
        with pytest.raises(InvalidArgumentError):
            a.transfer("b", blocks, key=key)  # type: ignore[arg-type]
        a.free(blocks)
    assert a.transport_stats() == sent
    unchanged(a, before_a)
    unchanged(b, before_b)


# frames that break the protocol itself: the receiver drops the link at once (not after its
# deadline), and the sender's side of it learns so
BROKEN: list[tuple[str, dict[str, Any]]] = [
    ("begin without an id", {"type": "begin", "n": 1, "key": "k"}),
    ("begin with a str id", {"type": "begin", "xid": "7", "n": 1, "key": "k"}),
    ("begin with a bool id", {"type": "begin", "xid": True, "n": 1, "key": "k"}),
    ("ready with a list id", {"type": "ready", "xid": [1]}),
    ("done with a dict id", {"type": "done", "xid": {"a": 1}}),
    ("fail with a float id", {"type": "fail", "xid": 1.5}),
    ("an unknown frame", {"type": "hello", "xid": 0}),
]


@pytest.mark.parametrize(("case", "frame"), BROKEN, ids=[c for c, _ in BROKEN])
def test_a_frame_that_breaks_the_protocol_ends_the_link_at_once(
    pair: tuple[MemPool, MemPool], case: str, frame: dict[str, Any]
) -> None:
    a, b = pair
    before = b.stats()
    _frame(a, "b", frame, answer=False)
    took = wait_until(lambda: "a" not in b.peers() and "b" not in a.peers())
    assert took < DEADLINE_S / 4, case
    unchanged(b, before)


def test_a_begin_reusing_a_running_transfer_id_ends_the_link(pair: tuple[MemPool, MemPool]) -> None:
    a, b = pair
    before = b.stats()
    got = _frame(a, "b", {"type": "begin", "xid": XID, "n": 2, "key": "k"})  # b now waits for the data
    assert got is not None and got["type"] == "ready"
    assert b.stats() != before  # it allocated for the transfer
    _frame(a, "b", {"type": "begin", "xid": XID, "n": 1, "key": "k2"}, answer=False)
    wait_until(lambda: "a" not in b.peers())
    unchanged(b, before)  # the running transfer's blocks are freed


# answers a hostile receiver gives to a begin: the sender raises a TransferError and leaks
# nothing; a plan it cannot follow (data may be about to move) also ends the link
def _ready(**fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda m: {"type": "ready", "xid": m["xid"], **fields}


BAD_ANSWERS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], bool]] = [
    # (case, the answer to a begin of 2 blocks, whether the sender keeps the link)
    ("ready without a plan", _ready(), False),
    ("ready with a str skip", _ready(skip="0", segments=[2]), False),
    ("ready with a float skip", _ready(skip=0.0, segments=[2]), False),
    ("ready with segments a str", _ready(skip=0, segments="2"), False),
    ("ready with a str segment", _ready(skip=0, segments=["2"]), False),
    ("ready with a bool segment", _ready(skip=1, segments=[True]), False),
    ("ready skipping too much", _ready(skip=5, segments=[]), False),
    ("ready with an empty segment", _ready(skip=0, segments=[0, 2]), False),
    ("ready short of blocks", _ready(skip=0, segments=[1]), False),
    ("done with counts that do not add up", lambda m: {"type": "done", "xid": m["xid"], "skipped": 0}, True),
    ("done with a negative skip", lambda m: {"type": "done", "xid": m["xid"], "skipped": -1, "received": 3}, True),
    ("a refusal", lambda m: {"type": "fail", "xid": m["xid"], "code": "odd", "reason": "no"}, True),
]


@pytest.mark.parametrize(("case", "answer", "keeps_link"), BAD_ANSWERS, ids=[c for c, _, _ in BAD_ANSWERS])
def test_a_bad_answer_raises_a_transfer_error_and_leaks_nothing(
    pair: tuple[MemPool, MemPool], case: str, answer: Callable[[dict[str, Any]], dict[str, Any]], keeps_link: bool
) -> None:
    a, b = pair
    agent = b._agent
    assert agent is not None

    async def hostile(peer: Any, msg: dict[str, Any]) -> None:
        await peer.channel.send(answer(msg))

    agent._serve = hostile  # type: ignore[method-assign]
    blocks = a.alloc(2)
    assert blocks is not None
    before = a.stats()
    start = time.monotonic()
    with pytest.raises(TransferError) as caught:
        a.transfer("b", blocks, key="k")
    assert time.monotonic() - start < DEADLINE_S / 4, (case, caught.value)  # refused, not timed out
    assert ("b" in a.peers()) == keeps_link, (case, caught.value)
    if case.startswith("ready"):
        assert "impossible plan" in str(caught.value), caught.value
    assert a.stats() == before  # the caller's blocks are still its own, nothing else changed
    a.free(blocks)
    a.check_invariants()
    assert a.stats()["device"]["used"] == 0


def test_an_error_nothing_foresaw_while_serving_ends_the_link_and_frees_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect of ours inside a transfer must not leave the sender waiting out its deadline, nor
    the receiver holding what it allocated. (On the data link: a sender whose pull offer went
    unanswered would hold its blocks for the whole deadline.)"""
    with connected(pull=False) as (a, b):
        _fails_while_serving(a, b, caplog)


def _fails_while_serving(a: MemPool, b: MemPool, caplog: pytest.LogCaptureFixture) -> None:
    agent = b._agent
    assert agent is not None

    async def broken(*args: Any) -> None:
        raise RuntimeError("a defect")

    agent._receive = broken  # type: ignore[method-assign]  # after the receiver allocated
    before = b.stats()
    blocks = a.alloc(2)
    assert blocks is not None
    start = time.monotonic()
    with pytest.raises(TransferError):
        a.transfer("b", blocks, key="k")
    assert time.monotonic() - start < DEADLINE_S / 4
    wait_until(lambda: "a" not in b.peers() and "b" not in a.peers())
    unchanged(b, before)
    assert "a defect" in caplog.text  # logged with its traceback, not swallowed
    a.free(blocks)
    a.check_invariants()


def test_an_error_nothing_foresaw_while_reading_ends_the_link(
    pair: tuple[MemPool, MemPool], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    agent = b._agent
    assert agent is not None
    channel = agent._peers["a"].channel
    recv = channel.recv

    async def broken() -> dict[str, Any]:
        await recv()
        raise RuntimeError("a defect")

    channel.recv = broken  # type: ignore[method-assign]
    for _ in range(2):  # the first may meet the call to recv that was waiting before the patch
        _frame(a, "b", {"type": "ping"}, answer=False)
    took = wait_until(lambda: "a" not in b.peers() and "b" not in a.peers())
    assert took < DEADLINE_S / 4
    assert "a defect" in caplog.text
