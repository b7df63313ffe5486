"""Pictures of the radix tree for people: ``format_tree`` and the ``python -m mempool.index.radix`` demo."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from mempool.alloc.allocator import BlockAllocator
from mempool.alloc.storage import KVStorage, copy_blocks
from mempool.config import KVLayout
from mempool.index.keys import decode_key
from mempool.types import IdArray, Tier

if TYPE_CHECKING:
    from mempool.index.node import Node
    from mempool.index.radix import RadixIndex

__all__ = ["demo", "format_tree"]


def format_tree(index: RadixIndex, namespace: Hashable = None, max_tokens: int = 8) -> str:
    """One line per node: its tokens, block ids per tier and lock count."""
    root = index._roots.get(namespace)
    lines = [f"<root ns={namespace!r}>"]
    if root is None:
        return lines[0]

    def walk(node: Node, indent: str) -> None:
        kids = sorted(node.children.values(), key=lambda c: c.key)
        for i, child in enumerate(kids):
            toks = decode_key(child.key)
            shown = toks if len(toks) <= max_tokens else [*toks[:max_tokens], "..."]
            where = []
            if child.device is not None:
                where.append(f"device={child.device.tolist()}")
            if child.host is not None:
                where.append(f"host={child.host.tolist()}")
            elbow = "└─" if i == len(kids) - 1 else "├─"
            lines.append(f"{indent}{elbow} {shown} {' '.join(where)} lock={child.lock}")
            walk(child, indent + ("   " if i == len(kids) - 1 else "│  "))

    walk(root, "")
    return "\n".join(lines)


def demo() -> None:
    """Build a small two-tier index, evict, and print it."""
    from mempool.index.radix import RadixIndex

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, dtype="float32")
    dev_alloc, host_alloc = BlockAllocator(Tier.DEVICE, 8, None), BlockAllocator(Tier.HOST, 8, None)
    cpu = torch.device("cpu")
    stores = {Tier.DEVICE: KVStorage(layout, 8, cpu), Tier.HOST: KVStorage(layout, 8, cpu)}

    def mover(st: Tier, s: IdArray, dt: Tier, d: IdArray) -> None:
        copy_blocks(stores[st], s, stores[dt], d)

    index = RadixIndex(block_size=2, device=dev_alloc, host=host_alloc, mover=mover)
    for prompt in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 7], [1, 2, 8, 8]):
        nb = len(prompt) // 2
        with index.match(prompt) as m:
            own = dev_alloc.allocate(nb - len(m.blocks))
            assert own is not None
            index.insert(prompt, m.blocks.concat(own))
            dev_alloc.free(own)
    print("three prompts sharing [1, 2]:")
    print(index.format_tree())
    index.evict(Tier.DEVICE, 2)
    print("\nafter evicting 2 device blocks (least recently used demoted to host):")
    print(index.format_tree())
    with index.match([1, 2, 3, 4, 5, 6]) as m:
        print(f"\nmatch([1..6]) -> {m}")
    index.check_invariants()
