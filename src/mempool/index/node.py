"""A node of the radix tree: one edge of whole blocks, with its residency per tier.

::

    root ──[A B]──> n1 ──[C]──> n2          edge keys are whole blocks of tokens
                     └───[D E]──> n3         children keyed by their first block

    n1.device = [7, 8]   (device block ids, one per block of the edge, or None)
    n1.host   = None     (host block ids, or None)
    n1.lock   = 2        (live matches whose path passes through n1)

Residency rules (checked by ``RadixIndex.check_invariants``):

* every non-root node is resident somewhere (``device`` or ``host`` is set);
* device residency is prefix-closed: a device-resident node's parent is device-resident;
* a node's lock count is at least each child's (matches lock whole root paths).
"""

from __future__ import annotations

from mempool.types import IdArray

__all__ = ["Node"]


class Node:
    """Tree node; plain data manipulated by :class:`~mempool.index.radix.RadixIndex`."""

    __slots__ = (
        "children",
        "dev_children",
        "device",
        "hits",
        "host",
        "key",
        "lock",
        "nblocks",
        "parent",
        "pushed",
        "removed",
        "stamp",
        "uid",
    )

    def __init__(self, uid: int, parent: Node | None, key: bytes, nblocks: int, stamp: int) -> None:
        self.uid = uid
        self.parent = parent
        self.children: dict[bytes, Node] = {}
        self.key = key
        self.nblocks = nblocks
        self.device: IdArray | None = None
        self.host: IdArray | None = None
        self.lock = 0
        self.stamp = stamp
        self.hits = 0
        self.dev_children = 0  # children whose device residency is set
        self.removed = False
        # stamp under which this node was last pushed on each candidate heap (-1: not pushed)
        self.pushed = [-1, -1]

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def path(self) -> list[Node]:
        """Nodes from the first below the root down to this one."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def __repr__(self) -> str:
        dev = None if self.device is None else self.device.tolist()
        host = None if self.host is None else self.host.tolist()
        return f"Node(uid={self.uid}, blocks={self.nblocks}, device={dev}, host={host}, lock={self.lock})"
