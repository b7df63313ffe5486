"""Random interleavings of every kind of transfer between two real processes: a receiver pool
small enough to evict, demote and push back, conversations that share prefixes and end in
partly filled blocks, transfers both ways at once, and a receiver that stalls past the
sender's deadline. Every transfer that completes is bit exact where it landed; nothing leaks;
both pools' invariants hold after every operation. Seeded, so a failure replays."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from .conftest import PATHS, PeerProcess, path_config

OPERATIONS = 50
SEED = os.environ.get("MEMPOOL_CHAOS_SEED", "0")  # another seed, another interleaving
BLOCK = 4  # peer_proc's block size


def insert_checked(b: PeerProcess, conv: dict[str, Any], out: dict[str, Any], sent: dict[str, Any]) -> list[str]:
    """Check one finished transfer_with_insert of ``conv``'s tokens to ``b``; returns what happened."""
    tokens, ns = conv["tokens"], conv["ns"]
    assert "error" not in out, out
    if out["result"] is None:
        return ["no room"]
    r = out["result"]
    assert r["sent"] + r["skipped"] == len(sent["blocks"]), (r, len(sent["blocks"]))
    held = b.ok("cached", tokens=tokens, ns=ns)
    whole = len(tokens) // BLOCK
    assert held["blocks"] == sent["blocks"][:whole], conv  # every whole block, bit exact (either tier)
    what = ["inserted"] + (["reused a prefix"] if r["skipped"] else [])
    if len(tokens) % BLOCK and held["tail"]["tokens"] is not None:
        assert held["tail"] == {"tokens": len(tokens) % BLOCK, "digest": sent["blocks"][-1]}, conv
        what.append("tail checked")
    return what


@pytest.mark.parametrize("path", PATHS)
def test_random_transfers_stay_bit_exact_and_leak_nothing(spawn: Any, path: str) -> None:
    rng = random.Random(f"chaos-{path}-{SEED}")
    common = {**path_config(path), "deadline_s": 2.0, "heartbeat_s": 0.5, "receipt_ttl_s": 1.0, "chunk_bytes": 1024}
    a = spawn("a", **common, device_blocks=512)
    b = spawn("b", **common, device_blocks=40, host_blocks=24)
    a.connect_to(b)
    system = [rng.randrange(1, 5000) for _ in range(10)]  # two conversations share it (2.5 blocks)
    convs: list[dict[str, Any]] = [{"tokens": [], "ns": "t" if i % 2 else None} for i in range(4)]
    seen: dict[str, int] = {}
    hog = False
    unclaimed: list[str] = []
    stall_at = rng.randrange(OPERATIONS // 4, OPERATIONS * 3 // 4)  # once, somewhere in the middle
    for step in range(OPERATIONS):
        kind = (
            "stall" if step == stall_at else rng.choices(["insert", "keyed", "both ways", "pressure"], [10, 4, 3, 2])[0]
        )
        if kind in ("insert", "both ways"):
            i = rng.randrange(len(convs))
            c = convs[i]
            if not c["tokens"] or len(c["tokens"]) > 80:
                c["tokens"] = (system[:] if i < 2 else []) + [rng.randrange(1, 5000)]
            c["tokens"] += [rng.randrange(1, 5000) for _ in range(rng.randint(1, 12))]
            name = f"s{step}"
            sent = a.ok("alloc_tokens", name=name, tokens=c["tokens"], layout=rng.choice(["run", "scattered"]))
            if kind == "insert":
                out = a.call("send_insert", peer="b", handle=name, tokens=c["tokens"], ns=c["ns"])
            else:  # and one the other way, keyed, at the same time
                back = b.ok("alloc_tokens", name=name, tokens=[7, *c["tokens"]], layout="scattered")
                a.ok("send_async", job=name, then="send_insert", peer="b", handle=name, tokens=c["tokens"], ns=c["ns"])
                if back["ids"] is not None:
                    b.ok("send_async", job=name, then="send", peer="a", handle=name, key=name)
                out = a.call("wait", job=name)
                if back["ids"] is not None:
                    got = b.call("wait", job=name)
                    assert "error" not in got, got
                    b.ok("free", handle=name)
                    if got["result"] is not None:
                        assert a.ok("claim", key=name)["digest"] == back["digest"]
            what = insert_checked(b, c, out, sent)
            if b.ok("state")["host_used"]:
                what.append("receiver demoted to host")
            a.ok("free", handle=name)
        elif kind == "keyed":
            name = f"k{step}"
            # now and then a key that may still hold an unclaimed receipt: refused, or free again
            key = rng.choice(unclaimed) if unclaimed and rng.random() < 0.25 else name
            sent = a.ok("alloc_tokens", name=name, tokens=[rng.randrange(1, 5000) for _ in range(rng.randint(1, 60))])
            out = a.call("send", peer="b", handle=name, key=key)
            a.ok("free", handle=name)
            if "error" in out:
                assert key != name and out["error"] == "TransferError" and "in use" in out["message"], out
                what = ["key in use"]
            else:
                what = ["no room" if out["result"] is None else "keyed"]
            if "error" not in out and out["result"] is not None:
                if rng.random() < 0.7:
                    assert b.ok("claim", key=key)["digest"] == sent["digest"]
                else:
                    unclaimed.append(key)  # it expires, unless claimed later
        elif kind == "pressure":  # the receiver's own sequences take (or give back) device blocks
            if hog:
                b.ok("free", handle="hog")
                hog = False
            else:
                hog = b.ok("alloc_tokens", name="hog", tokens=list(range(rng.randint(40, 120))))["ids"] is not None
            what = ["pressure"]
        else:  # the receiver stops answering mid-transfer: the sender gives up within its deadline
            name = f"x{step}"
            a.ok("alloc_tokens", name=name, tokens=list(range(1, 90)))
            b.pause()
            try:
                t0 = time.monotonic()
                out = a.call("send", peer="b", handle=name, key=name, timeout=60)
                assert out.get("error") in ("TransferTimeoutError", "PeerLostError"), out
                assert time.monotonic() - t0 < 15
            finally:
                b.resume()
            a.ok("free", handle=name)
            b.wait_state(lambda s: not s["peers"])
            a.wait_state(lambda s: not s["peers"])
            a.connect_to(b)
            what = ["stalled"]
        for w in what:
            seen[w] = seen.get(w, 0) + 1
        a.ok("state")  # check_invariants on both sides after every operation
        b.ok("state")
    if hog:
        b.ok("free", handle="hog")
    for p in (a, b):  # receipts nobody claimed expire; then only the cache holds blocks
        state = p.wait_state(lambda s: s["device_used"] == s["device_cached"], timeout=10)
        assert state["device_used"] == state["device_cached"], (p.name, state)
        assert state["transport"]["sending"] == state["transport"]["receiving"] == 0, state["transport"]
    assert seen.get("inserted", 0) >= 5 and seen.get("stalled") == 1, seen
    assert seen.get("reused a prefix") and seen.get("tail checked"), seen
    print(f"chaos {path}: {seen}")
