"""The request lifecycle of an engine on MemPool, end to end (docs/engine-guide.md walks through it)."""

import numpy as np
import torch

from mempool import MemPool, PoolConfig, Tier

L, H, D, BS = 2, 2, 4, 4  # layers, KV heads, head size, tokens per block
pool = MemPool(PoolConfig(num_layers=L, num_kv_heads=H, head_dim=D, block_size=BS, device_blocks=32,
                          host_blocks=32, dtype="float32"))  # fmt: skip
kv = pool.storage(Tier.DEVICE)  # layer views over the block-major tensor [blocks, L, 2, BS, H, D]


def project(tokens: list[int], start: int, layer: int) -> torch.Tensor:
    """Stand-in for a layer's K (V = -K): any deterministic function of token and position."""
    t = torch.tensor(tokens, dtype=torch.float32)[:, None, None]
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)[:, None, None]
    return (t * 100 + pos + layer * 0.5).expand(len(tokens), H, D).clone()


def serve(prompt: list[int]) -> int:
    """One request: reuse the cached prefix, compute the rest into own blocks, cache, release."""
    with pool.match(prompt[:-1], promote=True) as hit:  # keep >= 1 token to compute
        own = pool.alloc(-(-len(prompt) // BS) - len(hit.blocks))
        assert own is not None, "no room: a real engine queues the request"
        table = hit.blocks.concat(own)  # block table: cached prefix, then own blocks
        ids = torch.tensor(table.tolist())
        pos = torch.arange(hit.num_tokens, len(prompt))  # only the uncached positions are computed
        for layer in range(L):
            k = project(prompt[hit.num_tokens :], hit.num_tokens, layer)
            kv.keys(layer)[ids[pos // BS], pos % BS] = k
            kv.values(layer)[ids[pos // BS], pos % BS] = -k
            # attention reads every position back through the block table
            ctx = kv.keys(layer)[ids].flatten(0, 1)[: len(prompt)]
            assert torch.equal(ctx, project(prompt, 0, layer))  # cached + new K, bit-exact
        full = len(prompt) // BS  # only whole blocks are cached (the index takes its own references)
        pool.insert(prompt[: full * BS], table[:full])
        pool.free(own)  # drop ours; cached blocks stay, the rest return to the free list
        return hit.num_tokens


turn1 = list(range(10, 23))
turn2 = turn1 + [7, 8, 9, 5, 6]
print("turn 1 reused", serve(turn1), "tokens; turn 2 reused", serve(turn2), "tokens")
pool.evict(pool.stats()["device"]["cached"])  # pressure: cached blocks demoted to the host tier
print("after demotion, turn 2 again reused", serve(turn2), "tokens (promoted back from host)")
view = np.from_dlpack(pool.kv(Tier.HOST))  # zero-copy: numpy sees the pool's own memory
assert np.shares_memory(view, pool.kv(Tier.HOST).numpy())
pool.check_invariants()
s = pool.stats()["device"]
print(f"device blocks used {s['used']} = cached {s['cached']}: no leaks")
pool.close()
