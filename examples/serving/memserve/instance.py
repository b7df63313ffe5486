"""An instance process: one model, one engine, one MemPool, and a control API for the scheduler.

Roles: ``colocated`` (prefill + decode), ``prefill`` (computes a prompt, then sends its KV to a
decode instance), ``decode`` (continues requests whose KV arrived from a prefill instance). KV
moves between instances only through MemPool ``transfer`` / ``transfer_with_insert``.

Control API (aiohttp; JSON in, JSON or newline-delimited JSON out):

    GET  /health, /info, /stats (``?check=1``: run the pool's ``check_invariants()`` too); to a
         caller with the control token (the scheduler), /health and /stats also carry "removed":
         the prompt-tree keys of the prefixes the pool stopped caching since they were last
         reported (each key once, to whichever call comes first)
    POST /connect   {"name", "host", "port"}          open a transfer link to a peer instance
    POST /generate  {"id", "tokens", "prompt_len"?, "params", "handoff"?, "kv_key"?, "send_back"?}
                    -> NDJSON: {"token": t} per token ({"token", "logprob", "top": [[id, logprob]]}
                       when params ask for logprobs; the first also "prompt": [[logprob, top], ...]
                       for prompt tokens 1.. when they ask for prompt_logprobs), then
                       {"done": true, "finish_reason", "metrics", "removed",
                       "transfer"?: {...}}; a blank line every ``KEEPALIVE_S`` while nothing else
                       is due (so that the scheduler tells a slow request from a stalled instance);
                       503 ``{"error", "busy": true}`` when ``max_waiting`` requests wait already
    POST /push      {"peer", "tokens"}                 send this pool's cached prefix of tokens to a peer
    POST /shutdown

Every POST needs ``Authorization: Bearer <control_token(secret)>``: only holders of the deployment's
secret (the scheduler, the launcher) drive an instance; a wrong or missing token gets a 401.

``handoff`` ``{"peer", "mode": "transfer" | "insert"}``: after the first token, send the prompt's KV
to ``peer`` (``transfer`` under the request id, partial last block included; or
``transfer_with_insert``, which sends only the whole blocks the peer does not cache, and the
partly filled last one, which the peer keeps as a tail).
``kv_key``: claim KV a prefill instance transferred under that key and continue from it.
``send_back`` ``{"peer"}``: when finished, ``transfer_with_insert`` the prompt + output KV to ``peer``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from aiohttp import web

from mempool import Blocks, TransferResult, TransportConfig
from mempool.errors import MemPoolError

from .auth import control_token, holds_token, token_guard
from .checks import arg, check_device, check_int, check_port, check_positive, preset_arg
from .config import preset
from .engine import Engine, EngineConfig, RequestOutput
from .faults import Faults
from .model import LlamaModel
from .prompt_tree import chain_keys
from .sampling import SamplingParams
from .stages import ROLES, STAGES
from .worker import EngineWorker, WorkerStopped

SECRET_ENV = "MEMSERVE_SECRET"
# the default of --warm-up-tokens where the command line leaves it out (a test suite sets 0 here)
WARM_UP_ENV = "MEMSERVE_WARM_UP_TOKENS"
STOP = web.AppKey("stop", asyncio.Event)
KEEPALIVE_S = 1.0
PREFILL_SAMPLES = 256  # the latest prefills' timings /stats shows


class Busy(RuntimeError):
    """The instance cannot take the request now (its queue is at its limit, it is stopping, or its
    engine did not take it in ``ADD_TIMEOUT_S``); the scheduler tries another instance."""


ADD_TIMEOUT_S = 60.0  # how long a request may wait for the engine thread to take it


@dataclass(frozen=True, kw_only=True)
class InstanceConfig:
    name: str
    role: str = "colocated"
    model: str = "default"
    weights: str | None = None
    caching: bool = True
    block_size: int = 16
    device_blocks: int = 2048
    host_blocks: int = 2048
    host: str = "127.0.0.1"
    port: int = 0
    backend: str = "ucx"
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "cpu"
    max_waiting: int = 256  # requests queued before their prefill; past it new ones are refused (503)
    ucx_shared_memory: bool = True  # off: KV to peers on this machine takes the network too (no pull either)
    transfer_deadline_s: float = 30.0  # the longest one wait of a transfer may take (a lost peer)
    warm_up_tokens: int = 64  # step sizes set up before serving (EngineConfig.warm_up_tokens); 0: none

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.host in ("0.0.0.0", "::", ""):  # the scheduler and the peers are told this address
            raise ValueError(f"host must be the address others reach this instance at, got {self.host!r}")
        check_port("port", self.port)
        check_int("threads", self.threads)
        check_int("max_waiting", self.max_waiting, 1)  # 0: every request refused
        check_positive("transfer_deadline_s", self.transfer_deadline_s)
        check_device("device", self.device)


def params_from(body: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a JSON object (unknown keys are refused by the dataclass)."""
    p = dict(body)
    for key in ("stop_token_ids", "stop"):
        if key in p:
            p[key] = tuple(p[key])
    if "logit_bias" in p:  # JSON: [[token, bias], ...]
        p["logit_bias"] = tuple((int(t), float(b)) for t, b in p["logit_bias"])
    return SamplingParams(**p)


