"""The memserve server end to end: instance processes, scheduler, OpenAI API, every design stage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from memserve.launch import Cluster, ready_info
from memserve.stages import STAGES

from .helpers import drained, get, hand_started, wait_for
from .helpers import post_ok as post

pytest.importorskip("aiohttp")

MODEL = "tiny-llama3"
CHAT = [{"role": "user", "content": "Tell me about memory pools for serving language models, briefly."}]
SMALL = dict(model=MODEL, device_blocks=256, host_blocks=256)


def conversation(url: str, user: str = "u") -> list[list[int]]:
    """Three turns (each prompt = the last prompt + its reply + a new message) and one 1-token request."""
    prompt, outputs = list(range(1000, 1050)), []
    for turn in range(3):
        r = post(
            f"{url}/v1/completions",
            {"prompt": prompt, "max_tokens": 9, "temperature": 0, "ignore_eos": True, "user": user},
        )
        out = r["choices"][0]["token_ids"]
        assert r["usage"]["completion_tokens"] == len(out) == 9
        outputs.append(out)
        prompt = prompt + out + list(range(2000 + 20 * turn, 2013 + 20 * turn))
    r = post(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "user": user})
    outputs.append(r["choices"][0]["token_ids"])
    return outputs


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    with Cluster("colocated", colocated=1, **SMALL) as c:
        return conversation(c.url)


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "colocated"])
def test_every_stage_gives_the_tokens_of_colocated_no_cache(stage: str, reference: list[list[int]]) -> None:
    with Cluster(stage, **SMALL) as c:
        assert conversation(c.url) == reference
        stats = get(f"{c.url}/admin/stats")
        counters = stats["counters"]
        if STAGES[stage].prefill_caching:
            assert counters["cached_tokens"] > 0  # later turns hit the cache
        else:
            assert counters["cached_tokens"] == 0
        if STAGES[stage].disaggregated:
            assert counters["handoff_blocks"] > 0  # the KV really moved between processes
        for inst in stats["instances"].values():  # every request done: nothing held, nothing queued
            assert inst["waiting"] == inst["running"] == inst["swapped"] == inst["held"] == 0
            pool = inst["pool"]["device"]
            assert pool["used"] == pool["cached"]


def second_turn_blocks(stage: str) -> int:
    with Cluster(stage, **SMALL) as c:
        prompt = list(range(3000, 3100))
        r = post(f"{c.url}/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
        before = get(f"{c.url}/admin/stats")["counters"]["handoff_blocks"]
        turn2 = prompt + r["choices"][0]["token_ids"] + list(range(4000, 4010))
        post(f"{c.url}/v1/completions", {"prompt": turn2, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        return int(get(f"{c.url}/admin/stats")["counters"]["handoff_blocks"] - before)


def test_caching_stages_move_fewer_blocks_on_the_second_turn() -> None:
    basic = second_turn_blocks("pd-basic")
    assert basic == -(-(100 + 20 + 10) // 16)  # every block of the prompt, the partial one too
    for stage in ("pd-caching-2", "pd-caching-3"):
        moved = second_turn_blocks(stage)
        assert moved < basic, (stage, moved, basic)
        assert moved <= 2  # only the blocks decode does not already cache


def test_insert_handoff_and_send_back_carry_the_partly_filled_last_block() -> None:
    """``transfer_with_insert`` sends a sequence's partly filled last block too, and the peer keeps
    it as a tail: decode computes only the prefill's token, and (stage 3) the prefill instance's
    next turn reuses every token the decode instance computed."""
    with Cluster("pd-caching-3", **SMALL) as c:
        prompt = list(range(3000, 3100))  # 6 blocks of 16 and 4 tokens
        r = post(f"{c.url}/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
        decode = get(f"{c.url}/admin/stats")["instances"]["decode-1"]["counters"]
        assert (decode["prompt_tokens"], decode["cached_tokens"]) == (100, 100)  # 96 indexed + a 4-token tail
        turn2 = prompt + r["choices"][0]["token_ids"] + list(range(4000, 4010))
        post(f"{c.url}/v1/completions", {"prompt": turn2, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        prefill = drained(c.url)["instances"]["prefill-0"]["counters"]
        # decode sent back the K/V of 100 + 19 tokens (the last output has none): 7 blocks and a 7-token tail
        assert prefill["cached_tokens"] == 119


def test_openai_client_completes_chats_and_streams() -> None:
    openai = pytest.importorskip("openai")
    with Cluster("pd-caching-2", **SMALL) as c:
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["memserve-default"]
        done = client.completions.create(
            model="memserve-default", prompt="Hello there", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
        assert isinstance(done.choices[0].text, str)
        chat = client.chat.completions.create(
            model="memserve-default",
            messages=CHAT,
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
        stream = client.chat.completions.create(
            model="memserve-default",
            messages=CHAT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == chat.choices[0].message.content  # streaming and not streaming agree
        assert chunks[-1].usage.completion_tokens == 5
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same chat again: cached
        streamed = client.completions.create(
            model="memserve-default",
            prompt="Hello there",
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(ch.choices[0].text for ch in streamed) == done.choices[0].text
        # the options added since, parsed by the client's own models
        rich = client.chat.completions.create(
            model="memserve-default",
            messages=CHAT,
            max_tokens=5,
            temperature=0,
            n=2,
            logprobs=True,
            top_logprobs=2,
            frequency_penalty=0.5,
            logit_bias={"1000": 1.0},
            stop=["\u0000"],
            extra_body={"ignore_eos": True},
        )
        assert [ch.index for ch in rich.choices] == [0, 1] and rich.usage.completion_tokens == 10
        for ch in rich.choices:
            assert ch.message.content == rich.choices[0].message.content  # greedy: the same answer twice
            entries = ch.logprobs.content
            assert len(entries) == 5 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
        legacy = client.completions.create(
            model="memserve-default",
            prompt="Hello there",
            max_tokens=4,
            temperature=0,
            logprobs=2,
            echo=True,
            stop="\u0000",
            best_of=2,
        )
        lp = legacy.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 3
        assert legacy.choices[0].text.startswith("Hello there") and lp.token_logprobs[0] is None
        assert len(legacy.choices) == 1 and legacy.usage.completion_tokens == 8  # best_of: two generated
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="memserve-default", prompt=[], max_tokens=3)
        metrics = get(f"{c.url}/metrics")
        for series in (
            "memserve_ttft_seconds_bucket",
            "memserve_hit_ratio",
            "memserve_pool_blocks",
            "memserve_transfer_bytes",
            "memserve_queue_length",
            "memserve_tpot_seconds_count",
        ):
            assert series in metrics


def test_the_heartbeat_drops_expired_prompt_tree_entries() -> None:
    """A match skips expired entries, but only eviction reports, trims and departures remove
    entries; one that no report will ever name (a prefix an instance did not keep) must still go,
    or a long-running scheduler's tree grows for good."""
    import asyncio
    import time

    from memserve.scheduler import Scheduler

    sched = Scheduler(STAGES["colocated-caching"], block_size=16, ttl=0.2)
    tree = sched.trees["colocated"]
    stale, live = list(range(64)), list(range(1000, 1032))
    tree.insert("colocated-0", stale, time.monotonic())

    async def run() -> None:
        beat = asyncio.ensure_future(sched.heartbeat(interval=0.02))
        try:
            for _ in range(25):  # 0.5 s: past the TTL and the expiry period (TTL / 4)
                tree.insert("colocated-0", live, time.monotonic())  # refreshed: it stays
                await asyncio.sleep(0.02)
        finally:
            beat.cancel()

    asyncio.run(run())
    assert len(tree) == 2 and sched.counters.expired == 4  # the 4 blocks of the stale prompt are gone
    assert tree.match(live, time.monotonic()) == {"colocated-0": 32}


