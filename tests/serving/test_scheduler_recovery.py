"""The scheduler against instances that misbehave in ways a test can script: one that dies after
the request's last token, a prefill that dies after its first token, attempts that all fail, a
garbled stream line, a malformed registration; and what the OpenAI API makes of a failure after
its stream began, or of an instance refusing the request.

Each instance is a small aiohttp app in the test's event loop that answers ``/generate`` as its
script says, then drops the connection where the script ends early.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from memserve.api import make_app
from memserve.scheduler import RequestRefused, Scheduler, SchedulerError
from memserve.stages import STAGES
from memserve.tokenizer import Tokenizer


@dataclass
class Script:
    """What an instance answers to each ``/generate``, in order: the tokens it streams, then
    ``done`` (its summary) or nothing (the connection drops: the instance died)."""

    # an int: answer with that HTTP status; a str: stream the tokens, then that raw line
    calls: list[tuple[list[int], dict[str, Any] | int | str | None]]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    connects: list[dict[str, Any]] = field(default_factory=list)  # the /connect calls it got
    pushes: list[dict[str, Any]] = field(default_factory=list)  # the /push calls it got
    # set: the instance has stopped (SIGSTOP, a hung host): /connect, /push and /health never answer
    stalled: asyncio.Event = field(default_factory=asyncio.Event)


async def _instance(script: Script) -> tuple[web.AppRunner, str]:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script.bodies.append(body)
        tokens, done = script.calls[len(script.bodies) - 1]
        if isinstance(done, int):
            return web.json_response({"error": "scripted"}, status=done)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for t in tokens:
            await response.write((json.dumps({"token": t}) + "\n").encode())
        if isinstance(done, str):
            await response.write((done + "\n").encode())
        elif done is not None:
            await response.write((json.dumps({"done": True, **done}) + "\n").encode())
        await response.write_eof()
        return response

    async def answer(calls: list[dict[str, Any]] | None, request: web.Request) -> web.Response:
        if calls is not None:
            calls.append(await request.json())
        while script.stalled.is_set():  # no answer until the test ends (the caller's bound ends the call)
            await asyncio.sleep(0.05)
        return web.json_response({"ok": True})

    async def connect(request: web.Request) -> web.Response:
        return await answer(script.connects, request)

    async def push(request: web.Request) -> web.Response:
        return await answer(script.pushes, request)

    async def health(request: web.Request) -> web.Response:
        return await answer(None, request)

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/connect", connect)
    app.router.add_post("/push", push)
    app.router.add_get("/health", health)
    return await _start(app)


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free port of 127.0.0.1; its runner (to clean up) and base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def _deployment(stage: str, detokenize: Any = None, **scripts: Script) -> AsyncIterator[Scheduler]:
    """A scheduler for ``stage`` with one scripted instance per ``name=Script`` (role: the name's
    first part)."""
    scheduler = Scheduler(STAGES[stage], attempts=2, stall_timeout_s=5.0, control_timeout_s=1.0, detokenize=detokenize)
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
        for script in scripts.values():
            script.stalled.clear()  # (a runner's cleanup waits for the calls it is still answering)
        for runner in runners:
            await runner.cleanup()


async def _run(
    scheduler: Scheduler, tokens: list[int], max_tokens: int, **params: Any
) -> tuple[list[int], dict[str, Any]]:
    out, done = [], {}
    async for event in scheduler.generate(tokens, {"max_tokens": max_tokens, "ignore_eos": True, **params}):
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


def test_an_instance_that_dies_after_completing_a_stop_string_ends_the_request_there() -> None:
    """The tokens that came spell a stop string (across two of them): the answer is complete, as
    the instance's engine would have said, and nothing runs again. A scheduler that cannot read
    tokens as text refuses stop strings instead of running past them."""
    one, other = Script([([7, 8], None)]), Script([])

    def text(ids: list[int]) -> bytes:
        return b"".join(b"<%d>" % t for t in ids)

    async def go() -> None:
        async with _deployment("colocated", text, colocated_a=one, colocated_b=other) as s:
            out, done = await _run(s, [1, 2, 3], max_tokens=5, stop=["7><8"])
            assert out == [7, 8] and done["finish_reason"] == "stop"
            assert s.counters.retries == s.counters.resumes == 0 and not other.bodies
        blind = Script([])
        async with _deployment("colocated", colocated_a=blind) as s:
            with pytest.raises(RequestRefused, match="stop strings"):
                await _run(s, [1, 2, 3], max_tokens=5, stop=["x"])
            assert not blind.bodies

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


def test_a_malformed_eviction_report_is_skipped_not_a_failed_request() -> None:
    """Keys of an instance's eviction report that are not hex text are skipped, in an answer's
    summary as in a health probe: the valid ones still trim the prompt tree, the answer stands and
    the heartbeat goes on."""
    import time

    from memserve.prompt_tree import chain_keys

    earlier = list(range(100, 164))  # an earlier prompt of 4 blocks of 16, cached there
    gone = chain_keys(earlier, 16)[2].hex()  # the instance evicted its third block
    one = Script([([7], {**SUMMARY, "removed": ["zz", 5, None, gone]})])

    async def go() -> None:
        async with _deployment("colocated-caching", colocated_a=one) as s:
            s.trees["colocated"].insert("colocated_a", earlier, time.monotonic())
            out, done = await _run(s, [1, 2, 3], max_tokens=1)
            assert out == [7] and done["finish_reason"] == "length" and s.counters.retries == 0
            assert s.trees["colocated"].match(earlier, time.monotonic()) == {"colocated_a": 32}
            assert s.counters.removals == 1
            s._apply_removed(s.instances["colocated_a"], "not a list")  # (a health answer's field)
            assert s.counters.removals == 1

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


async def _api(scheduler: Scheduler, path: str, body: dict[str, Any]) -> tuple[int, str]:
    """POST ``body`` to the OpenAI API over ``scheduler``; the status and the raw answer."""
    runner, base = await _start(make_app(scheduler, Tokenizer("llama3")))
    try:
        async with aiohttp.ClientSession() as http, http.post(base + path, json=body) as r:
            return r.status, await r.text()
    finally:
        await runner.cleanup()


def test_a_stream_whose_attempts_run_out_ends_with_an_error_event() -> None:
    """The headers and a token went out before the failure: the client gets an error event in the
    stream, and no end marker, so it cannot take the answer for a whole one."""
    a, b = Script([([7], None)]), Script([([], None)])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a, colocated_b=b) as s:
            body = {"prompt": [1, 2, 3], "max_tokens": 3, "stream": True, "ignore_eos": True}
            status, text = await _api(s, "/v1/completions", body)
            assert status == 200
            events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
            assert events[-1]["error"]["message"] and "[DONE]" not in text
            assert [t for e in events[:-1] for c in e["choices"] for t in c.get("token_ids", [])] == [7]

    asyncio.run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_an_instance_refuses_is_a_400_not_a_retry(stream: bool) -> None:
    """An instance answering 400 (the request itself is bad) ends it at once with a 400."""
    a, b = Script([([], 400)]), Script([])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a, colocated_b=b) as s:
            body = {"prompt": [1, 2, 3], "max_tokens": 3, "stream": stream}
            status, text = await _api(s, "/v1/completions", body)
            assert status == 400 and "refused" in json.loads(text)["error"]["message"]
            assert len(a.bodies) == 1 and not b.bodies

    asyncio.run(go())


def test_a_malformed_registration_changes_nothing_even_from_a_reachable_instance() -> None:
    """A registration is read whole before anything happens: one whose capacity does not parse
    links no one (it used to be linked both ways and listed, then refused) and lists nothing."""
    a, newcomer = Script([]), Script([])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a) as s:
            runner, url = await _instance(newcomer)
            try:
                info = {"name": "colocated_b", "role": "colocated", "url": url, "transport": ["127.0.0.1", 1500]}
                with pytest.raises(ValueError, match="malformed registration"):
                    await s.register({**info, "capacity_tokens": "lots"})
                with pytest.raises(ValueError, match="role"):
                    await s.register({**info, "role": "boss"})
                assert list(s.instances) == ["colocated_a"] and not a.connects and not newcomer.connects
                await s.register(info)  # the same instance, well-formed: linked both ways
                assert list(s.instances) == ["colocated_a", "colocated_b"]
                assert [c["name"] for c in newcomer.connects] == ["colocated_a"]
                assert [c["name"] for c in a.connects] == ["colocated_b"]
            finally:
                await runner.cleanup()

    asyncio.run(go())


def test_an_instance_of_another_model_is_refused_and_changes_nothing() -> None:
    """Instances share K/V (handoffs, transfers): one whose model fingerprint differs from the live
    instances' is refused before it is linked to anyone (before 2026-11-24 it joined, and a decode
    instance of another model would have continued a prefill's K/V of the first one)."""
    a, newcomer = Script([]), Script([])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a) as s:
            s.instances["colocated_a"].model = "f" * 32
            runner, url = await _instance(newcomer)
            try:
                info = {"name": "colocated_b", "role": "colocated", "url": url, "transport": ["127.0.0.1", 1500]}
                for model in ("e" * 32, ""):
                    with pytest.raises(SchedulerError, match="another model"):
                        await s.register({**info, "model": model})
                with pytest.raises(ValueError, match="malformed registration"):
                    await s.register({**info, "model": 7})
                assert list(s.instances) == ["colocated_a"] and not a.connects and not newcomer.connects
                await s.register({**info, "model": "f" * 32})  # the same model: linked both ways
                assert list(s.instances) == ["colocated_a", "colocated_b"] and a.connects and newcomer.connects
            finally:
                await runner.cleanup()

    asyncio.run(go())


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"token": "seven"}', '{"token": 7.5}'])
def test_an_instance_that_sends_a_garbled_line_is_a_failed_attempt(line: str) -> None:
    """A line that is not an event (a bug, a proxy in the way) fails that attempt like a lost
    connection: the request resumes elsewhere with what was streamed, and nothing of the line
    reaches the client."""
    a = Script([([7], line)])
    b = Script([([8, 9], SUMMARY)])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a, colocated_b=b) as s:
            out, done = await _run(s, [1, 2, 3], max_tokens=3)
            assert out == [7, 8, 9] and done["finish_reason"] == "length" and s.counters.resumes == 1
            assert b.bodies[0]["tokens"] == [1, 2, 3, 7]

    asyncio.run(go())


