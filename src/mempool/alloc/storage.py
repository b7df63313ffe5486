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

On Linux a CPU tier that is not pinned lives in a memfd (shared memory with no name in any
file system): an authenticated transfer peer on the same host may map it read-only and copy
blocks straight out of it (``mempool.transport.mapped``). A process forked (without exec) by
the pool's process shares that memory instead of getting a copy of it.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import overload

import numpy as np
import torch

from mempool.config import KVLayout
from mempool.errors import InvalidArgumentError, InvalidBlockError, LayoutMismatchError, TierTooLargeError
from mempool.types import IdArray, as_block_ids

__all__ = [
    "RUN_COPY_MAX",
    "KVStorage",
    "available_memory",
    "copy_blocks",
    "copy_rows",
    "copy_rows_pieces",
    "gather_view",
]

# At most this many runs are copied one slice at a time; more go through one vectorised
# index_select / index_copy_ (a slice copy costs a few microseconds of dispatch each).
RUN_COPY_MAX = 8
# Scattered-to-scattered copies stage through a reusable buffer of about this size: a fresh
# large allocation costs page faults that run far below memcpy speed.
STAGING_BYTES = 8 << 20


class KVStorage:
    """The KV tensor of one tier.

    Args:
        layout: block layout.
        num_blocks: capacity in blocks.
        device: torch device for the tensor.
        pin: allocate pinned (page-locked) host memory; only honoured on CPU when CUDA exists.

    The tensor is zero-initialised (every page written up front, so no first-touch faults later)
    and a partially written block never holds NaN garbage.
    ``flat`` views the same memory as ``[num_blocks, words]`` of the widest integer type that
    divides a block: copies go through it, since torch's CPU gather kernels reach memcpy
    speed on 8-byte elements but not on 1- or 2-byte ones.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device, *, pin: bool = False) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, *layout.block_shape)
        if device.type == "cpu":  # every page is written below: what does not fit gets us killed
            room = available_memory()
            if room is not None and num_blocks * layout.block_bytes > room:
                raise TierTooLargeError(
                    f"{num_blocks} blocks of {layout.block_bytes} bytes need {num_blocks * layout.block_bytes / 2**30:.2f} "
                    f"GiB; this process can use {room / 2**30:.2f} GiB more (available memory, within its cgroup)"
                )
        self.pinned = bool(pin and device.type == "cpu" and torch.cuda.is_available())
        #: what a peer on this host needs to map this tier (memfd, size, identity), or None
        self.share_info: dict[str, int] | None = None
        shared = None if device.type != "cpu" or self.pinned else _memfd_tensor(num_blocks * layout.block_bytes)
        if shared is not None:
            raw, self.share_info = shared
            self.tensor = raw.view(layout.dtype).view(shape)  # type: ignore[arg-type]
            weakref.finalize(self, os.close, self.share_info["fd"])  # peers find the memory by this fd
        else:
            self.tensor = torch.empty(shape, dtype=layout.dtype, device=device, pin_memory=self.pinned)  # type: ignore[arg-type]
        #: the tensor's device, with its index ("cuda" names whichever GPU was current; CUDA calls
        #: such as ``torch.cuda.set_device`` need the index)
        self.device = self.tensor.device
        # Write every page now: lazily zeroed memory would fault on first touch, inside a swap or
        # a transfer, at a fraction of memcpy speed.
        self.tensor.zero_()
        self.flat = flat_view(self.tensor)
        self._staging: torch.Tensor | None = None
        self._staging_lock = threading.Lock()

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

    def staged(self) -> tuple[threading.Lock, torch.Tensor]:
        """The lock and reusable staging rows (``[rows, words]``, ~STAGING_BYTES) of this tier."""
        if self._staging is None:
            rows = max(1, STAGING_BYTES // max(1, self.layout.block_bytes))
            self._staging = torch.empty((rows, self.flat.shape[1]), dtype=self.flat.dtype, device=self.device)
        return self._staging_lock, self._staging

    def _ids(self, ids: IdArray) -> IdArray:
        """``ids`` as int64 ids of this tier's blocks.

        Raises:
            InvalidBlockError: not a 1-D sequence of ints, or an id outside ``[0, num_blocks)``.
        """
        return _ids_below(ids, self.num_blocks)

    def gather(self, ids: IdArray) -> torch.Tensor:
        """Copy of the blocks ``ids`` in order, ``[len(ids), *block_shape]``, contiguous."""
        ids = self._ids(ids)
        out = torch.empty((len(ids), *self.layout.block_shape), dtype=self.tensor.dtype, device=self.device)
        if len(ids):
            _copy_runs(self.flat, ids, flat_view(out), np.arange(len(ids), dtype=np.int64))
        return out

    def scatter(self, ids: IdArray, src: torch.Tensor) -> None:
        """Write ``src[i]`` into block ``ids[i]``; ``src`` is ``[len(ids), *block_shape]``."""
        ids = self._ids(ids)
        if tuple(src.shape) != (len(ids), *self.layout.block_shape) or src.dtype != self.tensor.dtype:
            raise LayoutMismatchError(
                f"src is {tuple(src.shape)} {src.dtype}, expected {(len(ids), *self.layout.block_shape)} "
                f"{self.tensor.dtype}"
            )
        if len(ids):
            _copy_runs(flat_view(src.contiguous()), np.arange(len(ids), dtype=np.int64), self.flat, ids)

    def read_rows(self, ids: IdArray, out: torch.Tensor) -> None:
        """Copy blocks ``ids``, in order, into the first ``len(ids)`` rows of ``out``, a buffer
        shaped like :attr:`flat` (``[rows, words]``, same dtype) on this tier's device."""
        ids = self._ids(ids)
        if (
            out.dim() != 2
            or out.shape[0] < len(ids)
            or out.shape[1] != self.flat.shape[1]
            or out.dtype != self.flat.dtype
        ):
            raise LayoutMismatchError(
                f"rows {tuple(out.shape)} {out.dtype} cannot hold {len(ids)} of {tuple(self.flat.shape)}"
            )
        _copy_runs(self.flat, ids, out, np.arange(len(ids), dtype=np.int64))

    def synchronize(self) -> None:
        """Return once the copies this thread has queued on the tier's device have landed (on
        CUDA, its current stream's work; on CPU every copy has landed when it returns)."""
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            torch.cuda.current_stream(self.device).synchronize()  # type: ignore[no-untyped-call]