def test_prompt_tree_routes_later_turns_to_the_prefix_holder() -> None:
    with Cluster("colocated-caching", colocated=2, policy="prompt-tree", **SMALL) as c:
        for user in range(4):  # four conversations, interleaved by turn
            post(
                f"{c.url}/v1/completions",
                {"prompt": list(range(5000 + 100 * user, 5064 + 100 * user)), "max_tokens": 2, "temperature": 0},
            )
        first = get(f"{c.url}/admin/stats")["counters"]["by_instance"]
        assert len(first) == 2  # load balance spread the first turns over both instances
        for user in range(4):
            r = post(
                f"{c.url}/v1/completions",
                {"prompt": list(range(5000 + 100 * user, 5080 + 100 * user)), "max_tokens": 2, "temperature": 0},
            )
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 64  # routed to its prefix


@pytest.mark.parametrize("stage", ["pd-basic", "pd-caching-2"])
def test_an_answer_that_stops_at_its_first_token_leaves_no_kv_in_transit(stage: str) -> None:
    """The prefill's token ends the answer (here a stop token id): no decode runs, so a keyed
    handoff (``transfer``) must not send KV that nothing would claim; a caching handoff
    (``insert``) still gives decode the prompt's blocks, cached."""
    with Cluster(stage, **SMALL) as c:
        body = {"prompt": list(range(5000, 5040)), "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        first = post(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"][0]  # one token: no handoff
        assert get(f"{c.url}/admin/stats")["counters"]["handoff_blocks"] == 0
        r = post(f"{c.url}/v1/completions", {**body, "max_tokens": 6, "stop_token_ids": [first]})
        assert r["choices"][0]["token_ids"] == [first] and r["choices"][0]["finish_reason"] == "stop"
        stats = drained(c.url)  # decode holds nothing but cached blocks: no unclaimed receipt
        # insert: the prompt's 2 whole blocks and its 8-token tail, cached on decode
        assert stats["counters"]["handoff_blocks"] == (0 if STAGES[stage].handoff == "transfer" else 3)


