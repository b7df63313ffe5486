"""A receiver that fails on its own before any of the sender's data can be on the link (a copy
between its tiers while it makes room or promotes what it caches, or the copy of a same-host
pull): that transfer fails typed on the sender at once, the receiver keeps nothing of it, and
the link stays up for the next one. A sender whose own copy fails once its data is on the way
ends the link instead, and neither end keeps anything of the transfer.

Two pools in this process (``tests/transport/inproc.py``), over the torch backend's data link and
over the same-host pull.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from mempool import MemPool
from mempool.errors import TransferError
from mempool.types import Blocks

from ..conftest import fill_random, make_config, make_tokens
from .inproc import DEADLINE_S, connected, unchanged


class _CopyFailed(RuntimeError):
    """What a failing copy (a CUDA error, say) raises here."""


def _fail(*args: object, **kwargs: object) -> None:
    raise _CopyFailed("the copy failed")


@pytest.fixture(params=[False, True], ids=["link", "pull"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[MemPool, MemPool]]:
    with connected(request.param) as (a, b):
        yield a, b


def _rows(pool: MemPool, blocks: Blocks) -> torch.Tensor:
    """The bytes of ``blocks``, one row a block."""
    return pool.storage(blocks.tier).flat[torch.tensor(blocks.ids.tolist())]


def _refused(a: MemPool, b: MemPool, send: Callable[[], object]) -> None:
    """``send()`` fails typed and at once; both ends keep the link, and ``a`` its blocks."""
    before_a, before_b = a.stats(), b.stats()
    start = time.monotonic()
    with pytest.raises(TransferError, match="_CopyFailed"):
        send()
    assert time.monotonic() - start < DEADLINE_S / 4  # answered, not waited out
    assert "b" in a.peers() and "a" in b.peers()
    unchanged(b, before_b)  # nothing allocated, received, cached or promoted there
    assert a.stats() == before_a  # the sender's blocks are its own again, none held for a pull


def test_a_receiver_whose_copy_between_tiers_fails_refuses_and_keeps_the_link(
    pair: tuple[MemPool, MemPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    bs = b.config.block_size
    held = b.config.device_blocks
    # b's device tier is all cached prefixes of 2 blocks: room for a transfer of 2 means a
    # demotion of one whole prefix (one that split a prefix would keep the split, as any does)
    prefixes = [make_tokens(2 * bs, seed=10 + i) for i in range(held // 2)]
    for prefix in prefixes:
        cached = b.alloc(2)
        assert cached is not None
        b.insert(prefix, cached)
        b.free(cached)
    blocks = a.alloc(2)
    assert blocks is not None
    fill_random(a, blocks, seed=2)
    tokens = make_tokens(2 * bs, seed=2)

    monkeypatch.setattr("mempool.transport.swap.copy_blocks", _fail)
    _refused(a, b, lambda: a.transfer("b", blocks, key="k"))
    _refused(a, b, lambda: a.transfer_with_insert("b", tokens, blocks))
    assert b.claim("k") is None

    monkeypatch.undo()  # copies work: b demotes its prefix; promoting it back will fail
    assert b.evict(held) == held and b.stats()["host"]["cached"] == held
    monkeypatch.setattr("mempool.transport.swap.copy_blocks", _fail)
    _refused(a, b, lambda: a.transfer_with_insert("b", prefixes[0], blocks))
    assert b.stats()["index"]["host_locked"] == 0

    monkeypatch.undo()  # the same link carries the next transfer, bit for bit
    result = a.transfer("b", blocks, key="k")
    assert result is not None and result.sent_blocks == 2
    got = b.claim("k")
    assert got is not None
    assert torch.equal(_rows(b, got), _rows(a, blocks))
    b.free(got)
    a.free(blocks)
    for pool in (a, b):
        pool.check_invariants()
    assert a.stats()["device"]["used"] == 0 and b.stats()["device"]["used"] == 0


@pytest.mark.parametrize("path", ["pieces", "chunks", "one piece"])
def test_a_same_host_pull_whose_copy_fails_refuses_and_keeps_the_link(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Every way a pull copies: in pieces shared by two threads (a destination in few runs), in
    vectorised chunks on the loop (a destination in many short runs), or at once (one piece)."""
    import mempool.transport.agent as agent_mod

    pieces = agent_mod.copy_rows_pieces
    chunk = {} if path == "one piece" else {"chunk_bytes": make_config().layout.block_bytes}
    with connected(pull=True, **chunk) as (a, b):
        blocks = a.alloc(3)
        assert blocks is not None
        fill_random(a, blocks, seed=4)
        tokens = make_tokens(3 * a.config.block_size, seed=4)
        if path == "pieces":
            monkeypatch.setattr(agent_mod, "copy_rows_pieces", lambda *args: [_fail for _ in pieces(*args) or ()])
        else:
            monkeypatch.setattr(agent_mod, "copy_rows_pieces", lambda *args: None)
            monkeypatch.setattr(agent_mod, "copy_rows", _fail)
        _refused(a, b, lambda: a.transfer("b", blocks, key="k"))
        _refused(a, b, lambda: a.transfer_with_insert("b", tokens, blocks))
        monkeypatch.undo()
        result = a.transfer_with_insert("b", tokens, blocks)
        assert result is not None and result.pulled and result.sent_blocks == 3
        with b.match(tokens) as hit:
            assert hit.num_tokens == len(tokens)
            assert torch.equal(_rows(b, hit.blocks), _rows(a, blocks))
        a.free(blocks)
        a.check_invariants()
        b.check_invariants()


