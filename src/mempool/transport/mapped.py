"""Same-host pull: a receiver maps its peer's KV tiers read-only and copies blocks straight out.

Between two processes on one host, every byte moved through a data link is copied twice (into
the link and out of it) and a scattered transfer a third time (the gather). When both pools keep
their CPU tiers in memfds (``KVStorage.share_info``), the receiver instead opens the sender's
memfd through ``/proc/<pid>/fd/<fd>`` (read-only) and copies the blocks it lacks straight into
its own blocks: one copy, one control round trip (``begin`` -> ``done``).

What makes a mapping trusted: the peer authenticated with the shared secret before it said where
its memory is; both run on the same boot in the same time namespace (so ``time.monotonic`` is
one clock for both); and the opened file is the one the peer described (device, inode, size).
CUDA tiers and pinned host tiers are not shared: their transfers take the data link.

Why a pull never reads a reused block: the sender stamps ``begin`` with ``until`` (its
``monotonic`` clock plus its deadline) and keeps the blocks referenced until then unless the
receiver answered first; the receiver commits a pulled copy only if the copy ended before
``until``.
"""

from __future__ import annotations

import mmap
import os
import warnings
from typing import Any

import torch

from mempool.alloc.storage import KVStorage
from mempool.types import Tier

__all__ = ["advertise", "near", "open_peer", "same_host"]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _time_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/time").st_ino
    except OSError:
        return 0


def same_host() -> dict[str, Any]:
    """Who this process is, as far as mapping goes: boot, time namespace, pid."""
    return {"boot": _boot_id(), "timens": _time_namespace(), "pid": os.getpid()}


def advertise(storages: dict[Tier, KVStorage]) -> dict[str, Any] | None:
    """What a peer needs to map this pool's shareable tiers; None when none is shareable."""
    tiers = {tier.value: s.share_info for tier, s in storages.items() if s.share_info is not None}
    me = same_host()
    if not tiers or not me["boot"]:
        return None
    return {**me, "tiers": tiers}


def near(info: Any) -> bool:
    """Whether a peer's advertisement comes from this boot and time namespace (one clock)."""
    me = same_host()
    return (
        isinstance(info, dict)
        and bool(me["boot"])
        and info.get("boot") == me["boot"]
        and info.get("timens") == me["timens"]
        and isinstance(info.get("pid"), int)
    )


def open_peer(info: Any, own: KVStorage) -> dict[Tier, torch.Tensor]:
    """Map the tiers a peer advertised, read-only, as flat ``[blocks, words]`` rows of ``own``'s
    layout (the tier pulled blocks land in).

    Returns only what could be mapped and checked; anything else (another host, another time
    namespace, no access to the peer's ``/proc``, a file that is not the one described) is
    left out, and those transfers take the data link.
    """
    if not near(info):
        return {}
    out: dict[Tier, torch.Tensor] = {}
    tiers = info.get("tiers")
    for name, desc in tiers.items() if isinstance(tiers, dict) else ():
        tier = next((t for t in Tier if t.value == name), None)
        rows = _map(info["pid"], desc, own) if tier is not None and isinstance(desc, dict) else None
        if tier is not None and rows is not None:
            out[tier] = rows
    return out


def _map(pid: int, desc: dict[str, Any], own: KVStorage) -> torch.Tensor | None:
    fd, size = desc.get("fd"), desc.get("bytes")
    block_bytes = own.layout.block_bytes
    if not isinstance(fd, int) or not isinstance(size, int) or size <= 0 or size % block_bytes:
        return None
    try:
        handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(handle)
        if (st.st_dev, st.st_ino, st.st_size) != (desc.get("dev"), desc.get("ino"), size):
            return None
        buf = mmap.mmap(handle, size, prot=mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(handle)
    with warnings.catch_warnings():  # read-only on purpose: nothing here ever writes to it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(buf, dtype=torch.uint8)
    return raw.view(own.flat.dtype).view(size // block_bytes, own.flat.shape[1])
