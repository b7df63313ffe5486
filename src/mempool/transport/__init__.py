"""Moving KV blocks: between tiers of one pool (swap) and between pools (transfer); see README.md."""

from mempool.transport.handles import SwapHandle
from mempool.transport.swap import CopyJob, SwapEngine

__all__ = ["CopyJob", "SwapEngine", "SwapHandle"]
