"""Eviction policies (by registry) and the candidate heaps that make eviction O(log n).

A policy only ranks candidates; which nodes are candidates is the tree's rule:

* device candidates: device-resident, unlocked, no device-resident child;
* host candidates: host-resident, unlocked, and either device-resident too (dropping the
  host copy loses nothing) or childless.

Each tier keeps a lazy min-heap of ``(priority, uid, stamp, node)``. A node is pushed when it
may have become a candidate or its stamp changed, and forgotten when it leaves the tree; stale
entries (older stamp, removed or no longer eligible node) are skipped when popped, and the heap
is compacted when stale entries outnumber live nodes, so every operation is O(log n) amortised,
nothing scans all leaves, and the heap never outgrows twice the tree (plus a constant).
A policy's priority must depend only on node state that changes together with ``stamp``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, Protocol

from mempool.index.node import Node

__all__ = ["LFU", "LRU", "POLICIES", "CandidateHeap", "EvictionPolicy", "make_policy"]


class EvictionPolicy(Protocol):
    """Ranks eviction candidates: the lowest priority is evicted first."""

    def priority(self, node: Node) -> Any: ...


class LRU:
    """Least recently used first (``stamp`` is a logical clock bumped on every access)."""

    def priority(self, node: Node) -> Any:
        return node.stamp


class LFU:
    """Least frequently matched first, least recently used among equals."""

    def priority(self, node: Node) -> Any:
        return (node.hits, node.stamp)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> EvictionPolicy:
    """Instantiate a registered policy.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction must be one of {sorted(POLICIES)}, got {name!r}") from None


class CandidateHeap:
    """Lazy min-heap of eviction candidates of one tier (``slot`` 0 = device, 1 = host)."""

    def __init__(self, slot: int, policy: EvictionPolicy, eligible: Callable[[Node], bool]) -> None:
        self._slot = slot
        self._policy = policy
        self._eligible = eligible
        self._heap: list[tuple[Any, int, int, Node]] = []
        self._live = 0  # entries that are a node's latest push

    def __len__(self) -> int:
        return len(self._heap)

    def offer(self, node: Node) -> None:
        """Push ``node`` if it is a candidate and not already queued under its current stamp."""
        if node.pushed[self._slot] == node.stamp or node.removed or not self._eligible(node):
            return
        if node.pushed[self._slot] == -1:
            self._live += 1
        node.pushed[self._slot] = node.stamp
        heapq.heappush(self._heap, (self._policy.priority(node), node.uid, node.stamp, node))
        if len(self._heap) > 2 * self._live + 64:
            self._compact()

    def forget(self, node: Node) -> None:
        """``node`` left the tree: its entry is stale from now on (and compacted away with the rest),
        so a tree that removes without evicting, by ``delete``, keeps no removed node alive."""
        if node.pushed[self._slot] != -1:
            node.pushed[self._slot] = -1
            self._live -= 1
            if len(self._heap) > 2 * self._live + 64:
                self._compact()

    def pop(self) -> Node | None:
        """Remove and return the lowest-priority candidate, or ``None``. O(log n) amortised."""
        heap = self._heap
        while heap:
            _, _, stamp, node = heapq.heappop(heap)
            if node.pushed[self._slot] != stamp:
                continue  # superseded by a later push
            node.pushed[self._slot] = -1
            self._live -= 1
            if node.removed or node.stamp != stamp or not self._eligible(node):
                continue
            return node
        return None

    def _compact(self) -> None:
        slot = self._slot
        self._heap = [e for e in self._heap if e[3].pushed[slot] == e[2] and not e[3].removed]
        heapq.heapify(self._heap)
        self._live = len(self._heap)
