"""The in-place decode attention kernel (``memserve.cpu_attention``) against gather + SDPA."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mempool.errors import InvalidArgumentError
from memserve import SamplingParams, paged
from memserve.cpu_attention import available, decode_attention
from memserve.paged import Chunk, StepInput, Workspace, paged_attention
from tests.conftest import examples

from .conftest import assert_no_leaks, make_prompts, run

SHAPES = [  # heads, kv_heads, head_dim, block_size
    (8, 4, 64, 16),  # the default model's attention
    (4, 4, 32, 4),  # no grouping
    (8, 2, 16, 8),  # four query heads a KV head
    (6, 1, 8, 3),  # one KV head, a block size that is not a power of two
]


def decode_step(
    heads: int, kv_heads: int, dim: int, block: int, lens: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, StepInput]:
    """A random pool (3 layers) and one decode step: each sequence's new token at the end of its
    context, its blocks scattered over the pool; returns q, k, v, the pool and the step."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lens]
    pool = torch.randn(sum(need) + 5, 3, 2, block, kv_heads, dim, generator=gen)
    ids = torch.randperm(len(pool), generator=gen).tolist()
    chunks, at = [], 0
    for n, k in zip(lens, need):
        chunks.append(Chunk([1], n - 1, ids[at : at + k]))
        at += k
    step = StepInput.build(chunks, block)
    b = len(lens)
    q = torch.randn(b, heads, dim, generator=gen)
    return q, torch.randn(b, kv_heads, dim, generator=gen), torch.randn(b, kv_heads, dim, generator=gen), pool, step


def test_the_kernel_serves_here() -> None:
    """The serving extra brings numba, and its threading layer is a thread-safe one: without
    this, every comparison below would pass by comparing the portable path with itself."""
    assert available()


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), SHAPES)
def test_kernel_equals_gather_and_sdpa(heads: int, kv_heads: int, dim: int, block: int) -> None:
    lens = [1, block, block + 1, 3 * block - 1, 5 * block, 2]  # ends inside, at and just past a block
    q, k, v, pool, step = decode_step(heads, kv_heads, dim, block, lens, seed=heads + block)
    want = paged_attention(q, k, v, pool, 1, step, Workspace(), in_place=False)  # also writes k/v
    got = decode_attention(q, pool, 1, step.tables, step.context_lens)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and through paged_attention's own dispatch
    torch.testing.assert_close(paged_attention(q, k, v, pool, 1, step, Workspace()), got, rtol=0, atol=0)


@settings(max_examples=examples(40), deadline=None)
@given(
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 3, 4]),
    dim=st.sampled_from([4, 8, 16, 64]),
    block=st.integers(1, 17),
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_gather_and_sdpa_on_random_shapes(
    kv_heads: int, group: int, dim: int, block: int, lens: list[int], seed: int
) -> None:
    q, k, v, pool, step = decode_step(kv_heads * group, kv_heads, dim, block, lens, seed=seed)
    want = paged_attention(q, k, v, pool, 2, step, Workspace(), in_place=False)
    got = decode_attention(q, pool, 2, step.tables, step.context_lens)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_sequence_gets_the_same_bits_in_any_batch() -> None:
    lens = [40, 7, 123, 16]
    q, _, _, pool, step = decode_step(8, 4, 64, 16, lens)
    batched = decode_attention(q, pool, 2, step.tables, step.context_lens)
    assert batched is not None
    for i in range(len(lens)):
        alone = decode_attention(q[i : i + 1], pool, 2, step.tables[i : i + 1], step.context_lens[i : i + 1])
        assert alone is not None and torch.equal(alone[0], batched[i])


def test_its_exponential_is_within_5_ulp() -> None:
    """The kernel's vectorisable exp against float64's, over softmax's whole range (x <= 0), at
    the edge of float32's normal range, and on -inf and NaN; compiled with the kernel's fastmath
    flags (an inlined function takes its caller's)."""
    import numba
    import numpy as np

    from memserve._attend_numba import FASTMATH, _exp

    @numba.njit(fastmath=FASTMATH)  # type: ignore[misc]
    def each(x: Any, out: Any) -> None:
        for i in range(x.shape[0]):
            out[i] = _exp(x[i])

    x = np.concatenate(
        [-np.geomspace(1e-8, 87, 200_001), np.linspace(-87, 0, 100_001), [0.0, -0.0, -86.99, -87.0, -87.01]]
    ).astype(np.float32)
    got = np.empty_like(x)
    each(x, got)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    inside = x > -87
    assert (np.abs(got[inside] - want[inside]) <= 5 * ulp[inside]).all()  # 4.4 at most, near -86
    assert (got[~inside] == 0).all()  # under float32's normal range: 0 (a softmax sums to >= 1)
    edge = np.array([-np.inf, np.nan, -1e30], np.float32)
    out = np.empty_like(edge)
    each(edge, out)
    assert out[0] == 0 and np.isnan(out[1]) and out[2] == 0


