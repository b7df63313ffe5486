"""PoolConfig and KVLayout validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mempool import KVLayout, PoolConfig
from tests.conftest import make_config


def test_valid_config_and_derived_layout() -> None:
    cfg = make_config()
    assert cfg.dtype is torch.float32
    assert cfg.layout == KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
    assert cfg.layout.block_shape == (2, 2, 4, 2, 4)
    assert cfg.layout.block_bytes == 2 * 2 * 4 * 2 * 4 * 4
    assert cfg.layout.describe()["dtype"] == "float32"


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device_blocks = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoolConfig(2, 2, 4, 4, 16)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 0),
        ("num_kv_heads", -1),
        ("head_dim", 2.5),
        ("block_size", True),
        ("device_blocks", 0),
        ("host_blocks", -1),
        ("dtype", "float64"),
        ("dtype", torch.int64),
        ("device", "tpu"),
        ("device", 3),
        ("pin_host", "yes"),
        ("eviction", ""),
    ],
)
def test_invalid_field_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        make_config(**{field: value})


def test_cuda_device_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_config(device="cuda")


def test_unknown_eviction_policy_is_refused_when_the_pool_is_built() -> None:
    from mempool import MemPool

    with pytest.raises(ValueError, match="eviction must be one of"):
        MemPool(make_config(eviction="random"))
