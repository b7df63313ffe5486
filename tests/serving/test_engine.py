"""The engine gives the tokens of a plain full recompute in every mode, and leaks nothing."""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from mempool import Blocks, Tier
from mempool.errors import BlockLockedError, InvalidArgumentError, OutOfBlocksError
from memserve import Engine, EngineConfig, LlamaModel, SamplingParams, preset
from memserve.sampling import argmax_rows
from tests.conftest import DEVICES

from .conftest import assert_no_leaks, make_prompts, reference, run

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True, return_logits=True)
TOL = dict(rtol=1e-4, atol=1e-5)


def test_single_request_equals_full_recompute(tiny_model, make_engine: Callable[..., Engine]) -> None:
    prompt = make_prompts([23])[0]
    want_tokens, want_logits = reference(tiny_model, prompt, GREEDY.max_tokens)
    engine = make_engine(caching=False)
    tokens, logits = run(engine, [prompt], GREEDY)
    assert tokens == [want_tokens]
    torch.testing.assert_close(logits[0], want_logits, **TOL)
    assert_no_leaks(engine)


def test_cached_prefix_equals_recompute(make_engine: Callable[..., Engine]) -> None:
    first, second = make_prompts([40, 52], shared=36, seed=1)
    cold = make_engine(caching=False)
    want, want_logits = run(cold, [second], GREEDY)
    engine = make_engine(caching=True)
    run(engine, [first], GREEDY)
    rid = engine.add_request(second, GREEDY)
    tokens, logits = [], []
    while engine.has_work():
        for out in engine.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
            cached = out.metrics.cached_tokens
    assert cached == 36 and rid  # 9 whole blocks of the shared 36-token head came from the cache
    assert tokens == want[0]
    torch.testing.assert_close(torch.stack(logits), want_logits[0], **TOL)
    assert_no_leaks(engine)


