"""The scheduler's global prompt tree: which instance caches which prefix, at block granularity.

Each whole block of a prompt is keyed by a hash chained over every block before it (a radix tree
flattened into a dict, as vLLM keys its prefix cache), so a lookup walks the prompt once and finds,
for every instance, how many leading blocks it holds. Entries expire after ``ttl`` seconds unless
refreshed; a response that shows an instance caches less than the tree believed trims it (the
instance evicted), and an instance that leaves is forgotten.

>>> tree = PromptTree(block_size=2, ttl=60)
>>> tree.insert("a", [1, 2, 3, 4, 5], now=0)
>>> tree.insert("b", [1, 2, 9, 9], now=0)
>>> sorted(tree.match([1, 2, 3, 4, 7], now=1).items())
[('a', 4), ('b', 2)]
>>> tree.drop("a", chain_keys([1, 2, 3, 4], 2)[-1])    # instance a evicted its second block
>>> sorted(tree.match([1, 2, 3, 4, 7], now=1).items())
[('a', 2), ('b', 2)]
>>> tree.match([1, 2, 3, 4], now=100)
{}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def chain_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The key of every whole block of ``tokens``: a hash of the block chained over all before it."""
    data = np.asarray(tokens[: len(tokens) // block_size * block_size], dtype=np.int64).tobytes()
    step = block_size * 8
    keys, h = [], b""
    for i in range(0, len(data), step):
        h = hashlib.blake2b(h + data[i : i + step], digest_size=16).digest()
        keys.append(h)
    return keys


class PromptTree:
    """Prefix -> {instance: expiry}; ``insert``, ``match`` and ``trim`` take O(the prompt's blocks),
    ``forget`` and ``expire`` walk every entry."""

    def __init__(self, block_size: int, ttl: float) -> None:
        self.block_size = block_size
        self.ttl = ttl
        self._nodes: dict[bytes, dict[str, float]] = {}

    def _chain(self, tokens: Sequence[int]) -> list[bytes]:
        return chain_keys(tokens, self.block_size)

    def drop(self, instance: str, key: bytes) -> None:
        """``instance`` no longer caches the prefix whose last block has ``key`` (see :func:`chain_keys`).

        Longer prefixes through it become unreachable for ``instance`` (a match stops there) and
        expire with their TTL.
        """
        holders = self._nodes.get(key)
        if holders is not None:
            holders.pop(instance, None)
            if not holders:
                del self._nodes[key]

    def insert(self, instance: str, tokens: Sequence[int], now: float) -> None:
        """Record that ``instance`` caches the whole blocks of ``tokens`` (refreshes their TTL)."""
        expiry = now + self.ttl
        for key in self._chain(tokens):
            self._nodes.setdefault(key, {})[instance] = expiry

    def match(self, tokens: Sequence[int], now: float) -> dict[str, int]:
        """Tokens of the longest live cached prefix of ``tokens``, per instance holding any."""
        depth: dict[str, int] = {}
        alive: set[str] | None = None
        for i, key in enumerate(self._chain(tokens)):
            holders = self._nodes.get(key)
            here = {name for name, exp in holders.items() if exp > now} if holders else set()
            alive = here if alive is None else alive & here
            if not alive:
                break
            for name in alive:
                depth[name] = (i + 1) * self.block_size
        return depth

    def trim(self, instance: str, tokens: Sequence[int], keep: int) -> None:
        """``instance`` holds only the first ``keep`` tokens of ``tokens``: drop deeper entries."""
        for key in self._chain(tokens)[keep // self.block_size :]:
            holders = self._nodes.get(key)
            if holders is not None:
                holders.pop(instance, None)
                if not holders:
                    del self._nodes[key]

    def forget(self, instance: str) -> None:
        """Drop every entry of ``instance``."""
        for key in list(self._nodes):
            holders = self._nodes[key]
            holders.pop(instance, None)
            if not holders:
                del self._nodes[key]

    def expire(self, now: float) -> int:
        """Remove expired entries; returns how many."""
        gone = 0
        for key in list(self._nodes):
            holders = self._nodes[key]
            for name in [n for n, exp in holders.items() if exp <= now]:
                del holders[name]
                gone += 1
            if not holders:
                del self._nodes[key]
        return gone

    def __len__(self) -> int:
        return len(self._nodes)
