"""Synthetic multi-turn chat with ShareGPT's shape, for API-level benchmarks (no model needed).

Turn k's prompt is every earlier turn plus a new user message; user messages average about 85
tokens and answers about 290 (ShareGPT V3's means), drawn from seeded log-normals; a fraction
of conversations open with one shared 500-token system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Turn:
    conversation: int
    prompt: np.ndarray  # int32 token ids: the whole history plus the new user message
    answer: np.ndarray  # int32 token ids the model "generated"


def _lengths(rng: np.random.Generator, mean: float, n: int, cap: int) -> np.ndarray:
    sigma = 0.9
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, n).astype(int), 4, cap)


def chat_turns(
    conversations: int = 200,
    turns: tuple[int, int] = (2, 8),
    user_mean: float = 85,
    answer_mean: float = 290,
    system_prompt: int = 500,
    shared_fraction: float = 0.5,
    seed: int = 0,
    vocab: int = 128_000,
) -> list[Turn]:
    """Requests in arrival order: conversations interleaved, turns in order within each."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, system_prompt, dtype=np.int32)
    histories = [
        system.copy() if rng.random() < shared_fraction else np.empty(0, np.int32) for _ in range(conversations)
    ]
    left = rng.integers(turns[0], turns[1] + 1, conversations)
    out: list[Turn] = []
    active = list(range(conversations))
    while active:
        c = active[int(rng.integers(len(active)))]
        user = rng.integers(0, vocab, _lengths(rng, user_mean, 1, 2048)[0], dtype=np.int32)
        answer = rng.integers(0, vocab, _lengths(rng, answer_mean, 1, 2048)[0], dtype=np.int32)
        prompt = np.concatenate((histories[c], user))
        out.append(Turn(c, prompt, answer))
        histories[c] = np.concatenate((prompt, answer))
        left[c] -= 1
        if left[c] == 0:
            active.remove(c)
    return out
