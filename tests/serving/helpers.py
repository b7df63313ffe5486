"""HTTP helpers for the server tests: JSON calls, polling, draining, instances started by hand."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from memserve.launch import instance_command, ready_info


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the JSON answer (error answers included)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post_ok(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST that must succeed; its JSON answer."""
    status, answer = post(url, body)
    assert status == 200, answer
    return answer


def get(url: str) -> Any:
    """GET; JSON decoded when the answer is JSON, else text."""
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
        return json.loads(body) if r.headers.get("Content-Type", "").startswith("application/json") else body.decode()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def drained(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until no instance has work; assert each pool passes ``check_invariants()`` and holds only
    cached blocks; the stats."""

    def idle() -> bool:
        stats = get(f"{url}/admin/stats")
        queues = any(i["running"] or i["waiting"] or i["held"] or i["swapped"] for i in stats["instances"].values())
        # the API's count too: a request between its prefill's handoff and its decode's start is on
        # no instance's queue for a moment
        clean = all(i["pool"]["device"]["used"] == i["pool"]["device"]["cached"] for i in stats["instances"].values())
        # and the pools: a call its client dropped may reach an instance's engine a moment after
        # the API let go of it (then it is aborted); a leak never settles, and fails here
        return not queues and stats["inflight"] == 0 and clean

    assert wait_for(idle, timeout), get(f"{url}/admin/stats")["instances"]
    stats: dict[str, Any] = get(f"{url}/admin/stats?check=1")
    for name, inst in stats["instances"].items():
        assert inst["invariants"] == "ok", (name, inst["invariants"])
        pool = inst["pool"]["device"]
        assert pool["used"] == pool["cached"], name  # nothing but cached prefixes
    return stats


def streamed(url: str, name: str) -> int:
    """How many tokens instance ``name`` has produced so far."""
    inst = get(f"{url}/admin/stats")["instances"].get(name, {})
    return int(inst.get("counters", {}).get("output_tokens", 0))


def busy(url: str, role: str, key: str) -> str | None:
    """The live instance of ``role`` whose stats show ``key`` > 0 (one with work of that kind), if any."""
    for name, inst in get(f"{url}/admin/stats")["instances"].items():
        if inst["role"] == role and (inst.get(key) or inst["transport_stats"].get(key)):
            return str(name)
    return None


def poll(probe: Callable[[], str | None], timeout: float = 30.0, why: Callable[[], Any] | None = None) -> str:
    """Poll ``probe`` until it names something; that name (``why()``: what a failure reports)."""
    found: list[str] = []
    assert wait_for(lambda: bool(found.append(probe() or "") or found[-1]), timeout), why() if why else None
    return found[-1]


def in_thread(url: str, body: dict[str, Any], into: list[tuple[int, dict[str, Any]]]) -> threading.Thread:
    """POST ``body`` to the completions API on a thread; ``(status, answer)`` is appended to ``into``."""
    t = threading.Thread(target=lambda: into.append(post(f"{url}/v1/completions", body)))
    t.start()
    return t


@contextmanager
def hand_started(scheduler: str, name: str, model: str = "tiny-llama3") -> Iterator[subprocess.Popen[str]]:
    """An instance started by hand, registering with ``scheduler`` (MEMSERVE_SECRET from the environment)."""
    proc = subprocess.Popen(
        instance_command(name, model=model, device_blocks=256, host_blocks=256, scheduler=scheduler),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready_info(proc, 120)  # its READY line, after any UCX warnings (or it fails, killed, at 120 s)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
