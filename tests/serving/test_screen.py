"""The screened greedy pick (``memserve.model.Linear.argmax``) against the float32 argmax it stands for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from memserve import Engine, SamplingParams
from memserve.model import _INT8_DOT, _MAX_CANDIDATES, Linear, _Screen
from memserve.sampling import argmax_rows

from .conftest import assert_no_leaks, make_prompts, reference, run


def screened(weight: torch.Tensor) -> Linear:
    """A bias-free packed ``Linear`` holding ``weight``, with its screen."""
    out_features, in_features = weight.shape
    lin = Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    lin.pack(screen=True)
    return lin


def whole_rows(lin: Linear, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows :meth:`Linear.argmax` computes whole (through ``forward``) from now on."""
    calls: list[int] = []
    forward: Callable[[Linear, torch.Tensor], torch.Tensor] = Linear.forward

    def counting(self: Linear, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x.reshape(-1, x.shape[-1])))
        return forward(self, x)

    monkeypatch.setattr(Linear, "forward", counting)
    return calls


@pytest.mark.parametrize(("outputs", "inputs"), [(1000, 64), (1003, 96), (5000, 32), (100, 16)])
def test_screened_pick_is_the_float32_argmax(outputs: int, inputs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(outputs + inputs)
    weight = torch.randn(outputs, inputs, generator=gen) * 0.05
    weight[::7] *= 6.0  # rows of very different norms
    lin = screened(weight)
    for rows in (1, 5, 17):
        x = torch.randn(rows, inputs, generator=gen)
        x[0, 3] = 40.0  # an outlier feature
        want = argmax_rows(lin(x))
        calls = whole_rows(lin, monkeypatch)
        assert lin.argmax(x) == want
        monkeypatch.undo()
        if _INT8_DOT:
            assert calls == []  # the screen decided every row: nothing computed whole


def test_every_output_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    """Far below zero everywhere: the zero outputs of the int8 copy's padding rows must not win."""
    gen = torch.Generator().manual_seed(2)
    lin = screened(-(1 + torch.rand(1000, 32, generator=gen)))  # 1000 outputs: padded to 1024
    x = 1 + torch.rand(3, 32, generator=gen)
    calls = whole_rows(lin, monkeypatch)
    picks = lin.argmax(x)
    monkeypatch.undo()
    assert picks == argmax_rows(lin(x)) and all(p < 1000 for p in picks)
    if _INT8_DOT:
        assert calls == []


def test_near_ties_and_exact_ties_resolve_as_float32() -> None:
    """Outputs whose int8 values tie but whose float32 values differ, and outputs that tie exactly."""
    gen = torch.Generator().manual_seed(7)
    inputs = 64
    x = torch.randn(4, inputs, generator=gen)
    weight = torch.randn(2000, inputs, generator=gen) * 0.01
    direction = x[0] / x[0].norm()
    weight[300] = direction  # the winner of row 0, by far
    weight[1700] = direction  # an exact tie, later: the first index must win
    weight[900] = direction  # equal to both, then a hair larger (far below int8's resolution)
    j = int(x[0].abs().argmax())
    weight[900, j] += 1e-5 * float(torch.sign(x[0, j]))
    lin = screened(weight)
    picks = lin.argmax(x)
    assert picks == argmax_rows(lin(x))
    assert picks[0] == 900
    weight[900] = direction
    lin = screened(weight)
    assert lin.argmax(x)[0] == 300 == argmax_rows(lin(x))[0]


def test_rows_the_screen_cannot_decide_are_computed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = 32
    gen = torch.Generator().manual_seed(3)
    lin = screened(torch.randn(_MAX_CANDIDATES + 500, inputs, generator=gen))
    x = torch.randn(3, inputs, generator=gen)
    x[1] = 0.0  # every output 0: all tie, too many candidates
    calls = whole_rows(lin, monkeypatch)
    assert lin.argmax(x) == argmax_rows(lin(x))
    if _INT8_DOT:
        assert calls[0] == 1  # only the undecidable row
    x[2, 5] = float("nan")  # an input that is not finite: the whole batch, with NaN semantics kept
    assert lin.argmax(x) == argmax_rows(lin(x))
    same = screened(torch.ones(_MAX_CANDIDATES + 500, inputs))  # every output ties everywhere
    assert same.argmax(torch.randn(2, inputs, generator=gen)) == [0, 0]


def test_screen_follows_an_in_place_weight_change() -> None:
    gen = torch.Generator().manual_seed(5)
    lin = screened(torch.randn(700, 48, generator=gen))
    x = torch.randn(6, 48, generator=gen)
    before = lin.argmax(x)
    with torch.no_grad():
        lin.weight.mul_(-1.0)
    after = lin.argmax(x)
    assert after == argmax_rows(lin(x)) and after != before


def test_no_screen_for_a_weight_that_is_not_finite() -> None:
    weight = torch.randn(300, 16)
    weight[10, 3] = float("inf")
    assert _Screen.build(weight) is None
    lin = screened(weight)
    x = torch.randn(2, 16)
    assert lin.argmax(x) == argmax_rows(lin(x))


def test_unscreened_layers_pick_through_their_float32_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``screen`` at pack time, unpacked, or with a bias: ``argmax`` is ``argmax_rows(forward)``."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 24, generator=gen)
    plain = Linear(24, 200, bias=False)
    biased = Linear(24, 200, bias=True)
    for lin, screen in ((plain, False), (biased, True)):
        lin.pack(screen=screen)
        calls = whole_rows(lin, monkeypatch)
        assert lin.argmax(x) == argmax_rows(lin(x))
        assert calls[0] == 3
        monkeypatch.undo()
    plain.pack(False, screen=True)
    assert plain._screen() is None and plain.argmax(x) == argmax_rows(plain(x))


def test_engine_tokens_are_the_same_with_and_without_the_screen(make_engine: Callable[..., Engine]) -> None:
    prompts = make_prompts([5, 19, 40], seed=11)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = [make_engine(screen_greedy=on).generate(prompts, params) for on in (True, False)]
    assert outputs[0] == outputs[1]


def test_screened_tokens_equal_full_recompute_in_every_mode(tiny_model, make_engine: Callable[..., Engine]) -> None:
    """Cached prefix, prefix swapped to the host and back, mixed batch: greedy tokens picked by the
    screen (no logits asked) equal a full recompute's float32 argmax (logits asked: no screen)."""
    n = 8
    screen_only = SamplingParams(max_tokens=n, ignore_eos=True)
    first, second = make_prompts([44, 50], shared=40, seed=4)
    want = reference(tiny_model, second, n)[0]
    engine = make_engine(caching=True)
    if _INT8_DOT:
        assert tiny_model.lm_head._screen() is not None  # the picks below really are screened
    run(engine, [first], screen_only)
    assert run(engine, [second], screen_only)[0] == [want]  # over the cached prefix
    assert engine.pool.evict(engine.pool.stats()["device"]["cached"]) > 0  # demoted to the host tier
    assert run(engine, [second], screen_only)[0] == [want]  # promoted back
    prompts = make_prompts([3, 17, 40, 9], seed=5)
    assert run(engine, prompts, screen_only)[0] == [reference(tiny_model, p, n)[0] for p in prompts]  # one batch
    assert_no_leaks(engine)
