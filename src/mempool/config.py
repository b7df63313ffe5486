"""Frozen, keyword-only configuration of a pool, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CHUNK_BYTES", "KVLayout", "PoolConfig", "TransportConfig"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _resolve_dtype(value: object) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {value!r}")
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or the torch dtype, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """Shape of one KV block; two pools can exchange blocks only if their layouts are equal.

    A block holds, for ``block_size`` consecutive tokens, every layer's K and V::

        block = [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]   (contiguous)
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype | str = torch.float16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "dtype", _resolve_dtype(self.dtype))

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: ``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies."""
        n = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * self.dtype.itemsize  # type: ignore[union-attr]

    def describe(self) -> dict[str, object]:
        """Plain-data form for handshakes and logs."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Everything a :class:`~mempool.pool.MemPool` needs to know; immutable once built.

    Args:
        num_layers, num_kv_heads, head_dim, block_size, dtype: the KV block layout
            (see :class:`KVLayout`).
        device_blocks: capacity of the device tier in blocks (HBM, or a CPU tensor without CUDA).
        host_blocks: capacity of the host tier in blocks (DRAM); 0 disables the host tier.
        device: torch device of the device tier, ``"cpu"`` or ``"cuda[:i]"``.
        pin_host: pin host-tier memory when the device tier is on a GPU (faster, asynchronous
            copies). A CPU device tier never pins: pinned memory cannot be shared with a
            same-host peer, and no DMA reads it.
        eviction: name of the eviction policy in :data:`mempool.index.eviction.POLICIES`.

    Raises:
        ValueError: naming the field and the value, for any invalid field.

    >>> cfg = PoolConfig(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, device_blocks=8)
    >>> cfg.layout.block_bytes
    256
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    device_blocks: int
    dtype: torch.dtype | str = torch.float16
    host_blocks: int = 0
    device: str = "cpu"
    pin_host: bool = True
    eviction: str = "lru"

    def __post_init__(self) -> None:
        layout = KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
            dtype=self.dtype,
        )
        object.__setattr__(self, "dtype", layout.dtype)
        _positive_int("device_blocks", self.device_blocks)
        if isinstance(self.host_blocks, bool) or not isinstance(self.host_blocks, int) or self.host_blocks < 0:
            raise ValueError(f"host_blocks must be an int >= 0, got {self.host_blocks!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a str such as 'cpu' or 'cuda:0', got {self.device!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from exc
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but CUDA is not available")
        if not isinstance(self.pin_host, bool):
            raise ValueError(f"pin_host must be a bool, got {self.pin_host!r}")
        if not isinstance(self.eviction, str) or not self.eviction:
            raise ValueError(f"eviction must be a policy name, got {self.eviction!r}")

    @property
    def layout(self) -> KVLayout:
        """The KV block layout these fields describe."""
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
            dtype=self.dtype,
        )

    @property
    def torch_device(self) -> torch.device:
        """The device tier's torch device."""
        return torch.device(self.device)


_BACKENDS = ("ucx", "torch")

#: the largest data message where ``TransportConfig.chunk_bytes`` is None, by the memory the blocks
#: are in. Host memory: 8 MiB pieces, so that a scattered transfer gathers one while the last is on
#: the wire. GPU memory gathers at TB/s, and each more message is one more rendezvous: on an H100,
#: 32 MiB in one message instead of four moved a run at 37 GB/s instead of 26, scattered blocks at
#: 20 instead of 10.5 (docs/gpu.md).
CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How a pool talks to other pools (see ``docs/transport.md``).

    Args:
        name: this pool's peer name (what other pools call it).
        secret: shared secret of the deployment (at least 16 bytes); only its HMAC ever travels.
        backend: data plane: ``"ucx"`` (ucxx; the ``ucx`` extra) or ``"torch"`` (torch.distributed:
            gloo on CPU, NCCL for CUDA tiers).
        host: address the control listener binds (loopback unless told otherwise).
        port: control port; 0 picks a free one.
        deadline_s: the longest any single wait of a transfer may take.
        receipt_ttl_s: received blocks nobody claimed are freed after this long.
        chunk_bytes: largest data message; larger runs are split (and pipelined). None: by
            where the blocks are (:data:`CHUNK_BYTES`).
        heartbeat_s: interval of liveness probes on idle connections.
        ucx_shared_memory: let UCX use shared memory with peer-failure detection kept on
            (UCX ``MM_ERROR_HANDLING``); off means TCP only.
        same_host_pull: offer this pool's CPU tiers to authenticated peers on the same host, and
            map theirs, so that a receiver copies blocks straight out of the sender's tier (one
            copy, one round trip; ``docs/transport.md``); off, every byte takes the data link.
    """

    name: str
    secret: bytes | str
    backend: str = "ucx"
    host: str = "127.0.0.1"
    port: int = 0
    deadline_s: float = 30.0
    receipt_ttl_s: float = 60.0
    chunk_bytes: int | None = None
    heartbeat_s: float = 1.0
    ucx_shared_memory: bool = True
    same_host_pull: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 128:
            raise ValueError(f"name must be a non-empty str of at most 128 chars, got {self.name!r}")
        secret = self.secret.encode() if isinstance(self.secret, str) else self.secret
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("secret must be bytes or str of at least 16 bytes")
        object.__setattr__(self, "secret", secret)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be an address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be an int in [0, 65536), got {self.port!r}")
        for name in ("deadline_s", "receipt_ttl_s", "heartbeat_s"):  # inf: no deadline, no expiry (a leak)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.chunk_bytes is not None:
            _positive_int("chunk_bytes", self.chunk_bytes)
        for name in ("ucx_shared_memory", "same_host_pull"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def chunk_for(self, device: torch.device) -> int:
        """The largest data message, in bytes, for blocks on ``device``."""
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]

    def __repr__(self) -> str:  # never print the secret
        return f"TransportConfig(name={self.name!r}, backend={self.backend!r}, host={self.host!r}, port={self.port})"
