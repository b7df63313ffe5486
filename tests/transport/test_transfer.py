"""transfer / transfer_with_insert between two real processes on 127.0.0.1 (both backends)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import needs_cuda
from tests.transport.conftest import BACKENDS, HAS_UCX, PATHS, path_config

B = 4  # block size of peer_proc's layout


def toks(n_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + n_blocks * B))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["run", "scattered"])
def test_transfer_round_trips_bit_exact(spawn, path: str, layout: str) -> None:
    a = spawn("a", **path_config(path), chunk_bytes=16 * 1024)
    b = spawn("b", **path_config(path))
    a.connect_to(b)
    sent = a.ok("alloc_fill", name="kv", n=40, layout=layout, seed=5)
    res = a.ok("send", peer="b", handle="kv", key="req-1")["result"]
    assert res["sent"] == 40 and res["skipped"] == 0 and res["bytes"] == 40 * 512
    assert res["pulled"] == (path == "pull")
    if path == "pull":  # the receiver copied out of the sender's tier: nothing on the link
        assert res["messages"] == 0 and b.ok("state")["transport"]["pulled"] == 1
    else:  # messages follow runs and chunks (16 KiB = 32 blocks of 512 B), never one per block
        assert 1 <= res["messages"] <= 4
    got = b.ok("claim", key="req-1")
    assert got["claimed"] == 40 and got["digest"] == sent["digest"]
    assert b.ok("claim", key="req-1")["claimed"] is None  # claimed once
    # the sender's blocks are its own again; the receiver holds nothing
    a.ok("free", handle="kv")
    assert a.ok("state")["device_used"] == 0
    assert b.ok("state")["device_used"] == 0


@pytest.mark.parametrize("path", PATHS)
def test_transfer_with_insert_sends_only_missing_blocks(spawn, path: str) -> None:
    prefill = spawn("prefill", **path_config(path))
    decode = spawn("decode", **path_config(path))
    prefill.connect_to(decode)
    turn1 = [*toks(6), 999]  # 6 full blocks and a partial one
    kv1 = prefill.ok("alloc_fill", name="t1", n=6, seed=1)
    res = prefill.ok("send_insert", peer="decode", tokens=turn1, handle="t1")["result"]
    assert (res["sent"], res["skipped"]) == (6, 0)
    hit = decode.ok("match", tokens=turn1)
    assert hit["num_tokens"] == 24 and hit["digest"] == kv1["digest"]  # cached, bit for bit
    # the same 6 blocks again: everything is cached there, nothing travels
    again = prefill.ok("send_insert", peer="decode", tokens=turn1, handle="t1")["result"]
    assert (again["sent"], again["skipped"]) == (0, 6)
    # turn 2 = turn 1 + 4 new blocks: only the 4 new ones travel
    turn2 = toks(6) + toks(4, start=500)
    prefill.ok("alloc_fill", name="t2", n=10, seed=2)
    res2 = prefill.ok("send_insert", peer="decode", tokens=turn2, handle="t2")["result"]
    assert (res2["sent"], res2["skipped"]) == (4, 6)
    assert res2["bytes"] == 4 * 512 and res2["pulled"] == (path == "pull")
    assert decode.ok("match", tokens=turn2)["num_tokens"] == 40
    # the receiver's copy of the 4 new blocks is the sender's (the first 6 stay turn 1's)
    tail = decode.ok("match_tail", tokens=turn2, skip_blocks=6)
    mine = prefill.ok("digest_rows", handle="t2", start=6, stop=10)
    assert tail["digest"] == mine["digest"]
    state = decode.ok("state")
    assert state["device_used"] == state["device_cached"] == 10  # all held blocks are cached: no leaks
    # a prompt shorter than a block has no block to cache there: nothing is asked, nothing fails
    prefill.ok("alloc_fill", name="none", n=0)
    res0 = prefill.ok("send_insert", peer="decode", tokens=[7, 8, 9], handle="none")["result"]
    assert (res0["sent"], res0["skipped"], res0["messages"]) == (0, 0, 0)
    assert prefill.ok("state")["transport"]["failed"] == 0
    assert decode.ok("state")["transport"]["received"] == 3  # the three transfers above, no more


@pytest.mark.parametrize("path", PATHS)
def test_transfer_with_insert_keeps_a_partly_filled_last_block_as_a_tail(spawn, path: str) -> None:
    prefill = spawn("prefill", **path_config(path))
    decode = spawn("decode", **path_config(path))
    prefill.connect_to(decode)
    seq = [*toks(3), 901, 902]  # 3 full blocks, then 2 tokens of a fourth
    prefill.ok("alloc_fill", name="seq", n=4, layout="scattered", seed=3)
    res = prefill.ok("send_insert", peer="decode", tokens=seq, handle="seq")["result"]
    assert (res["sent"], res["skipped"]) == (4, 0)
    hit = decode.ok("match", tokens=seq)  # the whole blocks, indexed
    assert (
        hit["num_tokens"] == 12 and hit["digest"] == prefill.ok("digest_rows", handle="seq", start=0, stop=3)["digest"]
    )
    # the next turn continues the sequence: the tail serves its 2 tokens, bit for bit
    got = decode.ok("copy_tail", tokens=[*seq, 903], start=12)
    assert got["tokens"] == 2 and got["digest"] == prefill.ok("digest_rows", handle="seq", start=3, stop=4)["digest"]
    state = decode.ok("state")
    assert state["device_used"] == state["device_cached"] == 4  # 3 indexed + 1 tail, nothing else held
    # again, one token longer: the whole blocks are there, only the new tail travels (and replaces the old)
    prefill.ok("alloc_fill", name="seq2", n=4, seed=4)
    res2 = prefill.ok("send_insert", peer="decode", tokens=[*seq, 903], handle="seq2")["result"]
    assert (res2["sent"], res2["skipped"]) == (1, 3)
    assert decode.ok("copy_tail", tokens=[*seq, 903, 904], start=12)["tokens"] == 3
    assert decode.ok("state")["device_used"] == 4
    # a sequence shorter than a block: its one block travels as a tail, nothing is indexed
    prefill.ok("alloc_fill", name="short", n=1, seed=5)
    res3 = prefill.ok("send_insert", peer="decode", tokens=[7, 8, 9], handle="short")["result"]
    assert (res3["sent"], res3["skipped"]) == (1, 0)
    short = decode.ok("copy_tail", tokens=[7, 8, 9, 10], start=0)
    assert short["tokens"] == 3 and short["digest"] == prefill.ok("digest", handle="short")["digest"]
    assert decode.ok("state")["device_used"] == 5
    # more blocks than the tokens reach into: refused before anything moves
    out = prefill.call("send_insert", peer="decode", tokens=toks(3), handle="seq")
    assert out["error"] == "InvalidArgumentError", out
    assert prefill.ok("state")["transport"]["failed"] == 0


@pytest.mark.parametrize(
    ("backend", "devices"),
    [
        pytest.param("ucx", ("cpu", "cpu"), marks=BACKENDS[0].marks, id="ucx-cpu"),
        pytest.param("torch", ("cpu", "cpu"), id="gloo-cpu"),
        pytest.param("ucx", ("cuda", "cuda"), marks=[*BACKENDS[0].marks, needs_cuda], id="ucx-cuda"),
        pytest.param(
            "torch",
            ("cuda:0", "cuda:1"),  # NCCL: one rank per GPU
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two GPUs (cuda)"),
            id="nccl-cuda",
        ),
    ],
)
@pytest.mark.parametrize("layout", ["run", "scattered"])
def test_device_tier_blocks_round_trip_bit_exact(spawn, backend: str, devices: tuple[str, str], layout: str) -> None:
    """Device tiers in CPU or GPU memory, over the data link: runs go straight from and into KV
    storage, scattered blocks through staging on the tier's device, gathered and scattered there
    (on a GPU, their ids there too, and landed before a link reads them or the receiver confirms)."""
    a = spawn("a", backend=backend, device=devices[0], chunk_bytes=16 * 1024)
    b = spawn("b", backend=backend, device=devices[1])
    a.connect_to(b)
    sent = a.ok("alloc_fill", name="kv", n=40, layout=layout, seed=5)
    res = a.ok("send", peer="b", handle="kv", key="req-1")["result"]
    assert (res["sent"], res["pulled"]) == (40, False)
    assert b.ok("claim", key="req-1")["digest"] == sent["digest"]
    seq = [*toks(9), 901]
    a.ok("alloc_fill", name="seq", n=10, layout=layout, seed=6)
    assert a.ok("send_insert", peer="b", tokens=seq, handle="seq")["result"]["sent"] == 10
    hit = b.ok("match", tokens=seq)
    assert hit["num_tokens"] == 36
    assert hit["digest"] == a.ok("digest_rows", handle="seq", start=0, stop=9)["digest"]
    tail = b.ok("copy_tail", tokens=[*seq, 902], start=36)  # the partly filled tenth block, kept there
    assert tail["tokens"] == 1 and tail["digest"] == a.ok("digest_rows", handle="seq", start=9, stop=10)["digest"]
    a.ok("free", handle="kv")
    a.ok("free", handle="seq")
    assert a.ok("state")["device_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_secret_is_refused_on_both_sides(spawn, backend: str) -> None:
    a = spawn("a", backend=backend)
    b = spawn("b", backend=backend, secret="another-secret-000000000000")
    out = a.call("connect", name="b", host=b.host, port=b.port)
    assert out["error"] == "AuthenticationError", out
    assert a.ok("state")["refusals"]  # the client refused the server's proof ...
    # ... and the server records it when the client's refusal arrives, after connect() returned
    assert b.wait_state(lambda s: s["refusals"])["refusals"]
    assert a.ok("state")["peers"] == {} and b.ok("state")["peers"] == {}


@pytest.mark.ucx
@pytest.mark.skipif(not HAS_UCX, reason="needs the ucx extra (ucxx)")
def test_the_ucx_data_listener_drops_an_endpoint_no_handshake_issued(spawn) -> None:
    """UCX's listener binds every interface (ucxx has no bind address): an endpoint that dials it
    directly, with a connection id no authenticated handshake issued, is closed at once (kept
    open, the rogue's wait runs out instead), and the pool takes no peer from it; a real
    connection still works afterwards."""
    a, b, rogue = spawn("a", backend="ucx"), spawn("b", backend="ucx"), spawn("rogue", backend="ucx")
    data = b.ok("state")["data"]
    for ident in ("0" * 32, "f" * 32):
        out = rogue.ok("ucx_rogue", host=data["host"], port=data["port"], ident=ident)
        assert out["outcome"] == "closed", out
    assert b.ok("state")["peers"] == {}
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=4, seed=2)
    assert a.ok("send", peer="b", handle="kv", key="k")["result"]["sent"] == 4
    assert set(b.ok("state")["peers"]) == {"a"}


def test_incompatible_layout_is_refused_on_both_sides(spawn) -> None:
    a = spawn("a")
    b = spawn("b", layout={"head_dim": 16})
    out = a.call("connect", name="b", host=b.host, port=b.port)
    assert out["error"] == "LayoutMismatchError", out
    assert "layout" in b.ok("state")["refusals"][0]


def test_wrong_name_and_backend_mismatch_are_refused(spawn) -> None:
    a = spawn("a")
    b = spawn("b")
    out = a.call("connect", name="not-b", host=b.host, port=b.port)
    assert out["error"] == "HandshakeError", out
    if __import__("tests.transport.conftest", fromlist=["HAS_UCX"]).HAS_UCX:
        c = spawn("c", backend="ucx")
        out = a.call("connect", name="c", host=c.host, port=c.port)
        assert out["error"] == "HandshakeError" and "backend" in out["message"], out


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_transfer(spawn, backend: str) -> None:
    a = spawn("a", backend=backend, chunk_bytes=4 * 1024, deadline_s=5.0)
    b = spawn("b", backend=backend)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=64, seed=1)
    a.ok("set_delay", seconds=0.2)  # 16 messages, 0.2 s apart
    a.ok("send_async", job="j", then="send", peer="b", handle="kv", key="k")
    time.sleep(1.0)
    b.kill()
    t0 = time.monotonic()
    out = a.call("wait", job="j", timeout=30)
    assert out.get("error") in ("PeerLostError", "TransferTimeoutError"), out
    assert time.monotonic() - t0 < 15  # within the deadline, no hang
    state = a.ok("state")  # check_invariants passed inside
    assert state["device_used"] == 64 and state["peers"] == {}  # only its own blocks: the transfer let go
    a.ok("free", handle="kv")
    assert a.ok("state")["device_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_transfer(spawn, backend: str) -> None:
    a = spawn("a", backend=backend, chunk_bytes=4 * 1024)
    b = spawn("b", backend=backend, deadline_s=5.0)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=64, seed=1)
    a.ok("set_delay", seconds=0.2)
    a.ok("send_async", job="j", then="send", peer="b", handle="kv", key="k")
    time.sleep(1.0)
    mid = b.ok("state")
    assert mid["device_used"] == 64  # allocated for the transfer in flight
    assert mid["transport"]["receiving"] == 1 and mid["transport"]["sending"] == 0
    assert a.ok("state")["transport"]["sending"] == 1
    a.kill()
    state = b.wait_state(lambda s: s["device_used"] == 0 and not s["peers"])
    assert state["device_used"] == 0 and state["peers"] == {}, state
    assert state["transport"]["receiving"] == 0
    assert b.ok("claim", key="k")["claimed"] is None  # nothing half-received is claimable


def test_unclaimed_receipts_expire(spawn) -> None:
    a = spawn("a")
    b = spawn("b", receipt_ttl_s=1.0)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=8, seed=1)
    a.ok("send", peer="b", handle="kv", key="forgotten")
    assert b.ok("state")["device_used"] == 8
    state = b.wait_state(lambda s: s["device_used"] == 0, timeout=10)
    assert state["device_used"] == 0 and state["transport"]["receipts_expired"] == 1
    assert b.ok("claim", key="forgotten")["claimed"] is None


def test_receiver_without_room_is_back_pressure(spawn) -> None:
    a = spawn("a")
    b = spawn("b", device_blocks=16)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=32, seed=1)
    assert a.ok("send", peer="b", handle="kv", key="big")["result"] is None
    assert b.ok("state")["device_used"] == 0
    assert a.ok("state")["device_used"] == 32


def test_restarted_peer_is_a_new_incarnation(spawn) -> None:
    a = spawn("a")
    b = spawn("b")
    a.connect_to(b)
    first = a.ok("state")["peers"]["b"]
    b.kill()
    b2 = spawn("b")
    a.wait_state(lambda s: not s["peers"], timeout=10)  # the dead connection is noticed
    out = a.call("send", peer="b", handle="none", key="x")
    assert out["error"] in ("UnknownPeerError", "KeyError"), out
    a.connect_to(b2)
    assert a.ok("state")["peers"]["b"] != first
    a.ok("alloc_fill", name="kv", n=4, seed=9)
    assert a.ok("send", peer="b", handle="kv", key="again")["result"]["sent"] == 4


@pytest.mark.parametrize("path", PATHS)
def test_concurrent_transfers_both_ways_stay_bit_exact(spawn, path: str) -> None:
    a = spawn("a", **path_config(path), chunk_bytes=8 * 1024)
    b = spawn("b", **path_config(path), chunk_bytes=8 * 1024)
    a.connect_to(b)
    digests = {}
    N = 5  # with too few threads per process, gloo used to deadlock here until the deadline
    for i in range(N):
        digests[f"a{i}"] = a.ok("alloc_fill", name=f"h{i}", n=24, layout="scattered" if i % 2 else "run", seed=i)[
            "digest"
        ]
        digests[f"b{i}"] = b.ok("alloc_fill", name=f"h{i}", n=24, layout="run" if i % 2 else "scattered", seed=10 + i)[
            "digest"
        ]
    for i in range(N):  # ten transfers in flight at once, five each way over the same link
        a.ok("send_async", job=f"j{i}", then="send", peer="b", handle=f"h{i}", key=f"from-a-{i}")
        b.ok("send_async", job=f"j{i}", then="send", peer="a", handle=f"h{i}", key=f"from-b-{i}")
    for i in range(N):
        assert a.call("wait", job=f"j{i}")["result"]["sent"] == 24
        assert b.call("wait", job=f"j{i}")["result"]["sent"] == 24
    for i in range(N):
        assert b.ok("claim", key=f"from-a-{i}")["digest"] == digests[f"a{i}"]
        assert a.ok("claim", key=f"from-b-{i}")["digest"] == digests[f"b{i}"]
    assert a.ok("state")["device_used"] == b.ok("state")["device_used"] == N * 24  # only their own


def test_stalled_receiver_times_out_and_nothing_leaks(spawn) -> None:
    a = spawn("a", deadline_s=2.0, heartbeat_s=0.5)
    b = spawn("b", deadline_s=2.0, heartbeat_s=0.5)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=16, seed=1)
    b.pause()  # alive, but silent
    try:
        t0 = time.monotonic()
        out = a.call("send", peer="b", handle="kv", key="k", timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        b.resume()
    assert out.get("error") in ("TransferTimeoutError", "PeerLostError"), out
    assert elapsed < 10  # the deadline, not a hang
    assert a.ok("state")["device_used"] == 16
    state = b.wait_state(
        lambda s: s["device_used"] == 0 and not s["peers"]
    )  # the receiver notices the dropped link, holds nothing
    assert state["device_used"] == 0 and state["peers"] == {}, state


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_giving_up_aborts_the_link_first(spawn, backend: str) -> None:
    # The sender's overall budget (3 x its 1 s deadline here) runs out while it pauses between
    # messages; the patient receiver must not complete the transfer afterwards.
    a = spawn("a", backend=backend, deadline_s=1.0, chunk_bytes=2 * 1024)
    b = spawn("b", backend=backend, deadline_s=10.0)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=16, seed=1)  # 4 messages
    a.ok("set_delay", seconds=2.0)
    out = a.call("send", peer="b", handle="kv", key="k", timeout=60)
    assert out.get("error") == "TransferTimeoutError", out
    assert a.ok("state")["peers"] == {}
    state = b.wait_state(lambda s: s["device_used"] == 0 and not s["peers"])
    assert state["device_used"] == 0, state
    assert b.ok("claim", key="k")["claimed"] is None


def test_receiver_killed_mid_pull_leaves_the_blocks_held_until_the_senders_deadline(spawn) -> None:
    a = spawn("a", same_host_pull=True, deadline_s=5.0)
    b = spawn("b", same_host_pull=True)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=16, seed=1)
    b.ok("set_pull_delay", seconds=30.0)  # copied, not yet committed
    a.ok("send_async", job="j", then="send", peer="b", handle="kv", key="k")
    b.wait_state(lambda s: s["transport"]["receiving"] == 1)
    b.kill()
    out = a.call("wait", job="j", timeout=30)
    assert out.get("error") == "PeerLostError", out
    # b might have been copying still: the sender keeps its blocks until the deadline it gave
    a.ok("free", handle="kv")
    assert a.ok("state")["device_used"] == 16
    state = a.wait_state(lambda s: s["device_used"] == 0)
    assert state["device_used"] == 0, state


def test_closing_the_sender_still_holds_a_pulled_transfers_blocks_until_its_deadline(spawn) -> None:
    # The pool outlives its agent: blocks close() gave back early could be reused and written
    # while a peer that had not answered yet was still copying them.
    deadline = 6.0
    a = spawn("a", same_host_pull=True, deadline_s=deadline)
    b = spawn("b", same_host_pull=True)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=16, seed=1)
    b.ok("set_pull_delay", seconds=30.0)  # copied, not yet committed
    began = time.monotonic()  # before a's send began: a's own deadline ends later than began + deadline
    a.ok("send_async", job="j", then="send", peer="b", handle="kv", key="k")
    b.wait_state(lambda s: s["transport"]["receiving"] == 1)
    b.kill()
    assert a.call("wait", job="j", timeout=30).get("error") == "PeerLostError"
    a.ok("free", handle="kv")
    assert a.ok("state")["device_used"] == 16  # held for b, which may have been copying them
    assert time.monotonic() - began < deadline - 2.0  # a's deadline is still ahead: close must wait for it
    closed = a.ok("close", timeout=30)
    assert time.monotonic() - began >= deadline, closed  # nothing was given back before the deadline
    assert closed["device_used"] == 0, closed  # and everything was, after it


def test_a_pull_that_ends_after_the_senders_deadline_is_discarded(spawn) -> None:
    a = spawn("a", same_host_pull=True, deadline_s=1.5, heartbeat_s=0.25)
    b = spawn("b", same_host_pull=True, deadline_s=10.0)
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=16, seed=1)
    b.ok("set_pull_delay", seconds=2.5)  # the copy is done; its commit comes after a's deadline
    a.ok("send_async", job="j", then="send", peer="b", handle="kv", key="k")
    b.wait_state(lambda s: s["transport"]["receiving"] == 1)
    a.pause()  # a can neither give up nor drop the link: only b's check is left
    try:
        state = b.wait_state(lambda s: s["transport"]["receiving"] == 0)
    finally:
        a.resume()
    assert state["device_used"] == 0 and state["transport"]["pulled"] == 0 and state["peers"] == {}, state
    assert b.ok("claim", key="k")["claimed"] is None
    out = a.call("wait", job="j", timeout=30)
    assert out.get("error") in ("PeerLostError", "TransferTimeoutError"), out
    a.ok("free", handle="kv")
    assert a.wait_state(lambda s: s["device_used"] == 0)["device_used"] == 0


@pytest.mark.ucx
@pytest.mark.skipif(not HAS_UCX, reason="needs the ucx extra (ucxx)")
def test_connected_ucx_peers_sleep_when_idle(spawn) -> None:
    # ucxx's blocking progress used to leave the worker's fd readable after its first event, so
    # a connected peer's loop spun on it: a whole core per process, idle or not.
    a = spawn("a", backend="ucx")
    b = spawn("b", backend="ucx")
    a.connect_to(b)
    a.ok("alloc_fill", name="kv", n=8, seed=1)
    a.ok("send", peer="b", handle="kv", key="k")  # UCX has had events on both sides
    before = [a.cpu_seconds(), b.cpu_seconds()]
    time.sleep(2.0)
    used = [p.cpu_seconds() - t for p, t in zip((a, b), before)]
    assert max(used) < 0.5, used  # heartbeats only; a spinning loop takes ~2 s of CPU here


def test_one_key_holds_one_receipt(spawn) -> None:
    a = spawn("a", chunk_bytes=4 * 1024)
    b = spawn("b")
    a.connect_to(b)
    for i in range(2):
        a.ok("alloc_fill", name=f"h{i}", n=32, seed=i)
    a.ok("set_delay", seconds=0.1)
    a.ok("send_async", job="j0", then="send", peer="b", handle="h0", key="same")
    a.ok("send_async", job="j1", then="send", peer="b", handle="h1", key="same")
    outs = [a.call("wait", job=f"j{i}") for i in range(2)]
    ok = [o for o in outs if "result" in o]
    refused = [o for o in outs if o.get("error") == "TransferError"]
    assert len(ok) == 1 and len(refused) == 1 and "in use" in refused[0]["message"], outs
    again = a.call("send", peer="b", handle="h0", key="same")  # the receipt is still unclaimed
    assert again.get("error") == "TransferError", again
    assert b.ok("state")["device_used"] == 32
    assert b.ok("claim", key="same")["claimed"] == 32
    assert b.ok("state")["device_used"] == 0
    assert a.ok("state")["peers"]  # a refused transfer does not cost the connection


def _listening(pid: int) -> list[str]:
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to list listening sockets")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_peers_listen_on_loopback_only(spawn) -> None:
    a, b = spawn("a"), spawn("b")  # torch backend: control, TCPStore and gloo pairs
    a.connect_to(b)
    for peer in (a, b):
        addrs = _listening(peer.proc.pid)
        assert addrs and all(x.startswith("127.0.0.1:") for x in addrs), addrs
    if __import__("tests.transport.conftest", fromlist=["HAS_UCX"]).HAS_UCX:
        u = spawn("u", backend="ucx")
        addrs = _listening(u.proc.pid)
        # ucxx's connection listener has no bind address (it takes any interface and aborts
        # clients without a conn_id from the authenticated handshake); all else is loopback.
        assert sum(not x.startswith("127.0.0.1:") for x in addrs) <= 1, addrs
        assert any(x.startswith("127.0.0.1:") for x in addrs), addrs
