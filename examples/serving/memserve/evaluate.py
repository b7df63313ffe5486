"""``python -m memserve.evaluate``: the paper's comparisons, each one command.

    caching   colocated without vs with context caching        (ShareGPT and ReAct-like)
    pd        PD-Basic vs PD-Caching-1/2/3                      (ShareGPT)
    routing   least-load vs session-id vs prompt-tree routing   (LooGLE-like, 3 colocated instances)
    links     PD-Caching-2 over a fast link, and over a slow one (``--link-rate``) with a link-blind
              scheduler (always transfers) vs the cost model (recomputes when moving is slower)
    all       the four above

Each prints a table, writes JSON (rows + every request) and a figure (bars per mode, CDFs of TTFT and
JCT) under ``--out``, and checks that every mode returned the same greedy tokens. ``--quick`` shrinks
the workloads and uses the tiny model (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench import RequestResult, replay_http, save, summarize, table
from .checks import arg, check_positive, output_dir_arg, preset_arg
from .launch import Cluster
from .tokenizer import Tokenizer
from .workloads import SessionSpec, loogle, react, sharegpt


@dataclass(frozen=True)
class Mode:
    label: str
    stage: str
    policy: str = "prompt-tree"
    instances: int = 2  # colocated instances; disaggregated stages run 1 prefill + 1 decode
    link_rate: float = 0.0  # bytes per second of the prefill -> decode link (0: as fast as it is)
    link_aware: bool = True


def compare(
    name: str,
    modes: list[Mode],
    sessions: list[SessionSpec],
    *,
    model: str,
    rate: float,
    out: Path,
) -> tuple[list[dict[str, Any]], dict[str, list[RequestResult]], bool]:
    """Run ``sessions`` through every mode; returns table rows, per-request results, same-tokens flag."""
    check_positive("rate", rate, infinite=True)  # before the first deployment starts
    rows, samples = [], {}
    for mode in modes:
        t = time.perf_counter()
        slow = {"prefill-0": {"link_bytes_per_s": {"decode-1": mode.link_rate}}} if mode.link_rate else None
        with Cluster(
            mode.stage,
            prefill=1,
            decode=1,
            colocated=mode.instances,
            policy=mode.policy,
            model=model,
            faults=slow,
            link_aware=mode.link_aware,
        ) as cluster:
            results, makespan = asyncio.run(replay_http(cluster.url, sessions, rate=rate, progress=f"{mode.label:>17}"))
            with urllib.request.urlopen(f"{cluster.url}/admin/stats", timeout=60) as r:
                stats = json.loads(r.read())
        moved = sum(i["transport_stats"].get("bytes_sent", 0) for i in stats["instances"].values())
        rows.append(summarize(mode.label, results, stats["counters"], moved, makespan))
        samples[mode.label] = results
        print(f"{mode.label:>17}: {len(results)} requests in {time.perf_counter() - t:.1f}s (launch included)")
    first = next(iter(samples.values()))
    same = all([r.output for r in v] == [r.output for r in first] for v in samples.values())
    print(f"\n== {name} ==")
    print(table(rows))
    print(f"every mode gave the same greedy tokens: {same}")
    save(rows, out, name, samples)
    return rows, samples, same


def _gain(rows: list[dict[str, Any]], base: str, better: str, key: str) -> float:
    by = {r["stage"]: r for r in rows}
    return 1.0 - by[better][key] / by[base][key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memserve.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("comparison", nargs="+", choices=("caching", "pd", "routing", "links", "all"))
    ap.add_argument("--quick", action="store_true", help="tiny model, small workloads (about a minute)")
    ap.add_argument(
        "--model",
        type=preset_arg,
        default=None,
        help="model preset (default: 'default', or 'tiny-llama3' with --quick)",
    )
    ap.add_argument(
        "--rate",
        type=arg(check_positive, parse=float, infinite=True),
        default=1.0,
        help="sessions arriving per second (inf: all at once)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--link-rate",
        type=arg(check_positive, parse=float),
        default=None,
        help="the slow link's bytes/s (default 1e6; 2e5 with --quick)",
    )
    ap.add_argument("--out", type=output_dir_arg, default="memserve_results")
    args = ap.parse_args(argv)
    quick, out = args.quick, args.out
    model = args.model or ("tiny-llama3" if quick else "default")
    tok = Tokenizer("llama3")
    ok, t0 = True, time.perf_counter()
    todo = ("caching", "pd", "routing", "links") if "all" in args.comparison else tuple(args.comparison)
    chats = sharegpt(tok, 2 if quick else 8, max_turns=2 if quick else 4, max_reply=6 if quick else 64, seed=args.seed)
    if "caching" in todo:
        modes = [Mode("no-cache", "colocated"), Mode("cache", "colocated-caching")]
        ok &= compare("caching_sharegpt", modes, chats, model=model, rate=args.rate, out=out)[2]
        agents = react(
            sessions=2 if quick else 4,
            calls=(3, 4) if quick else (5, 10),
            fewshot_tokens=200 if quick else 800,
            seed=args.seed,
        )
        ok &= compare("caching_react", modes, agents, model=model, rate=args.rate, out=out)[2]
    if "pd" in todo:
        modes = [Mode(s, s) for s in ("pd-basic", "pd-caching-1", "pd-caching-2", "pd-caching-3")]
        rows, _, same = compare("pd_sharegpt", modes, chats, model=model, rate=args.rate, out=out)
        ok &= same
        print(
            f"PD-Caching-3 vs PD-Basic: mean TTFT {-_gain(rows, 'pd-basic', 'pd-caching-3', 'ttft_mean'):+.0%} "
            f"(paper -58%), mean JCT {-_gain(rows, 'pd-basic', 'pd-caching-3', 'jct_mean'):+.0%} (paper -17%)"
        )
    if "routing" in todo:
        docs = loogle(docs=3, doc_tokens=200 if quick else 2000, questions=2 if quick else 8, seed=args.seed)
        modes = [
            Mode(p, "colocated-caching", policy=p, instances=3) for p in ("least-load", "session-id", "prompt-tree")
        ]
        rows, _, same = compare("routing_loogle", modes, docs, model=model, rate=args.rate, out=out)
        ok &= same
        print(
            f"prompt-tree vs session-id: p99 TTFT {-_gain(rows, 'session-id', 'prompt-tree', 'ttft_p99'):+.0%} "
            f"(paper -59%)"
        )
    if "links" in todo:
        slow = args.link_rate or (2e5 if quick else 1e6)
        rates = (slow,) if quick else (slow, slow / 4)  # the slower one: moving loses clearly
        modes = [Mode("fast link", "pd-caching-2")]
        for r in rates:
            modes += [
                Mode(f"{r / 1e6:g} MB/s, always move", "pd-caching-2", link_rate=r, link_aware=False),
                Mode(f"{r / 1e6:g} MB/s, cost model", "pd-caching-2", link_rate=r),
            ]
        # short replies: what a handoff costs is then a visible part of a request's time
        short = sharegpt(
            tok, 2 if quick else 8, max_turns=2 if quick else 4, max_reply=6 if quick else 16, seed=args.seed
        )
        rows, _, same = compare("links_sharegpt", modes, short, model=model, rate=args.rate, out=out)
        ok &= same
        for r in rates:
            blind, aware = f"{r / 1e6:g} MB/s, always move", f"{r / 1e6:g} MB/s, cost model"
            print(
                f"over a {r / 1e6:g} MB/s link, the cost model vs always moving KV: mean JCT "
                f"{-_gain(rows, blind, aware, 'jct_mean'):+.0%}, p99 JCT {-_gain(rows, blind, aware, 'jct_p99'):+.0%}"
            )
    print(f"\nresults under {out}/; {time.perf_counter() - t0:.0f}s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
