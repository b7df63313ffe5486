"""``python -m memserve.engine_demo``: the single-engine demo on embedded defaults (no download, no network).

Replays a few multi-turn ShareGPT conversations through the default random-weight model twice,
with context caching off and on, and shows per-turn TTFT, the cache hit ratio, that both runs
produced the same greedy tokens, and that the pool ends with no leaked block.
"""

from __future__ import annotations

import argparse
import statistics
import time

from . import Engine, EngineConfig, LlamaModel, Tokenizer, preset
from .checks import arg, check_device, check_int, preset_arg
from .replay import TurnResult, replay_chats
from .sharegpt import load_conversations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memserve.engine_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=preset_arg, default="default", help="model preset (default: 8 layers, hidden 512)")
    ap.add_argument("--conversations", type=arg(check_int, 1), default=4)
    ap.add_argument("--turns", type=arg(check_int, 1), default=3)
    ap.add_argument("--reply-tokens", type=arg(check_int, 1), default=24, help="cap on each reply's length")
    ap.add_argument("--concurrency", type=arg(check_int, 1), default=2)
    ap.add_argument("--device", type=arg(check_device, parse=str), default="cpu", help="cpu, cuda or cuda:k")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tok = Tokenizer("llama3")
    model = LlamaModel(preset(args.model, vocab_size=tok.vocab_size), device=args.device).init_random()
    convs = load_conversations(args.conversations, min_rounds=args.turns)
    c = model.config
    print(
        f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, "
        f"{c.num_params() / 1e6:.0f}M params, random weights (seed {c.seed}); tokenizer {tok.name}; "
        f"ready in {time.perf_counter() - t0:.1f}s"
    )
    print(f"workload: {len(convs)} ShareGPT conversations x {args.turns} turns, {args.concurrency} at a time")

    runs: dict[bool, list[TurnResult]] = {}
    for caching in (False, True):
        engine = Engine(
            model, EngineConfig(caching=caching, device_blocks=1024, host_blocks=1024), stop_ids=tok.stop_ids
        )
        runs[caching] = sorted(
            replay_chats(
                engine,
                tok,
                convs,
                max_turns=args.turns,
                max_reply_tokens=args.reply_tokens,
                concurrency=args.concurrency,
                progress=f"caching {'on' if caching else 'off'}",
            ),
            key=lambda r: (r.session, r.turn),
        )
        engine.pool.check_invariants()
        stats = engine.pool.stats()["device"]
        leaked = stats["used"] - stats["cached"]
        print(f"caching {'on ' if caching else 'off'}: {stats['cached']} blocks cached, {leaked} leaked")
        assert leaked == 0, "a finished request left blocks behind"
        engine.close()

    off, on = runs[False], runs[True]
    print("\nsession turn  prompt  cached   TTFT off    TTFT on")
    for a, b in zip(off, on):
        print(
            f"{a.session:7d} {a.turn:4d} {a.prompt_tokens:7d} {b.cached_tokens:7d} "
            f"{a.ttft * 1e3:8.1f}ms {b.ttft * 1e3:8.1f}ms"
        )
    same = all(a.output == b.output for a, b in zip(off, on))
    hit = sum(r.cached_tokens for r in on) / sum(r.prompt_tokens for r in on)
    mean_off, mean_on = statistics.mean(r.ttft for r in off), statistics.mean(r.ttft for r in on)
    later = [(a.ttft, b.ttft) for a, b in zip(off, on) if a.turn > 0]
    print(
        f"\nhit ratio {hit:.0%}; mean TTFT {mean_off * 1e3:.0f}ms -> {mean_on * 1e3:.0f}ms "
        f"({mean_off / mean_on:.1f}x; turns after the first: "
        f"{statistics.mean(x for x, _ in later) / statistics.mean(y for _, y in later):.1f}x)"
    )
    print(f"greedy tokens identical with and without caching: {same}")
    print(f"sample reply (random weights, so word salad): {tok.decode(on[0].output)[:80]!r}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
