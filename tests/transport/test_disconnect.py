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

import pytest
import torch

from mempool import MemPool
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
        outcome: list[BaseException | object] = []

        def send() -> None:
            try:
                outcome.append(a.transfer("b", blocks, key="mid"))
            except BaseException as exc:  # the test inspects it
                outcome.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
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


def test_a_receiver_closed_while_it_cleans_up_a_transfer_still_frees_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent's close cancels every task, also one already giving back what a failed transfer
    took: that give-back must still run to its end (it stopped half-way, leaking the blocks)."""
    with connected(pull=False, chunk_bytes=512) as (a, b):  # a message per block (512 bytes here)
        blocks = a.alloc(4)
        assert blocks is not None
        fill_random(a, blocks, seed=6)
        before_b = b.stats()
        receiver = b._agent
        sender = a._agent
        assert receiver is not None and sender is not None
        sender.segment_delay_s = 2.0  # b waits 2 s for each next block: time to leave mid-way
        cleaning = threading.Event()
        settle = agent_module._settle

        async def slow_settle(tasks: list[asyncio.Task[None]]) -> None:
            if tasks and asyncio.get_running_loop() is receiver._loop:  # b's give-back, nothing else
                cleaning.set()
                await asyncio.sleep(1.0)  # b closes meanwhile
            await settle(tasks)

        monkeypatch.setattr(agent_module, "_settle", slow_settle)
        outcome: list[BaseException | object] = []

        def send() -> None:
            try:
                outcome.append(a.transfer("b", blocks, key="mid"))
            except BaseException as exc:  # the test inspects it
                outcome.append(exc)

        thread = threading.Thread(target=send)
        thread.start()
        wait_until(lambda: b.stats() != before_b, DEADLINE_S)  # b has allocated for it: data is flowing
        a.disconnect("b")
        assert cleaning.wait(DEADLINE_S)
        b.close()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert isinstance(outcome[0], TransferError), outcome
        assert b.stats()["device"] == before_b["device"]  # the transfer's blocks are free again
        b.check_invariants()
        a.free(blocks)
        a.check_invariants()
