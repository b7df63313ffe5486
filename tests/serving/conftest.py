"""Factories for the memserve tests: a tiny model, engines over small pools, random prompts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from memserve import Engine, EngineConfig, LlamaModel, SamplingParams, preset


@pytest.fixture(scope="session")
def tiny_model() -> LlamaModel:
    return LlamaModel(preset("tiny", init_std=0.1)).init_random(seed=1)


@pytest.fixture
def make_engine(tiny_model: LlamaModel) -> Callable[..., Engine]:
    engines: list[Engine] = []

    def make(**kw: Any) -> Engine:
        kw.setdefault("block_size", 4)
        kw.setdefault("device_blocks", 256)
        kw.setdefault("host_blocks", 256)
        engine = Engine(tiny_model, EngineConfig(**kw))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def make_prompts(lengths: list[int], vocab: int = 512, seed: int = 0, shared: int = 0) -> list[list[int]]:
    """Random prompts of ``lengths``; the first ``shared`` tokens are common to all of them."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, vocab, (shared,), generator=gen).tolist()
    return [head + torch.randint(0, vocab, (n - shared,), generator=gen).tolist() for n in lengths]


def run(
    engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Run ``prompts`` together (``params`` for all, or one each); each one's output tokens and
    stacked per-step logits. The pool's invariants are checked after every step, and an engine
    that stops making progress fails here instead of looping."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, each, strict=True)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    logits: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
    for _ in range(20 * sum(q.max_tokens for q in each) + 20):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.logits is not None:
                logits[out.request_id].append(out.logits)
        engine.pool.check_invariants()
    assert not engine.has_work(), "the engine stopped making progress"
    return [tokens[i] for i in ids], [torch.stack(logits[i]) if logits[i] else torch.empty(0) for i in ids]


def reference(model: LlamaModel, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and logits by full recompute: every step re-runs the whole sequence, no cache."""
    tokens, rows = list(prompt), []
    for _ in range(n):
        engine = Engine(model, EngineConfig(block_size=4, device_blocks=256, host_blocks=0, caching=False))
        out, logits = run(engine, [tokens], SamplingParams(max_tokens=1, ignore_eos=True, return_logits=True))
        engine.close()
        tokens += out[0]
        rows.append(logits[0][0])
    return tokens[len(prompt) :], torch.stack(rows)


def assert_no_leaks(engine: Engine) -> None:
    """Invariants hold and, with every request done, only the index holds device blocks."""
    assert not engine.has_work()
    engine.pool.check_invariants()
    stats = engine.pool.stats()
    for tier in ("device", "host"):
        if tier in stats:
            assert stats[tier]["used"] == stats[tier]["cached"], stats
            assert stats[tier]["evictable"] == stats[tier]["cached"], stats  # no lock left behind