def gather_view(view: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``view[table]``, contiguous: the blocks ``table`` (int64 block ids, any shape) of a
    blocks-first view whose blocks are each contiguous, such as :meth:`KVStorage.keys`;
    ``[*table.shape, *view.shape[1:]]``.

    It copies block by block (indexing the strided view copies element by element, ~3x slower).
    ``out``, if given, is a buffer of ``view``'s dtype with at least that many elements, which the
    result then occupies (from its start).

    Raises:
        InvalidArgumentError: ``view`` is not blocks-first with each block contiguous.
    """
    if view.dim() < 2 or (len(view) > 0 and not view[0].is_contiguous()):
        raise InvalidArgumentError(f"needs a blocks-first view with contiguous blocks, got strides {view.stride()}")
    rows = view.flatten(1)
    index = table.flatten()
    if out is None:
        picked = torch.index_select(rows, 0, index)
    else:
        picked = torch.index_select(
            rows, 0, index, out=out.view(-1)[: rows.shape[1] * index.numel()].view(-1, rows.shape[1])
        )
    return picked.view(*table.shape, *view.shape[1:])


def available_memory() -> int | None:
    """Bytes of memory this process can still fill without swapping or being killed: the
    machine's ``MemAvailable``, capped by what its memory cgroup (v2 or v1) has left (reclaimable
    file cache counted as free); ``None`` where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        groups = []
    for _, controllers, path in (g for g in groups if len(g) == 3):
        if controllers == "":  # v2: one unified hierarchy
            root, limit, usage, inactive = "/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            root, limit, usage, inactive = (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        else:
            continue
        folder = os.path.join(root, path.lstrip("/"))
        try:
            with open(os.path.join(folder, limit)) as f:
                cap = f.read().strip()
            if cap == "max":
                continue
            with open(os.path.join(folder, usage)) as f:
                used = int(f.read())
            with open(os.path.join(folder, "memory.stat")) as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
            found.append(int(cap) - used + int(stat.get(inactive, 0)))
        except (OSError, ValueError):
            continue
    return max(0, min(found)) if found else None


