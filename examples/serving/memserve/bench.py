"""Replay multi-turn ShareGPT conversations against a running memserve over HTTP, per design stage.

Sessions arrive as a Poisson process; within a session, turn k+1 is sent when turn k finished
(its prompt = turn k's prompt + the streamed reply + the next user message, as token ids). Each
request streams, so TTFT, TPOT and JCT are measured as a client sees them; ``usage`` gives the
cached prompt tokens and the scheduler's counters the KV blocks and bytes moved.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from .checks import check_positive
from .workloads import SessionSpec


@dataclass(frozen=True)
class RequestResult:
    session: int
    turn: int
    group: str
    prompt_tokens: int
    cached_tokens: int
    output: tuple[int, ...]
    ttft: float
    tpot: float
    jct: float


async def _one(
    http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int, user: str
) -> tuple[list[int], float, float, int]:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": user,
    }
    start = time.perf_counter()
    ttft, cached = 0.0, 0
    ids: list[int] = []
    async with http.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                if choice.get("token_ids"):
                    if not ids:
                        ttft = time.perf_counter() - start
                    ids += choice["token_ids"]
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return ids, ttft, time.perf_counter() - start, cached


async def replay_http(
    url: str,
    sessions: list[SessionSpec],
    *,
    rate: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
    stall_s: float = 300.0,
) -> tuple[list[RequestResult], float]:
    """Replay ``sessions`` against the server at ``url``; they arrive as a Poisson process at ``rate``
    per second, in order, and each runs its calls one after another. Returns the results and the
    makespan in seconds. A response that sends nothing for ``stall_s`` seconds (or a server that
    does not accept the connection in 30 s) fails the replay with ``aiohttp``'s timeout error;
    a ``rate`` or ``stall_s`` that is not a positive number is a ``ValueError`` (``rate=inf``: all at once)."""
    check_positive("rate", rate, infinite=True)
    check_positive("stall_s", stall_s)
    rng = random.Random(seed)
    results: list[RequestResult] = []
    total = sum(len(s.calls) for s in sessions)

    async def run(i: int, spec: SessionSpec, delay: float, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(delay)
        history = list(spec.prefix)
        for k, call in enumerate(spec.calls):
            prompt = history + list(call.append)
            ids, ttft, jct, cached = await _one(http, url, prompt, call.max_tokens, spec.id)
            results.append(
                RequestResult(
                    i, k, spec.group, len(prompt), cached, tuple(ids), ttft, (jct - ttft) / max(len(ids) - 1, 1), jct
                )
            )
            history = prompt + ids + list(call.close)
            if progress:
                done = len(results)
                bar = "#" * (20 * done // total)
                print(f"\r{progress} [{bar:<20}] {done}/{total} requests", end="", file=sys.stderr, flush=True)

    t, delays = 0.0, []
    for _ in sessions:
        delays.append(t)
        t += rng.expovariate(rate)
    start = time.perf_counter()
    limits = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=stall_s)
    async with aiohttp.ClientSession(timeout=limits) as http:
        await asyncio.gather(*(run(i, s, d, http) for i, (s, d) in enumerate(zip(sessions, delays))))
    makespan = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    return sorted(results, key=lambda r: (r.session, r.turn)), makespan


def summarize(
    stage: str, results: list[RequestResult], counters: dict[str, Any], moved_bytes: int, makespan: float = 0.0
) -> dict[str, Any]:
    """One table row: latency statistics, throughput, hit ratio and KV moved."""

    def stats(values: list[float]) -> tuple[float, float, float]:
        return statistics.mean(values), float(np.percentile(values, 50)), float(np.percentile(values, 99))

    row: dict[str, Any] = {"stage": stage, "requests": len(results)}
    for name in ("ttft", "tpot", "jct"):
        mean, p50, p99 = stats([getattr(r, name) for r in results])
        row.update({f"{name}_mean": mean, f"{name}_p50": p50, f"{name}_p99": p99})
    row["tokens_per_s"] = sum(len(r.output) for r in results) / makespan if makespan else 0.0
    row["hit_ratio"] = sum(r.cached_tokens for r in results) / max(sum(r.prompt_tokens for r in results), 1)
    row["handoff_blocks"] = counters.get("handoff_blocks", 0)
    row["send_back_blocks"] = counters.get("send_back_blocks", 0)
    row["pushes"] = counters.get("pushes", 0)
    row["recomputed"] = counters.get("handoffs_recomputed", 0)
    row["moved_mb"] = moved_bytes / 1e6
    return row


def save(
    rows: list[dict[str, Any]], out: Path, name: str = "stages", samples: dict[str, list[RequestResult]] | None = None
) -> None:
    """Write ``rows`` (and per-request ``samples``) as JSON; draw bars per mode and, with samples,
    the CDFs of TTFT and JCT (matplotlib, if installed)."""
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"rows": rows}
    if samples:
        payload["requests"] = {k: [asdict(r) for r in v] for k, v in samples.items()}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ncols = 5 if samples else 3
    fig, axes = plt.subplots(1, ncols, figsize=(3.4 * ncols, 3.6))
    modes = [r["stage"] for r in rows]
    for ax, (key, label) in zip(axes, (("ttft", "TTFT (s)"), ("jct", "JCT (s)"), ("hit_ratio", "hit ratio"))):
        if key == "hit_ratio":
            ax.bar(modes, [r[key] for r in rows])
        else:
            ax.bar(modes, [r[f"{key}_mean"] for r in rows], label="mean")
            ax.plot(modes, [r[f"{key}_p99"] for r in rows], "k^", label="p99")
            ax.legend(fontsize=7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=40, labelsize=7)
    if samples:
        for ax, key in zip(axes[3:], ("ttft", "jct")):
            for mode, res in samples.items():
                values = np.sort([getattr(r, key) for r in res])
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=mode)
            ax.set(xlabel=f"{key.upper()} (s)", ylabel="CDF", xscale="log")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison table as text."""
    cols = [
        "stage",
        "requests",
        "ttft_mean",
        "ttft_p50",
        "ttft_p99",
        "tpot_mean",
        "jct_mean",
        "jct_p99",
        "tokens_per_s",
        "hit_ratio",
        "handoff_blocks",
        "send_back_blocks",
        "pushes",
        "recomputed",
        "moved_mb",
    ]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
