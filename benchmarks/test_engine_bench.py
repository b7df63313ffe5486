"""memserve engine against Hugging Face transformers (eager attention) on the same weights and dtype.

Goals (issue: engine): prefill no slower than HF for 128/512/1,000/2,000 tokens; a decode step at
batch 16 costs under 2x batch 1; mean TTFT over a short multi-turn ShareGPT replay at least 5x
lower with context caching on than off, with identical greedy tokens. Run with ``make bench``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.hf_models import hf_llama
from benchmarks.timing import best, settle
from memserve import Engine, EngineConfig, LlamaModel, SamplingParams, Tokenizer, load_pretrained, preset

transformers = pytest.importorskip("transformers")
from mempool.integrations.transformers import CACHE_ARG  # noqa: E402 (after the skip)

PREFILL = [128, 512, 1000, 2000]
DECODE_CONTEXT = 256
ROUNDS = 5  # multi-turn replays, each caching off and on


@pytest.fixture(scope="module")
def models() -> tuple[LlamaModel, Any]:
    """The default memserve model and an HF LlamaForCausalLM holding the same weights."""
    hf = hf_llama(preset("default"))
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(Path(folder))
    settle()
    return ours, hf


def engine_for(model: LlamaModel, **kw: Any) -> Engine:
    return Engine(model, EngineConfig(device_blocks=2048, host_blocks=0, **kw))


@pytest.mark.parametrize("n", PREFILL)
def test_prefill_vs_transformers(report: Any, models: tuple[LlamaModel, Any], n: int) -> None:
    ours, hf = models
    prompt = torch.randint(0, ours.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    engine = engine_for(ours, caching=False)

    def ttft() -> None:  # a whole request through the engine: queue, allocate, prefill, first token
        engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))

    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def hf_prefill() -> None:
        hf(ids, use_cache=True, logits_to_keep=1)

    reps = 5 if n <= 1000 else 3
    t_ours, t_hf = best(ttft, reps), best(hf_prefill, reps)
    with torch.inference_mode():  # the two did the same work: the same next token
        want = int(hf(ids, logits_to_keep=1).logits[0, -1].argmax())
    assert engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True)) == [[want]]
    report.note("engine_prefill", "seconds for one prompt (ours: a whole request through the engine, cache off)")
    report.add("engine_prefill", tokens=n, memserve=t_ours, hf_eager=t_hf, speedup=t_hf / t_ours)
    report.plot(
        "engine_prefill",
        lambda rows, ax: (
            ax.plot([r["tokens"] for r in rows], [r["memserve"] for r in rows], "-o", label="memserve"),
            ax.plot([r["tokens"] for r in rows], [r["hf_eager"] for r in rows], "--s", label="HF eager"),
            ax.set(xlabel="prompt tokens", ylabel="seconds"),
            ax.legend(),
        ),
    )
    engine.close()


def test_decode_step_vs_transformers(report: Any, models: tuple[LlamaModel, Any]) -> None:
    """Decode steps at batch 1 and 16: ours (the defaults; with the greedy screen off: a second copy
    of the model, since the screen is the model's; with decode attention through gather + SDPA
    instead of the in-place kernel) and HF's, in turns of 5 consecutive steps of each
    (6 rounds), so that every figure spans the same stretch of this shared machine's time. The
    first step of a turn refills caches the others evicted (a serving engine runs its steps back
    to back) and is not counted: each figure is the median of 24 steps."""
    ours, hf = models
    unscreened = LlamaModel(ours.config)
    unscreened.load_state_dict(ours.state_dict())
    batches = (1, 16)
    kinds = {
        "ours": (ours, {}),
        "ours_no_screen": (unscreened, {"screen_greedy": False}),
        "ours_sdpa": (ours, {"decode_kernel": False}),
    }
    engines, steps = [], {}
    for batch in batches:
        prompts = torch.randint(
            0, ours.config.vocab_size, (batch, DECODE_CONTEXT), generator=torch.Generator().manual_seed(batch)
        )
        for who, (model, switches) in kinds.items():
            engine = engine_for(model, caching=False, max_running=batch, **switches)
            engines.append(engine)
            for p in prompts.tolist():
                engine.add_request(p, SamplingParams(max_tokens=64, ignore_eos=True))
            engine.step()  # the prefill
            steps[who, batch] = lambda e=engine, b=batch: _decoded(e.step(), b)
        with torch.inference_mode():
            out = hf(prompts, use_cache=True, logits_to_keep=1)
        steps["hf", batch] = _hf_decoder(hf, getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for _ in range(6):
        for key, fn in steps.items():
            fn()
            for _ in range(4):
                a = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - a)
    med = {k: statistics.median(v) for k, v in times.items()}
    report.note(
        "engine_decode",
        f"seconds per decode step at context ~{DECODE_CONTEXT} (medians of 24 steps in interleaved turns); "
        "x_batch1 = step / batch-1 step; no_screen: EngineConfig(screen_greedy=False); "
        "gather_sdpa: EngineConfig(decode_kernel=False)",
    )
    for b in batches:
        report.add(
            "engine_decode",
            batch=b,
            memserve=med["ours", b],
            memserve_no_screen=med["ours_no_screen", b],
            memserve_gather_sdpa=med["ours_sdpa", b],
            hf_eager=med["hf", b],
            speedup=med["hf", b] / med["ours", b],
            memserve_x_batch1=med["ours", b] / med["ours", 1],
            no_screen_x_batch1=med["ours_no_screen", b] / med["ours_no_screen", 1],
            gather_sdpa_x_batch1=med["ours_sdpa", b] / med["ours_sdpa", 1],
            hf_x_batch1=med["hf", b] / med["hf", 1],
        )
    report.plot("engine_decode", draw_decode)
    for engine in engines:
        engine.close()


def draw_decode(rows: list[dict[str, Any]], ax: Any) -> None:
    """Step time of each system at batch 1 and 16, bars labelled with batch 16 / batch 1."""
    systems = (
        ("memserve", "memserve_x_batch1", "memserve"),
        ("memserve_no_screen", "no_screen_x_batch1", "no greedy screen"),
        ("memserve_gather_sdpa", "gather_sdpa_x_batch1", "gather + SDPA"),
        ("hf_eager", "hf_x_batch1", "HF eager"),
    )
    width = 0.8 / len(rows)
    for j, row in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(systems))]
        label = f"batch {row['batch']}" + (" (on the bar: / batch 1; goal < 2x)" if j else "")
        bars = ax.bar(xs, [row[key] * 1e3 for key, _, _ in systems], width, label=label)
        if j:
            ax.bar_label(bars, [f"{row[ratio]:.2f}x" for _, ratio, _ in systems], fontsize=8)
    ax.set_xticks(range(len(systems)), [label for _, _, label in systems])
    ax.set(ylabel="ms per decode step")
    ax.legend()


def _decoded(outputs: list[Any], batch: int) -> None:
    assert len(outputs) == batch  # every step decoded the whole batch


def _hf_decoder(hf: Any, cache: Any, nxt: torch.Tensor) -> Any:
    @torch.inference_mode()
    def step() -> None:
        hf(nxt, **{CACHE_ARG: cache}, use_cache=True).logits.argmax(-1)

    return step


def test_multi_turn_ttft_caching(report: Any, models: tuple[LlamaModel, Any]) -> None:
    """The same replay with caching off and on, in ROUNDS rounds of alternating order (a single
    replay on this shared machine drifts by up to ~20%): the figure is the median of the rounds'
    ratios, with their range."""
    from memserve.replay import replay_chats
    from memserve.sharegpt import load_conversations

    ours, _ = models
    tok = Tokenizer("llama3")
    convs = load_conversations(8, min_rounds=4)
    # untimed warm-up of both modes, so that first-use costs (buffers, kernel setup, the cache's
    # own paths) land on no timed run
    for caching in (False, True):
        warm = Engine(ours, EngineConfig(caching=caching, device_blocks=2048, host_blocks=0))
        replay_chats(warm, tok, convs[:4], max_turns=2, max_reply_tokens=16, max_context=4096, concurrency=4)
        warm.close()
    runs: dict[bool, list[list[Any]]] = {False: [], True: []}
    key = lambda r: (r.session, r.turn)  # noqa: E731
    for round_ in range(ROUNDS):
        for caching in (False, True) if round_ % 2 == 0 else (True, False):
            engine = Engine(ours, EngineConfig(caching=caching, device_blocks=2048, host_blocks=2048))
            rows = replay_chats(
                engine,
                tok,
                convs,
                max_turns=4,
                max_reply_tokens=256,
                max_context=4096,
                concurrency=4,
                progress=f"round {round_ + 1}/{ROUNDS}, caching={'on' if caching else 'off'}",
            )
            runs[caching].append(sorted(rows, key=key))
            engine.close()
    reference = [r.output for r in runs[False][0]]
    for rows in runs[False] + runs[True]:
        assert [r.output for r in rows] == reference  # caching changes no token, in any round

    def mean_ttft(rows: list[Any], later: bool = False) -> float:
        return statistics.mean(r.ttft for r in rows if r.turn or not later)

    ratios = [mean_ttft(off) / mean_ttft(on) for off, on in zip(runs[False], runs[True])]
    later = [mean_ttft(off, True) / mean_ttft(on, True) for off, on in zip(runs[False], runs[True])]
    for label, caching in (("off", False), ("on", True)):
        ttfts = [r.ttft for rows in runs[caching] for r in rows]
        rows = runs[caching][0]
        report.add(
            "engine_multi_turn",
            caching=label,
            turns=len(rows),
            rounds=ROUNDS,
            mean_ttft=statistics.mean(ttfts),
            p50_ttft=float(np.percentile(ttfts, 50)),
            p99_ttft=float(np.percentile(ttfts, 99)),
            hit_ratio=sum(r.cached_tokens for r in rows) / sum(r.prompt_tokens for r in rows),
            mean_prompt=statistics.mean(r.prompt_tokens for r in rows),
        )
    report.note(
        "engine_multi_turn",
        f"8 ShareGPT conversations x 4 turns (replies <= 256 tokens), 4 sessions at a time, {ROUNDS} rounds; "
        f"mean TTFT caching off / on = {statistics.median(ratios):.2f}x over all turns (rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f}), {statistics.median(later):.2f}x over turns after the first "
        f"({min(later):.2f}-{max(later):.2f}); TTFT columns pool every round",
    )

    def draw(rows: list[dict[str, Any]], ax: Any) -> None:
        turns = sorted({r.turn for r in runs[False][0]})
        for label, caching in (("caching off", False), ("caching on", True)):
            pooled = [r for rows in runs[caching] for r in rows]
            ax.plot(turns, [statistics.mean(r.ttft for r in pooled if r.turn == t) for t in turns], "-o", label=label)
        ax.set(xlabel="turn", ylabel="mean TTFT (s)")
        ax.legend()

    report.plot("engine_multi_turn", draw)