def _memfd_tensor(nbytes: int) -> tuple[torch.Tensor, dict[str, int]] | None:
    """``nbytes`` of shared memory as a uint8 tensor, and how to find it; None where unsupported."""
    if nbytes <= 0 or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("mempool-kv", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes)  # MAP_SHARED, read-write
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    return torch.frombuffer(buf, dtype=torch.uint8), {"fd": fd, "bytes": nbytes, "dev": st.st_dev, "ino": st.st_ino}


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous, blocks first) as ``[blocks, words]`` of the widest int dtype dividing a block."""
    rows = t.reshape(t.shape[0], -1).view(torch.uint8)
    width = rows.shape[1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0:
            return rows.view(dtype)
    return rows


def _ids_below(ids: IdArray, n: int) -> IdArray:
    """``ids`` as int64, each in ``[0, n)``; :class:`InvalidBlockError` otherwise."""
    ok = isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype == np.int64
    arr = ids if ok else as_block_ids(ids)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
        raise InvalidBlockError(f"block ids must lie in [0, {n}), got {int(arr.min())}..{int(arr.max())}")
    return arr


def copy_blocks(
    src: KVStorage, src_ids: IdArray, dst: KVStorage, dst_ids: IdArray, *, non_blocking: bool = False
) -> None:
    """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst``, pairwise.

    Runs adjacent in both tiers move as one slice copy each; otherwise a scattered source is
    gathered straight into each run of the destination (the allocator keeps those few), and
    only a destination in many small runs takes a gather plus a scatter. Never per layer.
    """
    src_ids, dst_ids = src._ids(src_ids), dst._ids(dst_ids)
    if len(src_ids) != len(dst_ids):
        raise InvalidArgumentError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.layout != dst.layout:
        raise LayoutMismatchError(f"layouts differ: {src.layout.describe()} vs {dst.layout.describe()}")
    _copy_runs(src.flat, src_ids, dst.flat, dst_ids, non_blocking=non_blocking, staging=dst)


def copy_rows(src: torch.Tensor, src_ids: IdArray, dst: KVStorage, dst_ids: IdArray) -> None:
    """Copy rows ``src_ids`` of a flat ``[blocks, words]`` tensor of ``dst``'s layout (such as a
    peer's mapped tier) into blocks ``dst_ids`` of ``dst``, pairwise, as :func:`copy_blocks` does."""
    src_ids, dst_ids = _checked_rows(src, src_ids, dst, dst_ids)
    _copy_runs(src, src_ids, dst.flat, dst_ids, staging=dst)