def test_a_sender_whose_own_gather_fails_raises_it_and_both_ends_keep_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other end: the sender's copy into staging fails once data is on the way. It raises that
    error, after dropping the link (the receiver may be waiting for the rest); the receiver frees
    what it had allocated; the sender's blocks are its own again."""
    with connected(pull=False) as (a, b):
        spread = a.alloc(8)
        assert spread is not None
        blocks = spread[::2]  # scattered: gathered into staging
        fill_random(a, blocks, seed=9)
        before_a, before_b = a.stats(), b.stats()
        monkeypatch.setattr("mempool.transport.agent._copy_out", _fail)
        start = time.monotonic()
        with pytest.raises(_CopyFailed):
            a.transfer("b", blocks, key="k")
        assert time.monotonic() - start < DEADLINE_S / 4
        assert "b" not in a.peers()
        unchanged(b, before_b)
        assert a.stats() == before_a
        a.free(spread)
        a.check_invariants()


def _on_copier() -> bool:
    return threading.current_thread().name.startswith("mempool-copy-")


def test_a_pull_is_copied_by_two_threads_in_pieces_and_a_failing_piece_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receiver copies a pull on its loop and on its copier thread at once, piece by piece:
    scattered blocks land bit-exact across piece edges whichever thread copied each, and a piece
    that fails after others have landed, on either thread, is refused like any failed copy, with
    nothing of it kept on either side."""
    import mempool.transport.agent as agent_mod

    block_bytes = make_config().layout.block_bytes
    real = agent_mod.copy_rows_pieces
    with connected(pull=True, chunk_bytes=2 * block_bytes) as (a, b):
        spread = a.alloc(14)
        assert spread is not None
        blocks = spread[::2]  # 7 scattered blocks: pieces of 2, 2, 2 and 1
        fill_random(a, blocks, seed=5)
        ran: list[bool] = []  # per piece copied: on the copier thread?
        both = threading.Barrier(2, timeout=10)  # each thread's first piece waits for the other's

        def traced(*args: object) -> list[Callable[[], None]]:
            pieces = real(*args)  # type: ignore[arg-type]
            assert pieces is not None

            def piece(copy: Callable[[], None]) -> None:
                if _on_copier() not in ran:
                    ran.append(_on_copier())
                    both.wait()
                else:
                    ran.append(_on_copier())
                copy()

            return [functools.partial(piece, p) for p in pieces]

        monkeypatch.setattr(agent_mod, "copy_rows_pieces", traced)
        result = a.transfer("b", blocks, key="k")
        assert result is not None and result.pulled
        assert len(ran) == 4 and True in ran and False in ran
        got = b.claim("k")
        assert got is not None
        assert torch.equal(_rows(b, got), _rows(a, blocks))
        b.free(got)

        tokens = make_tokens(7 * a.config.block_size, seed=5)
        for fail_on_copier in (False, True):

            def failing(*args: object, fail_on_copier: bool = fail_on_copier) -> list[Callable[[], None]]:
                pieces = real(*args)  # type: ignore[arg-type]
                assert pieces is not None
                both, failed, seen = threading.Barrier(2, timeout=10), threading.Event(), []

                def piece(copy: Callable[[], None]) -> None:
                    me = _on_copier()
                    if me not in seen:  # one piece each lands first
                        seen.append(me)
                        both.wait()
                    elif me == fail_on_copier:
                        failed.set()
                        _fail()
                    else:  # the other thread's next piece waits for the failure
                        assert failed.wait(10)
                    copy()

                return [functools.partial(piece, p) for p in pieces]

            monkeypatch.setattr(agent_mod, "copy_rows_pieces", failing)
            _refused(a, b, lambda: a.transfer("b", blocks, key="k2"))
            _refused(a, b, lambda: a.transfer_with_insert("b", tokens, blocks))
            monkeypatch.undo()
            with b.match(tokens) as hit:
                assert hit.num_tokens == 0  # nothing of it indexed
            assert b.claim("k2") is None
        a.free(spread)
        for pool in (a, b):
            pool.check_invariants()
        assert a.stats()["device"]["used"] == 0 and b.stats()["device"]["used"] == 0


def test_a_failed_pull_is_answered_only_once_the_copier_thread_has_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """A piece that fails on the loop while the copier thread still copies another: the receiver
    frees its blocks (and answers) only after that copy ended, so no copy writes a freed block."""
    import mempool.transport.agent as agent_mod

    block_bytes = make_config().layout.block_bytes
    real = agent_mod.copy_rows_pieces
    copier_in = threading.Event()
    copier_out: list[float] = []

    def slow_copier(*args: object) -> list[Callable[[], None]]:
        pieces = real(*args)  # type: ignore[arg-type]
        assert pieces is not None

        def piece(copy: Callable[[], None]) -> None:
            if _on_copier():
                copier_in.set()
                time.sleep(0.3)
                copy()
                copier_out.append(time.monotonic())
            else:
                assert copier_in.wait(10)
                _fail()

        return [functools.partial(piece, p) for p in pieces]

    with connected(pull=True, chunk_bytes=2 * block_bytes) as (a, b):
        blocks = a.alloc(6)
        assert blocks is not None
        fill_random(a, blocks, seed=6)
        monkeypatch.setattr(agent_mod, "copy_rows_pieces", slow_copier)
        _refused(a, b, lambda: a.transfer("b", blocks, key="k"))
        answered = time.monotonic()
        assert len(copier_out) == 1 and copier_out[0] <= answered  # its one piece, landed before the answer
        monkeypatch.undo()
        a.free(blocks)
        for pool in (a, b):
            pool.check_invariants()
