"""HF ``model.generate`` with the mempool cache (``PoolGenerator``) against HF's default cache.

Goal (issue: integrations): over a short multi-turn ShareGPT replay, same model and dtype, same
run, mean TTFT at least 4x lower at the replay's hit ratio, and no slower on cold prompts.

Each turn's history carries the model's own answer (as long as the dataset's, up to
``MAX_REPLY`` tokens), as a chat client's would: the mempool side generates it (and so caches
it); the default-cache side, set up for the same ``max_new_tokens`` (HF's setup depends on it),
stops at the first token, which must equal the mempool side's. Run with ``make bench``.

A third side bounds what any prefix cache could give here: HF's own ``DynamicCache``, already
holding the K/V of exactly the prefix the mempool side finds cached (computed before the turn's
timed runs, untimed), so that its TTFT has no lookup, no copy in and no block table in it.

The replay runs on two models: the memserve default's shape as a ``LlamaForCausalLM`` (its
128k-token vocabulary projection is three quarters of its weights, so a turn's fixed cost caps
what any cache gains) and Qwen2.5-0.5B's published shape, whose layers carry most of the work.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
import torch

from benchmarks.hf_models import hf_llama, hf_qwen2_0_5b
from benchmarks.timing import settle
from mempool import MemPool
from memserve import Tokenizer, preset

pytest.importorskip("transformers")
from mempool.integrations.transformers import CACHE_ARG, PoolGenerator, pool_config_for

CONVERSATIONS, TURNS, MAX_REPLY, MAX_PROMPT = 8, 4, 256, 2048
# the replay's models: (table, what the note calls it, how to build it)
REPLAY_MODELS = {
    "default": (
        "hf_generate_ttft",
        "memserve-default-shaped LlamaForCausalLM",
        lambda: hf_llama(preset("default"), attn="sdpa"),
    ),
    "qwen2-0.5b": (
        "hf_generate_ttft_qwen2_0_5b",
        "Qwen2.5-0.5B-shaped Qwen2ForCausalLM (random weights)",
        hf_qwen2_0_5b,
    ),
}


class FirstToken:
    """An HF streamer that records when the first generated token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.calls, self.first = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def ttft(generate: Any, prompt: list[int], n: int, **kwargs: Any) -> tuple[float, list[int]]:
    streamer = FirstToken()
    out = generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, streamer=streamer, **kwargs)
    return streamer.first, out[0].tolist()


