"""Evaluation workloads as sessions of calls whose prompts grow by what the server generated.

A :class:`SessionSpec` is a prefix and a list of :class:`Call`\\ s. Call k's prompt is the history
(the prefix, every earlier call's appended tokens, the server's outputs and closing tokens) plus
its own ``append`` tokens; the client feeds back the token ids the server really generated
(random-weight text would not survive a decode/encode round trip). All generators are seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .sharegpt import load_conversations
from .tokenizer import Tokenizer

VOCAB_TEXT = 120_000  # random "text" ids stay below the llama3 special tokens


@dataclass(frozen=True)
class Call:
    append: tuple[int, ...]  # tokens added to the history before this call
    max_tokens: int
    close: tuple[int, ...] = ()  # tokens added after the call's output (an end-of-turn marker)


@dataclass(frozen=True)
class SessionSpec:
    id: str
    prefix: tuple[int, ...]
    calls: tuple[Call, ...]

    @property
    def group(self) -> str:
        """What the session shares its prefix with (a document, a few-shot prompt), if anything."""
        return self.id.split("/", 1)[0]


def sharegpt(
    tok: Tokenizer, n: int, *, max_turns: int = 4, max_reply: int = 64, seed: int = 0, pool: int = 2000
) -> list[SessionSpec]:
    """``n`` conversations sampled (seeded) from the first ``pool`` multi-turn ShareGPT ones.

    Each turn appends the user message (chat template) and asks for as many tokens as the
    dataset's answer had, capped at ``max_reply``.
    """
    convs = load_conversations(pool, min_rounds=2)
    picked = random.Random(seed).sample(convs, min(n, len(convs)))
    out = []
    for c in picked:
        calls = tuple(
            Call(
                tuple(tok.message("user", user) + tok.generation_prompt()),
                max(2, min(max_reply, len(tok.encode(reply)))),
                tuple(tok.end_of_turn()),
            )
            for user, reply in c.rounds[:max_turns]
        )
        out.append(SessionSpec(f"sharegpt-{c.id}", tuple(tok.bos()), calls))
    return out


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(VOCAB_TEXT) for _ in range(n))


def loogle(
    *,
    docs: int = 3,
    doc_tokens: int = 2000,
    questions: int = 6,
    question_tokens: int = 24,
    answer_tokens: int = 8,
    seed: int = 0,
) -> list[SessionSpec]:
    """LooGLE-like: long seeded documents, each with many short questions; documents interleaved.

    Every question is its own one-call session (document + question); the list is shuffled so
    that requests for different documents alternate.
    """
    rng = random.Random(seed)
    bodies = [_tokens(rng, doc_tokens) for _ in range(docs)]
    out = [
        SessionSpec(f"doc{d}/q{q}", bodies[d], (Call(_tokens(rng, question_tokens), answer_tokens),))
        for d in range(docs)
        for q in range(questions)
    ]
    rng.shuffle(out)
    return out


def react(
    *,
    sessions: int = 4,
    fewshot_tokens: int = 800,
    calls: tuple[int, int] = (5, 10),
    observation_tokens: int = 40,
    thought_tokens: int = 24,
    seed: int = 0,
) -> list[SessionSpec]:
    """ReAct-like: one few-shot prefix shared by every session; each session makes 5-10 calls, its
    prompt growing by the model's output (thought + action) and a new observation each time."""
    rng = random.Random(seed)
    fewshot = _tokens(rng, fewshot_tokens)
    return [
        SessionSpec(
            f"fewshot/s{s}",
            fewshot,
            tuple(Call(_tokens(rng, observation_tokens), thought_tokens) for _ in range(rng.randint(*calls))),
        )
        for s in range(sessions)
    ]


WORKLOADS = ("sharegpt", "loogle", "react")
