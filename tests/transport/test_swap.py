"""swap_out / swap_in: bit-exact round trips, async handles, misuse that changes nothing."""

from __future__ import annotations

import gc
import time
import warnings

import numpy as np
import pytest
import torch

from mempool import Blocks, MemPool, Tier
from mempool.alloc.storage import RUN_COPY_MAX
from mempool.errors import (
    BlockLockedError,
    BlockNotAllocatedError,
    ForeignBlockError,
    InvalidArgumentError,
    TierUnavailableError,
    WrongTierError,
)
from tests.conftest import DEVICES, fill_random, make_pool


def read(pool: MemPool, blocks: Blocks) -> torch.Tensor:
    return pool.storage(blocks.tier).gather(blocks.ids).cpu()


def snapshot(pool: MemPool) -> tuple[object, ...]:
    return (pool.stats(), pool._alloc[Tier.DEVICE]._refs.tolist(), pool._alloc[Tier.HOST]._refs.tolist())


def scattered(pool: MemPool, n: int) -> Blocks:
    """``n`` device blocks that are not adjacent (every other block of a larger run)."""
    run = pool.alloc(2 * n)
    pool.free(run[1::2])
    return run[::2]


@pytest.mark.parametrize("layout", ["run", "scattered"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_bit_exact(layout: str, dtype: str) -> None:
    pool = make_pool(device_blocks=64, host_blocks=64, dtype=dtype)
    blocks = pool.alloc(12) if layout == "run" else scattered(pool, 12)
    written = fill_random(pool, blocks, seed=7)
    host = pool.swap_out(blocks)
    assert host is not None and host.tier is Tier.HOST and len(host) == 12
    assert pool.stats()["device"]["used"] == 0  # the device blocks went back
    assert torch.equal(read(pool, host), written)
    back = pool.swap_in(host)
    assert back is not None and back.tier is Tier.DEVICE
    assert torch.equal(read(pool, back), written)
    assert pool.stats()["host"]["used"] == 0
    pool.free(back)
    pool.check_invariants()
    assert pool.stats()["device"]["used"] == 0


def test_many_scattered_blocks_use_the_vectorised_path() -> None:
    pool = make_pool(device_blocks=256, host_blocks=256)
    blocks = scattered(pool, 100)  # 100 runs: more than RUN_COPY_MAX
    written = fill_random(pool, blocks, seed=1)
    host = pool.swap_out(blocks)
    assert torch.equal(read(pool, host), written)
    back = pool.swap_in(host)
    assert torch.equal(read(pool, back), written)
    pool.free(back)
    pool.check_invariants()


def test_async_swap_hands_back_source_only_when_done() -> None:
    pool = make_pool(device_blocks=32, host_blocks=32)
    blocks = pool.alloc(8)
    written = fill_random(pool, blocks, seed=2)
    handle = pool.swap_out_async(blocks)
    assert handle is not None
    host = handle.wait()
    assert handle.done() and host is handle.blocks
    assert torch.equal(read(pool, host), written)
    assert pool.stats()["device"]["used"] == 0
    assert handle.wait() is host  # idempotent: the source is freed once
    assert pool.stats()["device"]["used"] == 0
    h2 = pool.swap_in_async(host)
    while not h2.done():
        pass
    assert torch.equal(read(pool, h2.blocks), written)
    pool.free(h2.blocks)
    pool.check_invariants()


def test_swap_of_locked_cached_block_raises_and_changes_nothing(pool: MemPool) -> None:
    blocks = pool.alloc(2)
    pool.insert(list(range(8)), blocks)
    with pool.match(list(range(8))) as m:
        before = snapshot(pool)
        with pytest.raises(BlockLockedError):
            pool.swap_out(m.blocks)
        with pytest.raises(BlockLockedError):
            pool.swap_out(blocks)  # the caller's own reference, but the prefix is locked
        assert snapshot(pool) == before
    host = pool.swap_out(blocks)  # unlocked: allowed; the index keeps its device copy
    assert host is not None
    with pool.match(list(range(8))) as m:
        assert m.blocks.tolist() == blocks.tolist()
    pool.free(host)


def test_swap_misuse_raises_and_changes_nothing(pool: MemPool) -> None:
    own = pool.alloc(2)
    gone = pool.alloc(1)
    pool.free(gone)
    foreign = make_pool().alloc(1)
    before = snapshot(pool)
    for call, error in [
        (lambda: pool.swap_out(Blocks(Tier.HOST, [0])), WrongTierError),
        (lambda: pool.swap_in(own), WrongTierError),
        (lambda: pool.swap_out(gone), BlockNotAllocatedError),
        (lambda: pool.swap_out(foreign), ForeignBlockError),
        (lambda: pool.swap_in(Blocks(Tier.HOST, [3])), BlockNotAllocatedError),
        # one block twice (a hypothesis find: it used to leak the host copies, then fail to free)
        (lambda: pool.swap_out(Blocks(Tier.DEVICE, [own.tolist()[0]] * 2)), InvalidArgumentError),
        (lambda: pool.swap_out_async(Blocks(Tier.DEVICE, [own.tolist()[1]] * 2)), InvalidArgumentError),
    ]:
        with pytest.raises(error):
            call()
        assert snapshot(pool) == before
    pool.free(own)


class _CopyFailed(RuntimeError):
    pass


def _fail(*args: object, **kwargs: object) -> None:
    raise _CopyFailed("copy failed")


@pytest.fixture
def failing_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every copy between tiers fails before it moves a byte (as a CUDA error or an interrupted
    copy would surface), for the swap engine's sync and async paths alike."""
    monkeypatch.setattr("mempool.transport.swap.copy_blocks", _fail)


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_failed_swap_leaves_the_caller_its_blocks_and_frees_the_new_ones(failing_copies: None, how: str) -> None:
    pool = make_pool(device_blocks=8, host_blocks=8)
    blocks = pool.alloc(3)
    assert blocks is not None
    written = fill_random(pool, blocks, seed=3)
    before = snapshot(pool)
    if how == "sync":
        with pytest.raises(_CopyFailed):
            pool.swap_out(blocks)
    else:
        handle = pool.swap_out_async(blocks)
        assert handle is not None
        for _ in range(2):  # the error every time, and the swap undone once
            with pytest.raises(_CopyFailed):
                handle.wait()
        assert handle.done()
    assert snapshot(pool) == before  # the host blocks went back; the device blocks are still ours
    assert torch.equal(read(pool, blocks), written)
    pool.free(blocks)
    pool.check_invariants()
    assert pool.stats()["device"]["used"] == 0 and pool.stats()["host"]["used"] == 0


def test_a_failed_promotion_or_demotion_changes_nothing(failing_copies: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's moves between tiers: a match that would promote, an eviction that would demote."""
    pool = make_pool(device_blocks=4, host_blocks=4)
    tokens = list(range(8))  # two blocks of 4
    blocks = pool.alloc(2)
    assert blocks is not None
    pool.insert(tokens, blocks)
    pool.free(blocks)
    before = snapshot(pool)
    with pytest.raises(_CopyFailed):  # the demotion's copy fails: nothing is evicted
        pool.alloc(4)
    assert snapshot(pool) == before
    with pytest.raises(_CopyFailed):  # again: the prefix is still a candidate, not lost from the queue
        pool.evict(2)
    assert snapshot(pool) == before
    monkeypatch.undo()  # copies work again: demote, then fail the promotion
    assert pool.evict(2) == 2 and pool.stats()["host"]["cached"] == 2
    before = snapshot(pool)
    monkeypatch.setattr("mempool.transport.swap.copy_blocks", _fail)
    with pytest.raises(_CopyFailed):
        pool.match(tokens + [9], promote=True)
    assert snapshot(pool) == before  # no device block taken, no lock left
    assert pool.stats()["index"]["host_locked"] == 0
    pool.check_invariants()


def test_full_host_tier_is_back_pressure() -> None:
    pool = make_pool(device_blocks=8, host_blocks=4)
    host_own = pool.alloc(3, "host")
    blocks = pool.alloc(2)
    before = snapshot(pool)
    assert pool.swap_out(blocks) is None
    assert snapshot(pool) == before
    assert pool.swap_out(pool.alloc(0)) == Blocks(Tier.HOST, [])
    pool.free(host_own)
    assert pool.swap_out(blocks) is not None


def test_swap_without_host_tier_raises() -> None:
    pool = make_pool(host_blocks=0)
    blocks = pool.alloc(1)
    with pytest.raises(TierUnavailableError):
        pool.swap_out(blocks)


def test_a_cpu_pool_on_a_cuda_machine_keeps_its_host_tier_shareable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning serves only copies from a GPU: where CUDA exists, a CPU pool's host tier stays
    unpinned shared memory, which a same-host peer can map (before 2026-11-24 it was pinned,
    and pulls from it took the data link; seen on an H100 machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pool = make_pool(device_blocks=8, host_blocks=8)
    host = pool.storage(Tier.HOST)
    assert not host.pinned and host.share_info is not None
    pool.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_tier_round_trips_through_the_host_tier(device: str) -> None:
    """bfloat16 blocks to the host tier (pinned where the device tier is on a GPU) and back."""
    pool = make_pool(device=device, device_blocks=64, host_blocks=64, dtype="bfloat16")
    assert pool.storage(Tier.HOST).pinned == (device == "cuda")
    blocks = scattered(pool, 20)
    written = fill_random(pool, blocks, seed=3)
    host = pool.swap_out(blocks)
    assert torch.equal(read(pool, host), written)
    back = pool.swap_in(host)
    assert torch.equal(read(pool, back), written)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wait", [True, False])
def test_swap_out_into_host_blocks_in_many_runs_is_bit_exact(device: str, wait: bool) -> None:
    """Host blocks in many runs are written by a scatter on the host, after the device's copy into
    host memory: on a GPU that copy must have landed by then (a non-blocking one returns before
    its bytes)."""
    pool = make_pool(device=device, device_blocks=64, host_blocks=64, dtype="bfloat16")
    holes = pool.alloc(64, Tier.HOST)
    assert holes is not None
    pool.free(holes[::2])  # the host tier's free blocks: 32, none adjacent
    blocks = scattered(pool, 20)
    written = fill_random(pool, blocks, seed=4)
    if wait:
        host = pool.swap_out(blocks)
    else:
        handle = pool.swap_out_async(blocks)
        assert handle is not None
        host = handle.wait()
    assert host is not None
    assert int((np.diff(host.ids) != 1).sum()) + 1 > RUN_COPY_MAX  # the scatter path, not run copies
    assert torch.equal(read(pool, host), written)
    back = pool.swap_in(host)
    assert back is not None and torch.equal(read(pool, back), written)


def test_an_async_swap_dropped_before_wait_says_so_and_keeps_its_blocks() -> None:
    """A handle owns the source references until its copy is seen to end; dropped before that, it
    warns when collected (a ResourceWarning, as an unclosed file does) and releases nothing."""
    pool = make_pool(device_blocks=8, host_blocks=8)
    blocks = pool.alloc(2)
    assert blocks is not None
    handle = pool.swap_out_async(blocks)
    assert handle is not None
    with pytest.warns(ResourceWarning, match="dropped before wait"):
        del handle
        gc.collect()
    pool.close()  # the copy has ended; nothing gave the references back
    assert pool.stats()["device"]["used"] == 2 and pool.stats()["host"]["used"] == 2
    with warnings.catch_warnings(record=True) as seen:  # waited for, or seen done: no warning
        warnings.simplefilter("always")
        own = pool.alloc(1)
        assert own is not None
        waited = pool.swap_out_async(own)
        assert waited is not None
        pool.free(waited.wait())
        polled = pool.swap_out_async(pool.alloc(1))
        assert polled is not None
        while not polled.done():
            time.sleep(0.001)
        pool.free(polled.blocks)
        del waited, polled
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]
    pool.check_invariants()
