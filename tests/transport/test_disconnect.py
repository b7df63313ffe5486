"""``MemPool.disconnect``: a peer leaves at run time. Both ends forget the link at once, a transfer
in flight fails typed on the sender while the receiver frees what it had allocated, the blocks
received before stay cached, and the two pools can connect again.

Two pools in this process (``tests/transport/inproc.py``), over the torch backend's data link and
over the same-host pull.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mempool import Blocks, MemPool
from mempool.errors import TransferError, UnknownPeerError
from mempool.transport import agent as agent_module

from ..conftest import fill_random, make_tokens
from .inproc import DEADLINE_S, connected, unchanged, wait_until


@pytest.fixture(params=[False, True], ids=["link", "pull"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[MemPool, MemPool]]:
    with connected(request.param) as (a, b):
        yield a, b


def _address(pool: MemPool) -> tuple[str, int]:
    agent = pool._agent
    assert agent is not None and agent.address is not None
    return agent.address


def _transfer_in_background(a: MemPool, blocks: Blocks) -> tuple[threading.Thread, list[BaseException | object]]:
    """Start ``a.transfer("b", blocks, key="mid")`` on a thread; its result or error lands in the list."""
    outcome: list[BaseException | object] = []

    def send() -> None:
        try:
            outcome.append(a.transfer("b", blocks, key="mid"))
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, outcome


def _slow_abort(monkeypatch: pytest.MonkeyPatch, link: Any, seconds: float) -> threading.Event:
    """Make ``link``'s abort wait ``seconds`` first; the event is set once it has ended."""
    aborted = threading.Event()
    abort = link.abort

    async def slow_abort() -> None:
        await asyncio.sleep(seconds)
        await abort()
        aborted.set()

    monkeypatch.setattr(link, "abort", slow_abort)
    return aborted


def test_a_disconnect_ends_the_link_on_both_sides_and_they_can_connect_again(pair: tuple[MemPool, MemPool]) -> None:
    a, b = pair
    bs = a.config.block_size
    tokens = make_tokens(4 * bs, seed=3)
    blocks = a.alloc(4)
    assert blocks is not None
    fill_random(a, blocks, seed=3)
    first = a.transfer_with_insert("b", tokens[: 2 * bs], blocks[:2])
    assert first is not None and first.sent_blocks == 2

    a.disconnect("b")
    assert "b" not in a.peers()
    took = wait_until(lambda: "a" not in b.peers(), DEADLINE_S)
    assert took < DEADLINE_S / 4  # told at once (a goodbye), not found out by a missed heartbeat
    before_a, before_b = a.stats(), b.stats()
    with pytest.raises(UnknownPeerError):
        a.transfer("b", blocks, key="after")
    with pytest.raises(UnknownPeerError):
        a.disconnect("b")
    assert a.stats() == before_a and b.stats() == before_b  # the refused calls changed nothing
    a.check_invariants()

    a.connect("b", *_address(b))
    wait_until(lambda: "a" in b.peers())
    second = a.transfer_with_insert("b", tokens, blocks)
    assert second is not None
    assert (second.skipped_blocks, second.sent_blocks) == (2, 2)  # b kept what it had received
    with b.match(tokens) as hit:
        assert hit.num_tokens == len(tokens)
        got = b.storage(hit.blocks.tier).flat[torch.tensor(hit.blocks.ids.tolist())]
        assert got.equal(a.storage(blocks.tier).flat[torch.tensor(blocks.ids.tolist())])  # bit for bit
    a.free(blocks)
    a.check_invariants()
    b.check_invariants()


def test_a_disconnect_mid_transfer_fails_it_typed_and_the_receiver_frees_everything() -> None:
    with connected(pull=False, chunk_bytes=512) as (a, b):  # a message per block (512 bytes here)
        blocks = a.alloc(4)
        assert blocks is not None
        fill_random(a, blocks, seed=5)
        before_a, before_b = a.stats(), b.stats()
        agent = a._agent
        assert agent is not None
        assert a.config.layout.block_bytes == 512
        agent.segment_delay_s = 2.0  # b waits 2 s for each next block: time to leave mid-way
        sender, outcome = _transfer_in_background(a, blocks)
        wait_until(lambda: b.stats() != before_b, DEADLINE_S)  # b has allocated for it: data is flowing
        a.disconnect("b")
        sender.join(DEADLINE_S)
        assert not sender.is_alive()
        (result,) = outcome
        assert isinstance(result, TransferError), result
        unchanged(b, before_b)  # the receiver freed what it had allocated and holds no receipt
        assert b.claim("mid") is None
        assert a.stats() == before_a  # the sender's blocks are its own again, unlocked
        a.free(blocks)
        a.check_invariants()


