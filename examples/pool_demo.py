"""A short tour of the MemPool API: the README's main job until the memserve demo lands.

Serves a few multi-turn conversations the way an engine would (match the prompt, compute only
the uncached suffix, insert prompt + answer, free), under a device tier small enough that old
turns are demoted to the host tier and promoted back, then preempts a request with swap_out /
swap_in. Every KV block holds values derived from its tokens, and the demo checks them.

    python examples/pool_demo.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mempool import Blocks, MemPool, PoolConfig

BLOCK = 16


def kv_for(pool: MemPool, tokens: list[int], first_block: int, blocks: Blocks) -> None:
    """Stand-in for a model's prefill: write KV that is a function of the tokens it covers."""
    for i, b in enumerate(blocks.tolist()):
        k = first_block + i + 1
        pool.kv()[b].fill_(float(sum(tokens[: k * BLOCK]) % 9973))


def check(pool: MemPool, tokens: list[int], blocks: Blocks) -> None:
    for i, b in enumerate(blocks.tolist()):
        want = float(sum(tokens[: (i + 1) * BLOCK]) % 9973)
        assert torch.all(pool.kv()[b] == want), f"block {b} holds KV of other tokens"


def serve(pool: MemPool, prompt: list[int], answer_len: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """One request; returns (the answer, prompt tokens found cached on the device)."""
    with pool.match(prompt, promote=True) as m:
        check(pool, prompt, m.blocks)
        answer = rng.integers(0, 32000, answer_len).tolist()
        full = prompt + answer
        need = len(full) // BLOCK - len(m.blocks)
        own = pool.alloc(need)
        if own is None:
            raise RuntimeError("pool exhausted: a real engine would queue the request")
        kv_for(pool, full, len(m.blocks), own)
        pool.insert(full, m.blocks.concat(own))
        pool.free(own)
        return answer, m.num_tokens


def main() -> None:
    cfg = PoolConfig(
        num_layers=8,
        num_kv_heads=4,
        head_dim=64,
        block_size=BLOCK,
        dtype="float16",
        device_blocks=256,
        host_blocks=1024,
    )
    pool = MemPool(cfg)
    mib = cfg.layout.block_bytes * (cfg.device_blocks + cfg.host_blocks) / 2**20
    print(
        f"pool: {cfg.device_blocks} device + {cfg.host_blocks} host blocks of {cfg.layout.block_bytes} B ({mib:.0f} MiB)"
    )

    rng = np.random.default_rng(0)
    system = rng.integers(0, 32000, 500).tolist()  # a system prompt all conversations share
    convs = [list(system) for _ in range(12)]
    hit = computed = 0
    t0 = time.perf_counter()
    for turn in range(4):
        for history in convs:
            history += rng.integers(0, 32000, 85).tolist()  # the user's new message
            answer, cached = serve(pool, history, answer_len=290, rng=rng)
            hit, computed = hit + cached, computed + len(history) - cached
            history += answer  # the next turn's prompt holds the whole conversation
        s = pool.stats()
        print(
            f"turn {turn + 1}: prompt tokens cached {hit:6d} / computed {computed:6d}   "
            f"device used {s['device']['used']:4d}  host used {s['host']['used']:4d}  "
            f"demoted {s['index']['demoted']:4d}  promoted {s['index']['promoted']:4d}"
        )
    dt = time.perf_counter() - t0
    print(f"hit ratio {hit / (hit + computed):.1%} over {4 * len(convs)} requests in {dt * 1e3:.0f} ms")

    # Preemption: a running request's own blocks go to the host and come back bit for bit.
    own = pool.alloc(8)
    assert own is not None
    pool.storage().scatter(own.ids, torch.randn(8, *cfg.layout.block_shape).half())
    before = pool.storage().gather(own.ids)
    host = pool.swap_out(own)
    assert host is not None
    back = pool.swap_in(host)
    assert back is not None and torch.equal(pool.storage().gather(back.ids), before)
    pool.free(back)
    print(f"swap_out -> swap_in of 8 blocks: bit-exact ({host.runs()} on host, {back.runs()} on device)")

    pool.check_invariants()
    s = pool.stats()
    print(f"invariants hold; device {s['device']}, host {s['host']}")
    print(
        f"index: {s['index']['nodes']} nodes; device cached {s['index']['device_cached']}, host cached {s['index']['host_cached']}"
    )
    assert s["device"]["used"] == s["device"]["cached"] and s["host"]["used"] == s["host"]["cached"], "leak"
    print("no leaks: every used block is held by the cache")
    pool.close()


if __name__ == "__main__":
    main()