def stop_after_first_token() -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class First(StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.ones(input_ids.shape[0], dtype=torch.bool)

    return StoppingCriteriaList([First()])


def holding(model: Any, prefix: list[int]) -> Any:
    """HF's ``DynamicCache`` holding the K/V of ``prefix`` (the ideal cache's starting point)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(torch.tensor([prefix]), **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
    return cache


@pytest.mark.parametrize("shape", list(REPLAY_MODELS))
def test_generate_ttft_mempool_vs_default_cache(report: Any, shape: str) -> None:
    from memserve.sharegpt import load_conversations

    table, described, build = REPLAY_MODELS[shape]
    model = build()
    settle()
    pool = MemPool(pool_config_for(model, device_blocks=4096, host_blocks=4096))
    gen = PoolGenerator(model, pool)
    tok = Tokenizer("llama3")
    rows = []
    with torch.inference_mode():
        # warm-up: every side's cold and cached paths once, so first-use costs land on no timed turn
        ttft(model.generate, list(range(64)), 2)
        _, first = ttft(gen.generate, list(range(1000, 1064)), 2)
        again = first + list(range(2000, 2030))
        ttft(gen.generate, again, 2)  # a hit: match, tail copy, gathers
        ttft(model.generate, again, 2, **{CACHE_ARG: holding(model, first[:-1])})
        for c, conv in enumerate(load_conversations(40, min_rounds=TURNS)[:CONVERSATIONS]):
            history, with_kv = tok.bos(), 0  # with_kv: tokens of the last turn that have K/V
            for turn, (user, reply) in enumerate(conv.rounds[:TURNS]):
                prompt = history + tok.message("user", user) + tok.generation_prompt()
                if len(prompt) > MAX_PROMPT:
                    break
                # the reply the next turn's history carries; the last turn's is never read again
                n = max(2, min(MAX_REPLY, len(tok.encode(reply)))) if turn < TURNS - 1 else 2
                cached_before = gen.stats["cached_tokens"]
                ideal = holding(model, prompt[:with_kv]) if with_kv else None
                t_hf, out_hf = ttft(model.generate, prompt, n, stopping_criteria=stop_after_first_token())
                sides: list[tuple[str, Any, dict[str, Any]]] = [("mp", gen.generate, {})]
                if ideal is not None:  # cold, the ideal cache is HF's default itself: t_hf
                    stop = stop_after_first_token()
                    sides.append(("ideal", model.generate, {CACHE_ARG: ideal, "stopping_criteria": stop}))
                got = {who: ttft(run, prompt, n, **kw) for who, run, kw in (sides if turn % 2 else sides[::-1])}
                (t_mp, out_mp), (t_ideal, out_ideal) = got["mp"], got.get("ideal", (t_hf, out_hf))
                cached = gen.stats["cached_tokens"] - cached_before
                assert out_mp[: len(prompt) + 1] == out_hf == out_ideal, (c, turn)  # the cache changes no token
                assert cached == with_kv, (c, turn)  # the ideal side held what the pool had cached
                rows.append((turn, len(prompt), cached, t_hf, t_mp, t_ideal))
                history, with_kv = out_mp + tok.end_of_turn(), len(out_mp) - 1
            print(f"\rhf replay ({shape}): conversation {c + 1}/{CONVERSATIONS}", end="", flush=True)
    print()
    pool.check_invariants()
    for label, sel in (("all turns", rows), ("cold (turn 1)", [r for r in rows if r[0] == 0]),
                       ("later turns", [r for r in rows if r[0] > 0])):  # fmt: skip
        hf_mean, mp_mean = statistics.mean(r[3] for r in sel), statistics.mean(r[4] for r in sel)
        ideal_mean = statistics.mean(r[5] for r in sel)
        report.add(
            table,
            turns=label,
            n=len(sel),
            mean_prompt=statistics.mean(r[1] for r in sel),
            hit_ratio=sum(r[2] for r in sel) / sum(r[1] for r in sel),
            hf_default_cache=hf_mean,
            mempool_cache=mp_mean,
            speedup=hf_mean / mp_mean,
            median_speedup=statistics.median(r[3] for r in sel) / statistics.median(r[4] for r in sel),
            ideal_cache=ideal_mean,
            ideal_speedup=hf_mean / ideal_mean,
            mempool_over_ideal=mp_mean / ideal_mean,
        )
    report.note(
        table,
        f"{CONVERSATIONS} ShareGPT conversations x up to {TURNS} turns (replies <= {MAX_REPLY} tokens, prompts <= "
        f"{MAX_PROMPT}), {described}, float32, sdpa; mean TTFT in seconds; ideal_cache: HF's "
        "DynamicCache already holding the prefix the pool had cached (HF's default on cold turns)",
    )

    def draw(table: list[dict[str, Any]], ax: Any) -> None:
        turns = sorted({r[0] for r in rows})
        for i, label in ((3, "HF default cache"), (4, "mempool cache"), (5, "ideal: HF cache already holding it")):
            ax.plot([t + 1 for t in turns], [statistics.mean(r[i] for r in rows if r[0] == t) for t in turns], "-o",
                    label=label)  # fmt: skip
        ax.set(xlabel="turn", ylabel="mean TTFT (s)")
        ax.legend()

    report.plot(table, draw)
    pool.close()


@pytest.mark.parametrize("shape", list(REPLAY_MODELS))
def test_cold_prompt_ttft_mempool_vs_default_cache(report: Any, shape: str) -> None:
    """Cold prompts only (each mempool run in a fresh namespace: a guaranteed miss), both orders,
    several repetitions: the cache's own overhead, where it has nothing to reuse."""
    from memserve.sharegpt import load_conversations

    table, _, build = REPLAY_MODELS[shape]
    table += "_cold"
    model = build()
    settle()
    pool = MemPool(pool_config_for(model, device_blocks=4096))
    tok = Tokenizer("llama3")
    prompts = [tok.chat([{"role": "user", "content": c.rounds[0][0]}]) for c in load_conversations(200, min_rounds=1)]
    prompts = [p for p in prompts if len(p) <= MAX_PROMPT][:16]
    ttft(model.generate, list(range(64)), 2)
    hf_times, mp_times = [], []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for rep in range(4):
                gen = PoolGenerator(model, pool, namespace=(i, rep))  # nothing cached there
                runs = [(hf_times, model.generate), (mp_times, gen.generate)]
                for times, generate in runs if rep % 2 else runs[::-1]:
                    times.append(ttft(generate, prompt, 8)[0])
            print(f"\rcold prompts: {i + 1}/{len(prompts)}", end="", flush=True)
    print()
    hf_med, mp_med = statistics.median(hf_times), statistics.median(mp_times)
    report.add(
        table,
        prompts=len(prompts),
        runs_each=len(hf_times),
        mean_prompt=statistics.mean(len(p) for p in prompts),
        hf_default_cache=hf_med,
        mempool_cache=mp_med,
        mempool_over_default=mp_med / hf_med,
    )
    report.note(table, "median TTFT (s) of cold prompts (first ShareGPT user messages)")
    pool.close()
