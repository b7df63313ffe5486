"""``exec(prompt_len, cached_fraction)``: prefill seconds, fitted from the running model's measurements.

The model is ``a + b*u + c*u*L`` with ``u = L * (1 - f)`` uncached tokens: a fixed step cost, the
per-token cost of the projections, and attention of each new token over the whole context.
Instances report ``(prompt_len, cached_tokens, seconds)`` for every prefill; the scheduler refits
by least squares with non-negative coefficients once it has enough distinct samples.

>>> m = CostModel()
>>> for n in (64, 256, 512, 1024):
...     m.observe(n, 0, 0.01 + 4e-4 * n + 1e-7 * n * n)
>>> round(m.exec(1000, 0.0), 3), round(m.exec(1000, 0.9), 3)
(0.51, 0.06)
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import numpy.typing as npt


class CostModel:
    """Least-squares prefill-time model; starts from ``prior`` until ``min_samples`` are seen."""

    def __init__(self, prior: tuple[float, float, float] = (0.02, 4e-4, 1e-7), min_samples: int = 4) -> None:
        self.coef = np.asarray(prior, dtype=np.float64)
        self.min_samples = min_samples
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=512)

    @staticmethod
    def _features(prompt_len: float, cached: float) -> npt.NDArray[np.float64]:
        u = max(prompt_len - cached, 0.0)
        return np.array([1.0, u, u * prompt_len])

    def observe(self, prompt_len: int, cached_tokens: int, seconds: float) -> None:
        """Add one measured prefill and refit."""
        self._samples.append((float(prompt_len), float(cached_tokens), float(seconds)))
        if len({(p, c) for p, c, _ in self._samples}) >= self.min_samples:
            x = np.stack([self._features(p, c) for p, c, _ in self._samples])
            y = np.array([s for _, _, s in self._samples])
            self.coef = nonnegative_lstsq(x, y)

    def exec(self, prompt_len: int, cached_fraction: float) -> float:
        """Predicted prefill seconds for a prompt of ``prompt_len`` tokens, ``cached_fraction`` cached."""
        return float(self._features(prompt_len, prompt_len * cached_fraction) @ self.coef)


def nonnegative_lstsq(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``argmin |x c - y|`` over ``c >= 0``, exactly, for a few columns.

    The optimum is the plain least-squares fit on its own support (the columns where it is
    positive), so every support is tried and the best fit that is non-negative wins: 2^k - 1
    small fits for k columns (7 here). Clipping the unconstrained fit's negative coefficients to
    0, as this model did before, leaves the others fitted to a term that is gone. (``scipy.optimize.nnls``
    solves the general problem; scipy is no dependency of ours, and three columns need no more.)
    """
    cols = x.shape[1]
    norms = np.abs(x).max(axis=0)
    norms[norms == 0] = 1.0
    unit = x / norms  # columns of one scale (here 1, tokens and tokens^2): lstsq cuts none off as noise
    best, best_sq = np.zeros(cols), float(y @ y)
    for size in range(1, cols + 1):
        for support in itertools.combinations(range(cols), size):
            part, *_ = np.linalg.lstsq(unit[:, support], y, rcond=None)
            if (part < 0).any():
                continue
            coef = np.zeros(cols)
            coef[list(support)] = part
            sq = float(np.sum((unit @ coef - y) ** 2))
            if sq < best_sq:
                best, best_sq = coef, sq
    return best / norms
