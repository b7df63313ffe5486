"""The engine thread: a failed step ends its own requests with ``error`` and the engine goes on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from memserve import Engine, SamplingParams
from memserve.engine import RequestOutput
from memserve.worker import EngineWorker, WorkerStopped

from .conftest import assert_no_leaks, make_prompts


@contextmanager
def _started(engine: Engine) -> Iterator[EngineWorker]:
    """``engine`` on a worker thread, stopped when the block ends."""
    worker = EngineWorker(engine)
    try:
        yield worker
    finally:
        worker.stop()


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


def _fail_nth(pool: Any, name: str, nth: int) -> list[Any]:
    """Make ``pool.<name>`` raise on its ``nth`` call (an injected failure, as a device error would
    surface); returns the list its calls are recorded in."""
    real, calls = getattr(pool, name), []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == nth:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    setattr(pool, name, failing)
    return calls


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
    try:
        with _started(engine) as worker:
            failed = _submit(worker, prompt, params, "a")
            assert [o.finish_reason for o in failed] == ["error"] and not failed[0].new_token_ids
            assert worker.alive
            fine = _submit(worker, prompt, params, "b")  # the next request runs as if nothing happened
            assert [t for o in fine for t in o.new_token_ids] == expected and fine[-1].finish_reason == "length"
            worker.call(assert_no_leaks).result(timeout=30)
    finally:
        hook.remove()


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
    calls = []
    with _started(engine) as worker:

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
    late = worker.call(lambda e: None)  # after stop: refused, not queued for ever
    assert isinstance(late.exception(timeout=1), WorkerStopped)


def test_a_cache_insert_that_fails_at_finish_leaks_nothing(make_engine: Callable[..., Engine]) -> None:
    """The request whose finishing insert failed ends with ``error``; its lock and blocks go back,
    and the next request runs as if nothing happened."""
    engine = make_engine(caching=True)
    prompt = make_prompts([13], seed=24)[0]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    expected = make_engine().generate([prompt], params)[0]
    # the first call caches the prefill's whole blocks, the second the finished sequence
    calls = _fail_nth(engine.pool, "insert_sequence", 2)
    with _started(engine) as worker:
        failed = _submit(worker, prompt, params, "a")
        assert failed[-1].finish_reason == "error" and len(calls) == 2
        worker.call(assert_no_leaks).result(timeout=30)
        fine = _submit(worker, prompt, params, "b")
        assert [t for o in fine for t in o.new_token_ids] == expected and fine[-1].finish_reason == "length"
        worker.call(assert_no_leaks).result(timeout=30)


@pytest.mark.parametrize("failing", ["copy_tail", "alloc"])
def test_a_failed_copy_at_admission_leaks_nothing(make_engine: Callable[..., Engine], failing: str) -> None:
    """A copy fails (a device error) while a request is admitted: the kept tail's copy into its new
    block, or the demotion an allocation's eviction makes. That step fails; the request's match and
    blocks are given back (not left on it, or in no one's hands, when it is admitted again), and its
    answer is exact."""
    engine = make_engine(caching=True)
    first = make_prompts([13], seed=25)[0]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    out = engine.generate([first], params)[0]
    follow = first + out + make_prompts([5], seed=26)[0]  # continues the first: its prefix and tail serve
    expected = make_engine().generate([follow], params)[0]
    calls = _fail_nth(engine.pool, failing, 1)
    with _started(engine) as worker:
        again = _submit(worker, follow, params, "b")  # admitted again after the failed step
        assert [t for o in again for t in o.new_token_ids] == expected and len(calls) >= 2
        worker.call(assert_no_leaks).result(timeout=30)


def test_a_failed_copy_while_growing_a_running_request_ends_it_not_hangs_it(
    make_engine: Callable[..., Engine],
) -> None:
    """Growing the running requests by a block needs an allocation whose eviction copies (a
    demotion), and that copy fails: the requests that step had in hand end with ``error``; none is
    dropped from the engine's lists unanswered (its client would wait for ever), nothing leaks."""
    engine = make_engine(caching=True)
    prompt = make_prompts([13], seed=27)[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True)  # crosses into a new block of 4 while decoding
    expected = make_engine().generate([prompt], params)[0]
    calls = _fail_nth(engine.pool, "alloc", 2)  # the first call admits the request, the second grows it
    with _started(engine) as worker:
        failed = _submit(worker, prompt, params, "a")
        assert failed[-1].finish_reason == "error" and len(calls) >= 2
        worker.call(assert_no_leaks).result(timeout=30)
        fine = _submit(worker, prompt, params, "b")
        assert [t for o in fine for t in o.new_token_ids] == expected
        worker.call(assert_no_leaks).result(timeout=30)


def test_a_failed_admission_loses_none_of_the_requests_admitted_before_it(
    make_engine: Callable[..., Engine],
) -> None:
    """Two requests admitted in one step, the second's allocation fails (a copy in its eviction):
    the first, admitted already, is not dropped unanswered; both end, nothing leaks."""
    engine = make_engine(caching=True)
    prompts = make_prompts([9, 11], seed=28)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    _fail_nth(engine.pool, "alloc", 2)
    outs: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    done = {rid: threading.Event() for rid in outs}

    def add(engine: Engine) -> None:
        for rid, prompt in zip(outs, prompts):
            engine.add_request(prompt, params, rid)
            worker.listen(rid, lambda out, rid=rid: (outs[rid].append(out), out.finished and done[rid].set()))

    with _started(engine) as worker:
        worker.call(add).result(timeout=30)
        assert all(event.wait(60) for event in done.values())  # each ends: none hangs
        assert [outs[rid][-1].finish_reason for rid in outs] == ["error", "length"]
        worker.call(assert_no_leaks).result(timeout=30)


def test_a_stalled_engine_waits_for_room_without_spinning(make_engine: Callable[..., Engine]) -> None:
    """A request that waits for room blocks held elsewhere must free (a transfer's, say): the
    worker stepped the idle engine back to back, a core and the GIL for as long as it waited."""
    engine = make_engine(device_blocks=16, host_blocks=0)
    held = engine.pool.alloc(15)
    assert held is not None
    steps = 0
    real_step = engine.step

    def counted() -> list[RequestOutput]:
        nonlocal steps
        steps += 1
        return real_step()

    engine.step = counted  # type: ignore[method-assign]
    outs: list[RequestOutput] = []
    done = threading.Event()
    with _started(engine) as worker:

        def add(engine: Engine) -> None:
            engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=3, ignore_eos=True), "r")
            worker.listen("r", lambda out: (outs.append(out), out.finished and done.set()))

        worker.call(add).result(timeout=30)
        assert not done.wait(0.3)  # no room: it waits
        assert steps < 1000  # a step per STALL_WAIT_S (~150 here); back to back, thousands
        worker.call(lambda engine: engine.pool.free(held)).result(timeout=30)
        assert done.wait(60) and sum(len(o.new_token_ids) for o in outs) == 3  # room came: it ran
    assert_no_leaks(engine)
