"""The MemServe design stages: which instances run, which cache, and how KV moves between them."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("colocated", "prefill", "decode")  # what an instance can be


@dataclass(frozen=True)
class Stage:
    """One design stage.

    ``handoff``: how a prefill instance sends KV to decode (``transfer``: every block under the
    request id, claimed by decode; ``insert``: ``transfer_with_insert`` of whole blocks, so decode
    caches them and later turns send only what is missing). ``send_back``: decode returns the
    finished request's KV to prefill with ``transfer_with_insert``.
    """

    name: str
    disaggregated: bool
    prefill_caching: bool  # or the colocated instances' caching
    decode_caching: bool = False
    handoff: str = "transfer"
    send_back: bool = False

    def caches(self, role: str) -> bool:
        """Whether instances of ``role`` keep a context cache in this stage."""
        return self.decode_caching if role == "decode" else self.prefill_caching


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("colocated", False, prefill_caching=False),
        Stage("colocated-caching", False, prefill_caching=True),
        Stage("pd-basic", True, prefill_caching=False),
        Stage("pd-caching-1", True, prefill_caching=True),
        Stage("pd-caching-2", True, prefill_caching=True, decode_caching=True, handoff="insert"),
        Stage("pd-caching-3", True, prefill_caching=True, decode_caching=True, handoff="insert", send_back=True),
    )
}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {list(STAGES)}")
    return STAGES[name]
