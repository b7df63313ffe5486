"""A request as the engine tracks it: its tokens, its KV blocks and its timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from mempool import Blocks, Match

from .sampling import SamplingParams


class State(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks
    RUNNING = "running"  # KV on the device, decoding
    SWAPPED = "swapped"  # preempted: own blocks on the host, prefix still locked on the device
    FINISHED = "finished"


@dataclass
class Metrics:
    """Times (``time.perf_counter``) and token counts of one request."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    cached_tokens: int = 0  # prompt tokens served from the cache at first prefill
    computed_tokens: int = 0  # tokens run through the model (recomputation included)
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(eq=False)
class Sequence:
    """One request. ``tokens`` is prompt + output; KV exists for ``tokens[:num_computed]``.

    Block table = the first ``prefix_blocks`` blocks of ``match`` (cached, locked, not ours) followed
    by ``own`` (one reference each, ours to free).
    """

    id: str
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    seed: int = 0  # the sampling seed; output position i draws from stream (seed, i)
    hold: bool = False  # keep the blocks after finishing, until the engine's release()
    state: State = State.WAITING
    num_computed: int = 0
    match: Match | None = None
    prefix_blocks: int = 0
    own: Blocks | None = None
    swapped: Blocks | None = None  # host copy of ``own`` while SWAPPED
    finish_reason: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    logits: list[torch.Tensor] = field(default_factory=list)
    text: bytearray | None = None  # the output's UTF-8 bytes, kept only to find ``params.stop`` strings in

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def table(self) -> list[int]:
        prefix = [] if self.match is None else self.match.blocks.tolist()[: self.prefix_blocks]
        return prefix + ([] if self.own is None else self.own.tolist())