def test_multi_turn_hits_previous_output(make_engine: Callable[..., Engine]) -> None:
    """Turn 2 = turn 1's prompt + reply + a new message: every token of turn 1 with K/V is cached
    (the whole blocks in the index, the rest in the tail of turn 1's last block)."""
    engine = make_engine(caching=True)
    turn1 = make_prompts([30], seed=2)[0]
    reply = engine.generate([turn1], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    turn2 = turn1 + reply + make_prompts([9], seed=3)[0]
    rid = engine.add_request(turn2, SamplingParams(max_tokens=4, ignore_eos=True))
    outs = [o for _ in range(20) for o in engine.step() if o.request_id == rid]
    assert outs[0].metrics.cached_tokens == len(turn1) + len(reply) - 1 == 41
    assert engine.pool.stats()["index"]["tail_tokens"] == 41 % 4
    want = make_engine(caching=False).generate([turn2], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert [t for o in outs for t in o.new_token_ids] == want
    assert_no_leaks(engine)


def test_swapped_out_and_back_prefix_equals_recompute(make_engine: Callable[..., Engine]) -> None:
    first, second = make_prompts([44, 50], shared=40, seed=4)
    want, want_logits = run(make_engine(caching=False), [second], GREEDY)
    engine = make_engine(caching=True)
    run(engine, [first], GREEDY)
    pool = engine.pool
    cached = pool.stats()["device"]["cached"]
    assert pool.evict(cached) == cached  # every cached device block demoted to the host tier
    assert pool.stats()["device"]["cached"] == 0 and pool.stats()["host"]["cached"] >= 10
    # scribble over the freed device blocks: a stale read would show in the logits
    pool.kv("device").normal_()
    tokens, logits = run(engine, [second], GREEDY)
    assert pool.stats()["index"]["promoted"] >= 10
    assert tokens == want
    torch.testing.assert_close(logits[0], want_logits[0], **TOL)
    assert_no_leaks(engine)


def test_mixed_batch_equals_one_at_a_time(make_engine: Callable[..., Engine]) -> None:
    prompts = make_prompts([3, 17, 40, 33, 64, 8], seed=5)
    alone = [run(make_engine(caching=False), [p], GREEDY) for p in prompts]
    engine = make_engine(caching=False)
    tokens, logits = run(engine, prompts, GREEDY)
    assert engine.steps["decode"] < sum(len(t) for t in tokens)  # decode steps really were batched
    for (want, want_logits), got, got_logits in zip(alone, tokens, logits):
        assert got == want[0]
        torch.testing.assert_close(got_logits, want_logits[0], **TOL)
    assert_no_leaks(engine)


@pytest.mark.parametrize("preemption,host_blocks", [("swap", 64), ("recompute", 64), ("swap", 0)])
@pytest.mark.parametrize("caching", [False, True])
def test_preemption_under_memory_pressure_keeps_tokens(
    make_engine: Callable[..., Engine], preemption: str, host_blocks: int, caching: bool
) -> None:
    """host_blocks=0: swap preemption recomputes, with no host tier to swap to (it raised
    TierUnavailableError from the step before)."""
    prompts = make_prompts([20, 28, 36, 24, 30], seed=6)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = make_engine(caching=False).generate(prompts, params)
    engine = make_engine(caching=caching, preemption=preemption, device_blocks=40, host_blocks=host_blocks)
    got, preempted = _with_preemptions(engine, prompts, params)
    assert preempted > 0  # the pool really ran out
    assert got == want
    assert_no_leaks(engine)


def _with_preemptions(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], int]:
    """Each prompt's output tokens, run together, and how many preemptions the requests met
    (the pool's invariants checked after every step)."""
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    preempted = 0
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                preempted += out.metrics.preemptions
        engine.pool.check_invariants()
    return [got[i] for i in ids], preempted


def test_a_swapped_request_that_cannot_come_back_is_recomputed(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests over two different cached prefixes on a device tier that holds both prefixes
    and little else. Each swapped request keeps its prefix locked on the device, so once both are
    swapped out neither may fit back in; the engine must then recompute one (free it, requeue it)
    rather than stop, and both must end with the tokens of a plain recompute."""
    engine = make_engine(caching=True, preemption="swap", device_blocks=20, host_blocks=64)
    p1, p2 = make_prompts([24, 24], seed=3)
    engine.generate([p1, p2], SamplingParams(max_tokens=1, ignore_eos=True))  # caches both prefixes
    unstuck: list[str] = []
    unstick = engine._unstick
    monkeypatch.setattr(engine, "_unstick", lambda: (unstuck.append(engine.swapped[0].id), unstick())[1])
    params = SamplingParams(max_tokens=50, ignore_eos=True)  # 19 blocks each: fits the tier alone
    prompts = [p1 + [7], p2 + [9]]
    want = [make_engine(caching=False).generate([p], params)[0] for p in prompts]
    assert run(engine, prompts, params)[0] == want
    assert unstuck  # the case this test is for
    assert_no_leaks(engine)


def test_a_victim_whose_blocks_another_request_locked_is_recomputed(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill's blocks are cached at once, so a later request may lock them as its prefix;
    preempting the first by swapping its blocks out is then refused (BlockLockedError) and the
    engine recomputes it instead. (A seeded workload that meets this case.)"""
    rng = random.Random(13)
    heads = make_prompts([rng.randint(8, 24), rng.randint(8, 24)], seed=13)
    n = rng.randint(4, 9)
    prompts = [rng.choice(heads) + make_prompts([rng.randint(1, 12)], seed=13_000 + i)[0] for i in range(n)]
    lengths = [rng.randint(4, 24) for _ in prompts]
    engine = make_engine(
        caching=True,
        preemption="swap",
        device_blocks=rng.randint(16, 40),
        host_blocks=rng.choice([8, 16, 64]),
        max_running=rng.randint(2, 6),
    )
    refused: list[int] = []
    swap_out = engine.pool.swap_out

    def spy(blocks: Any) -> Any:
        try:
            return swap_out(blocks)
        except BlockLockedError:
            refused.append(len(blocks))
            raise

    monkeypatch.setattr(engine.pool, "swap_out", spy)
    params = [SamplingParams(max_tokens=k, ignore_eos=True) for k in lengths]
    want = [make_engine(caching=False).generate([p], q)[0] for p, q in zip(prompts, params)]
    assert run(engine, prompts, params)[0] == want
    assert refused  # the case this test is for
    assert_no_leaks(engine)


def test_random_workload_matches_reference(make_engine: Callable[..., Engine]) -> None:
    """Seeded stress: shared prefixes, staggered arrivals, a small pool, invariants after every step."""
    rng = random.Random(7)
    heads = make_prompts([12, 24], seed=8)
    prompts = [rng.choice(heads) + make_prompts([rng.randint(1, 20)], seed=100 + i)[0] for i in range(14)]
    lengths = [rng.randint(1, 16) for _ in prompts]
    want = [
        make_engine(caching=False).generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        for p, n in zip(prompts, lengths)
    ]
    engine = make_engine(caching=True, device_blocks=48, host_blocks=24, max_running=5)
    got: dict[str, list[int]] = {}
    pending = list(range(len(prompts)))
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop(0)
                got[
                    engine.add_request(prompts[i], SamplingParams(max_tokens=lengths[i], ignore_eos=True), f"r{i}")
                ] = []
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        engine.pool.check_invariants()
    assert [got[f"r{i}"] for i in range(len(prompts))] == want
    assert_no_leaks(engine)


@pytest.mark.parametrize("seed", range(40))
def test_random_configurations_give_the_reference_tokens(make_engine: Callable[..., Engine], seed: int) -> None:
    """A random engine configuration (block size, tight pools with or without a host tier,
    preemption mode, batch and prefill limits, the decode kernel and greedy screen on or off,
    caching on or off) under a random multi-turn workload with aborts: every finished turn has
    the tokens of a full recompute, invariants hold after every step, nothing leaks."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 4, 5, 8, 16])
    # first: an engine packs the model it is given, and the engines here share one model object
    reference_engine = make_engine(caching=False, warm_up_tokens=0)
    engine = make_engine(
        block_size=bs,
        device_blocks=rng.randint(max(8, 60 // bs), max(10, 200 // bs)),
        host_blocks=rng.choice([0, rng.randint(4, 60)]),
        preemption=rng.choice(["swap", "recompute"]),
        max_running=rng.randint(1, 6),
        max_prefill_tokens=rng.choice([1, 8, 32, 4096]),
        decode_kernel=rng.random() < 0.5,
        screen_greedy=rng.random() < 0.7,
        caching=rng.random() < 0.85,
        warm_up_tokens=0,
    )
    capacity = engine.pool.config.device_blocks * bs - bs
    heads = [[rng.randrange(512) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    history = {
        i: rng.choice(heads) + [rng.randrange(512) for _ in range(rng.randint(1, 12))] for i in range(rng.randint(1, 5))
    }
    turns = {i: rng.randint(1, 4) for i in history}
    pending, active, got, finished, aborted = list(history), {}, {}, 0, 0
    for step in range(3000):
        if not (pending or active):
            break
        for i in [i for i in pending if rng.random() < 0.5]:
            pending.remove(i)
            n = rng.randint(1, 12)
            if len(history[i]) + n <= capacity:  # else the session ends
                rid = engine.add_request(history[i], SamplingParams(max_tokens=n, ignore_eos=True), f"s{i}-{step}")
                active[rid], got[rid] = (i, history[i], n), []
        if active and rng.random() < 0.03:  # an abort: the others stay exact
            rid = rng.choice(list(active))
            assert engine.abort(rid)
            i, _, _ = active.pop(rid)
            aborted += 1
            turns[i] -= 1
            pending += [i] if turns[i] else []
        for out in engine.step():
            if out.request_id not in active:
                continue
            got[out.request_id] += out.new_token_ids
            if out.finished:
                i, prompt, n = active.pop(out.request_id)
                params = SamplingParams(max_tokens=n, ignore_eos=True)
                assert got[out.request_id] == reference_engine.generate([prompt], params)[0], (i, len(prompt), n)
                finished += 1
                turns[i] -= 1
                history[i] = prompt + got[out.request_id] + [rng.randrange(512) for _ in range(rng.randint(1, 10))]
                pending += [i] if turns[i] else []
        engine.pool.check_invariants()
    assert not (pending or active) and finished + aborted == len(got)  # every request ended
    assert_no_leaks(engine)


def test_eos_stops_unless_ignored(make_engine: Callable[..., Engine], tiny_model) -> None:
    prompt = make_prompts([10], seed=9)[0]
    free_run = make_engine(caching=False).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    eos = free_run[3]
    stopping = Engine(tiny_model, make_engine().config, stop_ids=[eos])
    out = stopping.generate([prompt], SamplingParams(max_tokens=8))[0]
    assert out == free_run[: free_run.index(eos) + 1]
    assert stopping.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0] == free_run
    stopping.close()


def test_a_requests_stop_token_ids_end_it_even_with_ignore_eos(make_engine: Callable[..., Engine]) -> None:
    """``stop_token_ids`` are the request's own: ``ignore_eos`` (the tokenizer's EOS) leaves them on."""
    prompt = make_prompts([10], seed=9)[0]
    engine = make_engine(caching=False)
    free_run = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop = free_run[2]
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=8, ignore_eos=ignore_eos, stop_token_ids=(stop,))
        assert engine.generate([prompt], params)[0] == free_run[: free_run.index(stop) + 1]
    assert_no_leaks(engine)


def _ids_text(ids: list[int]) -> bytes:
    """A stand-in detokenizer: token 17 reads ``<17>``."""
    return b"".join(b"<%d>" % t for t in ids)


def test_stop_strings_end_a_request_at_the_token_that_completes_one(
    make_engine: Callable[..., Engine], tiny_model
) -> None:
    """A ``stop`` string ends the request at the token completing it, across token boundaries,
    counting output generated elsewhere (a prefill's, a failed instance's), before ``max_tokens``;
    the answer is cached as any finished one is."""
    prompt = make_prompts([10], seed=9)[0]
    free_run = make_engine(caching=False).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    config = make_engine(caching=True).config
    engine = Engine(tiny_model, config, detokenize=_ids_text)
    stop = f"{free_run[2]}><{free_run[3]}"  # the end of token 2 and the start of token 3
    k = next(k for k in range(1, 9) if stop.encode() in _ids_text(free_run[:k]))
    assert k == 4  # no earlier pair of tokens spells it
    want = free_run[:k]
    for max_tokens in (8, k):  # completed by the last allowed token: still a stop
        rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop=("zz", stop)))
        outs = [o for _ in range(20) for o in engine.step() if o.request_id == rid]
        assert [t for o in outs for t in o.new_token_ids] == want and outs[-1].finish_reason == "stop"
    # continued elsewhere: token 2 came with the prompt, token 3 completes the stop here
    rid = engine.add_request(prompt + free_run[:3], SamplingParams(max_tokens=8, stop=(stop,)), prompt_len=10)
    outs = [o for _ in range(20) for o in engine.step() if o.request_id == rid]
    assert [t for o in outs for t in o.new_token_ids] == want[3:] and outs[-1].finish_reason == "stop"
    # the stopped answer is cached: a next turn over it computes only its own new tokens
    turn2 = prompt + want + make_prompts([5], seed=3)[0]
    rid = engine.add_request(turn2, SamplingParams(max_tokens=2, ignore_eos=True))
    outs = [o for _ in range(20) for o in engine.step() if o.request_id == rid]
    assert outs[0].metrics.cached_tokens == len(prompt) + len(want) - 1
    assert_no_leaks(engine)
    engine.close()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_models_log_softmax_and_change_no_token(
    make_engine: Callable[..., Engine], temperature: float
) -> None:
    """Each token's log-probability (and its top ``k`` alternatives') is the log-softmax of the
    model's own logits at that step, before temperature; asking for them changes no token (a
    greedy request then takes the full projection instead of the screen)."""
    prompts = make_prompts([9, 21], seed=14)
    base = SamplingParams(max_tokens=6, ignore_eos=True, temperature=temperature, seed=3)
    engine = make_engine(caching=True)
    plain = engine.generate(prompts, base)
    asked = SamplingParams(max_tokens=6, ignore_eos=True, temperature=temperature, seed=3, logprobs=4)
    with_logits = SamplingParams(
        max_tokens=6, ignore_eos=True, temperature=temperature, seed=3, logprobs=4, return_logits=True
    )
    ids = [engine.add_request(prompts[0], asked), engine.add_request(prompts[1], with_logits)]
    outs: dict[str, list[Any]] = {i: [] for i in ids}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    for rid, want in zip(ids, plain):
        assert [t for o in outs[rid] for t in o.new_token_ids] == want
        for o in outs[rid]:
            (lp,) = o.logprobs
            assert lp.token == o.new_token_ids[0] and len(lp.top) == 4
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            if temperature == 0:  # greedy: the token is the most likely one
                assert lp.top[0] == (lp.token, lp.logprob)
    for o in outs[ids[1]]:  # against the logits the engine returned for the same step
        ref = torch.log_softmax(o.logits, -1)
        (lp,) = o.logprobs
        assert lp.logprob == pytest.approx(float(ref[lp.token]), abs=1e-5)
        values, top = ref.topk(4)
        assert [t for t, _ in lp.top] == top.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert_no_leaks(engine)


def test_prompt_logprobs_are_each_prompt_tokens_given_those_before_it(
    make_engine: Callable[..., Engine], tiny_model
) -> None:
    """Prompt token i's log-probability is the log-softmax of the logits a full recompute of
    tokens 0..i-1 gives; the prompt is computed whole even where it is cached (and cached after);
    the tokens are those of a request that asks for nothing; a request continued elsewhere (it
    has output already) is not scored again."""
    prompt = make_prompts([11], seed=16)[0]
    engine = make_engine(caching=True)
    plain = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]  # now cached
    rid = engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3))
    outs = [o for _ in range(20) for o in engine.step() if o.request_id == rid]
    assert [t for o in outs for t in o.new_token_ids] == plain
    assert outs[0].metrics.cached_tokens == 0 and all(o.prompt_logprobs is None for o in outs[1:])
    scored = outs[0].prompt_logprobs
    assert scored is not None and [x.token for x in scored] == prompt[1:]
    for i, x in enumerate(scored, start=1):
        _, logits = reference(tiny_model, prompt[:i], 1)
        ref = torch.log_softmax(logits[0], -1)
        assert x.logprob == pytest.approx(float(ref[prompt[i]]), abs=1e-4)
        assert [t for t, _ in x.top] == ref.topk(3).indices.tolist()
    again = engine.add_request(prompt + plain[:2], SamplingParams(max_tokens=4, prompt_logprobs=3), prompt_len=11)
    outs = [o for _ in range(20) for o in engine.step() if o.request_id == again]
    assert all(o.prompt_logprobs is None for o in outs) and outs[0].metrics.cached_tokens > 0
    assert_no_leaks(engine)


def test_penalties_and_bias_shape_each_pick_and_carry_over_a_handoff(make_engine: Callable[..., Engine]) -> None:
    """Each greedy pick is the argmax of the model's logits less the presence and frequency
    penalties of the output so far; a request continued elsewhere (prompt + output so far)
    penalises that output too; a bias of +100 makes a token every pick, -100 keeps it out."""
    prompt = make_prompts([12], seed=15)[0]
    engine = make_engine(caching=False)
    free = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    shaped = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=1.5, frequency_penalty=2.0)
    (out,), (logits,) = run(engine, [prompt], replace(shaped, return_logits=True))
    assert out != free
    for i, token in enumerate(out):  # (the logits returned are the model's own)
        row = logits[i].clone()
        for u in set(out[:i]):
            row[u] -= 1.5 + 2.0 * out[:i].count(u)
        assert token == int(row.argmax())
    rid = engine.add_request(prompt + out[:5], shaped, prompt_len=len(prompt))
    rest = [t for step in iter(engine.step, []) for o in step for t in o.new_token_ids if o.request_id == rid]
    assert rest == out[5:]
    for temperature in (0.0, 1.0):
        forced = SamplingParams(
            max_tokens=5, ignore_eos=True, temperature=temperature, seed=1, logit_bias=((7, 100.0),)
        )
        assert engine.generate([prompt], forced)[0] == [7] * 5
    banned = SamplingParams(max_tokens=12, ignore_eos=True, logit_bias=tuple((t, -100.0) for t in set(free)))
    assert not set(engine.generate([prompt], banned)[0]) & set(free)
    assert_no_leaks(engine)


def test_seeded_sampling_is_reproducible(make_engine: Callable[..., Engine]) -> None:
    prompts = make_prompts([12, 30], seed=10)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = make_engine().generate(prompts[:1], params)[0]
    together = make_engine().generate(prompts, params)[0]  # another request beside it changes nothing
    assert alone == together
    other = make_engine().generate(
        prompts[:1], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    )
    assert other[0] != alone


def test_a_seeded_request_continued_elsewhere_samples_the_same(make_engine: Callable[..., Engine]) -> None:
    """A handoff or a resume re-sends prompt + output so far; the sampler picks up where it was."""
    prompt = make_prompts([14], seed=12)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=7, ignore_eos=True)
    whole = make_engine().generate([prompt], params)[0]
    for cut in (1, 4, 9):
        rest = make_engine()
        rid = rest.add_request(prompt + whole[:cut], params, prompt_len=len(prompt))
        got = {rid: whole[:cut]}
        while rest.has_work():
            for out in rest.step():
                got[out.request_id] = got[out.request_id] + out.new_token_ids
        assert got[rid] == whole, cut


def test_bad_requests_change_nothing(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(device_blocks=16)
    before = engine.pool.stats()
    for prompt, params in [
        ([], None),
        ([1, 2, 512], None),
        ([-1], None),
        ([1.5, 2.0], None),  # floats: were truncated to ids 1 and 2
        (torch.tensor([1.0, 2.0]), None),
        ("1 2", None),
        ([[1, 2]], None),
        ([1] * 60, SamplingParams(max_tokens=10)),  # 70 tokens > 16 blocks of 4
        ([1, 2, 3], SamplingParams(max_tokens=2, stop=("x",))),  # stop strings, and no detokenize
        ([1, 2, 3], SamplingParams(max_tokens=2, logit_bias=((512, 1.0),))),  # outside the vocabulary
    ]:
        with pytest.raises(InvalidArgumentError):
            engine.add_request(prompt, params)
    small = SamplingParams(max_tokens=4)
    engine.add_request([1, 2, 3], small, "dup")
    with pytest.raises(InvalidArgumentError, match="in use"):
        engine.add_request([1, 2, 3], small, "dup")
    assert engine.pool.stats() == before and len(engine.waiting) == 1
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    for stop in ("ab", ("",), ("a", 5)):
        with pytest.raises(ValueError, match="stop"):
            SamplingParams(stop=stop)  # type: ignore[arg-type]
    for bad in ({"seed": 1.5}, {"seed": True}, {"temperature": "1"}, {"top_p": None}, {"stop_token_ids": (-1,)},
                {"stop_token_ids": ("a",)}, {"stop_token_ids": [2]}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)  # type: ignore[arg-type]
    for logprobs in (-1, 21, True, 2.0):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=logprobs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=logprobs)  # type: ignore[arg-type]
    for penalty in (2.5, -3, True, "1"):
        with pytest.raises(ValueError, match="penalty"):
            SamplingParams(frequency_penalty=penalty)  # type: ignore[arg-type]
    for bias in ([(1, 1.0)], ((1, 101.0),), ((-1, 1.0),), ((True, 1.0),), ((1, 1.0), (1, 2.0)), ((1,),)):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bias)  # type: ignore[arg-type]


def test_engine_settings_it_cannot_honour_are_refused(tiny_model: LlamaModel) -> None:
    """An integer KV dtype (int8, uint8: pool dtypes, for other engines' quantized K/V) ran: the
    model's float K/V were truncated into it and the tokens were other than the float model's,
    silently. Now refused, like non-bool switches ("no" was truthy: caching on) and a str seed."""
    for bad in ({"caching": "no"}, {"decode_kernel": 1}, {"pack_weights": None}, {"screen_greedy": "yes"},
                {"seed": "x"}, {"seed": True}, {"preemption": "SWAP"}, {"warm_up_tokens": -1}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)  # type: ignore[arg-type]
    for dtype in ("int8", "uint8", torch.int8):
        with pytest.raises(InvalidArgumentError, match="floating point"):
            Engine(tiny_model, EngineConfig(device_blocks=16, kv_dtype=dtype, warm_up_tokens=0))  # type: ignore[arg-type]
    for dtype in ("bfloat16", "float16", "float8_e4m3fn"):  # lower-precision float K/V: the caller's choice
        engine = Engine(tiny_model, EngineConfig(device_blocks=16, kv_dtype=dtype, warm_up_tokens=0))
        assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]) == 3
        engine.close()


def test_extreme_sampling_values_sample_and_leave_their_batch_alone(make_engine: Callable[..., Engine]) -> None:
    """A top_p below float32's least positive value (it rounds to 0 beside float32 sums) kept no
    token, so the step raised and every request batched with it ended; it now keeps the likeliest.
    A seed past 64 bits raised in add_request; any int seed now samples, reproducibly."""
    engine = make_engine()
    prompts = make_prompts([9, 14], seed=5)
    greedy, _ = run(engine, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    tiny = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, top_p=1e-300)
    got, _ = run(engine, prompts, [SamplingParams(max_tokens=6, ignore_eos=True), tiny])
    assert got == greedy  # the likeliest token at every step: greedy's
    for seed in (2**70, -(2**70), -1):
        params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=seed)
        first, _ = run(engine, prompts[:1], params)
        again, _ = run(engine, prompts[:1], params)
        assert first == again and len(first[0]) == 6
    assert_no_leaks(engine)


def test_abort_releases_everything(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(caching=True)
    prompts = make_prompts([20, 30], seed=11)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.pool.stats()["device"]["used"] > 0
    assert all(engine.abort(i) for i in ids) and not engine.abort(ids[0])
    assert_no_leaks(engine)
    # what stays cached is the prompts' whole blocks (indexed once prefilled), none of the aborted output
    assert engine.pool.stats()["device"]["cached"] == sum(len(p) // 4 for p in prompts)


def test_a_running_prefill_is_reusable_at_once(make_engine: Callable[..., Engine]) -> None:
    first, second = make_prompts([40, 45], shared=36, seed=13)
    engine = make_engine(caching=True)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    engine.add_request(first, params)
    engine.step()  # the first request's prefill; it keeps decoding
    rid = engine.add_request(second, params)
    (out,) = [o for o in engine.step() if o.request_id == rid]
    assert out.metrics.cached_tokens == 36  # served from the running request's blocks
    want = make_engine(caching=False).generate([second], params)[0]
    got = out.new_token_ids + [
        t for step in iter(engine.step, []) for o in step for t in o.new_token_ids if o.request_id == rid
    ]
    assert got == want
    assert_no_leaks(engine)


def test_greedy_argmax_agrees_with_torch_on_ties_and_nans() -> None:
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    x[1, 10] = x[1, 500] = x[1].max() + 1  # a tie: the first wins
    x[2, 7] = x[2, 9] = float("nan")  # a NaN counts as the maximum
    x[3] = 0.0
    x[4] = float("-inf")
    assert argmax_rows(x) == x.argmax(-1).tolist() == [int(x[0].argmax()), 10, 7, 0, 0]
    assert argmax_rows(x[1:2]) == [10]
    assert argmax_rows(x[:2].bfloat16()) == x[:2].bfloat16().argmax(-1).tolist()  # numpy has no bfloat16


def test_a_closed_engine_frees_its_pool_at_once(tiny_model, no_cyclic_gc: None) -> None:
    """Engines come and go within a process (benchmarks, tests, a reloaded model): dropping a
    closed one must give its pool's KV memory back there and then, not at the cyclic collector's
    next pass inside some later request (see tests/test_lifetime.py)."""
    engine = Engine(tiny_model, EngineConfig(block_size=4, device_blocks=64, host_blocks=64, caching=True))
    engine.generate(make_prompts([20, 30], seed=5), SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request(make_prompts([12], seed=6)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # one request still running when the engine closes
    alive = weakref.ref(engine.pool)
    engine.close()
    del engine
    assert alive() is None


def test_the_prefill_budget_spreads_arrivals_over_steps_and_changes_no_token(
    make_engine: Callable[..., Engine],
) -> None:
    """``max_prefill_tokens`` caps a step's prefill: later arrivals wait for the next step (a prompt
    over the budget still runs, alone), and the tokens are those of one big prefill step."""
    prompts = make_prompts([30, 30, 12, 50, 6], seed=21)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    wide = make_engine(caching=False)
    expected, _ = run(wide, prompts, params)
    assert wide.steps["prefill"] == 1
    narrow = make_engine(caching=False, max_prefill_tokens=30)
    got, _ = run(narrow, prompts, params)
    assert got == expected
    # 30 | 30 | 12 (then 50 > 18 left) | 50 alone, over the budget | 6
    assert narrow.steps["prefill"] == 5
    assert_no_leaks(narrow)


def test_engines_of_other_models_sharing_a_pool_never_see_each_others_kv(tiny_model: LlamaModel) -> None:
    """Two models of one shape, one pool: the second engine was handed the first one's K/V for the
    same prompt and gave other tokens than its own model's, silently. Engines of one model (the
    same fingerprint) still share what they cached."""
    other = LlamaModel(preset("tiny", init_std=0.1)).init_random(seed=2)
    config = EngineConfig(block_size=4, device_blocks=64, host_blocks=0, warm_up_tokens=0)
    first = Engine(tiny_model, config)
    second, again = Engine(other, config, pool=first.pool), Engine(tiny_model, config, pool=first.pool)
    prompt, params = make_prompts([29], seed=8)[0], SamplingParams(max_tokens=6, ignore_eos=True)
    mine, alone = first.generate([prompt], params), Engine(other, config)
    assert second.generate([prompt], params) == alone.generate([prompt], params) != mine
    assert again.generate([prompt], params) == mine
    rid = again.add_request(prompt, params)
    outs = [o for _ in range(20) for o in again.step() if o.request_id == rid]
    assert outs[0].metrics.cached_tokens > 0  # from the first time ``again`` ran it, same model
    assert second.namespace != again.namespace and first.namespace is None
    first.pool.check_invariants()
    for engine in (again, second, first, alone):  # the sharing ones first: the first one's pool goes with it
        engine.close()


def test_generate_raises_where_the_pools_blocks_are_held_elsewhere(make_engine: Callable[..., Engine]) -> None:
    """Another engine on a shared pool (or a caller) holding the blocks: a request that cannot
    start was waited for by ``generate`` for good (nothing of the engine's would free a block)."""
    engine = make_engine(device_blocks=16, host_blocks=0)
    held = engine.pool.alloc(14)
    assert held is not None
    before = engine.pool.stats()
    with pytest.raises(OutOfBlocksError, match="in use elsewhere"):
        engine.generate([list(range(1, 20))], SamplingParams(max_tokens=4, ignore_eos=True))
    assert not engine.has_work() and engine.pool.stats() == before  # the call's request is gone
    engine.pool.free(held)
    want, _ = reference(engine.model, list(range(1, 20)), 4)
    assert engine.generate([list(range(1, 20))], SamplingParams(max_tokens=4, ignore_eos=True)) == [want]


def test_misused_request_arguments_change_nothing(make_engine: Callable[..., Engine]) -> None:
    """Among them kv blocks of another pool or not allocated: accepted before, the step wrote the
    request's K/V into those ids of this pool (blocks other requests own, or free ones the next
    alloc hands out), and the request's end raised DoubleFreeError."""
    engine, other = make_engine(device_blocks=16), make_engine(device_blocks=16)
    before = engine.pool.stats()
    small = SamplingParams(max_tokens=4)
    own, host, foreign = engine.pool.alloc(2), engine.pool.alloc(2, Tier.HOST), other.pool.alloc(2)
    assert own is not None and host is not None and foreign is not None
    for kwargs in (
        {"prompt_len": 0},
        {"prompt_len": 9},  # past the prompt
        {"prompt_len": 2},  # 6 tokens already generated: max_tokens (4) is used up
        {"kv": own[:1]},  # the first 7 tokens need 2 blocks
        {"kv": host},  # not device blocks
        {"kv": foreign},  # another pool's
        {"kv": Blocks(Tier.DEVICE, [14, 15])},  # free blocks
        {"prompt_len": 7.5},
        {"request_id": ["a"]},  # unhashable: a TypeError from the id check before
        {"params": {"max_tokens": 4}},  # an AttributeError from deep inside before
    ):
        with pytest.raises(InvalidArgumentError):
            engine.add_request(list(range(1, 9)), **{"params": small, **kwargs})
    with pytest.raises(InvalidArgumentError, match="not held"):
        engine.held_kv("nobody")
    assert engine.release("nobody") is False and engine.abort("nobody") is False
    assert not engine.has_work()
    engine.pool.free(own)
    engine.pool.free(host)
    other.pool.free(foreign)
    assert engine.pool.stats() == before


@pytest.mark.parametrize("device", DEVICES)
def test_a_second_model_on_each_device_gives_the_cpu_engines_tokens_in_every_mode(tiny_model, device: str) -> None:
    """The same weights in a second model (on a GPU where the case says cuda): greedy with cached
    prefixes, preemption by swap through the host tier (pinned beside a GPU device tier), and seeded
    sampling with a penalty, a bias and log-probabilities all give the CPU engine's tokens
    (sampled rows are drawn on the CPU, from the GPU's logits)."""
    second = LlamaModel(tiny_model.config, device=device)  # (a deepcopy fails once an engine packed it)
    second.load_state_dict(tiny_model.state_dict())
    prompts = make_prompts([20, 28, 36, 24, 30], seed=6, shared=8)
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(
        max_tokens=12, ignore_eos=True, temperature=1.0, top_k=40, seed=5, presence_penalty=0.5, logit_bias=((7, 2.0),)
    )

    def served(engine: Engine) -> tuple[list[list[int]], ...]:
        first, preempted = _with_preemptions(engine, prompts, greedy)
        assert preempted > 0 or engine.config.device_blocks > 40
        again = engine.generate([p + out for p, out in zip(prompts, first)], greedy)  # over cached prefixes
        drawn, _ = run(engine, prompts[:2], [sampled, replace(sampled, logprobs=3)])
        assert_no_leaks(engine)
        return first, again, drawn

    for config in (
        EngineConfig(block_size=4, device_blocks=256, host_blocks=256),
        EngineConfig(block_size=4, device_blocks=40, host_blocks=64, preemption="swap"),
    ):
        engines = [Engine(tiny_model, config), Engine(second, config)]
        try:
            on_cpu, on_device = (served(e) for e in engines)
        finally:
            for e in engines:
                e.close()
        assert on_device == on_cpu, config
