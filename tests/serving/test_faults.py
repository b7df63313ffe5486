"""Faults: an instance killed mid-request; the scheduler notices, routes around it, takes it back."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from memserve.launch import Cluster

from .helpers import busy, drained, get, hand_started, in_thread, poll, post, post_ok, streamed, wait_for

SMALL = dict(model="tiny-llama3", device_blocks=256, host_blocks=256, heartbeat_s=0.5)


def test_killed_instance_mid_request_resumes_elsewhere_then_a_new_incarnation(monkeypatch: Any) -> None:
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
        assert wait_for(lambda: streamed(c.url, "colocated-0") > 10)  # killed mid-answer
        started = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert time.monotonic() - started < 60  # nobody hangs
        # the request on the dead instance was resumed on the survivor from the tokens it had streamed:
        # the client sees one whole answer, token for token the answer of the request nothing happened to
        assert [code for code, _ in results] == [200, 200]
        (_, one), (_, other) = results
        assert one["choices"][0]["token_ids"] == other["choices"][0]["token_ids"]
        assert len(one["choices"][0]["token_ids"]) == 1500
        counters = get(f"{c.url}/admin/stats")["counters"]
        assert counters["resumes"] == 1 and counters["retries"] == 0
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
            counters = get(f"{c.url}/admin/stats")["counters"]
            assert counters["by_instance"].get("colocated-0", 0) > before, counters


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
        # it answers again: taken back, as a new incarnation with its transfer links opened anew
        assert wait_for(lambda: get(f"{c.url}/health")["down"] == [], timeout=20)
        stats = get(f"{c.url}/admin/stats")
        assert stats["counters"]["instance_failures"] == 1 and stats["counters"]["rejoins"] == 1
        assert stats["members"]["colocated-1"]["incarnation"] == 2


GREEDY = {"max_tokens": 40, "ignore_eos": True, "temperature": 0}


def test_decode_killed_while_a_transfer_to_it_is_in_flight() -> None:
    """The prefill instance's handoff fails (PeerLostError), the request goes on another decode
    instance, which recomputes the prompt's KV: the client gets the fault-free tokens."""
    slow_send = {"segment_delay_s": 0.5, "chunk_bytes": 1}  # one block per message, 0.5 s apart
    # link_aware off: the slowed link would otherwise teach the scheduler to recompute instead of moving
    with Cluster("pd-caching-1", prefill=1, decode=2, faults={"prefill-0": slow_send}, link_aware=False, **SMALL) as c:
        body = {"prompt": list(range(300, 364)), **GREEDY}  # 64 tokens: a 4-message transfer
        reference = post_ok(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"]
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(c.url, body, results)
        victim = poll(lambda: busy(c.url, "decode", "receiving"))
        c.process(victim).send_signal(signal.SIGKILL)
        started = time.monotonic()
        thread.join(timeout=90)
        assert time.monotonic() - started < 60
        assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
        stats = get(f"{c.url}/admin/stats")
        # (resumed after a failed decode attempt, or, when the heartbeat marked it down first, sent
        # straight to the other decode instance)
        assert stats["counters"]["resumes"] <= 1 and stats["counters"]["instance_failures"] == 1
        assert get(f"{c.url}/health")["down"] == [victim]
        assert stats["instances"]["prefill-0"]["transport_stats"]["failed"] >= 1  # the handoff failed
        drained(c.url)  # prefill and the surviving decode: invariants hold, nothing but cached blocks


def test_decode_killed_while_decoding_resumes_on_another_decode_instance() -> None:
    with Cluster("pd-caching-2", prefill=1, decode=2, **SMALL) as c:
        body = {"prompt": list(range(700, 740)), "max_tokens": 800, "ignore_eos": True, "temperature": 0}
        reference = post_ok(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"]
        base = {n: streamed(c.url, n) for n in c.names if n.startswith("decode")}
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(c.url, body, results)
        victim = poll(lambda: next((n for n in base if streamed(c.url, n) > base[n] + 10), None))
        c.process(victim).send_signal(signal.SIGKILL)
        thread.join(timeout=90)
        assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
        assert get(f"{c.url}/admin/stats")["counters"]["resumes"] == 1
        assert get(f"{c.url}/health")["down"] == [victim]
        drained(c.url)


def test_prefill_killed_mid_prefill_is_retried_on_another() -> None:
    slow = {"forward_delay_s": 2.0}  # every forward of the prefill instances takes 2 s more
    faults = {"prefill-0": slow, "prefill-1": slow}
    with Cluster("pd-caching-1", prefill=2, decode=1, faults=faults, **SMALL) as c:
        body = {"prompt": list(range(500, 530)), **GREEDY}
        reference = post_ok(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"]
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(c.url, body, results)
        victim = poll(lambda: busy(c.url, "prefill", "running"))
        c.process(victim).send_signal(signal.SIGKILL)
        thread.join(timeout=90)
        assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
        stats = get(f"{c.url}/admin/stats")
        assert stats["counters"]["retries"] == 1 and stats["counters"]["resumes"] == 0
        assert get(f"{c.url}/health")["down"] == [victim]
        drained(c.url)


def test_an_instance_stalled_past_the_deadline_is_routed_around() -> None:
    """SIGSTOP mid-answer: no keep-alive for ``stall_timeout_s`` and the request resumes elsewhere,
    long before the heartbeat would notice; once the instance runs again it is taken back."""
    with Cluster(
        "colocated", colocated=2, model="tiny-llama3", device_blocks=256, host_blocks=0, heartbeat_s=5.0,
        stall_timeout_s=2.0,
    ) as c:  # fmt: skip
        body = {"prompt": list(range(40, 80)), "max_tokens": 1200, "ignore_eos": True, "temperature": 0}
        reference = post_ok(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"]
        base = {name: streamed(c.url, name) for name in ("colocated-0", "colocated-1")}
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(c.url, body, results)
        victim = poll(lambda: next((n for n in base if streamed(c.url, n) > base[n] + 10), None))
        proc = c.process(victim)
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        try:
            thread.join(timeout=90)
            assert time.monotonic() - started < 30  # the deadline, not the 15 s heartbeat, caught it
            assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
            assert get(f"{c.url}/admin/stats")["counters"]["resumes"] == 1
            assert get(f"{c.url}/health")["down"] == [victim]
        finally:
            proc.send_signal(signal.SIGCONT)
        # running again, it finds its client gone and aborts the request; the heartbeat takes it back
        assert wait_for(lambda: get(f"{c.url}/health")["down"] == [], timeout=30)
        drained(c.url)


def test_a_full_instance_queue_answers_503_not_a_longer_queue() -> None:
    with Cluster(
        "colocated", colocated=1, model="tiny-llama3", device_blocks=256, host_blocks=0, max_waiting=1,
        faults={"colocated-0": {"forward_delay_s": 0.3}},
    ) as c:  # fmt: skip
        results: list[tuple[int, dict[str, Any]]] = []

        def request(k: int) -> dict[str, Any]:
            return {"prompt": [9, k], "max_tokens": 3, "temperature": 0}

        threads = [in_thread(c.url, request(0), results)]
        # the first runs before the rest arrive (sent all at once, a slow machine could see all six
        # before the engine's first step: one waiting, five refused, none running)
        assert wait_for(lambda: get(f"{c.url}/admin/stats")["instances"]["colocated-0"]["running"] == 1)
        threads += [in_thread(c.url, request(k), results) for k in range(1, 6)]
        for t in threads:
            t.join(timeout=60)
        codes = sorted(code for code, _ in results)
        assert len(codes) == 6 and set(codes) == {200, 503} and codes.count(200) >= 2, codes
        refused = [body for code, body in results if code == 503]
        assert all(b["error"]["code"] == "overloaded" and "busy" in b["error"]["message"] for b in refused)
        assert get(f"{c.url}/admin/stats")["counters"]["busy"] >= 1
        drained(c.url)