def test_shutdown_leaves_no_process_behind() -> None:
    with Cluster("pd-basic", **SMALL) as c:
        pids = [p.pid for p in c.procs]
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_instance_started_by_hand_joins_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSERVE_SECRET", "a-shared-test-secret-0123456789")
    with Cluster("colocated-caching", colocated=1, **SMALL) as c, hand_started(c.url, "late-0"):
        assert wait_for(lambda: get(f"{c.url}/health")["instances"] == 2)
        for user in range(2):
            post(
                f"{c.url}/v1/completions",
                {"prompt": list(range(7000 + 50 * user, 7040 + 50 * user)), "max_tokens": 2, "temperature": 0},
            )
        assert set(get(f"{c.url}/admin/stats")["counters"]["by_instance"]) == {"colocated-0", "late-0"}


def test_control_calls_need_the_token_derived_from_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from memserve.auth import control_token

    from .helpers import post as post_any

    monkeypatch.setenv("MEMSERVE_SECRET", "a-shared-test-secret-0123456789")
    with Cluster("colocated-caching", colocated=1, **SMALL) as c:
        member = get(f"{c.url}/admin/stats")["members"]["colocated-0"]
        work = {"id": "x", "tokens": [1, 2, 3], "params": {"max_tokens": 1}}
        for path, body in (("/generate", work), ("/shutdown", {}), ("/connect", {"name": "a", "host": "h", "port": 1})):
            code, answer = post_any(member["url"] + path, body)  # no token: refused, nothing done
            assert code == 401 and "token" in answer["error"], (path, answer)
        fake = {"name": "rogue", "role": "colocated", "url": "http://127.0.0.1:9", "transport": ["127.0.0.1", 9]}
        assert post_any(f"{c.url}/admin/register", fake)[0] == 401
        assert set(get(f"{c.url}/admin/stats")["members"]) == {"colocated-0"}
        assert get(f"{c.url}/health")["instances"] == 1  # the instance is still serving
        assert post(f"{c.url}/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1})["choices"]
        assert control_token("a-shared-test-secret-0123456789") != control_token("another-secret-0123456789")


def test_a_busy_holder_pushes_its_prefix_instead_of_recompute() -> None:
    with Cluster("colocated-caching", colocated=2, policy="prompt-tree", **SMALL) as c:
        prompt = list(range(8000, 8064))
        post(f"{c.url}/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        holder = next(iter(get(f"{c.url}/admin/stats")["counters"]["by_instance"]))
        assert c.scheduler is not None
        c.scheduler.instances[holder].queued_seconds += 100.0  # the holder looks busy: route elsewhere
        r = post(f"{c.url}/v1/completions", {"prompt": prompt + [9, 9, 9], "max_tokens": 2, "temperature": 0})
        counters = get(f"{c.url}/admin/stats")["counters"]
        c.scheduler.instances[holder].queued_seconds -= 100.0
        assert counters["pushes"] == 1 and set(counters["by_instance"]) == {"colocated-0", "colocated-1"}
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 64  # the pushed prefix, not recomputed


def test_a_push_asked_of_a_stopped_holder_gives_way_to_recompute_within_the_control_bound() -> None:
    """As above, but the holder is stopped (SIGSTOP) before it is asked to push: after
    ``control_timeout_s`` the other instance computes the prompt itself, and the answer is the one
    a holder that pushes gives. (Unbounded, the request waited on the stopped holder for good.)"""
    with Cluster(
        "colocated-caching", colocated=2, policy="prompt-tree", heartbeat_s=3600, control_timeout_s=2.0, **SMALL
    ) as c:
        prompt = list(range(8000, 8064))
        body = {"prompt": prompt + [9, 9, 9], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        post(f"{c.url}/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        holder = next(iter(get(f"{c.url}/admin/stats")["counters"]["by_instance"]))
        expected = post(f"{c.url}/v1/completions", body)["choices"][0]["token_ids"]  # on the holder, cached
        assert c.scheduler is not None
        c.scheduler.instances[holder].queued_seconds += 100.0  # the holder looks busy: route elsewhere
        proc = c.process(holder)
        proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            r = post(f"{c.url}/v1/completions", body)
            took = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGCONT)
            c.scheduler.instances[holder].queued_seconds -= 100.0
        counters = get(f"{c.url}/admin/stats")["counters"]
        assert r["choices"][0]["token_ids"] == expected
        assert counters["pushes"] == 0 and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert set(counters["by_instance"]) == {"colocated-0", "colocated-1"}
        assert took < 60  # the control bound (2 s), not the client's 120 s


def test_eviction_reports_update_the_prompt_tree() -> None:
    import time

    with Cluster("colocated-caching", colocated=1, model=MODEL, device_blocks=12, host_blocks=0) as c:
        assert c.scheduler is not None
        tree = c.scheduler.trees["colocated"]
        prompts = [list(range(9000 + 100 * k, 9064 + 100 * k)) for k in range(3)]  # 4 blocks each
        post(f"{c.url}/v1/completions", {"prompt": prompts[0], "max_tokens": 2, "temperature": 0})
        assert tree.match(prompts[0], time.monotonic()) == {"colocated-0": 64}
        for p in prompts[1:]:  # 12 blocks in all: the first prompt's blocks must go
            post(f"{c.url}/v1/completions", {"prompt": p, "max_tokens": 2, "temperature": 0})
        get(f"{c.url}/admin/stats")  # collects the latest reports too
        assert c.scheduler.counters.removals > 0
        believed = tree.match(prompts[0], time.monotonic()).get("colocated-0", 0)
        assert believed < 64  # the tree forgot what the pool evicted ...
        r = post(f"{c.url}/v1/completions", {"prompt": prompts[0] + [5], "max_tokens": 2, "temperature": 0})
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == believed  # ... and only that


def test_evictions_no_answer_reports_reach_the_prompt_tree_with_the_heartbeat() -> None:
    """In pd-caching-3 decode sends each answer's KV back to prefill after prefill has answered, so
    what that evicts on prefill is in no answer of prefill's: the heartbeat's health probe collects
    it, and the prompt tree then believes exactly what prefill's pool holds. A caller without the
    control token reads ``/health`` and ``/stats`` without taking the report from the scheduler."""
    import asyncio
    import time

    # the heartbeat is left idle here and driven by hand below: one probe, at a known point
    with Cluster("pd-caching-3", model=MODEL, device_blocks=12, host_blocks=0, heartbeat_s=3600) as c:
        assert c.scheduler is not None and c._loop is not None
        tree, prefill = c.scheduler.trees["prefill"], c.scheduler.instances["prefill-0"]
        prompts = [list(range(9000 + 100 * k, 9064 + 100 * k)) for k in range(4)]  # 4 blocks each
        for p in prompts:  # each leaves 6 blocks on prefill (its prompt, then its answer sent back)
            post(f"{c.url}/v1/completions", {"prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": True})

        def believed() -> list[int]:
            return [tree.match(p + [5], time.monotonic()).get("prefill-0", 0) for p in prompts]

        before = believed()
        for route in ("/health", "/stats"):  # open to anyone, but only the scheduler collects reports
            assert "removed" not in get(prefill.url + route)
        answer = asyncio.run_coroutine_threadsafe(c.scheduler._probe(prefill), c._loop).result(timeout=30)
        assert answer is not None and answer["removed"]  # evictions that no answer had carried
        after = believed()
        assert all(a <= b for a, b in zip(after, before)) and after != before
        again = asyncio.run_coroutine_threadsafe(c.scheduler._probe(prefill), c._loop).result(timeout=30)
        assert again is not None and again["removed"] == []  # each report is delivered once
        k = next(i for i, (a, b) in enumerate(zip(after, before)) if a < b)
        r = post(f"{c.url}/v1/completions", {"prompt": prompts[k] + [5], "max_tokens": 2, "temperature": 0})
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == after[k]  # the tree is right again


def test_session_id_policy_keeps_a_session_on_one_instance() -> None:
    with Cluster("colocated-caching", colocated=2, policy="session-id", **SMALL) as c:
        placed: dict[str, set[str]] = {}
        for turn in range(3):
            for user in ("alice", "bob", "carol", "dave"):
                before = get(f"{c.url}/admin/stats")["counters"]["by_instance"]
                post(f"{c.url}/v1/completions", {"prompt": [11, 12, 13, turn], "max_tokens": 1, "user": user})
                after = get(f"{c.url}/admin/stats")["counters"]["by_instance"]
                placed.setdefault(user, set()).update(k for k in after if after[k] != before.get(k, 0))
        assert all(len(where) == 1 for where in placed.values())  # each session stayed put
        assert len(set().union(*placed.values())) == 2  # and the sessions used both instances


def test_streamed_chunks_carry_every_token_and_the_same_text() -> None:
    import urllib.request

    with Cluster("colocated", colocated=1, **SMALL) as c:
        body = {"prompt": "Grüße, 世界! Ünïcödé ✓", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
        whole = post(f"{c.url}/v1/completions", body)["choices"][0]
        req = urllib.request.Request(
            f"{c.url}/v1/completions",
            data=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        ids, text = [], ""
        with urllib.request.urlopen(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    ids += choice.get("token_ids", [])
                    text += choice.get("text", "")
        assert ids == whole["token_ids"]  # no id lost while a character waited for its last byte
        assert text == whole["text"]


def test_an_instance_refuses_a_wildcard_address() -> None:
    from memserve.instance import InstanceConfig

    for wildcard in ("0.0.0.0", "::"):  # peers and the scheduler are told this address: it must be reachable
        with pytest.raises(ValueError, match="address others reach"):
            InstanceConfig(name="a", host=wildcard)
    assert InstanceConfig(name="a", host="10.0.0.2").host == "10.0.0.2"


def _children() -> list[int]:
    """Live processes whose parent is this one (from /proc)."""
    me, kids = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if fields[1] == me and fields[0] != "Z":  # ppid, and not a zombie
                kids.append(int(entry))
    return kids


def test_a_cluster_whose_instance_cannot_start_raises_and_leaves_no_process() -> None:
    """An instance that exits during startup (here: a fault spec it cannot read) fails the whole
    start with the reason, and the instance that did start is taken down with it."""
    before = set(_children())
    with pytest.raises(RuntimeError, match="exited during startup"):
        with Cluster("pd-basic", faults={"decode-1": {"no_such_fault": 1}}, **SMALL):
            pass
    assert wait_for(lambda: set(_children()) <= before, 15), set(_children()) - before


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_waiting_for_an_instances_ready_line_is_bounded_even_when_it_prints_nothing() -> None:
    """A process that hangs silently during startup would block a plain read for good; the wait
    ends at its timeout, kills it, and says so. Lines before READY are skipped; one that exits
    first is named as such."""
    quiet = _child("import time; time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"an instance did not start within 0.5 s \(killed\)"):
        ready_info(quiet, 0.5)
    assert time.monotonic() - start < 10
    assert quiet.wait(5) == -signal.SIGKILL
    talker = _child("import time\nwhile True: print('loading', flush=True); time.sleep(0.05)")
    with pytest.raises(RuntimeError, match="did not start within"):
        ready_info(talker, 0.5)
    assert talker.wait(5) == -signal.SIGKILL
    ready = _child(
        "print('warming up'); print('READY ' + '{\"url\": \"http://x\"}', flush=True); import time; time.sleep(4)"
    )
    assert ready_info(ready, 3) == {"url": "http://x"}
    assert ready.wait(10) == 0  # it outlived the 3 s: its timer was stopped once READY came
    gone = _child("print('bye')")
    with pytest.raises(RuntimeError, match=r"an instance exited during startup \(code 0\)"):
        ready_info(gone, 30)
    for p in (quiet, talker, ready, gone):
        assert p.stdout is not None
        p.stdout.close()


def test_a_replay_against_a_server_that_stops_answering_ends_at_its_stall_bound() -> None:
    """The replay behind the demo and the benchmarks bounds each response: one that starts and then
    sends nothing fails the replay after ``stall_s``, instead of waiting for good."""
    from aiohttp import web

    from memserve.bench import replay_http
    from memserve.workloads import Call, SessionSpec

    async def main() -> float:
        release = asyncio.Event()

        async def stall(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)  # the headers go out; then nothing until the test ends
            await release.wait()
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", stall)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        sessions = [SessionSpec("s", (1, 2, 3), (Call((4,), 4),))]
        start = time.monotonic()
        try:
            with pytest.raises(asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one
                await replay_http(f"http://127.0.0.1:{port}", sessions, rate=100.0, stall_s=0.5)
            return time.monotonic() - start
        finally:
            release.set()
            await runner.cleanup()

    assert asyncio.run(main()) < 10