def _check_invariants(engine: Engine) -> str:
    """``"ok"``, or what the engine's pool ``check_invariants()`` found wrong (run on the engine thread)."""
    try:
        engine.pool.check_invariants()
    except AssertionError as exc:
        return f"broken: {exc}"
    return "ok"


class Instance:
    """The engine worker plus the transfer plumbing; the HTTP handlers call into this."""

    def __init__(
        self,
        config: InstanceConfig,
        secret: str,
        stop_ids: frozenset[int] = frozenset(),
        faults: Faults | None = None,
        detokenize: Callable[[list[int]], bytes] | None = None,
    ) -> None:
        self.config = config
        faults = faults or Faults()
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.weights:
            from .weights import load_pretrained

            model = load_pretrained(config.weights, device=config.device)
        else:
            model = LlamaModel(preset(config.model), device=config.device).init_random()
        engine = Engine(
            model,
            EngineConfig(
                block_size=config.block_size,
                device_blocks=config.device_blocks,
                host_blocks=config.host_blocks,
                caching=config.caching,
                warm_up_tokens=config.warm_up_tokens,
            ),
            stop_ids=stop_ids,
            detokenize=detokenize,
        )
        self.pool = engine.pool
        self.model_fingerprint = model.fingerprint()
        transport = TransportConfig(
            name=config.name,
            secret=secret,
            backend=config.backend,
            host=config.host,
            deadline_s=config.transfer_deadline_s,
            ucx_shared_memory=config.ucx_shared_memory,
            same_host_pull=config.ucx_shared_memory,  # both are "may KV skip the network on this host"
        )
        if faults.chunk_bytes:
            transport = replace(transport, chunk_bytes=faults.chunk_bytes)
        self.transport = self.pool.serve(transport)
        if faults.forward_delay_s:
            model.register_forward_pre_hook(lambda *_: time.sleep(faults.forward_delay_s))
        agent = self.pool._agent  # the transport's test hooks
        if faults.segment_delay_s:
            agent.segment_delay_s = faults.segment_delay_s  # type: ignore[union-attr]
        if faults.link_bytes_per_s:
            agent.link_rate = dict(faults.link_bytes_per_s)  # type: ignore[union-attr]
        self.worker = EngineWorker(engine)
        # prefixes this pool stopped caching, as prompt-tree keys, until the scheduler collects them
        self._removed: deque[str] = deque(maxlen=4096)
        self.pool.watch_removals(self._on_removed)
        self._count_lock = threading.Lock()
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "output_tokens": 0}
        # (prompt, cached, seconds) of the latest prefills, newest last (a long-lived instance keeps a window)
        self.prefill_samples: deque[tuple[int, int, float]] = deque(maxlen=PREFILL_SAMPLES)

    def _on_removed(self, namespace: object, tokens: Any) -> None:
        if namespace is None:
            self._removed.append(chain_keys(tokens, self.config.block_size)[-1].hex())

    def take_removed(self) -> list[str]:
        """Keys of the prefixes evicted or deleted since the last call."""
        out = []
        while self._removed:
            out.append(self._removed.popleft())
        return out

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "role": c.role,
            "caching": c.caching,
            "block_size": c.block_size,
            "block_bytes": self.pool.config.layout.block_bytes,
            "capacity_tokens": c.device_blocks * c.block_size,
            "vocab_size": self.worker.engine.model.config.vocab_size,
            "model": self.model_fingerprint,
            "stop_ids": sorted(self.worker.engine.stop_ids),
            "max_waiting": c.max_waiting,
            "transport": list(self.transport),
            "pid": os.getpid(),
        }

    def stats(self, check: bool = False, collect: bool = True) -> dict[str, Any]:
        """Queues, pool and transport figures; with ``check``, also ``invariants``: ``"ok"`` or what
        ``check_invariants()`` found wrong; with ``collect``, ``removed`` (:meth:`take_removed`).

        The queue lengths are read without waiting for the engine thread (a long step must not stall
        monitoring): a request counts as running while its step is under way."""
        e = self.worker.engine
        waiting = list(e.waiting)  # (copies are atomic under the GIL; the engine thread may be mid-step)
        queues: dict[str, Any] = {
            "waiting": len(waiting),
            "running": len(e.running),
            "swapped": len(e.swapped),
            "held": len(e.held),
            "queued_tokens": sum(len(s.tokens) - s.num_computed for s in waiting),
        }
        with self._count_lock:
            samples = list(self.prefill_samples)
        if check:
            queues["invariants"] = self.worker.call(_check_invariants).result(timeout=60)
        return {
            **self.info(),
            **queues,
            "pool": self.pool.stats(),
            "transport_stats": self.pool.transport_stats(),
            "peers": sorted(self.pool.peers()),
            "counters": dict(self.counters),
            "prefill_samples": samples,
            **({"removed": self.take_removed()} if collect else {}),
        }

    def start(self, body: dict[str, Any], emit: Any) -> None:
        """Start a request; ``emit(dict)`` is called (from other threads) for every output line."""
        rid = str(body["id"])
        tokens = [int(t) for t in body["tokens"]]
        prompt_len = int(body.get("prompt_len", len(tokens)))
        params = params_from(body.get("params", {}))
        handoff, send_back = body.get("handoff"), body.get("send_back")
        kv_key = str(body["kv_key"]) if body.get("kv_key") else None

        def on_output(out: RequestOutput) -> None:
            for i, t in enumerate(out.new_token_ids):
                event: dict[str, Any] = {"token": t}
                if out.logprobs is not None:
                    lp = out.logprobs[i]
                    event.update(logprob=lp.logprob, top=[list(x) for x in lp.top])
                if out.prompt_logprobs is not None and i == 0:
                    event["prompt"] = [[x.logprob, [list(y) for y in x.top]] for x in out.prompt_logprobs]
                emit(event)
            with self._count_lock:
                self.counters["output_tokens"] += len(out.new_token_ids)
            if out.finished:
                self._finished(rid, out, tokens, prompt_len, handoff or send_back, bool(handoff), emit)

        def add(engine: Engine) -> None:
            # Claimed here, on the engine thread: a call that never runs (the worker stopped, or
            # it was cancelled) leaves the KV to its receipt, which frees it when it expires.
            kv = self.pool.claim(kv_key) if kv_key is not None else None
            try:
                if len(engine.waiting) >= self.config.max_waiting:
                    raise Busy(f"{self.config.name} has {len(engine.waiting)} requests waiting (its limit)")
                engine.add_request(tokens, params, rid, prompt_len=prompt_len, kv=kv, hold=bool(handoff or send_back))
            except Exception:
                if kv is not None:
                    self.pool.free(kv)
                raise
            self.worker.listen(rid, on_output)

        added = self.worker.call(add)
        try:
            added.result(timeout=ADD_TIMEOUT_S)
        except WorkerStopped as exc:
            raise Busy(f"{self.config.name} is stopping: {exc}") from exc
        except concurrent.futures.TimeoutError:  # (the builtin TimeoutError only from Python 3.11)
            if added.cancel():  # it never ran, and now never will
                raise Busy(f"{self.config.name}'s engine did not take the request in {ADD_TIMEOUT_S:.0f} s") from None
            added.result()  # it began meanwhile: its outcome stands
        with self._count_lock:
            self.counters["requests"] += 1

    def _finished(
        self,
        rid: str,
        out: RequestOutput,
        tokens: list[int],
        prompt_len: int,
        peer: dict[str, Any] | None,
        handoff: bool,
        emit: Any,
    ) -> None:
        m = out.metrics
        with self._count_lock:  # the HTTP threads count requests concurrently
            if m.first_scheduled is not None and m.first_token is not None and prompt_len == len(tokens):
                self.prefill_samples.append((prompt_len, m.cached_tokens, m.first_token - m.first_scheduled))
            self.counters["prompt_tokens"] += prompt_len
            self.counters["cached_tokens"] += m.cached_tokens
        metrics = {k: v for k, v in asdict(m).items()}
        done = {"done": True, "finish_reason": out.finish_reason, "metrics": metrics, "removed": self.take_removed()}
        if peer is None or out.finish_reason in ("abort", "error"):
            emit(done)
            return
        mode = peer.get("mode", "insert") if handoff else "insert"
        if mode == "transfer" and out.finish_reason != "length":  # the answer ended here: no decode
            self.worker.engine.release(rid)  # nothing would claim what a keyed handoff sends (engine thread)
            emit(done)
            return
        kv_tokens, blocks = self.worker.engine.held_kv(rid)  # we are on the engine thread
        # the transfer runs off the engine thread; the held blocks stay referenced until release
        threading.Thread(
            target=self._send, args=(rid, str(peer["peer"]), mode, kv_tokens, blocks, done, emit), daemon=True
        ).start()

    def _send(
        self, rid: str, peer: str, mode: str, kv_tokens: list[int], blocks: Blocks, done: dict[str, Any], emit: Any
    ) -> None:
        try:
            if mode == "transfer":
                result = self.pool.transfer(peer, blocks, key=rid)
            else:  # the partly filled last block too: the peer keeps it as a tail
                result = self.pool.transfer_with_insert(peer, kv_tokens, blocks)
            done["transfer"] = {"mode": mode, **_transfer_summary(result)}
        except Exception as exc:  # reported to the scheduler, which falls back to recomputation
            done["transfer"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.worker.call(lambda e: e.release(rid))
        emit(done)

    def push(self, peer: str, tokens: list[int]) -> dict[str, Any]:
        """Send this pool's cached prefix of ``tokens`` to ``peer`` (only blocks it lacks travel)."""
        with self.pool.match(tokens) as hit:
            if not hit.num_tokens:
                return {"sent_blocks": 0, "skipped_blocks": 0, "bytes": 0}
            result = self.pool.transfer_with_insert(peer, tokens[: hit.num_tokens], hit.blocks)
        return _transfer_summary(result)

    def close(self) -> None:
        self.worker.stop()
        self.pool.close()


def _transfer_summary(result: TransferResult | None) -> dict[str, Any]:
    """What the scheduler learns of a transfer (``None``: the peer had no room)."""
    if result is None:
        return {"error": "the peer has no room"}
    return {
        "sent_blocks": result.sent_blocks,
        "skipped_blocks": result.skipped_blocks,
        "bytes": result.bytes,
        "seconds": result.seconds,
        "data_seconds": result.data_seconds,
    }


def make_app(instance: Instance, token: str | None = None) -> web.Application:
    """The instance's aiohttp application (control API)."""
    app = web.Application(middlewares=[token_guard(token)])
    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    async def on_startup(app: web.Application) -> None:
        loop_holder["loop"] = asyncio.get_running_loop()
        app[STOP] = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        ok = instance.worker.alive  # an engine thread that died makes the instance useless: report it down
        about = {"ok": ok, "name": instance.config.name, "role": instance.config.role, "pid": os.getpid()}
        if holds_token(request, token):  # the scheduler's heartbeat: the evictions no answer reported
            about["removed"] = instance.take_removed()  # (a send-back or push after the last answer)
        return web.json_response(about, status=200 if ok else 503)

    async def info(_: web.Request) -> web.Response:
        return web.json_response(instance.info())

    async def stats(request: web.Request) -> web.Response:
        check = request.query.get("check") == "1"
        return web.json_response(await asyncio.to_thread(instance.stats, check, holds_token(request, token)))

    async def connect(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name, host, port = str(body["name"]), str(body["host"]), int(body["port"])
        except MALFORMED as exc:
            return _malformed(exc)
        try:
            await asyncio.to_thread(instance.pool.connect, name, host, port)
        except MemPoolError as exc:  # unreachable, refused, timed out: the scheduler tries again later
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=502)
        return web.json_response({"ok": True})

    async def generate(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except MALFORMED as exc:
            return _malformed(exc)
        loop = loop_holder["loop"]
        lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def emit(line: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, line)

        def stop_it() -> None:
            instance.worker.call(lambda e: e.abort(str(body["id"])))

        def stop_once_in(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                stop_it()

        starting = asyncio.ensure_future(asyncio.to_thread(instance.start, body, emit))
        try:
            await asyncio.shield(starting)
        except Busy as exc:  # (KV sent for it is freed, or left to its receipt to expire)
            return web.json_response({"error": str(exc), "busy": True}, status=503)
        except MALFORMED as exc:
            return _malformed(exc)
        except asyncio.CancelledError:  # cancelled while the engine took it: stop it once it is in
            starting.add_done_callback(stop_once_in)
            raise
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            # the client may be gone already (a choice cancelled as it began): then nobody reads it
            await response.prepare(request)
            while True:
                try:
                    line = await asyncio.wait_for(lines.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await response.write(b"\n")  # alive, nothing to say yet
                    continue
                await response.write((json.dumps(line) + "\n").encode())
                if line.get("done"):
                    break
        except ConnectionResetError:  # the client (the scheduler) left: stop the work, nothing to answer
            stop_it()
            return response
        except asyncio.CancelledError:
            stop_it()
            raise
        await response.write_eof()
        return response

    async def push(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            peer, tokens = str(body["peer"]), [int(t) for t in body["tokens"]]
        except MALFORMED as exc:
            return _malformed(exc)
        try:
            result = await asyncio.to_thread(instance.push, peer, tokens)
        except MemPoolError as exc:  # an unknown or lost peer, a failed transfer: nothing was inserted there
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=502)
        return web.json_response(result, status=200 if "error" not in result else 409)

    async def shutdown(request: web.Request) -> web.Response:
        asyncio.get_running_loop().call_later(0.1, request.app[STOP].set)
        return web.json_response({"ok": True})

    app.on_startup.append(on_startup)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/stats", stats)
    app.router.add_post("/connect", connect)
    app.router.add_post("/generate", generate)
    app.router.add_post("/push", push)
    app.router.add_post("/shutdown", shutdown)
    return app


# what a control body that is not the JSON object a route expects raises while it is read
MALFORMED = (ValueError, TypeError, KeyError, IndexError)


def _malformed(exc: Exception) -> web.Response:
    """400 for a control body that is not what the route expects (nothing was done)."""
    return web.json_response({"error": f"malformed request: {type(exc).__name__}: {exc}"}, status=400)


def _watch_parent(parent: int) -> None:
    """Exit when the launcher dies, so no instance outlives it (no orphans)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memserve.instance", description="a memserve instance")
    ap.add_argument("--name", required=True)
    ap.add_argument("--role", choices=ROLES, default="colocated")
    ap.add_argument("--model", type=preset_arg, default="default")
    ap.add_argument("--weights", default=None, help="a Llama/Qwen2 folder (config.json + safetensors)")
    ap.add_argument("--caching", choices=("on", "off"), default=None, help="default: on, or as --stage says")
    ap.add_argument("--stage", choices=list(STAGES), default=None, help="cache as this design stage's role does")
    ap.add_argument("--device-blocks", type=arg(check_int, 1), default=2048)
    ap.add_argument("--host-blocks", type=arg(check_int, 0), default=2048)
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on, which others reach it at")
    ap.add_argument("--port", type=arg(check_port), default=0)
    ap.add_argument(
        "--ucx-shared-memory",
        choices=("on", "off"),
        default="on",
        help="off: KV to peers on this machine takes the network (no UCX shared memory, no same-host pull)",
    )
    ap.add_argument(
        "--transfer-deadline",
        type=arg(check_positive, parse=float),
        default=30.0,
        help="seconds before a silent peer is lost",
    )
    ap.add_argument("--backend", choices=("ucx", "torch"), default="ucx")
    ap.add_argument("--threads", type=arg(check_int, 0), default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", type=arg(check_device, parse=str), default="cpu", help="cpu, cuda or cuda:k")
    ap.add_argument(
        "--max-waiting", type=arg(check_int, 1), default=256, help="queued requests before new ones get 503"
    )
    ap.add_argument(
        "--warm-up-tokens",
        type=arg(check_int, 0),
        default=os.environ.get(WARM_UP_ENV) or "64",  # a string default goes through type=int, as typed
        help=f"set up every step size up to this before serving (0: none; default: ${WARM_UP_ENV} or 64)",
    )
    ap.add_argument("--scheduler", default=None, help="register with the scheduler at this URL")
    ap.add_argument("--exit-with-parent", action="store_true")
    args = ap.parse_args(argv)
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        print(f"set {SECRET_ENV} (the deployment's shared secret, 16+ chars)", file=sys.stderr)
        return 2
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    from .tokenizer import Tokenizer

    config = InstanceConfig(
        name=args.name,
        role=args.role,
        model=args.model,
        weights=args.weights,
        caching=args.caching == "on"
        if args.caching
        else (STAGES[args.stage].caches(args.role) if args.stage else True),
        device_blocks=args.device_blocks,
        host_blocks=args.host_blocks,
        host=args.host,
        port=args.port,
        backend=args.backend,
        threads=args.threads,
        device=args.device,
        max_waiting=args.max_waiting,
        ucx_shared_memory=args.ucx_shared_memory == "on",
        transfer_deadline_s=args.transfer_deadline,
        warm_up_tokens=args.warm_up_tokens,
    )
    tokenizer = Tokenizer("llama3")
    instance = Instance(config, secret, tokenizer.stop_ids, Faults.from_env(), tokenizer.decode_bytes)
    token = control_token(secret)
    app = make_app(instance, token)
    # what startup built (model, tokenizer, libraries) lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise walk all of it (~0.2 s) in mid-request
    gc.collect()
    gc.freeze()

    async def announce(app: web.Application) -> None:
        site = next(iter(runner.sites))
        server = getattr(site, "_server", None)
        port = server.sockets[0].getsockname()[1] if server and server.sockets else args.port
        url = f"http://{args.host}:{port}"
        ready = {**instance.info(), "url": url}
        print("READY " + json.dumps(ready), flush=True)
        if args.scheduler:
            import aiohttp

            auth = {"Authorization": f"Bearer {token}"}
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"{args.scheduler}/admin/register", json=ready, headers=auth) as r,
            ):
                if r.status != 200:
                    raise SystemExit(f"the scheduler refused this instance ({r.status}): {await r.text()}")

    async def serve() -> None:
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        await announce(app)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app[STOP].set)
        try:
            await app[STOP].wait()
        finally:
            await runner.cleanup()

    runner = web.AppRunner(app)
    try:
        asyncio.run(serve())
    finally:
        instance.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
