"""An instance's request intake, in this process: what happens to KV sent ahead of a request
that the instance cannot take."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mempool import MemPool
from memserve import instance as inst
from memserve.instance import Busy, Instance, InstanceConfig

from ..conftest import fill_random
from ..transport.conftest import SECRET
from ..transport.inproc import serve, wait_until


@pytest.fixture
def decode() -> Iterator[tuple[Instance, MemPool]]:
    """A decode instance (tiny model, torch transport) and a connected pool that sends it KV."""
    config = InstanceConfig(
        name="decode", role="decode", model="tiny", backend="torch", device_blocks=64, host_blocks=0, warm_up_tokens=0
    )
    instance = Instance(config, SECRET)
    sender = MemPool(instance.pool.config)
    try:
        serve(sender, "prefill", pull=False)
        host, port = instance.transport
        sender.connect("decode", host, port)
        wait_until(lambda: "prefill" in instance.pool.peers())
        yield instance, sender
    finally:
        sender.close()
        instance.worker.stop()
        instance.pool.close()


def _send_kv(sender: MemPool, key: str, n: int = 3) -> Any:
    blocks = sender.alloc(n)
    assert blocks is not None
    written = fill_random(sender, blocks, seed=7)
    sender.transfer("decode", blocks, key=key)
    sender.free(blocks)
    return written


def _request(key: str) -> dict[str, Any]:
    tokens = list(range(1, 11))
    return {"id": "r1", "tokens": tokens, "kv_key": key, "params": {"max_tokens": 2, "ignore_eos": True}}


def test_a_request_to_a_stopping_instance_is_busy_and_its_kv_is_freed(decode) -> None:
    instance, sender = decode
    _send_kv(sender, "k")
    instance.worker.stop()  # as at shutdown: the engine closes, and its pool's transport with it
    with pytest.raises(Busy, match="stopping"):  # a 503: the scheduler tries another instance
        instance.start(_request("k"), lambda line: None)
    instance.pool.check_invariants()
    assert instance.pool.stats()["device"]["used"] == 0  # the unclaimed receipt was given back


def test_a_request_the_engine_does_not_take_in_time_is_cancelled_not_left_to_run(decode, monkeypatch) -> None:
    instance, sender = decode
    written = _send_kv(sender, "k")
    monkeypatch.setattr(inst, "ADD_TIMEOUT_S", 0.2)
    go_on = threading.Event()
    busy = instance.worker.call(lambda engine: go_on.wait(30.0))  # the engine thread is taken up
    with pytest.raises(Busy, match="did not take"):
        instance.start(_request("k"), lambda line: None)
    go_on.set()
    assert busy.result(timeout=30)
    assert instance.worker.call(lambda engine: (len(engine.waiting), len(engine.running))).result(30) == (0, 0)
    blocks = instance.pool.claim("k")  # the cancelled intake never claimed it: it is all there
    assert blocks is not None and len(blocks) == 3
    assert bool((instance.pool.storage().gather(blocks.ids) == written).all())
    instance.pool.free(blocks)
    instance.pool.check_invariants()
    assert instance.pool.stats()["device"]["used"] == 0


def test_stats_keep_a_window_of_the_latest_prefills_not_every_one(monkeypatch) -> None:
    """A long-lived instance must not grow with every request it served: /stats shows the latest
    ``PREFILL_SAMPLES`` prefill timings, newest last."""
    monkeypatch.setattr(inst, "PREFILL_SAMPLES", 3)
    config = InstanceConfig(name="c", model="tiny", backend="torch", device_blocks=64, host_blocks=0, warm_up_tokens=0)
    instance = Instance(config, SECRET)
    try:
        for i in range(5):
            done = threading.Event()
            body = {"id": f"r{i}", "tokens": list(range(1, 3 + i)), "params": {"max_tokens": 1, "ignore_eos": True}}
            instance.start(body, lambda line, done=done: line.get("done") and done.set())
            assert done.wait(60)
        samples = instance.stats()["prefill_samples"]
        assert [prompt for prompt, _, _ in samples] == [4, 5, 6]  # the last three prompts, in order
        assert all(seconds > 0 for _, _, seconds in samples)
    finally:
        instance.worker.stop()
        instance.pool.close()
