"""The single-instance engine: a request queue, prefill over the prefix cache, continuous batching.

Each :meth:`Engine.step` is either a prefill step (newly admitted requests, each computing only the
part of its prompt that the pool does not cache) or a decode step (one token for every running
request). Blocks are allocated as sequences grow; when the device runs out, the most recently
admitted request is preempted (its blocks swapped to the host, or freed for recomputation) and
resumes when room returns. A finished request's prompt and output are inserted into the pool's
index (context caching) before its own references are freed; its partly filled last block is
kept as a tail, so that a prompt continuing it (the next turn of a chat) computes only what is new.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mempool import Blocks, MemPool, PoolConfig, Tier
from mempool.errors import BlockLockedError, InvalidArgumentError, OutOfBlocksError
from mempool.index.keys import token_list

from . import cpu_attention
from .model import LlamaModel
from .paged import Chunk, StepInput
from .sampling import SEED_MASK, SamplingParams, TokenLogprob, reseed, sample_batch, shaped, stop_at, token_logprobs
from .sequence import Metrics, Sequence, State

PREEMPTION_MODES = ("swap", "recompute")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Engine knobs. ``caching`` switches context caching; ``preemption`` is ``swap`` or ``recompute``
    (``swap`` recomputes too where the pool has no host tier)."""

    block_size: int = 16
    device_blocks: int = 2048
    host_blocks: int = 2048
    kv_dtype: str | None = None  # None: the model's dtype
    caching: bool = True
    preemption: str = "swap"
    max_running: int = 32
    max_prefill_tokens: int = 4096
    # cache namespace (a model or adapter id); None: the pool's default namespace where the engine
    # makes its pool, and one named after the model's fingerprint where it is given one (shared)
    namespace: str | None = None
    seed: int = 0
    # CPU float32: linears on oneDNN-packed weight copies (decode at batch 16 ~2x faster, prefill
    # ~1.7x), at the cost of a second copy of those weights in memory; see memserve.model.Linear
    pack_weights: bool = True
    # CPU float32 with int8 dot products: a greedy request's token comes from an int8 screen of the
    # vocabulary projection plus a float32 recheck of the few candidates (the float32 argmax, a
    # quarter of the bytes read); needs pack_weights. See memserve.model.Linear.argmax.
    # Both are set on the model object (LlamaModel.pack): engines sharing one model run with the
    # setting of the last one built (the tokens are the same either way; only the speed differs)
    screen_greedy: bool = True
    # CPU float32: decode attention reads each sequence's K/V straight from its blocks (a numba
    # kernel, memserve.cpu_attention) instead of gathering them for SDPA (batch-16 steps 7-14%
    # faster); off, or where the kernel cannot serve: gather + SDPA
    decode_kernel: bool = True
    # CPU float32 with packed weights: at start, run the model's linears once for every step of up
    # to this many tokens (and the vocabulary screen for every batch up to max_running), so that
    # no request pays oneDNN's one-time set-up for a step size it has not seen yet (measured: a
    # turn of 30-37 new tokens over 500 cached, 36 ms the first time, 22 ms after); 0: off.
    # 0.5-1.4 s for the default model, ~0.3 s for another of its shapes in the same process
    warm_up_tokens: int = 64

    def __post_init__(self) -> None:
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}")
        for name in ("block_size", "device_blocks", "max_running", "max_prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warm_up_tokens, bool) or not isinstance(self.warm_up_tokens, int) or self.warm_up_tokens < 0:
            raise ValueError(f"warm_up_tokens must be an int >= 0, got {self.warm_up_tokens!r}")
        for name in ("caching", "pack_weights", "screen_greedy", "decode_kernel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def pool_config(self, model: LlamaModel) -> PoolConfig:
        """The :class:`PoolConfig` whose KV layout fits ``model``."""
        c = model.config
        return PoolConfig(
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            block_size=self.block_size,
            device_blocks=self.device_blocks,
            host_blocks=self.host_blocks,
            dtype=self.kv_dtype or c.dtype,
            device=str(model.device),
        )


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: Metrics
    logits: torch.Tensor | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.., with a request's first token


def _scores_prompt(seq: Sequence) -> bool:
    """Whether ``seq`` asks for its prompt's log-probabilities and has none yet (no output: a
    request continued elsewhere was scored where it began)."""
    return seq.params.prompt_logprobs is not None and len(seq.tokens) == seq.prompt_len


class Engine:
    """Runs requests on ``model`` with KV in ``pool`` (created from ``config`` when not given).

    A ``pool`` given (shared with other engines) keeps this model's cached K/V apart: they go
    under ``config.namespace``, or else one named after the model's fingerprint (engines of the
    same weights share it; :attr:`namespace` says which).

    ``stop_ids``: the tokenizer's end-of-answer tokens (EOS); ``detokenize``: token ids to their
    UTF-8 bytes, needed only by requests with ``stop`` strings.

    Not thread-safe: one caller drives :meth:`step` (the server runs it in one worker thread).
    """

    def __init__(
        self,
        model: LlamaModel,
        config: EngineConfig | None = None,
        pool: MemPool | None = None,
        *,
        stop_ids: Iterable[int] = (),
        detokenize: Callable[[list[int]], bytes] | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        layout = config.pool_config(model).layout
        if not layout.dtype.is_floating_point:  # type: ignore[union-attr]
            # the model writes float K/V, which an integer tier truncates: other tokens, silently
            raise InvalidArgumentError(
                f"the KV dtype must be floating point (no quantization here), got {layout.dtype}"
            )
        # now: the first request must not pay for it
        self.model = model.pack(config.pack_weights, screen=config.screen_greedy)
        if config.decode_kernel and self.model.device.type == "cpu":
            cpu_attention.available()  # compiled, or loaded from numba's cache, now
        self.model.warm_up(config.warm_up_tokens, min(config.max_running, config.warm_up_tokens))
        self._owns_pool = pool is None
        self.pool = pool or MemPool(config.pool_config(model))
        if self.pool.config.layout != layout:
            raise InvalidArgumentError("the pool's KV layout does not fit the model")
        # where engines share a pool, another model's K/V must never serve this one's prompts
        # (the same shapes fit: before, they did, and gave other tokens silently)
        self.namespace = config.namespace
        if self.namespace is None and pool is not None:
            self.namespace = f"memserve-{model.fingerprint()}"
        self.block_size = self.pool.config.block_size
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.detokenize = detokenize  # token ids -> UTF-8 bytes: needed by requests with ``stop`` strings
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self._by_id: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.steps = {"prefill": 0, "decode": 0}
        self._stalled = False  # the last step could start nothing, and nothing runs to free room
        self.in_step: list[Sequence] = []  # the batch of the step under way (what a failed step ran)

    # -- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Iterable[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        prompt_len: int | None = None,
        kv: Blocks | None = None,
        hold: bool = False,
    ) -> str:
        """Queue a request; returns its id.

        ``prompt_len`` (default: all of ``prompt``) says where the prompt ends when ``prompt`` also
        carries output generated elsewhere (a decode instance continuing a prefill instance's
        request); ``max_tokens`` counts that output too. ``kv``: device blocks already holding the
        K/V of ``prompt[:-1]`` (one per ``block_size`` tokens); the engine takes over the caller's
        references and the request starts decoding at once. ``hold``: when the request finishes,
        keep its blocks (cached, if caching is on) until :meth:`release`, so that the caller can
        send them elsewhere.

        Raises:
            InvalidArgumentError: empty prompt, a prompt that is not int ids (floats, strings, ...:
                ``InvalidTokensError``), ids (prompt or ``logit_bias``) outside the vocabulary, a duplicate id
                (or one that is not a str), ``params`` that are not ``SamplingParams``, a
                request that could not fit in the device tier even alone, ``kv`` of the wrong size,
                of another pool or not allocated (``ForeignBlockError``, ``BlockNotAllocatedError``),
                or ``stop`` strings on an engine built without ``detokenize``.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(f"params must be SamplingParams, got {type(params).__name__}")
        if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int)):
            raise InvalidArgumentError(f"prompt_len must be an int, got {prompt_len!r}")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidArgumentError(f"request_id must be a str, got {request_id!r}")
        tokens = token_list(prompt)
        vocab = self.model.config.vocab_size
        if not tokens:
            raise InvalidArgumentError("the prompt is empty")
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise InvalidArgumentError(f"prompt token ids must be in [0, {vocab})")
        plen = len(tokens) if prompt_len is None else prompt_len
        if not 0 < plen <= len(tokens) or len(tokens) - plen >= params.max_tokens:
            raise InvalidArgumentError(f"prompt_len={prompt_len} does not fit {len(tokens)} tokens and max_tokens")
        need = -(-(plen + params.max_tokens) // self.block_size)
        if need > self.pool.config.device_blocks:
            raise InvalidArgumentError(
                f"prompt + max_tokens need {need} blocks; the device tier has {self.pool.config.device_blocks}"
            )
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidArgumentError(f"logit_bias token ids must be in [0, {vocab})")
        if params.stop and self.detokenize is None:
            raise InvalidArgumentError("stop strings need an engine built with detokenize (token ids -> bytes)")
        if kv is not None and (kv.tier is not Tier.DEVICE or len(kv) != -(-(len(tokens) - 1) // self.block_size)):
            raise InvalidArgumentError(f"kv must be the device blocks of the first {len(tokens) - 1} tokens")
        if kv is not None:  # this pool's and allocated: the step writes the request's K/V into them
            self.pool.check_held(kv)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._by_id or rid in self.held:
            raise InvalidArgumentError(f"request id {rid!r} is in use")
        seed = params.seed if params.seed is not None else zlib.crc32(f"{self.config.seed}/{rid}".encode())
        gen = None if params.greedy else torch.Generator().manual_seed(seed & SEED_MASK)
        seq = Sequence(rid, tokens, plen, params, gen, seed, hold=hold)
        self._by_id[rid] = seq
        if kv is None:
            self.waiting.append(seq)
        else:
            seq.own, seq.num_computed, seq.state = kv, len(tokens) - 1, State.RUNNING
            seq.metrics.first_scheduled = seq.metrics.first_token = _now()
            self.running.append(seq)
        return rid

    def held_kv(self, request_id: str) -> tuple[list[int], Blocks]:
        """A held request's tokens that have K/V and the device blocks holding them (its block table).

        The blocks stay valid until :meth:`release`. Raises ``InvalidArgumentError`` if not held.
        """
        seq = self.held.get(request_id)
        if seq is None:
            raise InvalidArgumentError(f"request {request_id!r} is not held")
        n = seq.num_computed
        return seq.tokens[:n], Blocks(Tier.DEVICE, seq.table[: -(-n // self.block_size)])

    def release(self, request_id: str) -> bool:
        """Drop a held request's blocks (its cached prefix stays in the index); ``False`` if not held."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self._release(seq, cache=False)  # inserted when it finished
        return True

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is, releasing its blocks; ``False`` if unknown or finished."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        for queue in (self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, "abort", cache=False)
        return True

    def has_work(self) -> bool:
        """Whether any request is waiting, running or swapped out (held ones are done)."""
        return bool(self.waiting or self.running or self.swapped)

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; returns the tokens it produced (empty when idle)."""
        self._stalled = False
        self._resume_swapped()
        batch = self._admit()
        if batch:
            self.steps["prefill"] += 1
        else:
            batch = self._grow_running()
            if not batch:
                if self.swapped and not self.running:
                    self._unstick()  # (progress: its blocks are free for the next step)
                else:
                    self._stalled = bool(self.waiting) and not self.running
                return []
            self.steps["decode"] += 1
        return self._run(batch)

    def _unstick(self) -> None:
        """Nothing runs and the oldest swapped request cannot swap back in (other swapped requests'
        locked prefixes fill the device): recompute it instead, so the engine always progresses."""
        seq = self.swapped.popleft()
        self._release(seq, cache=False)
        seq.num_computed, seq.state = 0, State.WAITING
        self.waiting.appendleft(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Run ``prompts`` to completion; returns each one's output tokens, in order.

        Raises:
            OutOfBlocksError: a request cannot start and nothing in this engine runs to free a
                block (the pool's blocks are held elsewhere: by another engine on a shared pool,
                say); the call's requests are aborted. :meth:`step` waits instead.
        """
        ids = [self.add_request(p, params) for p in prompts]
        out: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            outputs = self.step()
            self.raise_if_stalled(outputs, ids)
            for o in outputs:
                if o.request_id in out:
                    out[o.request_id] += o.new_token_ids
        return [out[i] for i in ids]

    @property
    def stalled(self) -> bool:
        """Whether the last :meth:`step` could start no waiting request while nothing runs or is
        swapped out to free room: the pool's blocks are held elsewhere."""
        return self._stalled

    def raise_if_stalled(self, outputs: list[RequestOutput], request_ids: Iterable[str]) -> None:
        """For loops that drive :meth:`step` to the end: after a step that gave ``outputs``, where
        the engine is :attr:`stalled`, abort ``request_ids`` and raise ``OutOfBlocksError`` (a loop
        would wait for good)."""
        if outputs or not self.stalled:
            return
        for rid in request_ids:
            self.abort(rid)
        raise OutOfBlocksError(
            f"the pool has no room for a waiting request and this engine runs nothing that would free any "
            f"({self.pool.stats()['device']['used']} device blocks are in use elsewhere)"
        )

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        try:
            while self.waiting and len(self.running) + len(admitted) < self.config.max_running and not self.swapped:
                seq = self.waiting[0]
                if admitted and len(seq.tokens) > budget:
                    break
                if not self._allocate(seq):
                    break
                self.waiting.popleft()
                budget -= len(seq.tokens) - seq.num_computed
                admitted.append(seq)
                if budget <= 0:
                    break
        finally:  # those admitted before a failure are running (a failed step ends them), not lost
            self.running += admitted
        return admitted

    def _allocate(self, seq: Sequence) -> bool:
        """Match the cached prefix and allocate blocks for the rest; all or nothing."""
        bs = self.block_size
        match = None
        # keep at least one token to compute: its logits pick the next token; a prompt to score is
        # computed whole (the cache holds K/V, not the logits of its positions)
        if self.config.caching and not _scores_prompt(seq):
            match = self.pool.match(seq.tokens[:-1], self.namespace, promote=True)
        hit = 0 if match is None else len(match.blocks)
        try:
            own = self.pool.alloc(-(-len(seq.tokens) // bs) - hit)
        except BaseException:  # (an eviction's copy to the host failed) the request waits, holding nothing
            if match is not None:
                match.release()
            raise
        if own is None:
            if match is not None:
                match.release()
            return False
        extra = 0
        if match is not None:  # the K/V of a few more tokens, from a finished sequence's last block
            try:
                extra = self.pool.copy_tail(seq.tokens[:-1], hit * bs, own[:1], self.namespace)
            except BaseException:  # (the copy failed) likewise
                match.release()
                self.pool.free(own)
                raise
        seq.match, seq.prefix_blocks, seq.own = match, hit, own
        seq.num_computed = hit * bs + extra
        if seq.metrics.first_scheduled is None:
            seq.metrics.first_scheduled = _now()
            seq.metrics.cached_tokens = seq.num_computed
        seq.state = State.RUNNING
        return True

    def _grow_running(self) -> list[Sequence]:
        """Make room for every running sequence's next token, preempting from the back if needed."""
        bs = self.block_size
        ready: list[Sequence] = []
        seq = victim = None
        try:
            while self.running:
                seq = self.running.pop(0)
                while seq.state is State.RUNNING and len(seq.table) * bs < len(seq.tokens):
                    more = self.pool.alloc(1)
                    if more is not None:
                        assert seq.own is not None
                        seq.own = seq.own.concat(more)
                        continue
                    victim = self.running.pop() if self.running else seq
                    self._preempt(victim)
                    victim = None
                if seq.state is State.RUNNING:
                    ready.append(seq)
                seq = None
        except BaseException:  # (a failed copy) every request in hand runs again, for the failed step to end
            held = [s for s in (seq, victim) if s is not None and s.state is State.RUNNING]
            self.running = ready + list(dict.fromkeys(held)) + self.running
            raise
        self.running = ready
        return ready

    def _preempt(self, seq: Sequence) -> None:
        seq.metrics.preemptions += 1
        # swapping needs a host tier: a pool without one recomputes
        if self.config.preemption == "swap" and self.pool.config.host_blocks and seq.own is not None and len(seq.own):
            try:
                host = self.pool.swap_out(seq.own)
            except BlockLockedError:  # its cached blocks are in use by another request: recompute instead
                host = None
            if host is not None:
                seq.own, seq.swapped, seq.state = None, host, State.SWAPPED
                self.swapped.append(seq)
                return
        self._release(seq, cache=self.config.caching)  # recompute later, from the cache where it holds
        seq.num_computed, seq.state = 0, State.WAITING
        self.waiting.appendleft(seq)

    def _resume_swapped(self) -> None:
        while self.swapped and len(self.running) < self.config.max_running:
            seq = self.swapped[0]
            assert seq.swapped is not None
            back = self.pool.swap_in(seq.swapped)
            if back is None:
                return
            self.swapped.popleft()
            seq.own, seq.swapped, seq.state = back, None, State.RUNNING
            self.running.append(seq)

    def _run(self, batch: list[Sequence]) -> list[RequestOutput]:
        batch = self.in_step = list(batch)  # finished sequences leave self.running while we walk the batch
        chunks = [Chunk(s.tokens[s.num_computed :], s.num_computed, s.table) for s in batch]
        step = StepInput.build(chunks, self.block_size, self.model.device)
        scored = [i for i, s in enumerate(batch) if s.num_computed == 0 and _scores_prompt(s)]
        hidden = self.model(
            step,
            self.pool.kv(Tier.DEVICE),
            all_logits=bool(scored),
            hidden_only=True,
            in_place=self.config.decode_kernel,
        )
        prompt_lps: dict[int, list[TokenLogprob]] = {}
        if scored:  # every position's hidden state: those of the prompts to score, the last ones to pick from
            for i in scored:
                start, n, _ = step.spans[i]
                prompt_lps[i] = self._prompt_logprobs(batch[i], hidden[start : start + n - 1])
            hidden = hidden[step.last]
        tokens, logits, logprobs = self._pick(batch, hidden)
        outputs = []
        now = None
        for i, (seq, token) in enumerate(zip(batch, tokens)):
            seq.metrics.computed_tokens += len(chunks[i].tokens)
            seq.num_computed = len(seq.tokens)
            if self.config.caching and len(chunks[i].tokens) > 1:
                self._cache(seq, tail=False)  # a prefill's whole blocks are reusable now, by requests beside it
            seq.tokens.append(token)
            row = logits[i]
            if row is not None:
                seq.logits.append(row)
            if seq.metrics.first_token is None:
                seq.metrics.first_token = now = now or _now()
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason, cache=self.config.caching)
            lp = logprobs[i]
            outputs.append(
                RequestOutput(
                    seq.id,
                    [token],
                    reason is not None,
                    reason,
                    seq.metrics,
                    row,
                    None if lp is None else [lp],
                    prompt_lps.get(i),
                )
            )
        self.in_step = []
        return outputs

    def _pick(
        self, batch: list[Sequence], hidden: torch.Tensor
    ) -> tuple[list[int], list[torch.Tensor | None], list[TokenLogprob | None]]:
        """Each sequence's next token, and its logits row and log-probabilities where it asked for
        them. Greedy rows that want neither take the model's greedy pick (no full vocabulary
        projection); the rest are sampled from their logits."""
        tokens: list[int] = [0] * len(batch)
        rows: list[torch.Tensor | None] = [None] * len(batch)
        lps: list[TokenLogprob | None] = [None] * len(batch)
        wants = [
            s.params.return_logits or s.params.logprobs is not None or s.params.shapes_logits or not s.params.greedy
            for s in batch
        ]
        full = [i for i, want in enumerate(wants) if want]
        picks = [i for i, want in enumerate(wants) if not want]
        if picks:
            for i, token in zip(picks, self.model.greedy(hidden[picks] if full else hidden)):
                tokens[i] = token
        if full:
            logits = self.model.logits(hidden[full])
            seqs = [batch[i] for i in full]
            gens = [None if s.generator is None else reseed(s.generator, s.seed, len(s.output)) for s in seqs]
            scores = logits
            if any(s.params.shapes_logits for s in seqs):  # penalties, bias: on a copy, logits stay the model's
                scores = torch.stack(
                    [shaped(r, s.output, s.params) if s.params.shapes_logits else r for r, s in zip(logits, seqs)]
                )
            for j, (i, token) in enumerate(zip(full, sample_batch(scores, [s.params for s in seqs], gens))):
                tokens[i] = token
                if batch[i].params.return_logits:
                    rows[i] = logits[j].clone()
            asked = [j for j, s in enumerate(seqs) if s.params.logprobs is not None]
            if asked:
                got = token_logprobs(
                    logits[asked], [tokens[full[j]] for j in asked], [int(seqs[j].params.logprobs or 0) for j in asked]
                )
                for j, lp in zip(asked, got):
                    lps[full[j]] = lp
        return tokens, rows, lps

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[TokenLogprob]:
        """Log-probabilities of ``seq``'s prompt tokens 1.. from the hidden states of positions
        0.. before them, projected 64 rows at a time (a row of logits is 0.5 MB here)."""
        k = int(seq.params.prompt_logprobs or 0)
        out: list[TokenLogprob] = []
        for a in range(0, hidden.shape[0], 64):
            rows = hidden[a : a + 64]
            out += token_logprobs(
                self.model.logits(rows), seq.tokens[a + 1 : a + 1 + rows.shape[0]], [k] * rows.shape[0]
            )
        return out

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.stop_ids):
            return "stop"
        if seq.params.stop and self._completes_stop_string(seq, token):
            return "stop"
        if len(seq.tokens) - seq.prompt_len >= seq.params.max_tokens:
            return "length"
        return None

    def _completes_stop_string(self, seq: Sequence, token: int) -> bool:
        """Whether ``token``, the last of ``seq``'s output, completes one of its ``stop`` strings."""
        assert self.detokenize is not None  # add_request refuses stop strings otherwise
        if seq.text is None:  # the output before this token, some of it perhaps generated elsewhere
            seq.text = bytearray(self.detokenize(seq.output[:-1]))
        since = len(seq.text)
        seq.text += self.detokenize([token])
        return stop_at(seq.text, seq.params.stop, since) is not None

    # -- releasing ---------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, *, cache: bool) -> None:
        if seq.hold and reason != "abort":
            if cache:
                self._cache(seq)
            self.held[seq.id] = seq
        else:
            self._release(seq, cache=cache)
        seq.state, seq.finish_reason = State.FINISHED, reason
        seq.metrics.finished = _now()
        del self._by_id[seq.id]

    def _release(self, seq: Sequence, *, cache: bool) -> None:
        """Cache the sequence's full computed blocks (if ``cache``), then drop its locks and references
        (those go even if caching fails: a failed insert must not also leak the request's blocks)."""
        try:
            if cache:
                self._cache(seq)
        finally:
            match, own, swapped = seq.match, seq.own, seq.swapped
            seq.match, seq.own, seq.swapped, seq.prefix_blocks = None, None, None, 0
            if match is not None:
                match.release()
            for blocks in (own, swapped):
                if blocks is not None and len(blocks):
                    self.pool.free(blocks)

    def _cache(self, seq: Sequence, *, tail: bool = True) -> None:
        """Insert the sequence's full computed blocks into the index (context caching), and with
        ``tail`` (the sequence writes no more) keep its partly filled last block as a tail."""
        if seq.own is None:
            return
        n = seq.num_computed if tail else seq.num_computed - seq.num_computed % self.block_size
        table = Blocks(Tier.DEVICE, seq.table[: -(-n // self.block_size)])
        self.pool.insert_sequence(seq.tokens[:n], table, self.namespace)

    def close(self) -> None:
        """Abort every request, release held ones; close the pool if the engine created it."""
        for rid in list(self._by_id):
            self.abort(rid)
        for rid in list(self.held):
            self.release(rid)
        if self._owns_pool:
            self.pool.close()


def _now() -> float:
    return time.perf_counter()
