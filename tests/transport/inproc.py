"""Two pools in this process, connected over the torch backend (or the same-host pull): for tests
that reach into an agent (its control channel, its link) or need both ends in one place."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mempool import MemPool, TransportConfig

from ..conftest import make_pool
from .conftest import SECRET

DEADLINE_S = 20.0  # far above any answer below: a test that waits it out has found a hang


def serve(pool: MemPool, name: str, *, pull: bool, **overrides: Any) -> tuple[str, int]:
    """Start ``pool``'s transport as ``name`` (``overrides``: other ``TransportConfig`` fields)."""
    cfg = TransportConfig(
        name=name, secret=SECRET, backend="torch", same_host_pull=pull, deadline_s=DEADLINE_S, **overrides
    )
    return pool.serve(cfg)


@contextmanager
def connected(pull: bool, **overrides: Any) -> Iterator[tuple[MemPool, MemPool]]:
    """``a`` connected to ``b``; with ``pull``, ``a`` offers ``b`` to copy its blocks itself
    (``overrides``: other ``TransportConfig`` fields, for both)."""
    a, b = make_pool(), make_pool()
    try:
        host, port = serve(b, "b", pull=pull, **overrides)
        serve(a, "a", pull=pull, **overrides)
        a.connect("b", host, port)
        wait_until(lambda: "a" in b.peers())  # b registers a just after a's connect returns
        yield a, b
    finally:
        a.close()
        b.close()


def wait_until(cond: Callable[[], bool], seconds: float = 10.0) -> float:
    """Poll ``cond`` until it holds; return how long that took."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < seconds, "condition never held"
        time.sleep(0.01)
    return time.monotonic() - start


def unchanged(pool: MemPool, before: dict[str, dict[str, int]]) -> None:
    """Nothing allocated, cached or indexed since ``before`` (once the transfer's cleanup, which
    runs right after its answer is sent, is over), and every invariant holds."""
    wait_until(lambda: pool.stats() == before, 5.0)
    pool.check_invariants()
