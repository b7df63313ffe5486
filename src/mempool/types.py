"""Values that cross layers: tiers and the :class:`Blocks` handle."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from mempool.errors import InvalidBlockError

__all__ = ["Blocks", "Tier", "as_block_ids", "find_runs"]

IdArray = npt.NDArray[np.int64]


class Tier(enum.Enum):
    """A storage tier of the pool."""

    DEVICE = "device"  # HBM on CUDA machines; a CPU tensor otherwise
    HOST = "host"  # DRAM, pinned when the device tier is on a GPU

    def __repr__(self) -> str:
        return f"Tier.{self.name}"

    # Members are singletons: identity hashing runs in C, Enum's default hashes the name in Python.
    __hash__ = object.__hash__


def as_block_ids(ids: Iterable[int] | npt.ArrayLike) -> IdArray:
    """Return a read-only 1-D int64 copy of ``ids``.

    Raises:
        InvalidBlockError: ids are not a 1-D sequence of integers (bools and floats are refused).
    """
    if isinstance(ids, (set, frozenset, dict, str, bytes)):
        raise InvalidBlockError(f"block ids must be an ordered sequence of ints, got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidBlockError(f"block ids must be a 1-D sequence of ints, got {ids!r}") from exc
    if arr.ndim != 1:
        raise InvalidBlockError(f"block ids must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidBlockError(f"block ids must be ints, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidBlockError(f"block id out of range: {int(arr.max())}")
    out = np.array(arr, dtype=np.int64)
    out.flags.writeable = False
    return out


def find_runs(ids: IdArray) -> tuple[IdArray, IdArray]:
    """Split ``ids`` into maximal runs of consecutive ids, in order.

    Returns ``(starts, lengths)``: ``ids`` equals the concatenation of
    ``range(starts[i], starts[i] + lengths[i])``. O(n), vectorised.

    >>> s, n = find_runs(np.array([4, 5, 6, 9, 2, 3]))
    >>> s.tolist(), n.tolist()
    ([4, 9, 2], [3, 1, 2])
    """
    if ids.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    first = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [ids.size]))
    return ids[first].astype(np.int64, copy=False), (ends - first).astype(np.int64)


class Blocks:
    """An ordered list of block ids of one tier: what ``alloc`` returns and ``free`` takes.

    A handle records which pool issued it (``owner``: an identity token of that pool, which
    keeps no pool alive; slices and ``concat`` keep it); handles built by hand from ids
    (``Blocks(Tier.DEVICE, [3, 4])``) have no owner and are checked by id alone.
    Holding a handle does not hold a reference: references are counted by the allocator.

    >>> b = Blocks(Tier.DEVICE, [4, 5, 6, 9])
    >>> len(b), b.tolist(), b.runs()
    (4, [4, 5, 6, 9], [(4, 3), (9, 1)])
    """

    __slots__ = ("checked", "ids", "owner", "tier")

    tier: Tier
    ids: IdArray
    owner: object | None
    #: ids known to lie in the owner's range (issued by it, or sliced / joined from such handles)
    checked: bool

    def __init__(self, tier: Tier, ids: Iterable[int] | npt.ArrayLike, owner: object | None = None) -> None:
        if not isinstance(tier, Tier):
            raise InvalidBlockError(f"tier must be a Tier, got {tier!r}")
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "ids", as_block_ids(ids))
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "checked", False)

    @classmethod
    def _trusted(cls, tier: Tier, ids: IdArray, owner: object | None, checked: bool = True) -> Blocks:
        """Build without validation from in-range int64 ids the caller will not mutate."""
        b = object.__new__(cls)
        ids.flags.writeable = False
        object.__setattr__(b, "tier", tier)
        object.__setattr__(b, "ids", ids)
        object.__setattr__(b, "owner", owner)
        object.__setattr__(b, "checked", checked)
        return b

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Blocks is immutable")

    def __len__(self) -> int:
        return int(self.ids.size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())

    def __getitem__(self, item: slice) -> Blocks:
        if not isinstance(item, slice):
            raise TypeError("Blocks supports slicing only; use .ids or .tolist() for single ids")
        return Blocks._trusted(self.tier, self.ids[item], self.owner, self.checked)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Blocks):
            return NotImplemented
        return self.tier is other.tier and np.array_equal(self.ids, other.ids)

    def __hash__(self) -> int:
        return hash((self.tier, self.ids.tobytes()))

    def __repr__(self) -> str:
        ids = self.ids.tolist()
        shown = ids if len(ids) <= 8 else [*ids[:4], "...", *ids[-2:]]
        return f"Blocks({self.tier!r}, {shown})"

    def tolist(self) -> list[int]:
        """The ids as Python ints."""
        return list(self.ids.tolist())

    def runs(self) -> list[tuple[int, int]]:
        """Maximal runs of adjacent ids as ``(start, length)`` pairs, in order."""
        starts, lengths = find_runs(self.ids)
        return list(zip(starts.tolist(), lengths.tolist()))

    def concat(self, other: Blocks) -> Blocks:
        """This handle's ids followed by ``other``'s (same tier)."""
        if other.tier is not self.tier:
            raise InvalidBlockError(f"cannot concatenate {self.tier!r} and {other.tier!r} blocks")
        same = self.owner is other.owner
        owner = self.owner if same else None
        checked = same and self.checked and other.checked
        return Blocks._trusted(self.tier, np.concatenate((self.ids, other.ids)), owner, checked)