def test_a_nan_in_one_sequence_stays_in_that_sequence() -> None:
    """A NaN in a sequence's K or V makes what it feeds NaN (never a plausible number): a K
    element every output of the query heads reading it, a V element their outputs' same element.
    Everything else keeps its bits."""
    q, _, _, pool, step = decode_step(8, 4, 64, 16, [40, 7, 33])
    clean = decode_attention(q, pool, 1, step.tables, step.context_lens)
    assert clean is not None
    for part in (0, 1):  # K, then V
        dirty = pool.clone()
        dirty[int(step.tables[1, 0]), 1, part, 3, 2, 5] = float("nan")  # sequence 1, token 3, KV head 2
        got = decode_attention(q, dirty, 1, step.tables, step.context_lens)
        assert got is not None
        hit = torch.zeros(3, 8, 64, dtype=torch.bool)
        hit[1, 4:6, slice(None) if part == 0 else 5] = True  # query heads 4 and 5 read KV head 2
        assert torch.isnan(got.view(3, 8, 64)[hit]).all()
        assert torch.equal(got.view(3, 8, 64)[~hit], clean.view(3, 8, 64)[~hit])


@pytest.mark.parametrize(
    "break_it",
    [
        lambda t, n, pool: (t.fill_(len(pool)), n),  # a block id past the pool
        lambda t, n, pool: (t.fill_(-1), n),
        lambda t, n, pool: (t, n.fill_(0)),  # an empty context
        lambda t, n, pool: (t, n + t.shape[1] * pool.shape[3]),  # longer than the table covers
    ],
    ids=["block-past-pool", "negative-block", "empty-context", "context-past-table"],
)
def test_out_of_range_input_is_refused(break_it: Any) -> None:
    """The kernel reads without bounds checks, so its caller proves the indices first."""
    q, _, _, pool, step = decode_step(4, 2, 8, 4, [5, 9])
    before = pool.clone()
    tables, lens = break_it(step.tables.clone(), step.context_lens.clone(), pool)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        decode_attention(q, pool, 0, tables, lens)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        decode_attention(q, pool, 3, step.tables, step.context_lens)  # a layer past the pool's
    assert torch.equal(pool, before)


def test_it_declines_what_it_cannot_serve() -> None:
    q, _, _, pool, step = decode_step(4, 2, 8, 4, [5, 9])
    assert decode_attention(q.double(), pool.double(), 0, step.tables, step.context_lens) is None
    assert (
        decode_attention(q, pool.transpose(0, 1).contiguous().transpose(0, 1), 0, step.tables, step.context_lens)
        is None
    )


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_engine_tokens_and_logits_with_and_without_the_kernel(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, preemption: str
) -> None:
    """Same greedy tokens and logits (fp32 tolerance) with the kernel and with gather + SDPA, over
    a batch of mixed lengths sharing a cached prefix and a pool small enough to preempt; the
    kernel runs only when switched on."""
    calls: list[int] = []
    kernel = paged.decode_attention

    def counting(*args: Any) -> Any:
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(paged, "decode_attention", counting)
    prompts = make_prompts([19, 30, 17, 13, 41], shared=12, seed=5)
    params = SamplingParams(max_tokens=14, ignore_eos=True, return_logits=True)
    results = {}
    for on in (True, False):
        calls.clear()
        engine = make_engine(decode_kernel=on, device_blocks=30, preemption=preemption)
        preempted = [0]
        preempt = engine._preempt

        def counted(seq: Any, preempt: Any = preempt, preempted: list[int] = preempted) -> None:
            preempted[0] += 1
            preempt(seq)

        monkeypatch.setattr(engine, "_preempt", counted)
        results[on] = run(engine, prompts, params)
        assert preempted[0] > 0  # the pool really ran out
        assert bool(calls) == on
        assert_no_leaks(engine)
    (tokens, logits), (want_tokens, want_logits) = results[True], results[False]
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_threads_may_call_it_at_once() -> None:
    """Engines on separate threads (one per worker) run the kernel concurrently: every call gives
    the bits a lone call gives."""
    q, _, _, pool, step = decode_step(8, 4, 64, 16, [40, 7, 123, 16, 64, 3])
    want = decode_attention(q, pool, 1, step.tables, step.context_lens)
    assert want is not None
    errors: list[str] = []

    def hammer(rows: slice) -> None:
        for _ in range(40):
            got = decode_attention(q[rows], pool, 1, step.tables[rows], step.context_lens[rows])
            if got is None or not torch.equal(got, want[rows]):
                errors.append(f"rows {rows}: differs")

    threads = [threading.Thread(target=hammer, args=(rows,)) for rows in (slice(0, 6), slice(0, 1), slice(2, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
