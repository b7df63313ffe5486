"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def best(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return float(np.median(times))


def settle() -> None:
    """Collect garbage now and freeze what survives (models, libraries): a full pass of Python's
    cyclic collector walks every live object (~0.2 s here) and would otherwise land in one
    timed request at random. Serving processes do the same after startup (memserve's instances)."""
    gc.collect()
    gc.freeze()
