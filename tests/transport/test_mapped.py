"""Mapping a pool's tier the way a same-host peer does (``mempool.transport.mapped``), in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mempool import MemPool, PoolConfig
from mempool.alloc.storage import copy_rows
from mempool.errors import LayoutMismatchError
from mempool.transport import mapped
from mempool.types import Tier

CFG = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4}


def pool(**kw: int) -> MemPool:
    return MemPool(PoolConfig(**CFG, device_blocks=kw.get("device_blocks", 32), host_blocks=kw.get("host_blocks", 0)))


def test_a_mapped_tier_shows_the_owners_blocks_and_copies_bit_exact() -> None:
    owner, reader = pool(host_blocks=8), pool()
    info = mapped.advertise({Tier.DEVICE: owner.storage(Tier.DEVICE), Tier.HOST: owner.storage(Tier.HOST)})
    assert info is not None and set(info["tiers"]) == {"device", "host"}
    rows = mapped.open_peer(info, reader.storage())
    assert set(rows) == {Tier.DEVICE, Tier.HOST} and rows[Tier.DEVICE].shape == owner.storage().flat.shape
    g = torch.Generator().manual_seed(3)
    owner.storage().tensor.copy_(torch.rand(owner.storage().tensor.shape, generator=g))
    assert torch.equal(rows[Tier.DEVICE], owner.storage().flat)  # the same memory, not a copy
    src, dst = np.array([5, 9, 2, 30]), np.array([0, 1, 7, 8])
    copy_rows(rows[Tier.DEVICE], src, reader.storage(), dst)
    assert torch.equal(reader.storage().tensor[dst], owner.storage().tensor[src])


def test_what_is_not_the_described_memory_is_not_mapped() -> None:
    owner, reader = pool(), pool()
    info = mapped.advertise({Tier.DEVICE: owner.storage()})
    assert info is not None
    desc = info["tiers"]["device"]
    wrong = [
        {**info, "boot": "another-boot"},
        {**info, "timens": info["timens"] + 1},
        {**info, "tiers": {"device": {**desc, "ino": desc["ino"] + 1}}},
        {**info, "tiers": {"device": {**desc, "bytes": desc["bytes"] - 1}}},
        {**info, "tiers": {"device": {**desc, "fd": 10_000}}},
        {**info, "tiers": {"nowhere": desc}},
        {**info, "pid": "me"},
        "not a dict",
        None,
    ]
    for bad in wrong:
        assert mapped.open_peer(bad, reader.storage()) == {}, bad
    # another layout's rows cannot be copied into this pool's blocks
    other = MemPool(PoolConfig(**{**CFG, "head_dim": 16}, device_blocks=8))
    rows = mapped.open_peer(info, reader.storage())[Tier.DEVICE]
    with pytest.raises(LayoutMismatchError):
        copy_rows(rows, np.array([0]), other.storage(), np.array([0]))
