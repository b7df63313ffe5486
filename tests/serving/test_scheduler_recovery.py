"""The scheduler's recovery decisions, driven by scripted instances: an instance that dies after
the request's last token, a prefill that dies after its first token, and a request whose every
attempt fails. Each instance is a small aiohttp app in the test's event loop that answers
``/generate`` as its script says, then drops the connection where the script ends early.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from memserve.scheduler import Scheduler, SchedulerError
from memserve.stages import STAGES


@dataclass
class Script:
    """What an instance answers to each ``/generate``, in order: the tokens it streams, then
    ``done`` (its summary) or nothing (the connection drops: the instance died)."""

    calls: list[tuple[list[int], dict[str, Any] | None]]
    bodies: list[dict[str, Any]] = field(default_factory=list)


async def _instance(script: Script) -> tuple[web.AppRunner, str]:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script.bodies.append(body)
        tokens, done = script.calls[len(script.bodies) - 1]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for t in tokens:
            await response.write((json.dumps({"token": t}) + "\n").encode())
        if done is not None:
            await response.write((json.dumps({"done": True, **done}) + "\n").encode())
        await response.write_eof()
        return response

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/connect", ok)
    app.router.add_get("/health", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@asynccontextmanager
async def _deployment(stage: str, **scripts: Script) -> AsyncIterator[Scheduler]:
    """A scheduler for ``stage`` with one scripted instance per ``name=Script`` (role: the name's
    first part)."""
    scheduler = Scheduler(STAGES[stage], attempts=2, stall_timeout_s=5.0)
    runners = []
    try:
        for i, (name, script) in enumerate(scripts.items()):
            runner, url = await _instance(script)
            runners.append(runner)
            role = name.split("_")[0]
            info = {"name": name, "role": role, "url": url, "transport": ["127.0.0.1", 1000 + i], "pid": i + 1}
            await scheduler.register(info)
        yield scheduler
    finally:
        await scheduler.close()
        for runner in runners:
            await runner.cleanup()


async def _run(scheduler: Scheduler, tokens: list[int], max_tokens: int) -> tuple[list[int], dict[str, Any]]:
    out, done = [], {}
    async for event in scheduler.generate(tokens, {"max_tokens": max_tokens, "ignore_eos": True}):
        if "token" in event:
            out.append(event["token"])
        else:
            done = event
    return out, done


SUMMARY = {"finish_reason": "length", "metrics": {}}


def test_an_instance_that_dies_after_the_last_token_ends_the_request_normally() -> None:
    """Every token came, only the summary did not: the answer is complete, nothing runs again."""
    one = Script([([7, 8, 9], None)])
    other = Script([])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=one, colocated_b=other) as s:
            out, done = await _run(s, [1, 2, 3], max_tokens=3)
            assert out == [7, 8, 9] and done["finish_reason"] == "length"
            assert s.counters.retries == s.counters.resumes == 0 and not other.bodies

    asyncio.run(go())


def test_a_prefill_that_dies_after_its_first_token_leaves_decode_to_recompute() -> None:
    """The first token came from prefill, its KV never reached decode: decode gets prompt + that
    token without a KV key and computes the rest; the prefill is not run again."""
    prefill = Script([([7], None)])
    decode = Script([([8, 9], SUMMARY)])

    async def go() -> None:
        async with _deployment("pd-basic", prefill_a=prefill, decode_a=decode) as s:
            out, done = await _run(s, [1, 2, 3], max_tokens=3)
            assert out == [7, 8, 9] and done["finish_reason"] == "length"
            assert len(prefill.bodies) == 1 and s.counters.retries == s.counters.resumes == 0
            (body,) = decode.bodies
            assert body["tokens"] == [1, 2, 3, 7] and "kv_key" not in body and body["prompt_len"] == 3

    asyncio.run(go())


def test_a_request_whose_every_attempt_fails_raises_after_the_last() -> None:
    """No token ever came: each attempt goes to an instance not tried yet, and after the last the
    request fails with the scheduler's error (the API turns it into a 503)."""
    a, b = Script([([], None)]), Script([([], None)])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a, colocated_b=b) as s:
            with pytest.raises(SchedulerError, match="failed"):
                await _run(s, [1, 2, 3], max_tokens=3)
            assert len(a.bodies) == len(b.bodies) == 1 and s.counters.retries == 1

    asyncio.run(go())


def test_a_request_cut_off_mid_answer_resumes_with_what_was_streamed() -> None:
    """Two tokens came before the instance died: the next attempt gets prompt + those tokens and
    streams only the rest."""
    a = Script([([7, 8], None)])
    b = Script([([9], SUMMARY)])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a, colocated_b=b) as s:
            out, done = await _run(s, [1, 2, 3], max_tokens=3)
            assert out == [7, 8, 9] and done["finish_reason"] == "length" and s.counters.resumes == 1
            # ties go to the first registered instance
            assert [x["tokens"] for x in a.bodies + b.bodies] == [[1, 2, 3], [1, 2, 3, 7, 8]]

    asyncio.run(go())
