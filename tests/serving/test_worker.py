"""The engine thread: a failed step ends its own requests with ``error`` and the engine goes on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from memserve import Engine, SamplingParams
from memserve.engine import RequestOutput
from memserve.worker import EngineWorker, WorkerStopped

from .conftest import assert_no_leaks, make_prompts


def _submit(worker: EngineWorker, prompt: list[int], params: SamplingParams, rid: str) -> list[RequestOutput]:
    """Start ``rid`` on the worker; the list its outputs land in (finished once the last one has)."""
    outs: list[RequestOutput] = []
    done = threading.Event()

    def listener(out: RequestOutput) -> None:
        outs.append(out)
        if out.finished:
            done.set()

    def add(engine: Engine) -> None:
        engine.add_request(prompt, params, rid)
        worker.listen(rid, listener)

    worker.call(add).result(timeout=30)
    assert done.wait(60), rid
    return outs


def test_a_failed_step_ends_its_requests_with_error_and_the_worker_goes_on(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(caching=True)
    prompt = make_prompts([13], seed=21)[0]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    expected = make_engine().generate([prompt], params)[0]
    armed = [True]

    def boom(*_: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected failure")

    hook = engine.model.register_forward_pre_hook(boom)
    worker = EngineWorker(engine)
    try:
        failed = _submit(worker, prompt, params, "a")
        assert [o.finish_reason for o in failed] == ["error"] and not failed[0].new_token_ids
        assert worker.alive
        fine = _submit(worker, prompt, params, "b")  # the next request runs as if nothing happened
        assert [t for o in fine for t in o.new_token_ids] == expected and fine[-1].finish_reason == "length"
        worker.call(assert_no_leaks).result(timeout=30)
    finally:
        hook.remove()
        worker.stop()


def test_a_vanishing_temperature_is_greedy_not_nan(make_engine: Callable[..., Engine]) -> None:
    prompt = make_prompts([9], seed=22)[0]
    greedy = make_engine().generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    for t in (1e-300, 3e-260, 1e-6):  # logits / t would overflow to inf and NaN the softmax
        params = SamplingParams(max_tokens=6, temperature=t, seed=1, ignore_eos=True)
        assert params.greedy and make_engine().generate([prompt], params)[0] == greedy


def test_a_listener_that_raises_loses_only_its_own_outputs(make_engine: Callable[..., Engine]) -> None:
    """A broken output callback (a client handler's bug) is logged; its request still runs to its
    end and frees its blocks, and every other request gets all its tokens."""
    engine = make_engine(caching=True)
    broken_prompt, prompt = make_prompts([11, 13], seed=23)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = make_engine().generate([prompt], params)[0]
    worker = EngineWorker(engine)
    calls = []
    try:

        def broken(out: RequestOutput) -> None:
            calls.append(out)
            raise RuntimeError("a handler's bug")

        def add(engine: Engine) -> None:
            engine.add_request(broken_prompt, params, "broken")
            worker.listen("broken", broken)

        worker.call(add).result(timeout=30)
        fine = _submit(worker, prompt, params, "fine")
        assert [t for o in fine for t in o.new_token_ids] == expected and worker.alive
        worker.call(lambda e: None).result(timeout=30)  # a call runs between steps: the engine is idle
        assert len(calls) == 6 and calls[-1].finished  # every output reached it, each raising
        worker.call(assert_no_leaks).result(timeout=30)
    finally:
        worker.stop()
    late = worker.call(lambda e: None)  # after stop: refused, not queued for ever
    assert isinstance(late.exception(timeout=1), WorkerStopped)


def test_a_cache_insert_that_fails_at_finish_leaks_nothing(make_engine: Callable[..., Engine]) -> None:
    """The request whose finishing insert failed ends with ``error``; its lock and blocks go back,
    and the next request runs as if nothing happened."""
    engine = make_engine(caching=True)
    prompt = make_prompts([13], seed=24)[0]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    expected = make_engine().generate([prompt], params)[0]
    insert, calls = engine.pool.insert_sequence, []

    def failing_at_finish(*args: Any, **kwargs: Any) -> int:
        calls.append(args)
        if len(calls) == 2:  # the first caches the prefill's whole blocks, the second the finished sequence
            raise RuntimeError("injected failure")
        return insert(*args, **kwargs)

    engine.pool.insert_sequence = failing_at_finish  # type: ignore[method-assign]
    worker = EngineWorker(engine)
    try:
        failed = _submit(worker, prompt, params, "a")
        assert failed[-1].finish_reason == "error" and len(calls) == 2
        worker.call(assert_no_leaks).result(timeout=30)
        fine = _submit(worker, prompt, params, "b")
        assert [t for o in fine for t in o.new_token_ids] == expected and fine[-1].finish_reason == "length"
        worker.call(assert_no_leaks).result(timeout=30)
    finally:
        worker.stop()
