"""KV storage of one tier: one block-major tensor, layer views, and block-run copies.

Layout (one tensor per tier)::

    kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        |           |          |
        |           |          +-- 0 = K, 1 = V
        |           +------------- every layer of a block is in the block
        +------------------------- a block is one contiguous region of block_bytes

    block b:  [ L0.K | L0.V | L1.K | L1.V | ... ]     (block_bytes, contiguous)
    layer l:  kv[:, l]   -> strided view [num_blocks, 2, block_size, heads, dim]

A run of adjacent blocks is one contiguous region, so moving it is one copy; a model reads a
layer through a strided view without copying.
"""

from __future__ import annotations

import numpy as np
import torch

from mempool.config import KVLayout
from mempool.types import IdArray

__all__ = ["RUN_COPY_MAX", "KVStorage", "copy_blocks"]

# At most this many runs are copied one slice at a time; more go through one vectorised
# index_select / index_copy_ (a slice copy costs a few microseconds of dispatch each).
RUN_COPY_MAX = 8


class KVStorage:
    """The KV tensor of one tier.

    Args:
        layout: block layout.
        num_blocks: capacity in blocks.
        device: torch device for the tensor.
        pin: allocate pinned (page-locked) host memory; only honoured on CPU when CUDA exists.

    The tensor is zero-initialised, so a partially written block never holds NaN garbage.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device, *, pin: bool = False) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, *layout.block_shape)
        self.pinned = bool(pin and device.type == "cpu" and torch.cuda.is_available())
        self.tensor = torch.zeros(shape, dtype=layout.dtype, device=device, pin_memory=self.pinned)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tier."""
        return self.tensor.numel() * self.tensor.element_size()

    def layer(self, layer: int) -> torch.Tensor:
        """Strided view ``[num_blocks, 2, block_size, kv_heads, head_dim]`` of one layer."""
        return self.tensor[:, layer]

    def keys(self, layer: int) -> torch.Tensor:
        """Strided view ``[num_blocks, block_size, kv_heads, head_dim]`` of one layer's K."""
        return self.tensor[:, layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        """Strided view ``[num_blocks, block_size, kv_heads, head_dim]`` of one layer's V."""
        return self.tensor[:, layer, 1]

    def gather(self, ids: IdArray) -> torch.Tensor:
        """Copy of the blocks ``ids`` in order, ``[len(ids), *block_shape]``, contiguous."""
        out = torch.empty((len(ids), *self.layout.block_shape), dtype=self.tensor.dtype, device=self.device)
        _copy_runs(self.tensor, ids, out, np.arange(len(ids), dtype=np.int64))
        return out

    def scatter(self, ids: IdArray, src: torch.Tensor) -> None:
        """Write ``src[i]`` into block ``ids[i]``; ``src`` is ``[len(ids), *block_shape]``."""
        if tuple(src.shape) != (len(ids), *self.layout.block_shape):
            raise ValueError(f"src has shape {tuple(src.shape)}, expected {(len(ids), *self.layout.block_shape)}")
        _copy_runs(src, np.arange(len(ids), dtype=np.int64), self.tensor, ids)


def copy_blocks(
    src: KVStorage, src_ids: IdArray, dst: KVStorage, dst_ids: IdArray, *, non_blocking: bool = False
) -> None:
    """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst``, pairwise.

    Runs adjacent in both source and destination move as one slice copy; many scattered
    blocks move through one vectorised gather and one scatter. Never a copy per layer.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.layout != dst.layout:
        raise ValueError("source and destination layouts differ")
    _copy_runs(src.tensor, src_ids, dst.tensor, dst_ids, non_blocking=non_blocking)


def _joint_runs(src_ids: IdArray, dst_ids: IdArray) -> tuple[np.ndarray, np.ndarray]:
    """Break points where either id sequence stops being consecutive: (run starts, run ends)."""
    n = len(src_ids)
    brk = np.flatnonzero((np.diff(src_ids) != 1) | (np.diff(dst_ids) != 1)) + 1
    return np.concatenate(([0], brk)), np.concatenate((brk, [n]))


def _is_run(ids: IdArray) -> bool:
    return len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1 and bool((np.diff(ids) == 1).all())


def _copy_runs(
    src: torch.Tensor, src_ids: IdArray, dst: torch.Tensor, dst_ids: IdArray, *, non_blocking: bool = False
) -> None:
    n = len(src_ids)
    if n == 0:
        return
    firsts, ends = _joint_runs(src_ids, dst_ids)
    if len(firsts) <= RUN_COPY_MAX:
        for a, b in zip(firsts.tolist(), ends.tolist()):
            s0, d0 = int(src_ids[a]), int(dst_ids[a])
            dst[d0 : d0 + b - a].copy_(src[s0 : s0 + b - a], non_blocking=non_blocking)
        return
    src_run, dst_run = _is_run(src_ids), _is_run(dst_ids)
    if src.device == dst.device:
        if dst_run:
            d0 = int(dst_ids[0])
            sidx = torch.from_numpy(np.ascontiguousarray(src_ids)).to(src.device)
            torch.index_select(src, 0, sidx, out=dst[d0 : d0 + n])
            return
        didx = torch.from_numpy(np.ascontiguousarray(dst_ids)).to(dst.device)
        if src_run:
            s0 = int(src_ids[0])
            dst.index_copy_(0, didx, src[s0 : s0 + n])
        else:
            sidx = torch.from_numpy(np.ascontiguousarray(src_ids)).to(src.device)
            dst.index_copy_(0, didx, src.index_select(0, sidx))
        return
    # Across devices: gather on the source device, one transfer, scatter on the destination.
    if src_run:
        s0 = int(src_ids[0])
        staged = src[s0 : s0 + n]
    else:
        staged = src.index_select(0, torch.from_numpy(np.ascontiguousarray(src_ids)).to(src.device))
    if dst_run:
        d0 = int(dst_ids[0])
        dst[d0 : d0 + n].copy_(staged, non_blocking=non_blocking)
    else:
        moved = staged.to(dst.device, non_blocking=non_blocking)
        dst.index_copy_(0, torch.from_numpy(np.ascontiguousarray(dst_ids)).to(dst.device), moved)