def copy_rows_pieces(
    src: torch.Tensor, src_ids: IdArray, dst: KVStorage, dst_ids: IdArray, piece_rows: int
) -> RowPieces | None:
    """:func:`copy_rows` cut into pieces of at most ``piece_rows`` rows, for threads to share.

    Each piece is a single-threaded copy that releases the GIL while it runs; pieces touch
    disjoint destination rows, so any threads may run them, in any order. Checks the ids as
    ``copy_rows`` does, before any piece exists. None where ``copy_rows`` serves better: a tensor
    off the host, a destination in many short runs (it moves those in one vectorised gather and
    scatter), or a copy within one tier (it orders reads before writes).
    """
    src_ids, dst_ids = _checked_rows(src, src_ids, dst, dst_ids)
    n = len(src_ids)
    dfirst, dend = _run_bounds(dst_ids)
    if (
        src.device.type != "cpu"
        or dst.flat.device.type != "cpu"
        or len(dfirst) > max(RUN_COPY_MAX, n // 8)
        or src.untyped_storage().data_ptr() == dst.flat.untyped_storage().data_ptr()  # one tier: copy_rows
    ):
        return None
    return RowPieces(src, src_ids, dst.flat, dst_ids, dfirst, dend, max(1, piece_rows))


class RowPieces(Sequence[Callable[[], None]]):
    """The pieces of one host row copy (:func:`copy_rows_pieces`): ``pieces[k]()`` copies the
    k-th. A piece lies in one destination run; it is one slice copy where its source rows are
    adjacent too, else one gather straight into the destination."""

    def __init__(
        self,
        src: torch.Tensor,
        src_ids: IdArray,
        dst: torch.Tensor,
        dst_ids: IdArray,
        firsts: list[int],
        ends: list[int],
        step: int,
    ) -> None:
        with warnings.catch_warnings():  # a peer's read-only mapping: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            self._rows, self._out = src.numpy(), dst.numpy()
        self._src_ids, self._dst_ids = src_ids, dst_ids
        n = len(src_ids)
        starts = [p for a, b in zip(firsts, ends) for p in range(a, b, step)]
        self._bounds = np.array([*starts, n], dtype=np.int64)
        # breaks[i]: source rows i and i + 1 are not adjacent; a piece [p, q) has none in p..q-2
        breaks = np.concatenate(([0], np.cumsum(np.diff(src_ids) != 1)))
        lo, hi = self._bounds[:-1], self._bounds[1:]
        self._adjacent = (breaks[hi - 1] == breaks[lo]).tolist() if n else []

    def __len__(self) -> int:
        return len(self._adjacent)

    @overload
    def __getitem__(self, k: int) -> Callable[[], None]: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[Callable[[], None]]: ...
    def __getitem__(self, k: int | slice) -> Callable[[], None] | Sequence[Callable[[], None]]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return partial(self._copy, k % len(self))

    def _copy(self, k: int) -> None:
        p, q = int(self._bounds[k]), int(self._bounds[k + 1])
        d0 = int(self._dst_ids[p])
        out = self._out[d0 : d0 + q - p]
        if self._adjacent[k]:
            s0 = int(self._src_ids[p])
            np.copyto(out, self._rows[s0 : s0 + q - p])
        else:  # ids checked already: "clip" never clips, and unlike "raise" it needs no buffer
            np.take(self._rows, self._src_ids[p:q], axis=0, out=out, mode="clip")


def _checked_rows(src: torch.Tensor, src_ids: IdArray, dst: KVStorage, dst_ids: IdArray) -> tuple[IdArray, IdArray]:
    """Both id sequences as checked int64 arrays, for a row copy from ``src`` into ``dst``."""
    src_ids, dst_ids = _ids_below(src_ids, src.shape[0]), dst._ids(dst_ids)
    if len(src_ids) != len(dst_ids):
        raise InvalidArgumentError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.dim() != 2 or src.shape[1] != dst.flat.shape[1] or src.dtype != dst.flat.dtype:
        raise LayoutMismatchError(f"rows {tuple(src.shape)} {src.dtype} do not match {tuple(dst.flat.shape)}")
    return src_ids, dst_ids


def _run_bounds(*seqs: IdArray) -> tuple[list[int], list[int]]:
    """Positions where any of the id sequences stops being consecutive: (run starts, run ends)."""
    n = len(seqs[0])
    cut = np.zeros(max(n - 1, 0), dtype=bool)
    for ids in seqs:
        cut |= np.diff(ids) != 1
    brk = np.flatnonzero(cut) + 1
    return [0, *brk.tolist()], [*brk.tolist(), n]


def _index(ids: IdArray, device: torch.device) -> torch.Tensor:
    """An int64 index tensor of ``ids`` on ``device`` (a copy: handles' id arrays are read-only)."""
    return torch.from_numpy(np.array(ids, dtype=np.int64)).to(device)


def _copy_runs(
    src: torch.Tensor,
    src_ids: IdArray,
    dst: torch.Tensor,
    dst_ids: IdArray,
    *,
    non_blocking: bool = False,
    staging: KVStorage | None = None,
) -> None:
    """Pairwise block copy between two flat ``[blocks, words]`` tensors."""
    n = len(src_ids)
    if n == 0:
        return
    firsts, ends = _run_bounds(src_ids, dst_ids)
    if src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr() and (
        len(firsts) > RUN_COPY_MAX or np.intersect1d(src_ids, dst_ids).size
    ):
        # Within one tier torch refuses an op whose input and output share memory (an
        # index_select into a slice of the tensor it reads, overlapping slices): read every
        # block first, then write (a block that is both source and destination gets its old value).
        dst.index_copy_(0, _index(dst_ids, dst.device), src.index_select(0, _index(src_ids, src.device)))
        return
    if len(firsts) <= RUN_COPY_MAX:
        for a, b in zip(firsts, ends):
            s0, d0 = int(src_ids[a]), int(dst_ids[a])
            dst[d0 : d0 + b - a].copy_(src[s0 : s0 + b - a], non_blocking=non_blocking)
        return
    if src.device != dst.device:
        # Across devices: gather on the source device, one transfer, scatter on the destination.
        staged = src.index_select(0, _index(src_ids, src.device))
        dfirst, _ = _run_bounds(dst_ids)
        if len(dfirst) == 1:
            d0 = int(dst_ids[0])
            dst[d0 : d0 + n].copy_(staged, non_blocking=non_blocking)
        else:
            moved = staged.to(dst.device, non_blocking=non_blocking)
            if non_blocking and dst.device.type == "cpu":  # pragma: no cover - needs a GPU
                # The scatter below runs on the host at once: a non-blocking copy to the host
                # returns before its bytes arrive, so wait for the stream that carries it.
                torch.cuda.current_stream(src.device).synchronize()  # type: ignore[no-untyped-call]
            dst.index_copy_(0, _index(dst_ids, dst.device), moved)
        return
    sidx = _index(src_ids, src.device)
    dfirst, dend = _run_bounds(dst_ids)
    if len(dfirst) <= max(RUN_COPY_MAX, n // 8):
        for a, b in zip(dfirst, dend):  # few destination runs: gather straight into each
            d0 = int(dst_ids[a])
            torch.index_select(src, 0, sidx[a:b], out=dst[d0 : d0 + b - a])
        return
    didx = _index(dst_ids, dst.device)
    sfirst, _ = _run_bounds(src_ids)
    if len(sfirst) == 1:
        s0 = int(src_ids[0])
        dst.index_copy_(0, didx, src[s0 : s0 + n])
        return
    if staging is None:
        dst.index_copy_(0, didx, src.index_select(0, sidx))
        return
    lock, buf = staging.staged()
    rows = buf.shape[0]
    with lock:  # both sides scattered: gather a chunk into staging, scatter it out
        for a in range(0, n, rows):
            b = min(a + rows, n)
            torch.index_select(src, 0, sidx[a:b], out=buf[: b - a])
            dst.index_copy_(0, didx[a:b], buf[: b - a])
