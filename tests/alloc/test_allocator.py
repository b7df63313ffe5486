"""BlockAllocator: exact ids, runs, reference counts, and misuse that changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from mempool.alloc.allocator import BlockAllocator
from mempool.errors import (
    BlockNotAllocatedError,
    DoubleFreeError,
    ForeignBlockError,
    InvalidArgumentError,
    InvalidBlockError,
    WrongTierError,
)
from mempool.types import Blocks, Tier

OWNER = object()


def make(n: int = 10) -> BlockAllocator:
    return BlockAllocator(Tier.DEVICE, n, owner=OWNER)


def snapshot(a: BlockAllocator) -> tuple[list[int], list[tuple[int, int]]]:
    return a._refs.tolist(), sorted(a._by_start.items())


def test_fresh_allocations_are_ascending_runs() -> None:
    a = make()
    assert a.allocate(3).tolist() == [0, 1, 2]
    assert a.allocate(4).tolist() == [3, 4, 5, 6]
    assert a.stats() == {"capacity": 10, "free": 3, "used": 7, "free_runs": 1}
    a.check_invariants()


def test_best_fit_prefers_smallest_run_that_fits() -> None:
    a = make(12)
    x = a.allocate(2)  # 0-1
    a.allocate(1)  # 2
    y = a.allocate(4)  # 3-6
    a.allocate(1)  # 7
    a.free(x)
    a.free(y)  # free runs: [0,2) [3,7) [8,12)
    assert a.allocate(2).tolist() == [0, 1]  # exact fit
    assert a.allocate(3).tolist() == [3, 4, 5]  # smallest run >= 3, lowest start on ties
    a.check_invariants()


def test_no_single_run_takes_largest_runs_first() -> None:
    a = make(10)
    blocks = [a.allocate(1) for _ in range(10)]
    for i in (0, 2, 3, 5, 6, 7):
        a.free(blocks[i])  # free runs: [0] [2,3] [5,6,7]
    got = a.allocate(5)
    assert got.tolist() == [2, 3, 5, 6, 7]
    assert got.runs() == [(2, 2), (5, 3)]
    a.check_invariants()


def test_free_coalesces_neighbours() -> None:
    a = make(9)
    x, y, z = a.allocate(3), a.allocate(3), a.allocate(3)
    a.free(x)
    a.free(z)
    assert a.num_runs() == 2
    a.free(y)
    assert a.num_runs() == 1 and sorted(a._by_start.items()) == [(0, 9)]
    a.check_invariants()


def test_reference_counts() -> None:
    a = make()
    b = a.allocate(2)
    a.incref(b)
    assert a.refcounts(b) == [2, 2]
    assert a.free(b) == 0
    assert a.free(b) == 2
    assert a.num_free == 10
    a.check_invariants()


def test_shortage_returns_none_and_changes_nothing() -> None:
    a = make(4)
    a.allocate(3)
    before = snapshot(a)
    assert a.allocate(2) is None
    assert a.allocate(5) is None
    assert snapshot(a) == before
    assert a.allocate(0).tolist() == []


@pytest.mark.parametrize("n", [-1, 1.5, "2", True, None])
def test_bad_count_raises(n: object) -> None:
    a = make()
    with pytest.raises(InvalidArgumentError):
        a.allocate(n)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("blocks", "error"),
    [
        (Blocks(Tier.DEVICE, [10]), InvalidBlockError),
        (Blocks(Tier.DEVICE, [-1]), InvalidBlockError),
        (Blocks(Tier.HOST, [0]), WrongTierError),
        (Blocks(Tier.DEVICE, [0], owner=object()), ForeignBlockError),
        (Blocks(Tier.DEVICE, [5]), DoubleFreeError),  # never allocated
        (Blocks(Tier.DEVICE, [0, 0]), DoubleFreeError),  # given twice, referenced once
        (Blocks(Tier.DEVICE, [0, 1, 7]), DoubleFreeError),  # one bad id spoils the batch
    ],
)
def test_misuse_raises_typed_error_and_changes_nothing(blocks: Blocks, error: type[Exception]) -> None:
    a = make()
    a.allocate(2)  # 0, 1
    before = snapshot(a)
    with pytest.raises(error):
        a.free(blocks)
    assert snapshot(a) == before
    a.check_invariants()


def test_incref_of_free_block_raises_and_changes_nothing() -> None:
    a = make()
    a.allocate(1)
    before = snapshot(a)
    with pytest.raises(BlockNotAllocatedError):
        a.incref(Blocks(Tier.DEVICE, [0, 3]))
    assert snapshot(a) == before


def test_double_free_is_a_not_allocated_error() -> None:
    assert issubclass(DoubleFreeError, BlockNotAllocatedError)
    assert issubclass(InvalidBlockError, ValueError)


def test_bad_ids_refused_when_building_a_handle() -> None:
    for bad in ([1.5], [True], [[1, 2]], {1, 2}, "12"):
        with pytest.raises(InvalidBlockError):
            Blocks(Tier.DEVICE, bad)  # type: ignore[arg-type]
    assert Blocks(Tier.DEVICE, np.array([3, 4], dtype=np.uint8)).tolist() == [3, 4]
    with pytest.raises(InvalidBlockError, match="out of range"):  # would wrap to a negative int64
        Blocks(Tier.DEVICE, np.array([2**63], dtype=np.uint64))
    with pytest.raises(InvalidBlockError, match="tier"):
        Blocks("device", [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidBlockError):
        Blocks(Tier.DEVICE, [object()])  # type: ignore[list-item]


def test_a_handle_is_immutable_and_joins_only_its_own_tier() -> None:
    a = Blocks(Tier.DEVICE, [1, 2])
    with pytest.raises(AttributeError, match="immutable"):
        a.ids = np.array([3])  # type: ignore[misc]
    assert list(a) == [1, 2] and a.concat(Blocks(Tier.DEVICE, [5])).tolist() == [1, 2, 5]
    with pytest.raises(InvalidBlockError, match="concatenate"):
        a.concat(Blocks(Tier.HOST, [5]))


def test_zero_capacity_tier() -> None:
    a = BlockAllocator(Tier.HOST, 0, owner=None)
    assert a.allocate(1) is None
    assert a.allocate(0).tolist() == []
    a.check_invariants()
