"""The handshake between two agents: protocol, backend and KV layout checks, then mutual proof
of the shared secret (``auth``), then the data link.

::

    client                                              server
    hello {version, name, incarnation, backend,   --->  refuse {code, reason} if version, backend
           layout, nonce_c}                              or layout differ (recorded on the server)
                                                  <---  challenge {name, incarnation, nonce_s,
                                                                   proof_s, conn_id, data address}
    check name and proof_s (else refuse, recorded)
    auth {proof_c, share_c}                       --->  check proof_c (else refuse, recorded)
                                                  <---  welcome {share_s}
    open the data link with conn_id               ===>  the listener matches conn_id

``share`` says where a pool's shareable KV tiers are (``transport/mapped.py``); each side says it
only once the other has proven the secret.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mempool.errors import AuthenticationError, HandshakeError, LayoutMismatchError
from mempool.transport import auth
from mempool.transport.links import DataBackend, Link
from mempool.transport.wire import Channel

__all__ = ["PROTOCOL", "Identity", "PeerInfo", "client_handshake", "serve_handshake"]

PROTOCOL = 2  # 2: a pull offer of consecutive blocks names the first one ("run")
Refusals = Callable[[str, str], None]  # (who, why): how the agent records a refusal


@dataclass(frozen=True)
class Identity:
    """What an agent says (and proves) about itself."""

    name: str
    incarnation: str
    backend: str
    layout: dict[str, object]
    secret: bytes
    share: dict[str, Any] | None = None  # where its shareable KV tiers are (mapped.advertise)


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake established about the other side."""

    name: str
    incarnation: str
    link: Link
    share: Any  # the peer's ``Identity.share``, unchecked (``mapped.open_peer`` checks it)


def _refuse_reason(me: Identity, hello: dict[str, Any]) -> tuple[str, str] | None:
    if hello.get("type") != "hello" or hello.get("version") != PROTOCOL:
        return "protocol", f"unsupported protocol {hello.get('version')!r}"
    if hello.get("backend") != me.backend:
        return "backend", f"backend {hello.get('backend')!r} != {me.backend!r}"
    if hello.get("layout") != me.layout:
        return "layout", f"KV layout {hello.get('layout')} != {me.layout}"
    if not isinstance(hello.get("name"), str) or not isinstance(hello.get("nonce"), str):
        return "protocol", "hello without name or nonce"
    return None


async def serve_handshake(
    channel: Channel,
    me: Identity,
    data_info: dict[str, Any],
    backend: DataBackend,
    timeout: float,
    refused: Refusals,
) -> PeerInfo | None:
    """The accepting side; returns the client, or ``None`` when it was refused."""
    hello = await asyncio.wait_for(channel.recv(), timeout)
    reason = _refuse_reason(me, hello)
    if reason is not None:  # recorded first: once the client hears of it, our record shows it
        refused(channel.peer_address, reason[1])
        await channel.send({"type": "refuse", "code": reason[0], "reason": reason[1]})
        return None
    client, client_nonce = hello["name"], hello["nonce"]
    nonce, conn_id = auth.new_nonce(), secrets.token_hex(16)
    await channel.send(
        {
            "type": "challenge",
            "name": me.name,
            "incarnation": me.incarnation,
            "nonce": nonce,
            "proof": auth.proof(me.secret, "server", client_nonce, nonce, client, me.name),
            "conn_id": conn_id,
            "data": data_info,
        }
    )
    answer = await asyncio.wait_for(channel.recv(), timeout)
    if answer.get("type") != "auth" or not auth.verify(
        me.secret, answer.get("proof"), "client", client_nonce, nonce, client, me.name
    ):
        who = f"{client}@{channel.peer_address}"
        if answer.get("type") == "refuse":  # the client did not accept our proof
            refused(who, str(answer.get("reason", "client refused")))
        else:  # recorded first, as above
            refused(who, "wrong shared secret")
            await channel.send({"type": "refuse", "code": "auth", "reason": "authentication failed"})
        return None
    accepting = asyncio.ensure_future(backend.accept(conn_id, timeout))  # listen before the client dials
    await channel.send({"type": "welcome", "share": me.share})
    return PeerInfo(client, str(hello.get("incarnation")), await accepting, answer.get("share"))


async def client_handshake(
    channel: Channel,
    me: Identity,
    name: str,
    where: str,
    backend: DataBackend,
    timeout: float,
    refused: Refusals,
) -> PeerInfo:
    """The connecting side; returns the server.

    Raises:
        LayoutMismatchError, AuthenticationError, HandshakeError: with the server's reason.
    """
    nonce = auth.new_nonce()
    await channel.send(
        {
            "type": "hello",
            "version": PROTOCOL,
            "name": me.name,
            "incarnation": me.incarnation,
            "backend": me.backend,
            "layout": me.layout,
            "nonce": nonce,
        }
    )
    challenge = await asyncio.wait_for(channel.recv(), timeout)
    if challenge.get("type") == "refuse":
        code, reason = challenge.get("code"), str(challenge.get("reason"))
        error = {"layout": LayoutMismatchError, "auth": AuthenticationError}.get(str(code), HandshakeError)
        raise error(f"{name} at {where} refused: {reason}")
    server = challenge.get("name")
    if challenge.get("type") != "challenge" or server != name:
        raise HandshakeError(f"{where} is {server!r}, not {name!r}")
    server_nonce = str(challenge.get("nonce"))
    if not auth.verify(me.secret, challenge.get("proof"), "server", nonce, server_nonce, me.name, name):
        await channel.send({"type": "refuse", "code": "auth", "reason": "server failed authentication"})
        refused(f"{name}@{where}", "server failed authentication")
        raise AuthenticationError(f"{name} at {where} does not know the shared secret")
    proof = auth.proof(me.secret, "client", nonce, server_nonce, me.name, name)
    await channel.send({"type": "auth", "proof": proof, "share": me.share})
    welcome = await asyncio.wait_for(channel.recv(), timeout)
    if welcome.get("type") != "welcome":
        raise AuthenticationError(f"{name} at {where} refused: {welcome.get('reason')}")
    link = await backend.connect(challenge["data"], str(challenge["conn_id"]), timeout)
    return PeerInfo(name, str(challenge.get("incarnation")), link, welcome.get("share"))
