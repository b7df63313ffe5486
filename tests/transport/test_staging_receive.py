"""The receive path of a link that must not receive into KV storage (``receive_via_staging``: NCCL,
whose abort is not verified to end posted receives): each message lands in one of two staging
buffers and is copied into its blocks from there, whether they form a run or are scattered. No
GPU here, so a gloo link is told to take that path; the agent's code is the same.
"""

from __future__ import annotations

import pytest
import torch

from mempool import MemPool
from mempool.types import Blocks

from ..conftest import fill_random
from .inproc import connected, wait_until


def _rows(pool: MemPool, blocks: Blocks) -> torch.Tensor:
    return pool.storage(blocks.tier).flat[torch.tensor(blocks.ids.tolist())]


@pytest.mark.parametrize("destination", ["run", "scattered"])
def test_a_staging_link_lands_every_block_bit_for_bit(destination: str) -> None:
    with connected(pull=False, chunk_bytes=1024) as (a, b):  # 2 blocks of 512 bytes a message
        agent = b._agent
        assert agent is not None and a.config.layout.block_bytes == 512
        wait_until(lambda: "a" in agent._peers)
        agent._peers["a"].link.receive_via_staging = True
        if destination == "scattered":  # b's free blocks alternate with used ones
            taken = b.alloc(12)
            assert taken is not None
            b.free(Blocks(taken.tier, taken.ids[::2], owner=taken.owner))
        blocks = a.alloc(6)  # 3 messages: the first staging buffer is used twice
        assert blocks is not None
        fill_random(a, blocks, seed=11)
        result = a.transfer("b", blocks, key="k")
        assert result is not None and result.messages == 3
        got = b.claim("k")
        assert got is not None and len(got) == 6
        steps = set((got.ids[1:] - got.ids[:-1]).tolist())
        assert (steps == {1}) == (destination == "run")  # the destination is the case's
        assert _rows(b, got).equal(_rows(a, blocks))
        b.free(got)
        if destination == "scattered":
            b.free(Blocks(taken.tier, taken.ids[1::2], owner=taken.owner))
        a.free(blocks)
        for pool in (a, b):
            pool.check_invariants()
            assert pool.stats()["device"]["used"] == 0
