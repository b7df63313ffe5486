"""Replay multi-turn conversations through an :class:`Engine` and time every turn.

A session's turn k+1 prompt is turn k's prompt + the tokens the engine generated + the next
user message, all as tokens, so a caching engine finds all of turn k in its pool. Sessions run
closed-loop (a turn is sent when the previous one finished), ``concurrency`` at a time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .checks import check_int
from .engine import Engine
from .sampling import SamplingParams
from .sharegpt import Conversation
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class TurnResult:
    session: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    output: tuple[int, ...]
    ttft: float
    latency: float


@dataclass
class _Session:
    index: int
    conv: Conversation
    history: list[int]
    turn: int = 0
    request: str | None = None
    output: list[int] = field(default_factory=list)


def replay_chats(
    engine: Engine,
    tokenizer: Tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_turns: int = 4,
    max_reply_tokens: int = 32,
    max_context: int = 2048,
    concurrency: int = 1,
    progress: str | None = None,
) -> list[TurnResult]:
    """Run every conversation's first ``max_turns`` rounds; returns one result per turn.

    Replies are as long as the dataset's (capped at ``max_reply_tokens``, EOS ignored) so the
    work does not depend on what a random model says. A session ends early when its next prompt
    plus reply would pass ``max_context`` tokens. ``progress`` labels a progress line on stderr.

    Raises:
        ValueError: a count below 1 (``concurrency=0`` would wait for good).
        OutOfBlocksError: no turn can start, the pool's blocks being held elsewhere.
    """
    for name, value in (
        ("max_turns", max_turns),
        ("max_reply_tokens", max_reply_tokens),
        ("max_context", max_context),
        ("concurrency", concurrency),
    ):
        check_int(name, value, 1)
    pending = list(enumerate(conversations))
    active: list[_Session] = []
    results: list[TurnResult] = []
    total = sum(min(len(c.rounds), max_turns) for c in conversations)
    while pending or active:
        while pending and len(active) < concurrency:
            i, conv = pending.pop(0)
            active.append(_Session(i, conv, tokenizer.bos()))
        for s in list(active):
            if s.request is None and not _submit(engine, tokenizer, s, max_turns, max_reply_tokens, max_context):
                active.remove(s)
        outputs = engine.step()
        engine.raise_if_stalled(outputs, [s.request for s in active if s.request is not None])
        for out in outputs:
            s = next(x for x in active if x.request == out.request_id)
            s.output += out.new_token_ids
            if out.finished:
                m = out.metrics
                assert m.ttft is not None and m.finished is not None
                results.append(
                    TurnResult(
                        s.index,
                        s.turn,
                        len(s.history),
                        m.cached_tokens,
                        tuple(s.output),
                        m.ttft,
                        m.finished - m.arrival,
                    )
                )
                s.history += s.output + ([] if out.finish_reason == "stop" else tokenizer.end_of_turn())
                s.turn, s.request, s.output = s.turn + 1, None, []
                if progress:
                    print(f"\r{progress}: {len(results)}/{total} turns", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results


def _submit(engine: Engine, tok: Tokenizer, s: _Session, max_turns: int, max_reply: int, max_context: int) -> bool:
    rounds = s.conv.rounds
    if s.turn >= min(len(rounds), max_turns):
        return False
    user, reply = rounds[s.turn]
    prompt = s.history + tok.message("user", user) + tok.generation_prompt()
    n = max(1, min(max_reply, len(tok.encode(reply))))
    if len(prompt) + n > max_context:
        return False
    s.history = prompt
    s.request = engine.add_request(
        prompt, SamplingParams(max_tokens=n, ignore_eos=True), f"s{s.index}t{s.turn}-{time.perf_counter_ns()}"
    )
    return True
