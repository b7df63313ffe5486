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

from .sharegpt import Conversation
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class RequestResult:
    session: int
    turn: int
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
    tokenizer: Tokenizer,
    conversations: list[Conversation],
    *,
    max_turns: int = 3,
    max_reply_tokens: int = 32,
    rate: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
) -> list[RequestResult]:
    """Replay ``conversations`` against the server at ``url``; sessions arrive at ``rate`` per second."""
    rng = random.Random(seed)
    results: list[RequestResult] = []
    total = sum(min(len(c.rounds), max_turns) for c in conversations)

    async def session(i: int, conv: Conversation, delay: float, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(delay)
        history = tokenizer.bos()
        for turn, (user, reply) in enumerate(conv.rounds[:max_turns]):
            prompt = history + tokenizer.message("user", user) + tokenizer.generation_prompt()
            n = max(2, min(max_reply_tokens, len(tokenizer.encode(reply))))
            ids, ttft, jct, cached = await _one(http, url, prompt, n, f"session-{i}")
            results.append(
                RequestResult(i, turn, len(prompt), cached, tuple(ids), ttft, (jct - ttft) / max(len(ids) - 1, 1), jct)
            )
            history = prompt + ids + tokenizer.end_of_turn()
            if progress:
                print(f"\r{progress}: {len(results)}/{total} requests", end="", file=sys.stderr, flush=True)

    t, delays = 0.0, []
    for _ in conversations:
        delays.append(t)
        t += rng.expovariate(rate)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        await asyncio.gather(*(session(i, c, d, http) for i, (c, d) in enumerate(zip(conversations, delays))))
    if progress:
        print(file=sys.stderr)
    return sorted(results, key=lambda r: (r.session, r.turn))


def summarize(stage: str, results: list[RequestResult], counters: dict[str, Any], moved_bytes: int) -> dict[str, Any]:
    """One table row: latency statistics, hit ratio and KV moved."""

    def stats(values: list[float]) -> tuple[float, float, float]:
        return statistics.mean(values), float(np.percentile(values, 50)), float(np.percentile(values, 99))

    row: dict[str, Any] = {"stage": stage, "requests": len(results)}
    for name in ("ttft", "tpot", "jct"):
        mean, p50, p99 = stats([getattr(r, name) for r in results])
        row.update({f"{name}_mean": mean, f"{name}_p50": p50, f"{name}_p99": p99})
    row["hit_ratio"] = sum(r.cached_tokens for r in results) / max(sum(r.prompt_tokens for r in results), 1)
    row["handoff_blocks"] = counters.get("handoff_blocks", 0)
    row["send_back_blocks"] = counters.get("send_back_blocks", 0)
    row["moved_mb"] = moved_bytes / 1e6
    return row


def save(rows: list[dict[str, Any]], out: Path) -> None:
    """Write ``rows`` as JSON and draw TTFT / JCT per stage (matplotlib, if installed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["stage"] for r in rows]
    for ax, (key, label) in zip(axes, (("ttft", "TTFT (s)"), ("jct", "JCT (s)"), ("hit_ratio", "hit ratio"))):
        if key == "hit_ratio":
            ax.bar(names, [r[key] for r in rows])
        else:
            ax.bar(names, [r[f"{key}_mean"] for r in rows], label="mean")
            ax.plot(names, [r[f"{key}_p99"] for r in rows], "k^", label="p99")
            ax.legend(fontsize=7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=40, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison table as text."""
    cols = [
        "stage",
        "requests",
        "ttft_mean",
        "ttft_p99",
        "tpot_mean",
        "jct_mean",
        "jct_p99",
        "hit_ratio",
        "handoff_blocks",
        "send_back_blocks",
        "moved_mb",
    ]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def asdicts(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
