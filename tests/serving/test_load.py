"""Load: back-pressure instead of an unbounded queue, and a bounded soak that leaves nothing behind."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest

from memserve.launch import Cluster
from memserve.stages import STAGES

from .helpers import drained, post

SOAK_SECONDS = float(os.environ.get("MEMSERVE_SOAK_SECONDS", "12"))  # per mode; docs/reliability.md: a 60 s run
CLIENTS = 32


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_over_the_limit_requests_get_429_not_a_queue() -> None:
    with Cluster(
        "colocated-caching", colocated=1, model="tiny-llama3", device_blocks=256, host_blocks=0, max_inflight=4
    ) as c:
        statuses: list[int] = []
        body = {"prompt": list(range(10, 40)), "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        threads = [
            threading.Thread(target=lambda: statuses.append(post(f"{c.url}/v1/completions", body)[0]))
            for _ in range(24)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        counts = Counter(statuses)
        assert set(counts) <= {200, 429} and counts[429] > 0 and counts[200] >= 4, counts
        assert "memserve_rejected_total" in urllib.request.urlopen(f"{c.url}/metrics").read().decode()
        drained(c.url)


@pytest.mark.parametrize("stage", list(STAGES))
def test_bounded_soak_leaves_pools_and_memory_at_baseline(stage: str) -> None:
    """32 multi-turn clients for ``MEMSERVE_SOAK_SECONDS`` against every mode (stage)."""
    with Cluster(stage, model="tiny-llama3", device_blocks=512, host_blocks=256) as c:
        pids = [p.pid for p in c.procs]
        errors: list[tuple[int, Any]] = []
        done = Counter[str]()
        stop = time.monotonic() + SOAK_SECONDS

        def client(k: int) -> None:
            prompt = [100 + k, 200 + k, *range(300, 330)]
            turn = 0
            while time.monotonic() < stop:
                code, body = post(
                    f"{c.url}/v1/completions",
                    {"prompt": prompt, "max_tokens": 8, "ignore_eos": True, "temperature": 0, "user": f"client-{k}"},
                )
                if code != 200:
                    errors.append((code, body))
                    return
                done["requests"] += 1
                turn += 1
                prompt = prompt + body["choices"][0]["token_ids"] + [400 + turn] if turn % 4 else [100 + k, 7]

        warm = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in warm:
            t.start()
        # the baseline comes a quarter of the way in: code paths, buffers and oneDNN's primitive
        # cache (one per step size, bounded) fill early, and a long run's early growth is that,
        # not a leak (docs/reliability.md, the 90 s run); a leak still shows over the other 3/4
        time.sleep(SOAK_SECONDS / 4)
        baseline = {pid: rss_mb(pid) for pid in pids}
        for t in warm:
            t.join(timeout=SOAK_SECONDS + 120)
        assert not errors, errors[:3]
        assert done["requests"] > CLIENTS  # every client got through several turns
        drained(c.url)  # no request left anywhere, pools hold only cached prefixes
        grown = {pid: rss_mb(pid) - baseline[pid] for pid in pids}
        print(f"soak {stage}: {done['requests']} requests in {SOAK_SECONDS:.0f} s; RSS change (MB) {grown}")
        for pid in pids:
            assert rss_mb(pid) <= 1.25 * baseline[pid] + 64, (pid, baseline[pid], rss_mb(pid))
