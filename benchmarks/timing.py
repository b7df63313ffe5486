"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

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
