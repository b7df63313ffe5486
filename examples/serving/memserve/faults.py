"""Fault injection for tests: slow an instance down so that a fault lands where a test wants it.

An instance reads ``MEMSERVE_FAULTS`` (a JSON object) at start; nothing is injected without it.

* ``forward_delay_s``: sleep before every model forward (a prefill or decode step "in progress");
* ``segment_delay_s``: sleep after every data message the transfer agent sends;
* ``chunk_bytes``: the transport's largest data message (small: a transfer is many messages);
* ``link_bytes_per_s``: ``{peer name: bytes per second}``, a slow link: data this instance sends
  to that peer is paced to the rate (this kernel has no ``netem``; the transport does it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

FAULTS_ENV = "MEMSERVE_FAULTS"


@dataclass(frozen=True, kw_only=True)
class Faults:
    forward_delay_s: float = 0.0
    segment_delay_s: float = 0.0
    chunk_bytes: int = 0  # 0: the transport's default
    link_bytes_per_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Faults:
        """The faults ``MEMSERVE_FAULTS`` asks for; unknown keys or bad values raise ``ValueError``."""
        raw = os.environ.get(FAULTS_ENV)
        if not raw:
            return cls()
        spec = json.loads(raw)
        known = {f.name for f in fields(cls)}
        if not isinstance(spec, dict) or set(spec) - known:
            raise ValueError(f"{FAULTS_ENV} must be a JSON object with keys from {sorted(known)}, got {raw!r}")
        faults = cls(**spec)
        rates = faults.link_bytes_per_s
        if not isinstance(rates, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in rates.items()
        ):
            raise ValueError(f"{FAULTS_ENV}: link_bytes_per_s must map peer names to rates > 0, got {raw!r}")
        if min(faults.forward_delay_s, faults.segment_delay_s, faults.chunk_bytes) < 0:
            raise ValueError(f"{FAULTS_ENV} values must be >= 0, got {raw!r}")
        return faults

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))
