"""The control channel between two agents: length-prefixed JSON frames over TCP.

::

    frame = u32 big-endian length | UTF-8 JSON object with a "type" field

Control frames are small (handshake, transfer begin / ready / done, heartbeats); KV bytes travel
on the data plane. A frame larger than ``MAX_FRAME`` or not a JSON object closes the channel.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

__all__ = ["MAX_FRAME", "Channel", "ChannelClosed", "pack_bytes", "unpack_bytes"]

MAX_FRAME = 4 << 20
_LEN = struct.Struct(">I")


class ChannelClosed(ConnectionError):
    """The other side closed the channel or sent something that is not a frame."""


def pack_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unpack_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class Channel:
    """One TCP connection carrying frames; ``send`` may be called from many tasks at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._send_lock = asyncio.Lock()
        self.closed = False

    @property
    def peer_address(self) -> str:
        addr = self._writer.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if addr else "?"

    async def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        if len(data) > MAX_FRAME:
            raise ValueError(f"control frame of {len(data)} bytes exceeds {MAX_FRAME}")
        async with self._send_lock:
            if self.closed:
                raise ChannelClosed("channel is closed")
            try:
                self._writer.write(_LEN.pack(len(data)) + data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self.closed = True
                raise ChannelClosed(str(exc)) from exc

    async def recv(self) -> dict[str, Any]:
        try:
            head = await self._reader.readexactly(_LEN.size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.closed = True
            raise ChannelClosed("peer closed the channel") from exc
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME:
            self.closed = True
            raise ChannelClosed(f"frame of {size} bytes exceeds {MAX_FRAME}")
        try:
            body = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.closed = True
            raise ChannelClosed("peer closed the channel") from exc
        try:
            msg = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.closed = True
            raise ChannelClosed("peer sent a malformed frame") from exc
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.closed = True
            raise ChannelClosed("peer sent a frame without a type")
        return msg

    async def close(self) -> None:
        self.closed = True
        try:
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
