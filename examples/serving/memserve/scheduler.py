"""The global scheduler: routes each request to instances and drives prefill -> decode handoffs.

It tokenizes once (the API layer), keeps a :class:`PromptTree` per instance role recording who
caches which prefix, and picks an instance by policy:

* ``least-load``: the fewest predicted seconds of queued prefill work;
* ``session-id``: a stable hash of the session (OpenAI ``user``), so a conversation stays put;
* ``prompt-tree``: the least ``exec(prompt_len, cached_fraction) + queued seconds``, where the
  cached fraction comes from the tree and ``exec`` is a :class:`CostModel` fitted from the
  instances' measured prefills. When another instance of the role holds more of the prefix and
  sending those blocks is predicted cheaper than recomputing them, the holder is asked to push
  them first (``transfer_with_insert``).

Moving KV or recomputing it: a push, and (with ``link_aware``) a prefill -> decode handoff, happen
(when there are blocks to move) only when ``latency + blocks x block_bytes / bandwidth`` of the
link ``src -> dst`` is less than what recomputing costs: the prefill seconds saved by the cost model, times the requests that
recompute would stall (the target's requests in flight, whose steps wait for it, and this one).
Each link's latency and bandwidth are learned from the transfers it carried: the least latency
and the best bandwidth of its last ``LINK_SAMPLES`` (a delay only ever adds time, so one transfer
that waited on a busy core does not make the link look slow; a link that did slow down is seen
once its faster transfers leave the window). Until a link has carried two transfers within
``link_ttl_s`` (one could be that slow one) it is taken to have the configured ``bandwidth`` and
no latency; so a link that got faster is measured anew once its figures are that old. Every
decision is kept in :attr:`Scheduler.decisions`.

Faults: a request whose instance dies, stalls (no byte, not even a keep-alive, for
``stall_timeout_s``) or refuses it as busy is run again on another live instance of the role, at
most ``attempts`` times in all. Before its first token it simply starts over; after, it *resumes*:
the new instance gets prompt + the tokens already streamed (``prompt_len`` marks the prompt) and
continues, so the client sees one uninterrupted answer, the same tokens a fault-free run gives
(greedy, or seeded: each output position samples from its own stream). A control call to an
instance (``/connect`` while another registers, ``/push``) that gets no answer within
``control_timeout_s`` fails as an unreachable instance's does: a push is skipped (the prefix is
recomputed), a link is given up once the instance's ``/health`` does not answer either.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .checks import check_int, check_positive
from .costmodel import CostModel
from .prompt_tree import PromptTree
from .sampling import stop_at
from .stages import ROLES, Stage

POLICIES = ("least-load", "session-id", "prompt-tree")


class SchedulerError(RuntimeError):
    """An instance failed or none can serve the request."""


class RequestRefused(SchedulerError):
    """An instance refused the request as invalid (the client's fault: a 400)."""


class InstanceLost(SchedulerError):
    """An instance died or stopped answering in the middle of a request."""


class InstanceBusy(SchedulerError):
    """Every live instance of a role refused the request for a full queue (retry later: a 503)."""


@dataclass
class InstanceHandle:
    name: str
    role: str
    url: str
    transport: tuple[str, int]
    caching: bool
    block_bytes: int = 0
    pid: int = 0
    model: str = ""  # the model's fingerprint (LlamaModel.fingerprint): K/V is shared only within one
    incarnation: int = 1  # the scheduler's count of this name's (re)joins
    alive: bool = True
    misses: int = 0  # consecutive failed heartbeats
    inflight: int = 0
    queued_seconds: float = 0.0
    requests: int = 0


def _registration(info: Any) -> tuple[InstanceHandle, int, list[int], int]:
    """An instance's registration read whole: its handle, capacity in tokens, stop ids and
    vocabulary size (0: not given). Raises ``ValueError`` for a malformed one."""
    try:
        if not isinstance(info, dict):
            raise TypeError("a registration is a JSON object")
        name, role, url, (host, port) = (info[k] for k in ("name", "role", "url", "transport"))
        if not all(isinstance(v, str) for v in (name, role, url, host)):
            raise TypeError("name, role, url and the transport host must be text")
        handle = InstanceHandle(
            name,
            role,
            url,
            (host, int(port)),
            bool(info.get("caching", True)),
            int(info.get("block_bytes", 0)),
            int(info.get("pid", 0)),
            info.get("model", ""),
        )
        if not isinstance(handle.model, str):
            raise TypeError("model must be text")
        numbers = int(info.get("capacity_tokens") or 0), int(info.get("vocab_size") or 0)
        stop_ids = [int(t) for t in info.get("stop_ids", ())]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed registration: {type(exc).__name__}: {exc}") from None
    if handle.role not in ROLES:
        raise ValueError(f"malformed registration: role must be one of {ROLES}, got {handle.role!r}")
    if not handle.name or min(numbers) < 0 or not 0 < handle.transport[1] < 65536:
        raise ValueError("malformed registration: an empty name, a negative size or a port out of range")
    return handle, numbers[0], stop_ids, numbers[1]


def _event(raw: bytes) -> dict[str, Any]:
    """One line of an instance's stream as an event; a line that is not one (a bug, something in
    the way) raises ``ClientPayloadError``, which fails the attempt as a lost connection does."""
    try:
        event = json.loads(raw)
    except ValueError as exc:
        raise aiohttp.ClientPayloadError(f"a line that is not JSON: {raw[:80]!r}") from exc
    token = event.get("token", 0) if isinstance(event, dict) else None
    if not isinstance(token, int) or isinstance(token, bool) or token < 0:
        raise aiohttp.ClientPayloadError(f"a line that is not an event: {raw[:80]!r}")
    return event


@dataclass
class Counters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    pushes: int = 0
    rejoins: int = 0  # instances taken back as a new incarnation after they were marked down
    handoffs_recomputed: int = 0  # handoffs skipped: decode recomputing was predicted faster
    retries: int = 0  # requests re-run elsewhere after their instance died before any token
    resumes: int = 0  # requests continued elsewhere after their instance died or stalled mid-answer
    busy: int = 0  # refusals by instances whose queue was full
    instance_failures: int = 0
    removals: int = 0  # evicted prefixes instances reported
    expired: int = 0  # prompt-tree entries dropped after their TTL (an instance never reported them gone)
    handoff_blocks: int = 0
    handoff_bytes: int = 0
    send_back_blocks: int = 0
    by_instance: dict[str, int] = field(default_factory=dict)


LINK_SAMPLES = 8  # transfers a link's estimate looks back over
LINK_MIN_SAMPLES = 2  # transfers a link must have carried before its estimate is used


@dataclass
class LinkEstimate:
    bandwidth: float  # bytes per second of the data phase: the best of the recent transfers
    latency: float  # seconds a transfer costs besides its data (control round trips): the least of them
    measured: float  # time.monotonic() of the last one


def _estimate(samples: Iterable[tuple[float, float, float]]) -> LinkEstimate:
    """The best bandwidth and the least latency of ``(when, bandwidth, latency)`` samples, oldest first."""
    rows = list(samples)
    return LinkEstimate(max(r[1] for r in rows), min(r[2] for r in rows), rows[-1][0])


class Scheduler:
    """Routes requests over registered instances for one design ``stage``."""

    def __init__(
        self,
        stage: Stage,
        *,
        policy: str = "prompt-tree",
        block_size: int = 16,
        ttl: float = 600.0,
        block_bytes: int = 8 * 2 * 16 * 4 * 64 * 4,
        bandwidth: float = 2e9,
        stall_timeout_s: float = 15.0,
        control_timeout_s: float = 30.0,
        attempts: int = 3,
        link_aware: bool = True,
        link_ttl_s: float = 60.0,
        token: str | None = None,
        detokenize: Callable[[list[int]], bytes] | None = None,
    ) -> None:
        """``bandwidth``: bytes per second assumed of a link until it is measured; ``link_aware``:
        skip a handoff whose transfer is predicted slower than decode recomputing the prompt
        (off: always hand off, as a link-blind deployment does); ``control_timeout_s``: the longest
        a control call to an instance (``/connect``, ``/push``) may take before the instance is
        treated as unreachable for it (a healthy one answers well within a transfer's deadline);
        ``token``: the instances' control
        token, sent with every call to them; ``detokenize``: token ids to UTF-8 bytes, the
        instances' tokenizer's (requests with ``stop`` strings are refused without it)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        check_int("block_size", block_size, 1)
        check_int("block_bytes", block_bytes, 1)
        check_int("attempts", attempts, 1)
        for name, value in (
            ("ttl", ttl),
            ("bandwidth", bandwidth),
            ("stall_timeout_s", stall_timeout_s),
            ("control_timeout_s", control_timeout_s),
            ("link_ttl_s", link_ttl_s),
        ):
            check_positive(name, value)
        self.stage, self.policy = stage, policy
        self.instances: dict[str, InstanceHandle] = {}
        self.trees = {role: PromptTree(block_size, ttl) for role in ROLES}
        # expired entries are skipped by every match; the heartbeat also drops them now and then, or
        # entries no eviction report ever names (a prefix an instance did not keep) pile up for good
        self._expiry_period = min(60.0, ttl / 4)
        self._next_expiry = time.monotonic() + self._expiry_period
        self.cost = CostModel()
        self.block_bytes, self.bandwidth = block_bytes, bandwidth
        self.link_aware, self.link_ttl_s = link_aware, link_ttl_s
        self.links: dict[tuple[str, str], LinkEstimate] = {}
        self._link_samples: dict[tuple[str, str], deque[tuple[float, float, float]]] = {}  # (when, rate, latency)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=256)  # transfer-or-recompute, newest last
        self.stall_timeout_s, self.attempts = stall_timeout_s, attempts
        self.control_timeout_s = control_timeout_s
        self.stop_ids: set[int] = set()  # every instance's tokenizer stop ids
        self.detokenize = detokenize
        self.counters = Counters()
        self.max_context = 0  # the smallest instance's device capacity in tokens (0: no instance yet)
        self.vocab_size = 0  # the smallest model vocabulary among the instances
        self._ids = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._joining = asyncio.Lock()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.observers: list[Any] = []  # callables(event: dict) for metrics

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), headers=self._headers
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- instances -----------------------------------------------------------------------------
    async def register(self, info: dict[str, Any]) -> InstanceHandle:
        """Add an instance and open transfer links between it and every other instance, both ways.

        One at a time: two instances joining at once would each miss the other."""
        async with self._joining:
            return await self._register(info)

    async def _register(self, info: dict[str, Any]) -> InstanceHandle:
        handle, capacity, stop_ids, vocab = _registration(info)  # all read before anything changes
        old = self.instances.get(handle.name)
        if old is not None and old.alive and old.pid == handle.pid:
            raise SchedulerError(f"an instance named {handle.name!r} is registered already")
        for other in self.instances.values():
            if other.alive and other.name != handle.name and other.model != handle.model:
                raise SchedulerError(
                    f"{handle.name} serves another model (fingerprint {handle.model or 'none'}) than "
                    f"{other.name} ({other.model or 'none'}): their K/V cannot be shared"
                )
        for other in [o for o in self.instances.values() if o.alive and o.name != handle.name]:
            try:
                await self._post(
                    handle, "/connect", {"name": other.name, "host": other.transport[0], "port": other.transport[1]}
                )
                await self._post(
                    other, "/connect", {"name": handle.name, "host": handle.transport[0], "port": handle.transport[1]}
                )
            except (SchedulerError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if not await self._healthy(other):
                    self.mark_down(other, f"unreachable while linking {handle.name}: {exc}")
                    continue
                raise SchedulerError(f"cannot link {handle.name} and {other.name}: {exc}") from exc
        if old is not None:  # a new incarnation of a dead (or restarted) instance takes its place
            self.mark_down(old, "replaced by a new incarnation")
            handle.incarnation = old.incarnation + 1
            self.links = {k: v for k, v in self.links.items() if handle.name not in k}
            self._link_samples = {k: v for k, v in self._link_samples.items() if handle.name not in k}
        self.instances[handle.name] = handle
        if capacity:
            self.max_context = capacity if not self.max_context else min(self.max_context, capacity)
        self.stop_ids.update(stop_ids)
        if vocab:
            self.vocab_size = vocab if not self.vocab_size else min(self.vocab_size, vocab)
        return handle

    async def _post(self, inst: InstanceHandle, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``inst``'s answer to a control call.

        Raises:
            SchedulerError: an error answer, or none within ``control_timeout_s``.
            aiohttp.ClientError: ``inst`` could not be reached.
        """
        s = await self.session()
        try:
            async with s.post(
                inst.url + path, json=body, timeout=aiohttp.ClientTimeout(total=self.control_timeout_s)
            ) as r:
                data: dict[str, Any] = await r.json()
                if r.status != 200:
                    raise SchedulerError(f"{inst.name}{path}: {data.get('error', r.status)}")
                return data
        except asyncio.TimeoutError:
            raise SchedulerError(f"{inst.name}{path}: no answer within {self.control_timeout_s:g} s") from None

    async def instance_stats(self, check: bool = False, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """The ``/stats`` of every live instance that answers within ``timeout`` seconds (``check``:
        with its pool's invariants checked, which may take longer: 60 s)."""
        s = await self.session()
        limit = aiohttp.ClientTimeout(total=max(timeout, 60.0) if check else timeout)

        async def one(inst: InstanceHandle) -> tuple[str, dict[str, Any] | None]:
            try:
                async with s.get(inst.url + "/stats" + ("?check=1" if check else ""), timeout=limit) as r:
                    stats: dict[str, Any] = await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return inst.name, None  # unreachable now: the heartbeat decides what that means
            self._apply_removed(inst, stats.get("removed", ()))
            return inst.name, stats

        answers = await asyncio.gather(*(one(i) for i in self.instances.values() if i.alive))
        return {name: stats for name, stats in answers if stats is not None}

    def mark_down(self, inst: InstanceHandle, reason: str) -> None:
        """Stop routing to ``inst`` and forget what the prompt trees believed it caches."""
        if inst.alive:
            inst.alive = False
            self.counters.instance_failures += 1
            for tree in self.trees.values():
                tree.forget(inst.name)
            logging.getLogger(__name__).warning("instance %s is down: %s", inst.name, reason)

    async def _probe(self, inst: InstanceHandle, timeout: float = 2.0) -> dict[str, Any] | None:
        """``inst``'s ``/health`` answer, its eviction report applied; ``None`` if it is not healthy."""
        s = await self.session()
        try:
            async with s.get(inst.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                answer = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        if not isinstance(answer, dict):
            return None
        if inst.alive:
            self._apply_removed(inst, answer.get("removed", ()))
        return answer if r.status == 200 else None

    async def _healthy(self, inst: InstanceHandle) -> bool:
        return await self._probe(inst) is not None

    async def heartbeat(self, interval: float = 1.0, misses: int = 3) -> None:
        """Probe every instance each ``interval`` seconds. ``misses`` failures in a row mark one down
        (one slow answer under load does not); a down instance of the same incarnation (pid) that
        answers again is taken back. Every ``ttl / 4`` (at most a minute) it also drops the prompt
        trees' expired entries."""
        while True:
            await asyncio.sleep(interval)
            insts = list(self.instances.values())
            for inst, answer in zip(insts, await asyncio.gather(*(self._probe(i) for i in insts))):
                if answer is None:
                    inst.misses += 1
                    if inst.alive and inst.misses >= misses:
                        self.mark_down(inst, f"{inst.misses} heartbeats missed")
                    continue
                inst.misses = 0
                if not inst.alive and self.instances.get(inst.name) is inst:
                    await self._rejoin(inst)
            now = time.monotonic()
            if now >= self._next_expiry:
                self._next_expiry = now + self._expiry_period
                self.counters.expired += sum(tree.expire(now) for tree in self.trees.values())

    async def _rejoin(self, inst: InstanceHandle) -> None:
        """Take back a down instance that answers again (it stalled, or was cut off the network) as a
        new incarnation: its transfer links are opened anew both ways (its peers dropped them) and the
        prompt tree starts empty for it."""
        try:
            s = await self.session()
            async with s.get(inst.url + "/info", timeout=aiohttp.ClientTimeout(total=10)) as r:
                info = {**await r.json(), "url": inst.url}
            handle = await self.register(info)
        except (SchedulerError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            logging.getLogger(__name__).warning("instance %s answers but cannot rejoin yet: %s", inst.name, exc)
            return
        self.counters.rejoins += 1
        logging.getLogger(__name__).warning("instance %s rejoined as incarnation %d", inst.name, handle.incarnation)

    def _apply_removed(self, inst: InstanceHandle, keys: Any) -> None:
        """An instance's eviction report: it no longer caches these prefixes (a key that is not
        hex text is skipped: a report never stops a request or the heartbeat)."""
        tree = self.trees[inst.role]
        for key in keys if isinstance(keys, list | tuple) else ():
            try:
                tree.drop(inst.name, bytes.fromhex(key))
            except (TypeError, ValueError):
                continue
            self.counters.removals += 1

    # -- routing -------------------------------------------------------------------------------
    def _role_of_first(self) -> str:
        return "prefill" if self.stage.disaggregated else "colocated"

    def pick(
        self, role: str, tokens: list[int], session: str | None, exclude: set[str] | frozenset[str] = frozenset()
    ) -> tuple[InstanceHandle, int]:
        """The instance of ``role`` (not in ``exclude``) to run ``tokens``, and how many tokens it is
        believed to cache."""
        live = [i for i in self.instances.values() if i.role == role and i.alive]
        cands = sorted((i for i in live if i.name not in exclude), key=lambda i: i.name)
        if not cands:
            if live:
                raise InstanceBusy(f"every live {role} instance failed or refused this request as busy")
            raise SchedulerError(f"no live {role} instance")
        hits = self.trees[role].match(tokens, time.monotonic()) if self._caches(role) else {}
        if self.policy == "session-id" and session:
            chosen = cands[zlib.crc32(session.encode()) % len(cands)]
        elif self.policy == "prompt-tree":
            n = len(tokens)
            chosen = min(
                cands,
                key=lambda i: (self.cost.exec(n, hits.get(i.name, 0) / n) + i.queued_seconds, i.inflight, i.requests),
            )
        else:  # ties (an idle cluster) go round-robin, spreading prefixes over every cache
            chosen = min(cands, key=lambda i: (i.queued_seconds, i.inflight, i.requests))
        return chosen, hits.get(chosen.name, 0)

    def _caches(self, role: str) -> bool:
        return self.stage.caches(role)

    async def _maybe_push(self, role: str, target: InstanceHandle, tokens: list[int], have: int) -> int:
        """Ask the instance holding the longest prefix to send it to ``target`` when that beats recompute."""
        if self.policy != "prompt-tree" or not self._caches(role):
            return have
        hits = self.trees[role].match(tokens, time.monotonic())
        holder = max(hits, key=lambda k: hits[k], default=None)
        if holder is None or holder == target.name or hits[holder] <= have:
            return have
        more, size = hits[holder], self.trees[role].block_size
        if not self._transfer_pays(
            "push", self.instances[holder], target, len(tokens), have, more, (more - have) // size
        ):
            return have
        try:
            sent = await self._post(self.instances[holder], "/push", {"peer": target.name, "tokens": tokens[:more]})
        except (SchedulerError, aiohttp.ClientError):
            return have  # a failed push costs only the recompute it meant to save
        self.observe_link(holder, target.name, sent)
        self.counters.pushes += 1
        self.trees[role].insert(target.name, tokens[:more], time.monotonic())
        return more

    def link(self, src: str, dst: str) -> LinkEstimate:
        """What the link ``src -> dst`` is expected to do (the prior while measured fewer than
        ``LINK_MIN_SAMPLES`` times within ``link_ttl_s``)."""
        now = time.monotonic()
        fresh = [x for x in self._link_samples.get((src, dst), ()) if now - x[0] <= self.link_ttl_s]
        if len(fresh) < LINK_MIN_SAMPLES:
            return LinkEstimate(self.bandwidth, 0.0, 0.0)
        return _estimate(fresh)

    def observe_link(self, src: str, dst: str, transfer: dict[str, Any]) -> None:
        """Learn the link from one transfer's ``bytes``, ``seconds`` and ``data_seconds`` (if it moved
        any); :attr:`links` shows what its last ``LINK_SAMPLES`` measured."""
        nbytes, seconds = transfer.get("bytes"), transfer.get("seconds")
        if not nbytes or not seconds or "error" in transfer:
            return
        data = float(transfer.get("data_seconds") or seconds)
        now = time.monotonic()
        samples = self._link_samples.setdefault((src, dst), deque(maxlen=LINK_SAMPLES))
        while samples and now - samples[0][0] > self.link_ttl_s:
            samples.popleft()
        samples.append((now, float(nbytes) / data, max(float(seconds) - data, 0.0)))
        self.links[(src, dst)] = _estimate(samples)

    def _transfer_pays(
        self, kind: str, src: InstanceHandle, dst: InstanceHandle, n: int, have: int, more: int, blocks: int
    ) -> bool:
        """Whether sending ``blocks`` from ``src`` to ``dst`` (so that ``dst`` holds ``more`` of the ``n``
        tokens instead of ``have``) is predicted cheaper than ``dst`` recomputing them; recorded."""
        stalled = 1 + dst.inflight  # a recompute on dst delays every request it is running, and this one
        recompute = (self.cost.exec(n, have / n) - self.cost.exec(n, more / n)) * stalled
        link = self.link(src.name, dst.name)
        move = (link.latency if blocks else 0.0) + blocks * (src.block_bytes or self.block_bytes) / link.bandwidth
        pays = blocks == 0 or move < recompute  # nothing to move: no recompute, whatever the fit says
        self.decisions.append(
            {
                "kind": kind,
                "src": src.name,
                "dst": dst.name,
                "tokens": n,
                "blocks": blocks,
                "bandwidth": link.bandwidth,
                "latency": link.latency,
                "stalled": stalled,
                "move_s": move,
                "recompute_s": recompute,
                "transfer": pays,
            }
        )
        return pays

    def _handoff_pays(self, prefill: InstanceHandle, decode: InstanceHandle, tokens: list[int]) -> bool:
        """Whether ``prefill`` should send the prompt's KV to ``decode`` (always, unless ``link_aware``)."""
        if not self.link_aware:
            return True
        n, size = len(tokens), self.trees["decode"].block_size
        if self.stage.handoff == "transfer":  # every block, the partial last one too
            have, blocks = 0, -(-n // size)
        else:  # transfer_with_insert of the whole blocks decode lacks, and the partly filled last one
            have = self.trees["decode"].match(tokens, time.monotonic()).get(decode.name, 0)
            blocks = -(-n // size) - have // size
        return self._transfer_pays("handoff", prefill, decode, n, have, n, blocks)

    # -- requests ------------------------------------------------------------------------------
    async def generate(
        self, tokens: list[int], params: dict[str, Any], session: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Run one request; yields ``{"token": t}`` events then one ``{"done": ...}`` summary.

        Raises:
            RequestRefused: an instance refused it, or it has ``stop`` strings and this scheduler
                no ``detokenize``.
        """
        if params.get("stop") and self.detokenize is None:
            raise RequestRefused("stop strings need a scheduler built with detokenize (token ids -> bytes)")
        role = self._role_of_first()
        n = len(tokens)
        max_tokens = int(params.get("max_tokens", 16))
        output: list[int] = []
        box: dict[str, dict[str, Any]] = {"summary": {}}  # the last instance's summary
        rid = f"r{next(self._ids)}-{time.monotonic_ns()}"
        tried: set[str] = set()  # instances that failed or refused this request
        decode: InstanceHandle | None = None
        for attempt in range(self.attempts):
            context = tokens + output
            first, believed = self.pick(role, context, session, tried)
            believed = await self._maybe_push(role, first, context, believed)
            predicted = self.cost.exec(len(context), believed / len(context))
            if self._caches(role):  # optimistic: the instance will hold this prompt once its prefill ran, so
                # requests arriving meanwhile with the same prefix follow it there (trimmed if it did not)
                self.trees[role].insert(first.name, context, time.monotonic())
            body: dict[str, Any] = {"id": rid, "tokens": context, "prompt_len": n, "params": params}
            if self.stage.disaggregated:
                decode, _ = self.pick("decode", tokens, session, tried)
                body["params"] = {**params, "max_tokens": 1}
                if max_tokens > 1 and self._handoff_pays(first, decode, context):
                    body["handoff"] = {"peer": decode.name, "mode": self.stage.handoff}
                elif max_tokens > 1:
                    self.counters.handoffs_recomputed += 1
            first.inflight += 1
            first.requests += 1
            first.queued_seconds += predicted
            try:
                async for event in self._relay(first, body, output, box):
                    yield event
                break
            except (InstanceLost, InstanceBusy) as exc:
                if not self._recover(first, exc, output, params, max_tokens, attempt, tried, box):
                    break  # the answer is complete, or the prefill's token is: decode goes on
            finally:
                first.inflight -= 1  # (idle: exactly 0, not a float residue that would skew the ties)
                first.queued_seconds = first.queued_seconds - predicted if first.inflight else 0.0
        summary = box["summary"]
        metrics = summary.get("metrics", {})
        cached = int(metrics.get("cached_tokens", 0))
        self._learn(role, first, tokens, output, cached, believed, metrics)
        transfer = summary.get("transfer") or {}
        handed = "handoff" in body and "error" not in transfer  # (body: the last prefill attempt's)
        if decode is not None:
            self.observe_link(first.name, decode.name, transfer)
        self.counters.handoff_blocks += int(transfer.get("sent_blocks", 0))
        self.counters.handoff_bytes += int(transfer.get("bytes", 0))
        reason = summary.get("finish_reason")
        if decode is not None and reason == "length" and max_tokens > 1:
            kv_key = rid if handed and self.stage.handoff == "transfer" else None
            if not decode.alive:  # lost (or cut off) since it was picked: whatever was sent is gone too
                decode, _ = self.pick("decode", tokens + output, session, tried)
                kv_key = None
            for attempt in range(self.attempts):
                dbody: dict[str, Any] = {"id": rid, "tokens": tokens + output, "prompt_len": n, "params": params}
                if kv_key is not None:
                    dbody["kv_key"] = kv_key
                if self.stage.send_back and first.alive:
                    dbody["send_back"] = {"peer": first.name}
                target = decode
                target.inflight += 1
                target.requests += 1
                try:
                    async for event in self._relay(target, dbody, output, box):
                        yield event
                    break
                except (InstanceLost, InstanceBusy) as exc:
                    if not self._recover(target, exc, output, params, max_tokens, attempt, tried, box):
                        break
                    kv_key = None  # the KV went to the failed instance: the next one computes it
                    decode, _ = self.pick("decode", tokens + output, session, tried)
                finally:
                    target.inflight -= 1
            summary = box["summary"]
            reason = summary.get("finish_reason")
            if self.stage.decode_caching and "metrics" in summary:
                self.trees["decode"].insert(decode.name, (tokens + output)[:-1], time.monotonic())
            back = summary.get("transfer") or {}
            self.counters.send_back_blocks += int(back.get("sent_blocks", 0))
            if self.stage.send_back and "error" not in back and back:
                self.trees["prefill"].insert(first.name, (tokens + output)[:-1], time.monotonic())
        c = self.counters
        c.requests += 1
        c.prompt_tokens += n
        c.cached_tokens += cached
        c.output_tokens += len(output)
        c.by_instance[first.name] = c.by_instance.get(first.name, 0) + 1
        done = {
            "done": True,
            "finish_reason": reason,
            "prompt_tokens": n,
            "cached_tokens": cached,
            "completion_tokens": len(output),
            "instance": first.name,
            "decode_instance": None if decode is None else decode.name,
            "transfer": transfer,
        }
        for observe in self.observers:
            observe(done)
        yield done

    def _recover(
        self,
        inst: InstanceHandle,
        exc: SchedulerError,
        output: list[int],
        params: dict[str, Any],
        max_tokens: int,
        attempt: int,
        tried: set[str],
        box: dict[str, dict[str, Any]],
    ) -> bool:
        """After ``inst`` failed or refused a request: ``True`` to run it again elsewhere; ``False``
        when what was streamed already ends the phase (``box`` then holds its summary); raises
        ``exc`` when the attempts are used up."""
        tried.add(inst.name)
        logging.getLogger(__name__).warning("a request on %s failed after %d tokens: %s", inst.name, len(output), exc)
        reason = self._finish_reason(output, params, max_tokens)
        if reason is not None:  # the instance died after the last token, before its summary
            box["summary"] = {"finish_reason": reason}
            return False
        if output and inst.role == "prefill":  # the first token came, its KV did not: decode recomputes it
            box["summary"] = {"finish_reason": "length", "transfer": {"error": str(exc)}}
            return False
        if attempt + 1 >= self.attempts:
            raise exc
        if isinstance(exc, InstanceBusy):
            self.counters.busy += 1
        elif output:
            self.counters.resumes += 1
        else:
            self.counters.retries += 1
        return True

    def _finish_reason(self, output: list[int], params: dict[str, Any], max_tokens: int) -> str | None:
        """Why a request whose tokens so far are ``output`` is finished, or ``None`` if it is not."""
        if not output:
            return None
        stops = set(params.get("stop_token_ids", ())) | (set() if params.get("ignore_eos") else self.stop_ids)
        if output[-1] in stops:
            return "stop"
        if (
            params.get("stop")
            and self.detokenize is not None
            and stop_at(self.detokenize(output), params["stop"]) is not None
        ):
            return "stop"
        return "length" if len(output) >= max_tokens else None

    def _learn(
        self,
        role: str,
        inst: InstanceHandle,
        tokens: list[int],
        output: list[int],
        cached: int,
        believed: int,
        metrics: dict[str, Any],
    ) -> None:
        now = time.monotonic()
        if metrics.get("first_token") is not None and metrics.get("first_scheduled") is not None:
            self.cost.observe(len(tokens), cached, metrics["first_token"] - metrics["first_scheduled"])
        if not self._caches(role):
            return
        tree = self.trees[role]
        if cached < believed:  # the instance evicted part of what the tree believed it held
            tree.trim(inst.name, tokens, cached)
        kv = tokens if role == "prefill" else (tokens + output)[:-1]
        tree.insert(inst.name, kv, now)

    async def _relay(
        self, inst: InstanceHandle, body: dict[str, Any], output: list[int], box: dict[str, dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield ``inst``'s token events (appended to ``output``); its summary lands in ``box["summary"]``
        and its eviction report in the prompt tree."""
        async for event in self._stream(inst, body):
            if "token" in event:
                output.append(event["token"])
                yield event
            else:
                box["summary"] = event
                self._apply_removed(inst, event.get("removed", ()))
                if event.get("finish_reason") == "error":  # the engine failed it (see the instance's log)
                    raise SchedulerError(f"{inst.name} failed the request: its engine step raised")

    async def _stream(self, inst: InstanceHandle, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        s = await self.session()
        # instances send a keep-alive line every second: silence this long means a stalled instance
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.stall_timeout_s)
        try:
            async with s.post(inst.url + "/generate", json=body, timeout=timeout) as r:
                if r.status == 400:
                    raise RequestRefused(f"{inst.name} refused the request: {(await r.json()).get('error')}")
                if r.status == 503:
                    raise InstanceBusy(f"{inst.name} is busy: {(await r.json()).get('error')}")
                if r.status != 200:
                    raise SchedulerError(f"{inst.name} failed the request (HTTP {r.status})")
                done = False
                async for raw in r.content:
                    if raw.strip():
                        event = _event(raw)
                        done = done or bool(event.get("done"))
                        yield event
                if not done:
                    raise aiohttp.ClientPayloadError("the stream ended before the request did")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            what = f"no answer for {self.stall_timeout_s} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            if not await self._healthy(inst):
                self.mark_down(inst, what)
            raise InstanceLost(f"{inst.name} failed: {what}") from exc
