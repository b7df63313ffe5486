"""KVStorage: block-major layout, layer views, gather / scatter and copies of runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mempool.alloc import storage as storage_mod
from mempool.alloc.storage import KVStorage, copy_blocks, gather_view
from mempool.config import KVLayout
from mempool.errors import InvalidArgumentError, InvalidBlockError, LayoutMismatchError

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype="float32")


def make(n: int = 16) -> KVStorage:
    s = KVStorage(LAYOUT, n, torch.device("cpu"))
    s.tensor.copy_(torch.arange(s.tensor.numel(), dtype=torch.float32).view_as(s.tensor))
    return s


def test_layout_is_block_major_and_contiguous_per_block() -> None:
    s = make()
    assert tuple(s.tensor.shape) == (16, 3, 2, 2, 2, 4)
    assert s.tensor.is_contiguous()
    assert s.nbytes == 16 * LAYOUT.block_bytes
    block = s.tensor[5]
    assert block.is_contiguous() and block.data_ptr() == s.tensor.data_ptr() + 5 * LAYOUT.block_bytes


def test_layer_views_share_storage() -> None:
    s = make()
    k, v = s.keys(1), s.values(1)
    assert tuple(k.shape) == (16, 2, 2, 4)
    k[3, 0, 0, 0] = -7.0
    v[3, 1, 1, 3] = -9.0
    assert s.tensor[3, 1, 0, 0, 0, 0] == -7.0 and s.tensor[3, 1, 1, 1, 1, 3] == -9.0
    assert s.layer(2).data_ptr() == s.tensor[:, 2].data_ptr()


@pytest.mark.parametrize("table", [[5], [9, 2, 3, 15], [[1, 4, 4], [0, 15, 7]]])
def test_gather_view_picks_blocks_of_a_layer_view(table: list[int] | list[list[int]]) -> None:
    s = make()
    ids = torch.tensor(table)
    for view in (s.keys(2), s.values(0), s.layer(1)):
        want = view[ids]
        assert torch.equal(gather_view(view, ids), want)
        buf = torch.full((want.numel() + 5,), -1.0)
        got = gather_view(view, ids, buf)
        assert torch.equal(got, want) and got.data_ptr() == buf.data_ptr()  # written into the buffer
        assert (buf[want.numel() :] == -1).all()  # and nothing past it
    with pytest.raises(InvalidArgumentError, match="contiguous blocks"):
        gather_view(s.keys(0).transpose(1, 2), ids)


def test_new_storage_is_zeroed() -> None:
    s = KVStorage(LAYOUT, 4, torch.device("cpu"))
    assert not s.tensor.any()


@pytest.mark.parametrize(
    "ids",
    [[3], [4, 5, 6], [9, 2, 3, 4, 11], list(range(15, -1, -1)), [1, 3, 5, 7, 9, 11, 13, 15, 0, 2]],
)
def test_gather_scatter_roundtrip(ids: list[int]) -> None:
    s = make()
    arr = np.array(ids, dtype=np.int64)
    got = s.gather(arr)
    assert torch.equal(got, s.tensor[torch.tensor(ids)])
    t = make()
    t.tensor.zero_()
    t.scatter(arr, got)
    assert torch.equal(t.tensor[torch.tensor(ids)], got)
    untouched = sorted(set(range(16)) - set(ids))
    assert not t.tensor[torch.tensor(untouched, dtype=torch.long)].any() if untouched else True


@pytest.mark.parametrize("max_runs", [0, 1000])  # vectorised path and per-run path
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ([0, 1, 2, 3], [8, 9, 10, 11]),  # run to run
        ([0, 1, 2, 3], [9, 4, 12, 1]),  # run to scattered
        ([7, 2, 13, 5], [8, 9, 10, 11]),  # scattered to run
        ([7, 2, 13, 5, 0, 15, 3, 11, 10, 1], [9, 4, 12, 1, 0, 2, 3, 5, 6, 7]),  # scattered to scattered
    ],
)
def test_copy_blocks_pairs_ids(monkeypatch: pytest.MonkeyPatch, max_runs: int, src: list[int], dst: list[int]) -> None:
    monkeypatch.setattr(storage_mod, "RUN_COPY_MAX", max_runs)
    a, b = make(), make()
    b.tensor.mul_(-1)
    expected = b.tensor.clone()
    expected[torch.tensor(dst)] = a.tensor[torch.tensor(src)]
    copy_blocks(a, np.array(src), b, np.array(dst))
    assert torch.equal(b.tensor, expected)


@st.composite
def _copy_case(draw: st.DrawFn) -> tuple[list[int], list[int], int, int]:
    """Pairs of blocks to copy between two 64-block tiers: destinations distinct, sources any
    (repeats included), each side drawn as a mix of runs and scattered ids; and the copy's
    two thresholds (runs copied one by one, staging rows)."""
    n = draw(st.integers(1, 40))
    dst = draw(st.permutations(range(64)))[:n]
    if draw(st.booleans()):  # runs: the allocator's usual output
        start = draw(st.integers(0, 64 - n))
        dst = list(range(start, start + n))
    src = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n))
    if draw(st.booleans()):
        start = draw(st.integers(0, 64 - n))
        src = list(range(start, start + n))
    return src, dst, draw(st.sampled_from([0, 1, 8, 1000])), draw(st.integers(1, 9))


@given(case=_copy_case())
def test_copy_blocks_matches_indexing_on_every_path(case: tuple[list[int], list[int], int, int]) -> None:
    """Whatever path a copy takes (slices per run, a gather into each destination run, one
    vectorised copy, or a gather and scatter through staging rows, in chunks), between tiers or
    inside one, the result is plain tensor indexing's, and no other block changes."""
    src, dst, max_runs, staging_rows = case
    block_bytes = LAYOUT.block_bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage_mod, "RUN_COPY_MAX", max_runs)
        mp.setattr(storage_mod, "STAGING_BYTES", staging_rows * block_bytes)
        a, b = make(64), make(64)
        b.tensor.mul_(-1)
        expected = b.tensor.clone()
        expected[torch.tensor(dst)] = a.tensor[torch.tensor(src)]
        copy_blocks(a, np.array(src, dtype=np.int64), b, np.array(dst, dtype=np.int64))
        assert torch.equal(b.tensor, expected)
        # inside one tier, sources and destinations may overlap: every block is read before any is written
        inside = a.tensor.clone()
        inside[torch.tensor(dst)] = a.tensor[torch.tensor(src)]
        copy_blocks(a, np.array(src, dtype=np.int64), a, np.array(dst, dtype=np.int64))
        assert torch.equal(a.tensor, inside)


