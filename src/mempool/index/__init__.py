"""Token radix index at block granularity (see README.md in this folder)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mempool.index.eviction import POLICIES, EvictionPolicy
    from mempool.index.match import Match
    from mempool.index.radix import Mover, RadixIndex

__all__ = ["POLICIES", "EvictionPolicy", "Match", "Mover", "RadixIndex"]

_WHERE = {
    "Match": "mempool.index.match",
    "RadixIndex": "mempool.index.radix",
    "Mover": "mempool.index.radix",
    "POLICIES": "mempool.index.eviction",
    "EvictionPolicy": "mempool.index.eviction",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m mempool.index.radix`` does not import radix twice.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mempool.index' has no attribute {name!r}")