def test_an_instance_that_stops_answering_does_not_block_the_next_registration() -> None:
    """A newcomer is linked with every live instance one at a time (under a lock); one that has
    stopped answering (its /connect and /health hang) is marked down after the control call's
    bound, and the newcomer joins. Unbounded, the registration, and every one after it, waited
    for good."""
    a, newcomer = Script([]), Script([])

    async def go() -> None:
        async with _deployment("colocated", colocated_a=a) as s:
            runner, url = await _instance(newcomer)
            try:
                a.stalled.set()
                info = {"name": "colocated_b", "role": "colocated", "url": url, "transport": ["127.0.0.1", 1500]}
                await asyncio.wait_for(s.register(info), 30)  # the bound: 1 s, the health probe 2 s
                assert list(s.instances) == ["colocated_a", "colocated_b"]
                assert not s.instances["colocated_a"].alive and s.instances["colocated_b"].alive
                assert [c["name"] for c in newcomer.connects] == ["colocated_a"]
                assert [c["name"] for c in a.connects] == ["colocated_b"]  # it got the call, never answered
            finally:
                await runner.cleanup()

    asyncio.run(go())


def test_a_push_from_a_holder_that_stops_answering_falls_back_to_recompute() -> None:
    """The prompt tree says ``a`` holds the prompt but ``a`` is busy, so ``b`` runs it and ``a`` is
    asked to push its prefix to ``b`` first. ``a`` has stopped answering: after the control call's
    bound, ``b`` computes the prompt itself (no push counted, ``b``'s cache not believed)."""
    a, b = Script([]), Script([([5, 6], {**SUMMARY, "metrics": {"cached_tokens": 0}})])
    prompt = list(range(1, 129))

    async def go() -> None:
        async with _deployment("colocated-caching", colocated_a=a, colocated_b=b) as s:
            s.trees["colocated"].insert("colocated_a", prompt, time.monotonic())
            s.instances["colocated_a"].queued_seconds = 1e6  # busy: b is picked
            a.stalled.set()
            out, done = await asyncio.wait_for(_run(s, prompt, max_tokens=2), 30)
            assert out == [5, 6] and done["instance"] == "colocated_b"
            assert [p["peer"] for p in a.pushes] == ["colocated_b"]  # it was asked, and never answered
            assert s.counters.pushes == 0 and b.bodies[0]["tokens"] == prompt
            assert s.decisions[-1]["kind"] == "push" and s.decisions[-1]["transfer"]

    asyncio.run(go())
