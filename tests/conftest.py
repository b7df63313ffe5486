"""Shared factories and hypothesis profiles."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from mempool import MemPool, PoolConfig

# CI runs the property tests at 200 examples each, the same examples every run (derandomize), so
# that a landing never depends on the draw; local runs draw fresh examples (a quicker default) and
# HYPOTHESIS_PROFILE=deep searches hard. What a random draw finds becomes an explicit test case.
_QUIET = [HealthCheck.too_slow]
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, suppress_health_check=_QUIET)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=_QUIET)
PROFILE = "ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """The example count of a test that sets its own (``n``): ten times ``n`` under the deep
    profile, which would otherwise not reach such a test."""
    return 10 * n if PROFILE == "deep" else n


# memserve instances started by tests skip the step-size warm-up (memserve.instance.WARM_UP_ENV):
# ~1 s of CPU an instance on 2 cores, and no test times a first request (tests/serving cover it)
os.environ.setdefault("MEMSERVE_WARM_UP_TOKENS", "0")

BLOCK_SIZE = 4
# The CUDA paths' tests: they run where a GPU is (no machine of this project's CI has one)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A test of a device path, once on the CPU (so that CI runs its logic) and once on a GPU where one
# is; ``pytest -k cuda`` selects the GPU cases
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def make_config(**overrides: object) -> PoolConfig:
    """A tiny float32 layout; any field can be overridden."""
    fields: dict[str, object] = dict(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        block_size=BLOCK_SIZE,
        dtype="float32",
        device_blocks=16,
        host_blocks=16,
    )
    fields.update(overrides)
    return PoolConfig(**fields)  # type: ignore[arg-type]


def make_pool(**overrides: object) -> MemPool:
    """A small CPU pool with both tiers."""
    return MemPool(make_config(**overrides))


def make_tokens(n: int, seed: int = 0, vocab: int = 32000) -> list[int]:
    """``n`` seeded random token ids."""
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def fill_random(pool: MemPool, blocks: object, seed: int = 0) -> torch.Tensor:
    """Write seeded random (never zero) KV into ``blocks``; return what was written."""
    from mempool.types import Blocks

    assert isinstance(blocks, Blocks)
    storage = pool.storage(blocks.tier)
    g = torch.Generator().manual_seed(seed)
    data = torch.rand((len(blocks), *storage.layout.block_shape), generator=g) + 0.5
    data = data.to(storage.tensor.dtype)
    storage.scatter(blocks.ids, data.to(storage.device))
    return data


@pytest.fixture
def pool() -> Iterator[MemPool]:
    p = make_pool()
    yield p
    p.check_invariants()
    p.close()


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic collector off for the test: an object still alive after ``del`` is then
    held by a reference cycle (or by something else that is alive)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
