"""Invariant checker of :class:`~mempool.index.radix.RadixIndex` (used by tests after every step)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mempool.index.keys import TOKEN_BYTES
from mempool.types import Tier

if TYPE_CHECKING:
    from mempool.index.radix import RadixIndex

__all__ = ["check_index"]


def check_index(index: RadixIndex) -> None:
    """Assert every structural, residency, lock and reference invariant of ``index``. O(nodes + capacity)."""
    tb = index.block_size * TOKEN_BYTES
    held = {t: np.zeros_like(index._where[t]) for t in Tier}
    count = {t: 0 for t in Tier}
    locked = {t: 0 for t in Tier}
    nodes = 0
    assert len(index._root_ns) == len(index._roots), "a stale namespace of a root"
    for ns, root in index._roots.items():
        assert root.parent is None and root.lock == 0 and root.device is None and root.host is None, ns
        assert root.children, f"namespace {ns!r} keeps an empty root"
        assert index._root_ns.get(root.uid) is ns, ns
        stack = [root]
        while stack:
            node = stack.pop()
            assert node.dev_children == sum(c.device is not None for c in node.children.values()), node
            for first, child in node.children.items():
                nodes += 1
                stack.append(child)
                assert index._nodes.get(child.uid) is child, child
                assert not child.removed, child
                assert child.parent is node, child
                assert child.nblocks > 0 and len(child.key) == child.nblocks * tb, child
                assert child.key[:tb] == first, child
                assert child.device is not None or child.host is not None, f"{child} is resident nowhere"
                assert 0 <= child.lock, child
                if node.parent is not None:
                    assert node.lock >= child.lock, (node, child)
                if child.device is not None:
                    assert node.parent is None or node.device is not None, (
                        f"device residency not prefix-closed at {child}"
                    )
                for tier, ids in ((Tier.DEVICE, child.device), (Tier.HOST, child.host)):
                    if ids is None:
                        continue
                    assert len(ids) == child.nblocks, child
                    assert not held[tier][ids].any(), f"{tier.value} block indexed twice at {child}"
                    assert np.unique(ids).size == ids.size, child
                    held[tier][ids] = child.uid
                    count[tier] += len(ids)
                    if child.lock:
                        locked[tier] += len(ids)
    assert nodes == index.num_nodes == len(index._nodes), (nodes, index.num_nodes, len(index._nodes))
    for tier in Tier:
        assert np.array_equal(held[tier], index._where[tier]), f"{tier.value} block-to-node map is stale"
        assert count[tier] == index._count[tier], (tier, count[tier], index._count[tier])
        assert locked[tier] == index._locked[tier], (tier, locked[tier], index._locked[tier])
        heap = index._heaps[tier]  # one live entry per node queued; none for a node that left the tree
        queued = sum(1 for node in index._nodes.values() if node.pushed[heap._slot] != -1)
        assert heap._live == queued, (tier, heap._live, queued)
        assert len(heap) <= 2 * heap._live + 64, (tier, len(heap), heap._live)
        alloc = index._alloc[tier]
        if alloc is not None and held[tier].any():
            refs = alloc._refs[held[tier] != 0]
            assert (refs >= 1).all(), f"{tier.value} blocks indexed but free in the allocator"
