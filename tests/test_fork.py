"""A pool inherited by a forked child is refused there: its KV memory is shared with the parent,
its allocator and index are copies that stop agreeing with the parent's the moment either acts."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from mempool.errors import ForkedPoolError

from .conftest import fill_random, make_pool, make_tokens

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_a_forked_child_cannot_use_the_pool_and_the_parents_cached_kv_stays_whole() -> None:
    """Before 2026-11-24 the child's ``alloc`` evicted and reused a block the parent had cached,
    and what the child wrote into it became the parent's cached K/V."""
    pool = make_pool()
    tokens = make_tokens(4 * pool.config.block_size, seed=3)
    blocks = pool.alloc(4)
    assert blocks is not None
    written = fill_random(pool, blocks, seed=4)
    pool.insert(tokens, blocks)
    pool.free(blocks)
    calls = {
        "alloc": lambda: pool.alloc(pool.config.device_blocks),
        "match": lambda: pool.match(tokens),
        "evict": lambda: pool.evict(4),
        "kv": lambda: pool.kv(),
        "storage": lambda: pool.storage(),
        "insert": lambda: pool.insert(tokens, blocks),
        "stats": lambda: pool.stats(),
    }
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads running
        pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            answers = {}
            for name, call in calls.items():
                try:
                    call()
                    answers[name] = "allowed"
                except ForkedPoolError:
                    answers[name] = "refused"
                except BaseException as exc:  # reported to the parent
                    answers[name] = type(exc).__name__
            pool.close()
            os.write(write, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answers = json.loads(f.read())
    assert os.waitpid(pid, 0)[1] == 0
    assert answers == {name: "refused" for name in calls}
    with pool.match(tokens) as hit:  # the parent's cache is whole, and the pool still works here
        assert hit.num_tokens == len(tokens)
        assert torch.equal(pool.storage().gather(hit.blocks.ids), written)
    more = pool.alloc(1)
    assert more is not None
    pool.free(more)
    pool.check_invariants()
    pool.close()
