"""How a transfer's blocks are cut into data messages (the receiver decides, the sender follows).

Messages follow the receiver's destination runs, split at ``chunk`` blocks, so each lands with
one receive straight into KV storage; a destination fragmented into many small runs (or a link
that must receive into staging) is cut into plain chunks instead and scattered after landing.
Never a message per block or per layer (unless a run is one block long).

>>> plan_segments(np.array([4, 5, 6, 7, 8, 20, 21]), chunk=3, via_staging=False)
[3, 2, 2]
>>> plan_segments(np.array([4, 5, 6, 7, 8, 20, 21]), chunk=3, via_staging=True)
[3, 3, 1]
"""

from __future__ import annotations

import numpy as np

from mempool.types import IdArray, find_runs

__all__ = ["RUNS_PER_MESSAGE_MIN", "plan_segments", "segment_tag"]

# a destination averaging fewer blocks than this per run is received in plain chunks
RUNS_PER_MESSAGE_MIN = 8


def plan_segments(dst_ids: IdArray, chunk: int, via_staging: bool) -> list[int]:
    """Segment lengths (in blocks) covering ``dst_ids`` in order."""
    n = len(dst_ids)
    if n == 0:
        return []
    _, lengths = find_runs(np.asarray(dst_ids, dtype=np.int64))
    if via_staging or len(lengths) > max(RUNS_PER_MESSAGE_MIN, n // RUNS_PER_MESSAGE_MIN):
        lengths = np.array([n])
    out: list[int] = []
    for length in lengths.tolist():
        full, rest = divmod(length, chunk)
        out.extend([chunk] * full)
        if rest:
            out.append(rest)
    return out


def segment_tag(xid: int, index: int) -> int:
    """A message tag unique per (transfer, segment) within one direction of one link."""
    return ((xid & 0x7FFFF) << 12 | (index & 0xFFF)) & 0x7FFFFFFF
