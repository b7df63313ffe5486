"""The OpenAI-compatible HTTP API in front of the :class:`Scheduler` (aiohttp, prometheus_client).

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, or not), with a
prompt given as text or token ids (completions: also a list of up to 32 prompts, whose answers
come prompt by prompt); ``usage`` counts tokens, with ``prompt_tokens_details.cached_tokens``
the prefix served from a cache. ``stop`` strings end an answer (the text stops before the first of
them; a stream holds back text that may be the start of one). Extensions: ``ignore_eos``
(benchmarks), ``stop_token_ids`` (as vLLM's) and, in each choice, ``token_ids`` (the generated ids,
those after a stop string's start included). ``logprobs`` (chat: with ``top_logprobs``) come
from the model's own distribution, before penalties, bias, temperature and top-k/p.
``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` shape the logits a token is picked
from (greedy too). ``n`` answers share the prompt's KV through the cache; ``best_of``
(completions, not streamed) generates that many and returns the ``n`` with the highest mean
log-probability per token. ``echo`` (completions)
puts the prompt before the answer, with its tokens' log-probabilities when ``logprobs`` is set
(a prompt so scored is computed whole, not read from the cache). OpenAI options not implemented
here (``suffix``, tools, ...) are a 400 unless sent at the value that asks for
nothing. A client that closes its connection before its answer is done has its answers stopped
on their instances (a stream at its next write; otherwise within ``DISCONNECT_POLL_S``). Also
``/v1/models``, ``/health``,
``/metrics`` (Prometheus text) and ``/admin/register``, ``/admin/stats``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .auth import token_guard
from .sampling import MAX_LOGPROBS, stop_at, stop_prefix
from .scheduler import InstanceBusy, RequestRefused, Scheduler, SchedulerError
from .tokenizer import Tokenizer

SCHEDULER = web.AppKey("scheduler", Scheduler)
T = TypeVar("T")
_PARAMS: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": None, "ignore_eos": False}
# fields we act on, OpenAI's bookkeeping fields (ignored) and the options of _INERT; anything else is a 400
_COMMON = {
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "ignore_eos",
    "stream",
    "stream_options",
    "user",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop",
    "stop_token_ids",
}
_FIELDS = {
    False: _COMMON | {"prompt", "echo", "suffix", "best_of", "logprobs"},
    True: _COMMON
    | {
        "messages",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "store",
    },
}
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_TOKEN_IDS = 64
MAX_CHOICES = 16  # n: answers to one prompt
MAX_PROMPTS = 32  # prompts in one completions request
MAX_ANSWERS = 64  # answers one request may have generated: prompts x best_of
MAX_LOGIT_BIAS = 300  # token ids one request may bias (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # the completions endpoint's limit (chat's: MAX_LOGPROBS, 20)
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings: OpenAI's count; a bound on each one's length
# OpenAI options this server does not implement: accepted only at a value that asks for nothing
# (what a client library sends by default), refused otherwise, so that no request silently gets
# other output than it asked for (suffix, tools, ...)
_INERT: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class BadRequest(ValueError):
    pass


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


DISCONNECT_POLL_S = 0.5  # how often a request that has sent nothing yet checks that its client is there


async def _while_connected(request: web.Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client closes its connection first, ``work`` is cancelled (ending
    every answer it was waiting for) and :class:`ClientGone` raised. (aiohttp does not cancel a
    handler whose client left; one that writes nothing until the end would run on for nobody.)"""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if request.transport is None or request.transport.is_closing():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Metrics:
    """Prometheus series; instance-side gauges are refreshed from ``/stats`` at every scrape."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("memserve_requests", "finished requests", ["finish_reason"], registry=r)
        self.prompt = Counter("memserve_prompt_tokens", "prompt tokens", registry=r)
        self.cached = Counter("memserve_cached_prompt_tokens", "prompt tokens served from a cache", registry=r)
        self.output = Counter("memserve_output_tokens", "generated tokens", registry=r)
        self.hit_ratio = Gauge("memserve_hit_ratio", "cached / prompt tokens since start", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("memserve_ttft_seconds", "time to first token", buckets=buckets, registry=r)
        self.tpot = Histogram(
            "memserve_tpot_seconds", "time per output token after the first", buckets=buckets, registry=r
        )
        self.blocks = Gauge("memserve_pool_blocks", "pool blocks", ["instance", "tier", "state"], registry=r)
        self.queue = Gauge("memserve_queue_length", "requests per engine queue", ["instance", "queue"], registry=r)
        self.moved = Gauge("memserve_transfer_bytes", "bytes an instance sent to other pools", ["instance"], registry=r)
        self.moved_blocks = Gauge("memserve_transfer_blocks", "blocks an instance sent", ["instance"], registry=r)
        self.rejected = Counter("memserve_rejected", "requests refused with 429 (back-pressure)", registry=r)
        self._totals = [0, 0]  # prompt, cached tokens

    def finished(self, done: dict[str, Any], ttft: float | None, total: float) -> None:
        self.requests.labels(str(done.get("finish_reason"))).inc()
        self.prompt.inc(done["prompt_tokens"])
        self.cached.inc(done["cached_tokens"])
        self.output.inc(done["completion_tokens"])
        self._totals[0] += done["prompt_tokens"]
        self._totals[1] += done["cached_tokens"]
        self.hit_ratio.set(self._totals[1] / self._totals[0] if self._totals[0] else 0.0)
        if ttft is not None:
            self.ttft.observe(ttft)
            if done["completion_tokens"] > 1:
                self.tpot.observe((total - ttft) / (done["completion_tokens"] - 1))

    def refresh(self, stats: dict[str, dict[str, Any]]) -> None:
        for name, s in stats.items():
            for tier, t in s["pool"].items():
                if tier in ("device", "host"):
                    for state in ("used", "free", "cached"):
                        self.blocks.labels(name, tier, state).set(t[state])
            for q in ("waiting", "running", "swapped"):
                self.queue.labels(name, q).set(s[q])
            self.moved.labels(name).set(s["transport_stats"].get("bytes_sent", 0))
            self.moved_blocks.labels(name).set(s["transport_stats"].get("blocks_sent", 0))


def _params(body: dict[str, Any], vocab: int, chat: bool) -> dict[str, Any]:
    out: dict[str, Any] = {k: body.get(k, v) for k, v in _PARAMS.items()}
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]
    if out["seed"] is None:
        del out["seed"]
    if (
        not isinstance(out["max_tokens"], int)
        or isinstance(out["max_tokens"], bool)
        or not 1 <= out["max_tokens"] <= MAX_TOKENS_LIMIT
    ):
        raise BadRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}]")
    if not isinstance(out["ignore_eos"], bool):
        raise BadRequest("ignore_eos must be a boolean")
    if "seed" in out and (not isinstance(out["seed"], int) or isinstance(out["seed"], bool) or out["seed"] < 0):
        raise BadRequest("seed must be a non-negative integer")
    for k in ("temperature", "top_p"):
        if not isinstance(out[k], int | float) or isinstance(out[k], bool):
            raise BadRequest(f"{k} must be a number")
    if not (0.0 <= out["temperature"] <= 2.0) or not (0.0 < out["top_p"] <= 1.0):
        raise BadRequest("temperature must be in [0, 2] and top_p in (0, 1]")
    stops = body.get("stop_token_ids")  # vLLM's extension: token ids that end the answer, as EOS does
    if stops is not None:
        if (
            not isinstance(stops, list)
            or len(stops) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stops)
        ):
            raise BadRequest(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in [0, {vocab})")
        out["stop_token_ids"] = stops
    text_stops = body.get("stop")
    if isinstance(text_stops, str):
        text_stops = [text_stops] if text_stops else []
    if text_stops is not None:
        if (
            not isinstance(text_stops, list)
            or len(text_stops) > MAX_STOPS
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in text_stops)
        ):
            raise BadRequest(
                f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings "
                f"of at most {MAX_STOP_CHARS} characters"
            )
        if text_stops:
            out["stop"] = text_stops
    for k in ("presence_penalty", "frequency_penalty"):
        value = body.get(k)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not -2.0 <= value <= 2.0:
            raise BadRequest(f"{k} must be a number in [-2, 2]")
        if value:
            out[k] = value
    bias = body.get("logit_bias")
    if bias is not None:
        out.update(_logit_bias(bias, vocab))
    logprobs = _logprobs_asked(body, chat)
    if logprobs is not None:
        out["logprobs"] = logprobs
        if body.get("echo"):  # the prompt's tokens come back too, with theirs
            out["prompt_logprobs"] = logprobs
    for field, inert in _INERT.items():
        if field in body and not _is_one_of(body[field], inert):
            shown = " or ".join(json.dumps(v) for v in inert)
            raise BadRequest(f"{field} is not supported by this server: leave it out or send {shown}")
    return out


def _choices_count(body: dict[str, Any]) -> int:
    """``n``: how many answers to give the prompt (``null``: one)."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be an integer in [1, {MAX_CHOICES}]")
    return n


