"""``python -m memserve``: the main demo, on embedded defaults (no download, no network).

For each MemServe design stage it launches a deployment on this machine (1 prefill + 1 decode
instance; 2 colocated instances for the colocated stages), replays a small multi-turn ShareGPT
sample through the OpenAI API, and prints a comparison table (TTFT, TPOT, JCT, hit ratio, KV
moved) and saves it with a plot. Every stage must return the same greedy tokens.
"""

from __future__ import annotations

import argparse
import time

from .checks import arg, check_int, check_positive, output_dir_arg, preset_arg
from .evaluate import Mode, compare
from .stages import STAGES
from .tokenizer import Tokenizer
from .workloads import sharegpt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memserve", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated design stages")
    ap.add_argument("--model", type=preset_arg, default="default", help="model preset of every instance")
    ap.add_argument("--conversations", type=arg(check_int, 1), default=4)
    ap.add_argument("--turns", type=arg(check_int, 1), default=3)
    ap.add_argument("--reply-tokens", type=arg(check_int, 1), default=32, help="cap on each reply's length")
    ap.add_argument(
        "--rate",
        type=arg(check_positive, parse=float, infinite=True),
        default=2.0,
        help="sessions arriving per second (Poisson; inf: all at once)",
    )
    ap.add_argument("--out", type=output_dir_arg, default="memserve_results", help="where the table (JSON) and plot go")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {list(STAGES)}")
    sessions = sharegpt(Tokenizer("llama3"), args.conversations, max_turns=args.turns, max_reply=args.reply_tokens)
    print(
        f"workload: {len(sessions)} ShareGPT conversations (seeded sample), <= {args.turns} turns, replies <= "
        f"{args.reply_tokens} tokens, sessions arriving at {args.rate}/s; model preset {args.model!r}"
    )
    t0 = time.perf_counter()
    _, _, same = compare(
        "stages", [Mode(s, s) for s in stages], sessions, model=args.model, rate=args.rate, out=args.out
    )
    print(f"table and plot saved under {args.out}/ (stages.json, stages.png); {time.perf_counter() - t0:.0f}s in all")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
