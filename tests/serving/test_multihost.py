"""memserve across hosts: Linux network namespaces on one machine, joined by veth pairs and a bridge.

Every test makes its own hosts and removes them (namespaces, links, processes), also when it fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from memserve.bench import RequestResult, replay_http
from memserve.launch import Cluster, read_until
from memserve.netns import Deployment, Hosts, leftovers, sweep, unavailable
from memserve.tokenizer import Tokenizer
from memserve.workloads import sharegpt

from .helpers import busy, drained, get, in_thread, poll, post_ok, streamed, wait_for

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSERVE_SECRET", "multihost-test-secret-0123456789")


@pytest.fixture(autouse=True, scope="module")
def _swept() -> None:
    sweep()  # what an earlier run that was killed left behind


def outputs(results: list[RequestResult]) -> list[tuple[int, ...]]:
    return [r.output for r in sorted(results, key=lambda r: (r.session, r.turn))]


def test_sharegpt_replay_across_hosts_gives_the_tokens_of_one_host() -> None:
    sessions = sharegpt(Tokenizer("llama3"), 3, max_turns=2, max_reply=8)
    with Cluster("pd-caching-2", model="tiny-llama3", device_blocks=256, host_blocks=256) as one_host:
        reference, _ = asyncio.run(replay_http(one_host.url, sessions, rate=4.0))
    with Deployment("pd-caching-2", prefill=2, decode=2) as d:
        assert not d.url.startswith("http://127.")  # the scheduler listens on its host's address
        members = d.members()
        assert all(not m["url"].startswith("http://127.") for m in members.values()), members
        # the instances joined at once, by themselves: still every pair is linked
        for name, inst in d.stats()["instances"].items():
            assert inst["peers"] == sorted(set(d.names) - {name}), (name, inst["peers"])
        results, _ = asyncio.run(replay_http(d.url, sessions, rate=4.0))
        assert outputs(results) == outputs(reference)
        stats = drained(d.url)
        assert stats["counters"]["handoff_bytes"] > 0
        for name in d.names:
            kv_sent = stats["instances"][name]["transport_stats"]["bytes_sent"]
            # KV crossed the host's own link: its veth carried at least every byte the transport sent
            assert d.hosts.link_bytes(name)["sent"] >= kv_sent, name
        assert sum(stats["instances"][n]["transport_stats"]["bytes_sent"] for n in d.names) > 0
    assert d.hosts.leftovers() == []


def test_a_decode_host_cut_off_mid_transfer_then_rejoins_as_a_new_incarnation() -> None:
    slow_send = {"segment_delay_s": 0.5, "chunk_bytes": 1}  # one block per message, 0.5 s apart
    with Deployment(
        "pd-basic",
        prefill=1,
        decode=2,
        faults={"prefill-0": slow_send},
        link_aware=False,  # the slowed link would otherwise teach the scheduler to recompute instead
        heartbeat_s=0.5,
        stall_timeout_s=10.0,  # (keep-alives come every second, later on a loaded machine: no false stalls)
        transfer_deadline_s=3.0,
    ) as d:
        # 128 tokens: a transfer of 8 messages, about 4 s in flight
        body = {"prompt": list(range(300, 428)), "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        reference = post_ok(f"{d.url}/v1/completions", body)["choices"][0]["token_ids"]
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(d.url, body, results)
        victim = poll(lambda: busy(d.url, "decode", "receiving"), 60, lambda: (results, d.stats()))
        d.hosts.cut(victim)
        started = time.monotonic()
        thread.join(timeout=120)
        assert time.monotonic() - started < 60  # nothing hangs: re-routed well within the client's deadline
        assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
        stats = get(f"{d.url}/admin/stats")
        assert stats["instances"]["prefill-0"]["transport_stats"]["failed"] >= 1  # the handoff failed
        assert wait_for(lambda: get(f"{d.url}/health")["down"] == [victim], timeout=30)
        drained(d.url)  # the survivors: invariants hold, nothing leaked
        d.hosts.restore(victim)
        _rejoins_and_takes_traffic(d, victim, {"prompt": list(range(900, 940)), "max_tokens": 4, "temperature": 0})
        drained(d.url)  # the rejoined instance too: what it was receiving when cut off was freed


def test_a_host_cut_off_mid_answer_is_resumed_elsewhere_then_rejoins() -> None:
    with Deployment("colocated", colocated=2, heartbeat_s=0.5, stall_timeout_s=5.0, transfer_deadline_s=3.0) as d:
        body = {"prompt": list(range(40, 80)), "max_tokens": 1200, "ignore_eos": True, "temperature": 0}
        reference = post_ok(f"{d.url}/v1/completions", body)["choices"][0]["token_ids"]
        base = {name: streamed(d.url, name) for name in d.names}
        results: list[tuple[int, dict[str, Any]]] = []
        thread = in_thread(d.url, body, results)
        victim = poll(lambda: next((n for n in base if streamed(d.url, n) > base[n] + 10), None))
        d.hosts.cut(victim)
        started = time.monotonic()
        thread.join(timeout=120)
        assert time.monotonic() - started < 60
        assert results[0][0] == 200 and results[0][1]["choices"][0]["token_ids"] == reference
        assert get(f"{d.url}/admin/stats")["counters"]["resumes"] == 1
        assert wait_for(lambda: get(f"{d.url}/health")["down"] == [victim], timeout=30)
        drained(d.url)
        d.hosts.restore(victim)
        _rejoins_and_takes_traffic(d, victim, {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
        drained(d.url)  # the answer it was writing when cut off was aborted once the link came back


def _rejoins_and_takes_traffic(d: Deployment, name: str, body: dict[str, Any]) -> None:
    assert wait_for(lambda: d.members()[name]["alive"], timeout=60)
    assert d.members()[name]["incarnation"] == 2
    assert get(f"{d.url}/admin/stats")["counters"]["rejoins"] == 1
    before = streamed(d.url, name)
    for k in range(4):  # an idle cluster spreads requests: some go to the rejoined instance
        post_ok(f"{d.url}/v1/completions", {**body, "prompt": [*body["prompt"], k]})
    assert streamed(d.url, name) > before


def test_hosts_are_removed_even_when_the_test_fails() -> None:
    hosts = Hosts(["a", "b"])
    with pytest.raises(RuntimeError, match="boom"), hosts:
        proc = hosts.spawn("a", [sys.executable, "-c", "import time; time.sleep(600)"])
        assert len(hosts.leftovers()) >= 3  # two namespaces and the bridge, at least
        raise RuntimeError("boom")
    assert proc.poll() is not None  # stopped
    assert hosts.leftovers() == []


def test_sweep_removes_what_a_killed_process_left() -> None:
    code = "from memserve.netns import Hosts; import time; h = Hosts(['x']); h.start(); print(h.tag, flush=True)"
    code += "; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tag = read_until(proc, 60, lambda line: line.strip() or None, "the namespaces' owner")
    os.kill(proc.pid, signal.SIGKILL)  # no close(): its namespace and links stay behind ...
    proc.wait(timeout=30)
    proc.stdout.close()
    removed = sweep()  # ... until a sweep finds their owner dead
    assert any(name.startswith(tag) for name in removed), removed
    assert leftovers(tag) == []
