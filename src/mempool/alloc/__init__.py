"""Block allocation over KV storage tiers (see README.md in this folder)."""

from mempool.alloc.allocator import BlockAllocator
from mempool.alloc.storage import KVStorage, copy_blocks, gather_view

__all__ = ["BlockAllocator", "KVStorage", "copy_blocks", "gather_view"]
