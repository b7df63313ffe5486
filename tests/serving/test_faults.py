"""Faults: an instance killed mid-request; the scheduler notices, routes around it, takes it back."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from memserve.launch import Cluster

from .helpers import drained, get, hand_started, post, wait_for

SMALL = dict(model="tiny-llama3", device_blocks=256, host_blocks=256, heartbeat_s=0.5)


def test_killed_instance_mid_request_then_a_new_incarnation(monkeypatch: Any) -> None:
    monkeypatch.setenv("MEMSERVE_SECRET", "fault-test-secret-0123456789abcdef")
    with Cluster("colocated-caching", colocated=2, **SMALL) as c:
        victim = c.procs[0]  # colocated-0
        long = {"prompt": list(range(100, 140)), "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
        results: list[tuple[int, dict[str, Any]]] = []
        # two long requests: the idle cluster spreads them round-robin, one lands on colocated-0
        threads = [
            threading.Thread(target=lambda: results.append(post(f"{c.url}/v1/completions", long))) for _ in range(2)
        ]
        for t in threads:
            t.start()
        assert wait_for(lambda: get(f"{c.url}/admin/stats")["instances"].get("colocated-0", {}).get("running", 0) > 0)
        started = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert time.monotonic() - started < 60  # nobody hangs
        codes = sorted(code for code, _ in results)
        assert 503 in codes  # the request on the dead instance got a clear error ...
        failed = next(body for code, body in results if code == 503)
        assert failed["error"]["type"] == "server_error" and "colocated-0" in failed["error"]["message"]
        assert wait_for(lambda: get(f"{c.url}/health")["down"] == ["colocated-0"])
        # ... and new requests go to the survivor only
        for k in range(3):
            code, _ = post(f"{c.url}/v1/completions", {"prompt": [7, 8, k], "max_tokens": 2, "temperature": 0})
            assert code == 200
        assert get(f"{c.url}/admin/stats")["counters"]["instance_failures"] == 1
        drained(c.url)  # the survivor: no request left, only cached blocks
        # the instance comes back as a new incarnation under the same name and is used again
        with hand_started(c.url, "colocated-0"):
            assert wait_for(lambda: get(f"{c.url}/health")["instances"] == 2, timeout=60)
            before = get(f"{c.url}/admin/stats")["counters"]["by_instance"].get("colocated-0", 0)
            for k in range(4):
                assert post(f"{c.url}/v1/completions", {"prompt": [9, k], "max_tokens": 1})[0] == 200
            assert get(f"{c.url}/admin/stats")["counters"]["by_instance"]["colocated-0"] > before


def test_a_request_whose_instance_is_gone_before_it_starts_is_retried() -> None:
    with Cluster("colocated", colocated=2, heartbeat_s=3600, model="tiny-llama3", device_blocks=64, host_blocks=0) as c:
        c.procs[0].send_signal(signal.SIGKILL)
        c.procs[0].wait(timeout=30)
        for k in range(4):  # round-robin would send some to the dead one: each is retried on the survivor
            code, body = post(f"{c.url}/v1/completions", {"prompt": [5, k], "max_tokens": 2, "temperature": 0})
            assert code == 200 and len(body["choices"][0]["token_ids"]) == 2
        counters = get(f"{c.url}/admin/stats")["counters"]
        assert counters["retries"] >= 1 and counters["instance_failures"] == 1


def test_heartbeats_tolerate_a_stall_then_mark_down_and_take_back() -> None:
    with Cluster("colocated", colocated=2, heartbeat_s=0.3, model="tiny-llama3", device_blocks=64, host_blocks=0) as c:
        proc = c.procs[1]
        proc.send_signal(signal.SIGSTOP)  # a stall shorter than three heartbeats is tolerated
        time.sleep(0.45)
        proc.send_signal(signal.SIGCONT)
        time.sleep(1.0)
        assert get(f"{c.url}/health")["down"] == []
        proc.send_signal(signal.SIGSTOP)  # a long stall: marked down, routed around
        try:
            assert wait_for(lambda: get(f"{c.url}/health")["down"] == ["colocated-1"], timeout=20)
            for k in range(3):
                assert post(f"{c.url}/v1/completions", {"prompt": [3, k], "max_tokens": 1})[0] == 200
        finally:
            proc.send_signal(signal.SIGCONT)
        # the same incarnation answers again: taken back
        assert wait_for(lambda: get(f"{c.url}/health")["down"] == [], timeout=20)
        assert get(f"{c.url}/admin/stats")["counters"]["instance_failures"] == 1
