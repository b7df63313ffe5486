"""mempool: an elastic KV-cache memory pool for LLM serving.

``MemPool`` manages KV blocks on a device tier (HBM, or a CPU tensor) and a host tier (DRAM),
indexes them by token prefix for context caching, and moves them between tiers. Only torch
and numpy (plus sortedcontainers) are needed to ``import mempool``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mempool.config import KVLayout, PoolConfig, TransportConfig
from mempool.errors import MemPoolError
from mempool.types import Blocks, Tier

if TYPE_CHECKING:
    from mempool.index.match import Match
    from mempool.pool import MemPool
    from mempool.transport.agent import TransferResult
    from mempool.transport.handles import SwapHandle

__version__ = "0.1.0"
__all__ = [
    "Blocks",
    "KVLayout",
    "Match",
    "MemPool",
    "MemPoolError",
    "PoolConfig",
    "SwapHandle",
    "Tier",
    "TransferResult",
    "TransportConfig",
    "errors",
]

_LAZY = {
    "MemPool": "mempool.pool",
    "Match": "mempool.index.match",
    "SwapHandle": "mempool.transport.handles",
    "TransferResult": "mempool.transport.agent",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m mempool.<module>`` demos run their module once.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "errors":
        return importlib.import_module("mempool.errors")
    raise AttributeError(f"module 'mempool' has no attribute {name!r}")