def _best_of(body: dict[str, Any], n: int) -> int:
    """``best_of``: how many answers to generate, of which the ``n`` with the highest mean
    log-probability per token are returned (``null``: ``n``). Such a response cannot be streamed:
    which answers it holds is known only once all have ended."""
    k = body.get("best_of")
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, int) or not n <= k <= MAX_CHOICES:
        raise BadRequest(f"best_of must be an integer in [n, {MAX_CHOICES}] (n is {n})")
    if k > n and body.get("stream"):
        raise BadRequest("best_of cannot be streamed: send stream: false, or best_of equal to n")
    return k


def _logit_bias(bias: Any, vocab: int) -> dict[str, Any]:
    """The ``logit_bias`` parameter of OpenAI's map of token ids (as strings) to biases."""
    bad = BadRequest(
        f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids in [0, {vocab}) to numbers in [-100, 100]"
    )
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < vocab):
            raise bad
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100.0 <= value <= 100.0:
            raise bad
        pairs.append([int(key), value])
    return {"logit_bias": pairs} if pairs else {}


def _logprobs_asked(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request wants log-probabilities of (``None``: no
    log-probabilities): chat's ``logprobs`` (a boolean) and ``top_logprobs``, or the completions
    endpoint's ``logprobs`` (a count)."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if not chat:
        if want is None:
            return None
        if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want <= MAX_COMPLETION_LOGPROBS:
            raise BadRequest(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        return want
    if not isinstance(want, bool | None):
        raise BadRequest("logprobs must be a boolean")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
        raise BadRequest(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]")
    if top and not want:
        raise BadRequest("top_logprobs needs logprobs: true")
    return (top or 0) if want else None


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` equals one of ``allowed`` as JSON does (``true`` is not ``1``, ``0.0`` is ``0``)."""
    return any((type(value) is bool) == (type(a) is bool) and value == a for a in allowed)


def _check_options(body: dict[str, Any]) -> None:
    """The request's delivery options are of OpenAI's types (``null`` where the field is optional)."""
    for flag in ("stream", "echo"):
        if not isinstance(body.get(flag, False), bool | None):
            raise BadRequest(f"{flag} must be a boolean")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"}:
            raise BadRequest("stream_options must be an object with the fields include_usage, include_obfuscation")
        for k, v in options.items():
            if not isinstance(v, bool):
                raise BadRequest(f"stream_options.{k} must be a boolean")
    if not isinstance(body.get("user"), str | None):
        raise BadRequest("user must be a string")


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status)


def _unavailable(exc: SchedulerError) -> web.Response:
    """503 for a failed request; when every instance was busy, with ``Retry-After`` (back-pressure)."""
    response = _error(503, str(exc), "overloaded" if isinstance(exc, InstanceBusy) else None)
    if isinstance(exc, InstanceBusy):
        response.headers["Retry-After"] = "1"
    return response


def make_app(
    scheduler: Scheduler,
    tokenizer: Tokenizer,
    model_name: str = "memserve-default",
    api_key: str | None = None,
    max_inflight: int = 256,
    control_token: str | None = None,
) -> web.Application:
    """The API application; with ``api_key``, every ``/v1`` call needs ``Authorization: Bearer <key>``;
    with ``control_token``, ``/admin/register`` needs that token (instances derive it from the secret).

    At most ``max_inflight`` completions run at once; more get a 429 with ``Retry-After`` (back-pressure
    instead of an unbounded queue)."""
    inflight = [0]

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "a valid API key is required", "invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # 404 / 405 from routing: OpenAI-shaped too
            return _error(exc.status, exc.reason or "error")
        except Exception:  # a bug of ours: logged, and still an OpenAI-shaped answer
            logging.getLogger(__name__).exception("%s %s failed", request.method, request.path)
            return _error(500, "internal error (logged by the server)")

    app = web.Application(middlewares=[guard, token_guard(control_token)], client_max_size=8 << 20)
    app[SCHEDULER] = scheduler
    metrics = Metrics()

    def vocab() -> int:
        return min(tokenizer.vocab_size, scheduler.vocab_size or tokenizer.vocab_size)

    def prompts_of(body: dict[str, Any], chat: bool) -> list[list[int]]:
        """The request's prompts as token ids: a chat's one, or the completions endpoint's
        ``prompt``, which is a text, a list of token ids, or a list of up to ``MAX_PROMPTS`` of either."""
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("messages must be a non-empty list")
            try:
                return [tokenizer.chat([{"role": m["role"], "content": _content(m)} for m in msgs])]
            except (KeyError, TypeError, ValueError) as exc:
                raise BadRequest(f"bad message: {exc}") from exc
        p = body.get("prompt")
        if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p):
            if len(p) > MAX_PROMPTS:
                raise BadRequest(f"prompt may hold at most {MAX_PROMPTS} prompts")
            return [one_prompt(x) for x in p]
        return [one_prompt(p)]

    def one_prompt(p: Any) -> list[int]:
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise BadRequest(
                "prompt must be a string, a non-empty list of token ids, or a list of either (one prompt each)"
            )
        if not ids:
            raise BadRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab():
            raise BadRequest(f"token ids must be in [0, {vocab()})")
        return ids

    async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            unknown = sorted(set(body) - _FIELDS[chat])
            if unknown:
                raise BadRequest(f"unknown fields: {unknown}")
            if body.get("model", model_name) != model_name:
                return _error(
                    404,
                    f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
                    "model_not_found",
                )
            prompts = prompts_of(body, chat)
            params = _params(body, vocab(), chat)
            n = _choices_count(body)
            _check_options(body)
            k = _best_of(body, n)
            if len(prompts) * k > MAX_ANSWERS:
                raise BadRequest(f"{len(prompts)} prompts x {k} answers each is over this server's {MAX_ANSWERS}")
            limit = scheduler.max_context
            longest = max(len(p) for p in prompts)
            if limit and longest + params["max_tokens"] > limit:
                raise BadRequest(
                    f"the prompt ({longest} tokens) plus max_tokens ({params['max_tokens']}) exceeds "
                    f"the context window of {limit} tokens"
                )
        except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, str(exc))
        session = body.get("user") or request.headers.get("x-session-id")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        start = time.perf_counter()
        shown_logprobs = params.get("logprobs") is not None
        if k > n and not shown_logprobs:  # best_of ranks the answers by their tokens' log-probabilities
            params["logprobs"] = 0
        # a prompt's later answers start once its first one's prompt is in: they take its KV from the cache
        events = _fan_in(scheduler, prompts, params, session, k, stagger=scheduler.stage.prefill_caching)
        stops: list[str] = params.get("stop", [])
        echo = body.get("echo")
        choices = [
            _Choice(i * k + j, tokenizer, stops, chat, shown_logprobs, p if echo else None)
            for i, p in enumerate(prompts)
            for j in range(k)
        ]

        def finished(c: _Choice, done: dict[str, Any]) -> None:
            c.done = done
            metrics.finished(done, c.first, time.perf_counter() - start)

        if not body.get("stream"):

            async def collect() -> None:
                async for i, e in events:
                    if "token" in e:
                        choices[i].add(e, time.perf_counter() - start)
                    else:
                        finished(choices[i], e)

            try:
                await _while_connected(request, collect())
            except ClientGone:  # its answers were stopped on their instances; nobody reads this
                return _error(499, "the client closed the connection")
            except RequestRefused as exc:
                return _error(400, str(exc))
            except SchedulerError as exc:
                return _unavailable(exc)
            best = choices
            if k > n:  # each prompt's n best of its k answers (sorted is stable: ties by index), prompt by prompt
                best = [
                    c for i in range(0, len(choices), k) for c in sorted(choices[i : i + k], key=_by_mean_logprob)[:n]
                ]
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [c.whole(i) for i, c in enumerate(best)],
                    "usage": _usage([c.done for c in choices], k),  # every answer generated counts
                }
            )
        try:  # the first event before the headers: a refused or failed request still gets a status
            head = await _while_connected(request, events.__anext__())
        except ClientGone:
            return _error(499, "the client closed the connection")
        except RequestRefused as exc:
            return _error(400, str(exc))
        except SchedulerError as exc:
            return _unavailable(exc)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> None:
            payload: dict[str, Any] = {
                "id": rid,
                "object": chunk_kind,
                "created": created,
                "model": model_name,
                "choices": [choice] if choice else [],
            }
            if usage is not None:
                payload["usage"] = usage
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        try:  # (finally: a failed or cut-off stream ends every choice still running, now)
            if chat:
                for c in choices:
                    await send({"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for i, e in _chain(head, events):
                c = choices[i]
                if "token" in e:
                    delta = c.add(e, time.perf_counter() - start)
                    if delta:
                        await send(c.chunk(delta))
                else:
                    finished(c, e)
                    await send(c.chunk(c.answer.finish(), e["finish_reason"]))
        except SchedulerError as exc:
            await response.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
            return response
        except ConnectionResetError:  # the client left: stop the requests on their instances now, not at GC
            return response
        finally:
            await events.aclose()
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(None, _usage([c.done for c in choices], k))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def admitted(request: web.Request, chat: bool) -> web.StreamResponse:
        if inflight[0] >= max_inflight:
            metrics.rejected.inc()
            response = _error(
                429, f"the server is at its limit of {max_inflight} requests; retry shortly", "rate_limit_exceeded"
            )
            response.headers["Retry-After"] = "1"
            return response
        inflight[0] += 1
        try:
            return await complete(request, chat)
        finally:
            inflight[0] -= 1

    async def completions(request: web.Request) -> web.StreamResponse:
        return await admitted(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await admitted(request, chat=True)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "memserve"}]}
        )

    async def health(_: web.Request) -> web.Response:
        live = sum(i.alive for i in scheduler.instances.values())
        down = sorted(i.name for i in scheduler.instances.values() if not i.alive)
        return web.json_response(
            {"ok": live > 0, "stage": scheduler.stage.name, "instances": live, "down": down},
            status=200 if live else 503,
        )

    async def prometheus(_: web.Request) -> web.Response:
        metrics.refresh(await scheduler.instance_stats())
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def register(request: web.Request) -> web.Response:
        try:
            info = await request.json()
        except ValueError as exc:
            return _error(400, f"malformed registration: not JSON: {exc}")
        try:
            handle = await scheduler.register(info)
        except ValueError as exc:  # not a registration: nothing changed
            return _error(400, str(exc))
        except SchedulerError as exc:
            return _error(409, str(exc))
        return web.json_response({"ok": True, "name": handle.name})

    async def admin_stats(request: web.Request) -> web.Response:
        c = scheduler.counters
        return web.json_response(
            {
                "stage": scheduler.stage.name,
                "policy": scheduler.policy,
                # completions under way: between a prefill's handoff and its decode's start no
                # instance holds the request, but it is still counted here
                "inflight": inflight[0],
                "counters": c.__dict__,
                "members": {
                    i.name: {"role": i.role, "url": i.url, "alive": i.alive, "incarnation": i.incarnation}
                    for i in scheduler.instances.values()
                },
                "links": {
                    f"{a} -> {b}": {"bandwidth": round(e.bandwidth), "latency": e.latency}
                    for (a, b), e in scheduler.links.items()
                },
                "decisions": list(scheduler.decisions),
                "instances": await scheduler.instance_stats(request.query.get("check") == "1"),
            }
        )

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/admin/register", register)
    app.router.add_get("/admin/stats", admin_stats)
    return app


async def _fan_in(
    scheduler: Scheduler,
    prompts: list[list[int]],
    params: dict[str, Any],
    session: str | None,
    n: int,
    *,
    stagger: bool,
) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
    """The events of ``n`` answers to each prompt as ``(choice, event)``, in the order they come;
    answer ``j`` of prompt ``i`` is choice ``i * n + j`` and samples with ``seed + j`` (where a
    seed is given), as answer ``j`` of that prompt alone would. With ``stagger``, a prompt's answers
    after its first start once the first has its first event (the prompt is then cached). The
    first failure of any choice is raised; closing this ends every choice still running."""
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None, Exception | None]] = asyncio.Queue()
    first_in = [asyncio.Event() for _ in prompts]

    async def pump(c: int) -> None:
        i, j = divmod(c, n)
        if j and stagger:
            await first_in[i].wait()
        mine = {**params, "seed": params["seed"] + j} if j and "seed" in params else params
        events = scheduler.generate(prompts[i], mine, session)
        try:
            async for e in events:
                first_in[i].set()
                await queue.put((c, e, None))
        except Exception as exc:  # (a SchedulerError, or a bug of ours: raised where it is read)
            await queue.put((c, None, exc))
        finally:
            first_in[i].set()
            await events.aclose()

    tasks = [asyncio.ensure_future(pump(c)) for c in range(len(prompts) * n)]
    try:
        running = len(tasks)
        while running:
            i, event, exc = await queue.get()
            if exc is not None:
                raise exc
            assert event is not None
            running -= bool(event.get("done"))
            yield i, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Choice:
    """One answer as its events arrive: ids, text (cut at stop strings), log-probabilities."""

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        stops: list[str],
        chat: bool,
        logprobs: bool,
        echo: list[int] | None = None,
    ) -> None:
        self.index, self.chat = index, chat
        self.echo = echo  # the prompt, to come back before the answer (completions' ``echo``)
        self.echo_text = "" if echo is None else tokenizer.decode(echo)
        self.ids: list[int] = []
        self.pending: list[int] = []  # ids whose text is not out yet (an incomplete character, a stop's start)
        self.answer = AnswerText(tokenizer.decode_bytes, stops)
        self.track = Logprobs(tokenizer, chat) if logprobs else None
        self.first: float | None = None  # time to its first token
        self.done: dict[str, Any] = {}
        self.logprob_sum = 0.0  # of its tokens (where the request asked the engine for log-probabilities)

    def add(self, event: dict[str, Any], elapsed: float) -> str:
        """Take a token event; the text it lets out (the first, the echoed prompt before it)."""
        echoed = ""
        if self.first is None:
            self.first = elapsed
            if self.echo is not None:
                echoed = self.echo_text
                if self.track is not None:
                    self.track.add_prompt(self.echo, event.get("prompt"))
        self.ids.append(event["token"])
        self.pending.append(event["token"])
        self.logprob_sum += event.get("logprob") or 0.0
        if self.track is not None:
            self.track.add(event)
        return echoed + self.answer.add(event["token"])

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        """A streamed choice carrying ``text`` and the ids and log-probabilities not sent yet."""
        ids, self.pending = self.pending, []
        body = {"delta": {"content": text}} if self.chat else {"text": text}
        logprobs = None if self.track is None else self.track.take()
        return {"index": self.index, **body, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish_reason}

    def mean_logprob(self) -> float:
        """Its tokens' mean log-probability (what ``best_of`` ranks answers by)."""
        return self.logprob_sum / max(1, len(self.ids))

    def whole(self, index: int | None = None) -> dict[str, Any]:
        """The finished choice of a response that is not streamed, at ``index`` (default: its own)."""
        text = self.echo_text + self.answer.sent + self.answer.finish()
        out: dict[str, Any] = {
            "index": self.index if index is None else index,
            "finish_reason": self.done["finish_reason"],
            "token_ids": self.ids,
            "logprobs": None if self.track is None else self.track.take(),
        }
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out


class Logprobs:
    """The ``logprobs`` object of a choice, in OpenAI's chat or completions shape, from the token
    events of an answer (``{"token", "logprob", "top": [[id, logprob], ...]}``)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool) -> None:
        self._tokenizer, self._chat = tokenizer, chat
        self._events: list[dict[str, Any]] = []
        self._chars = 0  # characters of the answer so far: the next token's text_offset

    def add(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def add_prompt(self, tokens: list[int], scored: list[Any] | None) -> None:
        """The echoed prompt's tokens: the first has no log-probability; the rest take
        ``scored`` (``[logprob, top]`` each, from the engine), or none where it is missing."""
        rest = scored if scored is not None and len(scored) == len(tokens) - 1 else [[None, None]] * (len(tokens) - 1)
        self._events.append({"token": tokens[0], "logprob": None, "top": None})
        self._events += [{"token": t, "logprob": lp, "top": top} for t, (lp, top) in zip(tokens[1:], rest)]

    def take(self) -> dict[str, Any]:
        """The object for the tokens added since the last call."""
        events, self._events = self._events, []

        def entry(token: int, logprob: float) -> dict[str, Any]:
            b = self._tokenizer.decode_bytes([token])
            return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}

        if self._chat:
            content = [
                {**entry(e["token"], e["logprob"]), "top_logprobs": [entry(int(t), v) for t, v in e["top"]]}
                for e in events
            ]
            return {"content": content, "refusal": None}
        chosen, offsets = [entry(e["token"], e["logprob"]) for e in events], []
        for c in chosen:
            offsets.append(self._chars)
            # characters = bytes that do not continue a UTF-8 sequence (exact for valid UTF-8)
            self._chars += sum(1 for x in c["bytes"] if not 0x80 <= x < 0xC0)
        return {
            "tokens": [c["token"] for c in chosen],
            "token_logprobs": [c["logprob"] for c in chosen],
            "top_logprobs": [
                None if e["top"] is None else {self._tokenizer.decode([int(t)]): v for t, v in e["top"]} for e in events
            ],
            "text_offset": offsets,
        }


class AnswerText:
    """The text of an answer as its tokens arrive, cut before the first of ``stops`` found in it;
    until :meth:`finish`, without an incomplete character or bytes that may begin a stop string.
    What it lets out is never taken back: the pieces join into the final text."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes], stops: list[str]) -> None:
        self._decode, self._stops = decode_bytes, stops
        self._data = bytearray()
        self.sent = ""  # the text let out so far

    def add(self, token: int) -> str:
        """The text that ``token`` lets out (``""`` while held back)."""
        self._data += self._decode([token])
        text = _shown(self._data, self._stops, final=False)
        if text.endswith("\ufffd") or len(text) <= len(self.sent):
            return ""  # wait for the character to complete, or for more to show
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self) -> str:
        """The rest of the text, once the answer has ended."""
        text = _shown(self._data, self._stops, final=True)
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _shown(data: bytes | bytearray, stops: list[str], *, final: bool) -> str:
    """The text of an answer's bytes ``data`` that may be shown: cut before the first of ``stops``
    found in it; until the answer is ``final``, also without the bytes that may begin one."""
    cut = stop_at(data, stops) if stops else None
    if cut is not None:
        data = data[:cut]
    elif stops and not final:
        data = data[: len(data) - stop_prefix(data, stops)]
    return data.decode("utf-8", errors="replace")


async def _chain(head: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield head
    async for e in rest:
        yield e


def _content(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise TypeError("content parts must be {'type': 'text', 'text': str} objects")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise TypeError("content must be a string or a list of text parts")
    return content


def _usage(dones: list[dict[str, Any]], per_prompt: int) -> dict[str, Any]:
    """The usage of a response whose answers come ``per_prompt`` to a prompt: each prompt counted
    once (as its first answer saw the cache), the tokens of every answer."""
    firsts = dones[::per_prompt]
    prompt, completion = sum(d["prompt_tokens"] for d in firsts), sum(d["completion_tokens"] for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(d["cached_tokens"] for d in firsts)},
    }


def _by_mean_logprob(choice: _Choice) -> float:
    """The sort key that puts the answer most likely per token first (``best_of``)."""
    return -choice.mean_logprob()
