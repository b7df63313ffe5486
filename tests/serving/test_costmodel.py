"""The scheduler's prefill cost model: a least-squares fit with non-negative coefficients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.costmodel import CostModel, nonnegative_lstsq
from tests.conftest import examples


def test_it_recovers_exact_costs_and_keeps_the_prior_until_enough_samples() -> None:
    m = CostModel(prior=(1.0, 0.0, 0.0), min_samples=3)
    truth = lambda n, c: 0.01 + 2e-4 * (n - c) + 1e-7 * (n - c) * n  # noqa: E731
    m.observe(100, 0, truth(100, 0))
    m.observe(100, 0, truth(100, 0))  # the same (prompt, cached) again: still one distinct sample
    m.observe(300, 100, truth(300, 100))
    assert m.exec(500, 0.0) == 1.0  # two distinct samples: the prior
    m.observe(800, 0, truth(800, 0))
    assert m.coef == pytest.approx([0.01, 2e-4, 1e-7], rel=1e-6)
    assert m.exec(1000, 0.5) == pytest.approx(truth(1000, 500), rel=1e-6)


def test_a_term_the_data_contradicts_is_zero_and_the_rest_refit() -> None:
    """Prefills that took about as long whatever their length (two instances on two cores): the
    plain fit gives the per-token terms negative weights. Dropping them to 0 must refit the
    fixed cost: clipping the plain fit kept a fixed cost fitted beside them (0.076 s here against
    0.066 s, the mean), with a larger error."""
    samples = [(24, 0, 0.0998), (55, 16, 0.0816), (86, 48, 0.0663), (118, 80, 0.0541)]
    samples += [(14, 0, 0.0564), (51, 0, 0.0547), (97, 48, 0.0730), (38, 0, 0.0432)]
    m = CostModel(min_samples=8)
    for p, c, s in samples:
        m.observe(p, c, s)
    x = np.array([CostModel._features(p, c) for p, c, _ in samples])
    y = np.array([s for *_, s in samples])
    clipped = np.maximum(np.linalg.lstsq(x, y, rcond=None)[0], 0.0)
    assert (np.linalg.lstsq(x, y, rcond=None)[0][1:] < 0).all()  # the case this is about
    assert m.coef == pytest.approx([y.mean(), 0.0, 0.0])
    assert np.sum((x @ m.coef - y) ** 2) < np.sum((x @ clipped - y) ** 2)


# 0, or a magnitude from 1e-3 to 1e3 (the model's columns are 1, tokens and tokens^2: of very
# different scales, none of them near float64's limits)
value = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))


@settings(max_examples=examples(60), deadline=None)
@given(rows=st.lists(st.tuples(value, value, value, value), min_size=3, max_size=12))
def test_nonnegative_lstsq_meets_the_optimality_conditions(rows: list[tuple[float, float, float, float]]) -> None:
    """Karush-Kuhn-Tucker: c >= 0; the gradient x^T (x c - y) is 0 where c > 0 and >= 0 where c = 0."""
    data = np.array(rows)
    x, y = data[:, :3], data[:, 3]
    c = nonnegative_lstsq(x, y)
    grad = x.T @ (x @ c - y)
    scale = 1e-7 * (1 + np.abs(x).sum() * (np.abs(y).sum() + np.abs(x @ c).sum()))
    assert (c >= 0).all()
    assert (np.abs(grad[c > 0]) <= scale).all()
    assert (grad[c == 0] >= -scale).all()
