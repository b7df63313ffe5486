"""``python -m memserve``: the main demo, on embedded defaults (no download, no network).

For each MemServe design stage it launches a deployment on this machine (1 prefill + 1 decode
instance; 2 colocated instances for the colocated stages), replays a small multi-turn ShareGPT
sample through the OpenAI API, and prints a comparison table (TTFT, TPOT, JCT, hit ratio, KV
moved) and saves it with a plot. Every stage must return the same greedy tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path

from .bench import replay_http, save, summarize, table
from .launch import Cluster
from .sharegpt import load_conversations
from .stages import STAGES
from .tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memserve", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated design stages")
    ap.add_argument("--model", default="default", help="model preset of every instance")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--reply-tokens", type=int, default=32, help="cap on each reply's length")
    ap.add_argument("--rate", type=float, default=2.0, help="sessions arriving per second (Poisson)")
    ap.add_argument("--out", default="memserve_results", help="where the table (JSON) and plot go")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {list(STAGES)}")

    tok = Tokenizer("llama3")
    convs = load_conversations(args.conversations, min_rounds=args.turns)
    print(
        f"workload: {len(convs)} ShareGPT conversations x {args.turns} turns, replies <= {args.reply_tokens} "
        f"tokens, sessions arriving at {args.rate}/s; model preset {args.model!r}"
    )
    rows, outputs = [], {}
    t0 = time.perf_counter()
    for name in stages:
        t = time.perf_counter()
        with Cluster(name, prefill=1, decode=1, model=args.model) as cluster:
            results = asyncio.run(
                replay_http(
                    cluster.url,
                    tok,
                    convs,
                    max_turns=args.turns,
                    max_reply_tokens=args.reply_tokens,
                    rate=args.rate,
                    progress=f"{name:>17}",
                )
            )
            with urllib.request.urlopen(f"{cluster.url}/admin/stats", timeout=60) as r:
                stats = json.loads(r.read())
        moved = sum(i["transport_stats"].get("bytes_sent", 0) for i in stats["instances"].values())
        rows.append(summarize(name, results, stats["counters"], moved))
        outputs[name] = [r.output for r in results]
        print(f"{name:>17}: {len(results)} requests in {time.perf_counter() - t:.1f}s (launch included)")
    print()
    print(table(rows))
    save(rows, Path(args.out))
    first = next(iter(outputs.values()))
    same = all(o == first for o in outputs.values())
    print(f"\nevery stage gave the same greedy tokens: {same}")
    print(f"table and plot saved under {args.out}/ (stages.json, stages.png); {time.perf_counter() - t0:.0f}s in all")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