class _FailingReceiver:
    """``b`` receiving 4 scattered blocks from ``a`` through staging, one message every 2 s, set to
    fail on its own (a local error) once its peer ``a`` is being dropped, whose link abort takes
    ``abort_s``. Records, for each free of the transfer's blocks, whether that abort had ended."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, a: MemPool, b: MemPool, abort_s: float) -> None:
        self.spread = b.alloc(b.config.device_blocks)
        assert self.spread is not None
        b.free(self.spread[::2])  # b's free blocks are scattered
        self.blocks = a.alloc(4)
        assert self.blocks is not None
        fill_random(a, self.blocks, seed=7)
        receiver, sender = b._agent, a._agent
        assert receiver is not None and sender is not None
        peer = receiver._peers["a"]
        monkeypatch.setattr(peer.link, "receive_via_staging", True)  # as NCCL's: 2 blocks a message
        sender.segment_delay_s = 2.0  # a message every 2 s: b waits mid-way
        self.aborted = _slow_abort(monkeypatch, peer.link, abort_s)
        self.failed = threading.Event()
        land = receiver._land

        async def failing_land(*args: Any) -> None:
            while peer.alive and not args[0].done():
                await asyncio.sleep(0.01)
            if not peer.alive:
                self.failed.set()
                raise RuntimeError("a local failure while the peer is being dropped")
            await land(*args)

        monkeypatch.setattr(receiver, "_land", failing_land)
        free = b.free
        self.freed_after_abort: list[bool] = []

        def recording_free(what: Any) -> int:
            self.freed_after_abort.append(self.aborted.is_set())
            return free(what)

        monkeypatch.setattr(b, "free", recording_free)


def test_a_receiver_frees_nothing_a_receive_may_write_into_before_its_link_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transfer that fails on the receiver's side while another task is dropping the peer (here
    a disconnect, whose link abort is slowed down): its blocks are freed only once that abort has
    ended every posted receive, never in between (a late byte would land in a reused block)."""
    with connected(pull=False, chunk_bytes=1024) as (a, b):  # a message per 2 blocks (of 512 bytes)
        case = _FailingReceiver(monkeypatch, a, b, abort_s=0.5)
        before_b = b.stats()
        thread, outcome = _transfer_in_background(a, case.blocks)
        wait_until(lambda: b.stats() != before_b, DEADLINE_S)  # b has allocated for it: data is flowing
        b.disconnect("a")
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert isinstance(outcome[0], TransferError), outcome
        unchanged(b, before_b)
        assert case.freed_after_abort == [True]  # one give-back of the transfer's blocks, after the abort
        b.free(case.spread[1::2])
        a.free(case.blocks)
        for pool in (a, b):
            pool.check_invariants()


def test_a_receiver_closed_while_it_waits_to_free_a_transfer_still_frees_everything_after_the_abort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same failure, and the receiving pool closed while that transfer waits for the abort:
    the close cancels every task of the agent, and the wait must not be cut short (freeing at once
    risks a late byte; giving up leaks the blocks)."""
    with connected(pull=False, chunk_bytes=1024) as (a, b):
        case = _FailingReceiver(monkeypatch, a, b, abort_s=1.0)
        before_b = b.stats()
        thread, outcome = _transfer_in_background(a, case.blocks)
        wait_until(lambda: b.stats() != before_b, DEADLINE_S)
        a.disconnect("b")  # b's reader drops a on the goodbye: this thread is free meanwhile
        assert case.failed.wait(DEADLINE_S)  # b's transfer waits for the abort now
        b.close()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert isinstance(outcome[0], TransferError), outcome
        assert case.freed_after_abort == [True]
        assert b.stats()["device"] == before_b["device"]  # the transfer's blocks are free again
        b.check_invariants()
        a.free(case.blocks)
        a.check_invariants()


def test_a_sender_gives_back_no_staging_a_send_may_read_before_its_link_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's side of the test above: a transfer that fails while another task drops the
    peer gives its staging buffers back (for another transfer to fill) only once the link abort
    has ended every posted send."""
    with connected(pull=False, chunk_bytes=1024) as (a, b):  # a message per 2 blocks (of 512 bytes)
        spread = a.alloc(8)
        assert spread is not None
        blocks = spread[::2]  # scattered: gathered into staging
        fill_random(a, blocks, seed=8)
        sender, receiver = a._agent, b._agent
        assert sender is not None and receiver is not None
        peer = sender._peers["b"]
        link_b = receiver._peers["a"].link
        recv = link_b.recv

        async def late_recv(buf: torch.Tensor, tag: int) -> None:  # a's sends stay posted meanwhile
            await asyncio.sleep(3.0)
            await recv(buf, tag)

        monkeypatch.setattr(link_b, "recv", late_recv)
        sender.segment_delay_s = 1.0  # a message a second: a is mid-way when it disconnects
        aborted = _slow_abort(monkeypatch, peer.link, 2.5)  # still going when the next gather fails
        gather = agent_module._copy_out
        gathered = threading.Event()

        def failing_gather(*args: Any) -> None:  # a local failure once the peer is being dropped
            if not peer.alive:
                raise RuntimeError("a local failure while the peer is being dropped")
            gather(*args)
            gathered.set()

        monkeypatch.setattr(agent_module, "_copy_out", failing_gather)
        give = sender._give_staging
        given_after_abort: list[bool] = []

        def recording_give(buf: torch.Tensor) -> None:
            given_after_abort.append(aborted.is_set())
            give(buf)

        monkeypatch.setattr(sender, "_give_staging", recording_give)
        before_a = a.stats()
        thread, outcome = _transfer_in_background(a, blocks)
        assert gathered.wait(DEADLINE_S)  # the first message is on its way
        a.disconnect("b")
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert isinstance(outcome[0], RuntimeError) and "local failure" in str(outcome[0]), outcome  # as it came
        assert given_after_abort == [True, True]  # both staging buffers, given back after the abort
        assert a.stats() == before_a
        a.free(spread)
        a.check_invariants()
