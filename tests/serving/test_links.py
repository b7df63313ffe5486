"""Link cost: the scheduler moves KV over a link only while that beats recomputing it, per its cost model."""

from __future__ import annotations

from typing import Any

import pytest

from memserve.costmodel import CostModel
from memserve.launch import Cluster
from memserve.scheduler import LINK_SAMPLES, InstanceHandle, Scheduler
from memserve.stages import stage

from .helpers import drained, get, post_ok

SMALL = dict(model="tiny-llama3", device_blocks=256, host_blocks=256)
PROMPTS = [[100 + 7 * k + i for i in range(200)] for k in range(5)]  # 200 tokens: 13 blocks each
RATE = 100_000.0  # bytes per second: 13 blocks of 8 KiB take about 1 s, recomputing them milliseconds


def run(faults: dict[str, dict[str, Any]] | None = None, link_aware: bool = True) -> tuple[list[Any], dict[str, Any]]:
    with Cluster("pd-basic", faults=faults, link_aware=link_aware, **SMALL) as c:  # prefill-0, decode-1
        outs = [
            post_ok(f"{c.url}/v1/completions", {"prompt": p, "max_tokens": 6, "ignore_eos": True, "temperature": 0})[
                "choices"
            ][0]["token_ids"]
            for p in PROMPTS
        ]
        drained(c.url)
        return outs, get(f"{c.url}/admin/stats")


def handoffs(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in stats["decisions"] if d["kind"] == "handoff"]


def test_a_slow_link_turns_handoffs_into_recompute_as_the_cost_model_predicts() -> None:
    fast_out, fast = run()
    slow_out, slow = run(faults={"prefill-0": {"link_bytes_per_s": {"decode-1": RATE}}})
    assert slow_out == fast_out  # transfer or recompute: the same greedy tokens
    # a fast link: every handoff moves the KV
    assert [d["transfer"] for d in handoffs(fast)] == [True] * len(PROMPTS)
    assert fast["counters"]["handoffs_recomputed"] == 0
    # a slow link: the first two handoffs, over a link not measured twice yet, move the KV and
    # measure the link; from then on moving is predicted slower than recomputing, and decode recomputes
    decisions = handoffs(slow)
    assert [d["transfer"] for d in decisions] == [True, True] + [False] * (len(PROMPTS) - 2)
    for d in decisions:  # each decision is the cost model's comparison
        assert d["transfer"] == (d["blocks"] == 0 or d["move_s"] < d["recompute_s"])
        assert d["move_s"] == d["latency"] + d["blocks"] * 8192 / d["bandwidth"]
    learned = slow["links"]["prefill-0 -> decode-1"]["bandwidth"]
    assert RATE / 3 < learned < RATE * 1.5  # the measured link is about as slow as the cap
    assert slow["counters"]["handoffs_recomputed"] == len(PROMPTS) - 2
    assert slow["counters"]["handoff_blocks"] == 2 * 13  # only the first two requests' KV crossed the link
    assert fast["counters"]["handoff_blocks"] == 13 * len(PROMPTS)


def test_a_link_blind_scheduler_always_transfers() -> None:
    _, stats = run(faults={"prefill-0": {"link_bytes_per_s": {"decode-1": RATE * 10}}}, link_aware=False)
    assert stats["decisions"] == [] and stats["counters"]["handoffs_recomputed"] == 0
    assert stats["counters"]["handoff_blocks"] == 13 * len(PROMPTS)


def test_one_slow_transfer_does_not_make_a_link_look_slow() -> None:
    """A delay only adds time: a link is the least latency and the best bandwidth of its last
    LINK_SAMPLES transfers, used once there are two. One transfer that waited on a busy core changes
    nothing (a moving average gave it half the weight, and alone it decided: the likely cause of
    handoffs recomputed on a fast link in one run); a link that did slow down is seen once its
    faster transfers have left the window; stale figures are dropped (the prior again)."""
    sched = Scheduler(stage("pd-caching-2"), bandwidth=2e9)
    fast = {"bytes": 8192, "seconds": 0.002, "data_seconds": 0.0005}
    waited = {"bytes": 8192, "seconds": 0.030, "data_seconds": 0.010}
    slow = {"bytes": 8192, "seconds": 0.1, "data_seconds": 0.08}

    def estimate() -> tuple[float, float]:
        link = sched.link("prefill-0", "decode-1")
        return link.bandwidth, link.latency

    fast_figures = (pytest.approx(8192 / 0.0005), pytest.approx(0.0015))
    slow_figures = (pytest.approx(8192 / 0.08), pytest.approx(0.02))
    sched.observe_link("prefill-0", "decode-1", waited)
    assert estimate() == (2e9, 0.0)  # one transfer could be a slow one: not used yet
    sched.observe_link("prefill-0", "decode-1", fast)
    assert estimate() == fast_figures
    assert sched.link("decode-1", "prefill-0").bandwidth == 2e9  # the other direction: not measured
    sched.link_ttl_s = -1.0  # every figure is stale: the prior
    assert estimate() == (2e9, 0.0)
    sched.observe_link("prefill-0", "decode-1", slow)  # the stale ones leave the window
    sched.link_ttl_s = 60.0
    shown = sched.links["prefill-0", "decode-1"]  # what /admin/stats shows
    assert (shown.bandwidth, shown.latency) == slow_figures
    sched.observe_link("prefill-0", "decode-1", slow)
    assert estimate() == slow_figures
    sched.observe_link("prefill-0", "decode-1", fast)
    for _ in range(LINK_SAMPLES):  # the fast one leaves the window once LINK_SAMPLES more have come
        assert estimate() == fast_figures
        sched.observe_link("prefill-0", "decode-1", slow)
    assert estimate() == slow_figures


def test_a_handoff_with_no_block_to_move_is_never_a_recompute() -> None:
    """A fit that puts per-token cost at 0 (prefills as long whatever their length, as on two
    shared cores) predicts recomputing for free: a handoff of blocks then recomputes, but one with
    none to move (decode caches them all) is sent, not counted as recomputed."""
    sched = Scheduler(stage("pd-caching-2"))
    sched.cost = CostModel(prior=(0.05, 0.0, 0.0))
    prefill = InstanceHandle("prefill-0", "prefill", "http://127.0.0.1:1", ("127.0.0.1", 1), True, block_bytes=8192)
    decode = InstanceHandle("decode-1", "decode", "http://127.0.0.1:2", ("127.0.0.1", 2), True, block_bytes=8192)
    assert not sched._transfer_pays("handoff", prefill, decode, 64, 32, 64, 2)
    assert sched._transfer_pays("handoff", prefill, decode, 64, 64, 64, 0)
    assert [(d["blocks"], d["move_s"], d["recompute_s"], d["transfer"]) for d in sched.decisions] == [
        (2, 2 * 8192 / 2e9, 0.0, False),
        (0, 0.0, 0.0, True),
    ]