@given(case=_copy_case(), piece_rows=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_copy_rows_pieces_run_in_any_order_give_copy_rows_result(
    case: tuple[list[int], list[int], int, int], piece_rows: int, seed: int
) -> None:
    """The pieces a same-host pull shares between two threads: run in any order, they give what
    ``copy_rows`` gives, each lies in one destination run of at most ``piece_rows`` rows, and
    nothing else changes. A destination in many short runs has no pieces (``copy_rows`` serves)."""
    src, dst, _, _ = case
    a, b = make(64), make(64)
    b.tensor.mul_(-1)
    expected = b.tensor.clone()
    expected[torch.tensor(dst)] = a.tensor[torch.tensor(src)]
    src_ids, dst_ids = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    pieces = storage_mod.copy_rows_pieces(a.flat, src_ids, b, dst_ids, piece_rows)
    runs = 1 + int((np.diff(dst_ids) != 1).sum())
    if runs > max(storage_mod.RUN_COPY_MAX, len(dst) // 8):
        assert pieces is None
        return
    assert pieces is not None
    assert len(pieces) == sum(
        -(-len(r) // piece_rows) for r in np.split(dst_ids, np.flatnonzero(np.diff(dst_ids) != 1) + 1)
    )
    for k in np.random.default_rng(seed).permutation(len(pieces)):
        pieces[int(k)]()
    assert torch.equal(b.tensor, expected)


def test_copy_rows_pieces_check_ids_first_and_leave_one_tier_to_copy_rows() -> None:
    a, b = make(), make()
    before = b.tensor.clone()
    with pytest.raises(InvalidBlockError):
        storage_mod.copy_rows_pieces(a.flat, np.array([0, 16]), b, np.array([0, 1]), 4)
    with pytest.raises(InvalidBlockError):
        storage_mod.copy_rows_pieces(a.flat, np.array([0, 1]), b, np.array([15, 16]), 4)
    with pytest.raises(InvalidArgumentError, match="2 source blocks but 1"):
        storage_mod.copy_rows_pieces(a.flat, np.array([0, 1]), b, np.array([3]), 4)
    with pytest.raises(LayoutMismatchError):
        storage_mod.copy_rows_pieces(a.flat[:, :3], np.array([0]), b, np.array([3]), 4)
    assert torch.equal(b.tensor, before)
    # inside one tier reads must come before writes: only copy_rows orders them
    assert storage_mod.copy_rows_pieces(b.flat, np.array([0, 1]), b, np.array([1, 2]), 4) is None
    pieces = storage_mod.copy_rows_pieces(a.flat, np.array([], dtype=np.int64), b, np.array([], dtype=np.int64), 4)
    assert pieces is not None and len(pieces) == 0
    with pytest.raises(IndexError):
        pieces[0]


def test_copy_blocks_rejects_mismatch() -> None:
    a = make()
    with pytest.raises(InvalidArgumentError, match="source blocks"):
        copy_blocks(a, np.array([1, 2]), a, np.array([3]))
    other = KVStorage(
        KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, block_size=2, dtype="float32"), 4, torch.device("cpu")
    )
    with pytest.raises(LayoutMismatchError, match="layouts differ"):
        copy_blocks(a, np.array([1]), other, np.array([0]))
    with pytest.raises(LayoutMismatchError, match="expected"):
        a.scatter(np.array([1]), torch.zeros(2, *LAYOUT.block_shape))


@pytest.mark.parametrize("ids", [[-1], [16], [3, -1], [2, 16, 4], [1.5], [[1]], [True]])
def test_ids_that_name_no_block_are_refused_and_nothing_is_written(ids: list[object]) -> None:
    """Before 2026-11-24 a negative or too-large id was silently skipped by scatter and copy_blocks
    (slicing past the end copies nothing) and a float id was truncated."""
    a, small = make(), KVStorage(LAYOUT, 4, torch.device("cpu"))
    before, small_before = a.tensor.clone(), small.tensor.clone()
    bad = np.array(ids)
    n = bad.shape[0]
    rows = torch.ones(n, *LAYOUT.block_shape)
    calls = [
        lambda: a.gather(bad),
        lambda: a.scatter(bad, rows),
        lambda: a.read_rows(bad, torch.empty(n, a.flat.shape[1], dtype=a.flat.dtype)),
        lambda: copy_blocks(a, bad, small, np.arange(n) % 4),
        lambda: copy_blocks(small, np.arange(n) % 4, a, bad),
        lambda: storage_mod.copy_rows(a.flat, bad, small, np.arange(n) % 4),
    ]
    for call in calls:
        with pytest.raises(InvalidBlockError):
            call()
    with pytest.raises(InvalidBlockError, match=r"\[0, 4\)"):  # in range for a, not for small
        copy_blocks(a, np.array([7]), small, np.array([4]))
    assert torch.equal(a.tensor, before) and torch.equal(small.tensor, small_before)


def test_no_ids_copy_nothing() -> None:
    a = make()
    before, none = a.tensor.clone(), np.array([], dtype=np.int64)
    assert tuple(a.gather(none).shape) == (0, *LAYOUT.block_shape)
    a.scatter(none, torch.zeros(0, *LAYOUT.block_shape))
    a.read_rows(none, torch.empty(0, a.flat.shape[1], dtype=a.flat.dtype))
    copy_blocks(a, none, a, none)
    assert torch.equal(a.tensor, before)


@pytest.mark.parametrize("ids", [[3, 4, 5], [9, 2, 3, 4, 11], [1, 3, 5, 7, 9, 11, 13, 15, 0, 2]])
def test_read_rows_copies_blocks_in_order_into_the_first_rows_of_a_buffer(ids: list[int]) -> None:
    """What a transfer's sender gathers into staging: the blocks' rows in order, nothing else touched."""
    s = make()
    before = s.tensor.clone()
    out = torch.full((12, s.flat.shape[1]), -1, dtype=s.flat.dtype)
    s.read_rows(np.array(ids), out)
    s.synchronize()  # on CPU the copy has landed already
    assert torch.equal(out[: len(ids)], s.flat[torch.tensor(ids)])
    assert bool((out[len(ids) :] == -1).all())
    assert torch.equal(s.tensor, before)
    for wrong in (out[: len(ids) - 1], out[:, 1:], out.view(torch.int32), out.view(-1)):
        with pytest.raises(LayoutMismatchError, match="cannot hold"):
            s.read_rows(np.array(ids), wrong)


def test_available_memory_is_what_this_machine_reports() -> None:
    room = storage_mod.available_memory()
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("needs Linux: this OS has no /proc/meminfo to compare with")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert room is not None and 0 < room <= total


def test_a_cpu_tier_larger_than_the_memory_left_is_refused_before_any_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, such a tier was made (a memfd and its mapping cost nothing) and then zero-filled, and
    the kernel's OOM killer ended the process (reproduced in a 2 GiB memory cgroup: exit 137)."""
    from mempool import MemPool, PoolConfig
    from mempool.errors import TierTooLargeError

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
    monkeypatch.setattr(storage_mod, "available_memory", lambda: 10 * layout.block_bytes)
    fds = len(os.listdir("/proc/self/fd"))
    for device_blocks, host_blocks in ((11, 0), (4, 11)):  # the device tier, then the host tier
        with pytest.raises(TierTooLargeError, match="GiB"):
            MemPool(PoolConfig(**layout.describe(), device_blocks=device_blocks, host_blocks=host_blocks))  # type: ignore[arg-type]
    assert len(os.listdir("/proc/self/fd")) == fds  # no memfd left open
    KVStorage(layout, 10, torch.device("cpu"))  # what fits is made
    monkeypatch.setattr(storage_mod, "available_memory", lambda: None)  # unknown (not Linux): no check
    KVStorage(layout, 11, torch.device("cpu"))
