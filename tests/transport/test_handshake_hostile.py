"""A client that does not play the handshake by the rules: it ignores the server's proof and
answers with a forged one, or speaks another protocol. The server refuses each with a reason,
records the refusal, and never registers the client as a peer.

A pool serves in this process; the client is a bare control channel written by the test.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from mempool import MemPool
from mempool.transport.handshake import PROTOCOL
from mempool.transport.wire import Channel, ChannelClosed

from ..conftest import make_pool
from .inproc import serve, wait_until


def _hello(pool: MemPool, **changes: Any) -> dict[str, Any]:
    """The hello a compatible client sends, with ``changes`` (a ``None`` value drops the field)."""
    agent = pool._agent
    assert agent is not None
    me = agent._identity()
    hello = {
        "type": "hello",
        "version": PROTOCOL,
        "name": "mallory",
        "incarnation": "1",
        "backend": me.backend,
        "layout": me.layout,
        "nonce": secrets.token_hex(16),
    }
    hello.update(changes)
    return {k: v for k, v in hello.items() if v is not None}


def _converse(address: tuple[str, int], frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send each frame and read one answer to it; stop at the first refusal or a closed channel."""

    async def go() -> list[dict[str, Any]]:
        reader, writer = await asyncio.open_connection(*address)
        channel, answers = Channel(reader, writer), []
        try:
            for frame in frames:
                await channel.send(frame)
                try:
                    answer = await asyncio.wait_for(channel.recv(), 10.0)
                except ChannelClosed:
                    break
                answers.append(answer)
                if answer.get("type") == "refuse":
                    break
        finally:
            await channel.close()
        return answers

    return asyncio.run(go())


AUTHS = [
    ("forged proof", {"type": "auth", "proof": "00" * 32}),
    ("no proof", {"type": "auth"}),
    ("proof not text", {"type": "auth", "proof": [1, 2]}),
    ("not an auth", {"type": "welcome"}),
]


@pytest.mark.parametrize(("case", "auth"), AUTHS, ids=[a[0] for a in AUTHS])
def test_a_client_without_the_secret_that_answers_anyway_is_refused(case: str, auth: dict[str, Any]) -> None:
    b = make_pool()
    try:
        address = serve(b, "b", pull=False)
        agent = b._agent
        assert agent is not None
        challenge, refusal = _converse(address, [_hello(b), auth])
        assert challenge["type"] == "challenge" and challenge["name"] == "b"
        assert refusal == {"type": "refuse", "code": "auth", "reason": "authentication failed"}, case
        # recorded just after the refusal is sent
        wait_until(lambda: any("mallory" in r and "wrong shared secret" in r for r in agent.refusals))
        assert not b.peers()
        b.check_invariants()
    finally:
        b.close()


HELLOS = [
    ("another protocol version", {"version": PROTOCOL + 1}, "protocol"),
    ("no version", {"version": None}, "protocol"),
    ("not a hello", {"type": "auth"}, "protocol"),
    ("no nonce", {"nonce": None}, "protocol"),
    ("a name that is not text", {"name": 7}, "protocol"),
    ("another backend", {"backend": "carrier-pigeon"}, "backend"),
    ("another layout", {"layout": {"block_size": 1}}, "layout"),
]


@pytest.mark.parametrize(("case", "changes", "code"), HELLOS, ids=[h[0] for h in HELLOS])
def test_a_hello_the_server_cannot_accept_is_refused_with_its_reason(
    case: str, changes: dict[str, Any], code: str
) -> None:
    b = make_pool()
    try:
        address = serve(b, "b", pull=False)
        agent = b._agent
        assert agent is not None
        (refusal,) = _converse(address, [_hello(b, **changes)])
        assert refusal["type"] == "refuse" and refusal["code"] == code and refusal["reason"], case
        wait_until(lambda: bool(agent.refusals))
        assert not b.peers()
    finally:
        b.close()
