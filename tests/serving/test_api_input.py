"""The HTTP API over one disaggregated cluster (pd-caching-2): bad input gets a 4xx with an
OpenAI-style error body and leaks nothing; the OpenAI options it implements (stop strings and ids,
logprobs, echo, penalties, logit_bias, n, best_of, a list of prompts) give exactly what they
specify, checked against an engine of our own over the same weights where a value is computed;
clients that leave are stopped on their instances."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memserve import Engine, EngineConfig, LlamaModel, SamplingParams, preset
from memserve.launch import Cluster
from memserve.tokenizer import Tokenizer
from tests.conftest import examples

from .conftest import run
from .helpers import drained, get, wait_for

KEY = "test-api-key-0123456789"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster("pd-caching-2", model="tiny-llama3", device_blocks=64, host_blocks=64, api_key=KEY) as c:
        yield c


def request(
    c: Cluster | str, method: str, path: str, body: bytes | None = None, key: str | None = KEY
) -> tuple[int, Any]:
    """``method path`` on the API (a Cluster) or on an instance (its URL), with ``key`` as the bearer token."""
    u = urlparse(c.url if isinstance(c, Cluster) else c)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except json.JSONDecodeError:
        return r.status, data.decode(errors="replace")


def completion(c: Cluster, **fields: Any) -> tuple[int, Any]:
    return request(c, "POST", "/v1/completions", json.dumps(fields).encode())


OK = {"prompt": [1, 2, 3], "max_tokens": 2}
CASES = [
    ("malformed json", b'{"prompt": [1, 2', 400),
    ("not an object", b"[1, 2, 3]", 400),
    ("broken utf-8", b'{"prompt": "\xff\xfe"}', 400),
    ("empty body", b"", 400),
]
FIELD_CASES = [
    ({"prompt": []}, 400),
    ({"prompt": ""}, 400),
    ({"prompt": 42}, 400),
    ({"prompt": [1, "a"]}, 400),
    ({"prompt": [1, -5]}, 400),
    ({"prompt": [1, 10**9]}, 400),
    ({"prompt": [1.5]}, 400),
    ({**OK, "max_tokens": -1}, 400),
    ({**OK, "max_tokens": 0}, 400),
    ({**OK, "max_tokens": 10**12}, 400),
    ({**OK, "max_tokens": "3"}, 400),
    ({**OK, "temperature": "hot"}, 400),
    ({**OK, "temperature": -1}, 400),
    ({**OK, "top_p": 0}, 400),
    ({**OK, "seed": -3}, 400),
    ({**OK, "ignore_eos": "yes"}, 400),
    ({**OK, "n": 0}, 400),
    ({**OK, "n": 17}, 400),
    ({**OK, "n": "2"}, 400),
    ({**OK, "frobnicate": True}, 400),
    ({**OK, "model": "gpt-9"}, 404),
    ({**OK, "stream": "yes"}, 400),
    ({**OK, "stream": True, "stream_options": [1]}, 400),  # was a 500 after the stream had begun
    ({**OK, "stream": True, "stream_options": {"include_usage": "yes"}}, 400),
    ({**OK, "stream": True, "stream_options": {"usage": True}}, 400),
    ({**OK, "user": ["a"]}, 400),
    ({**OK, "user": {"id": 1}}, 400),
    ({"prompt": list(range(1000, 2100)), "max_tokens": 4}, 400),  # beyond the 1,024-token context window
    ({**OK, "n": True}, 400),
    ({"prompt": ["a"] * 33, "max_tokens": 2}, 400),  # more prompts than one request may hold
    ({"prompt": ["a", ""], "max_tokens": 2}, 400),
    ({"prompt": [[1, 2], []], "max_tokens": 2}, 400),
    ({"prompt": [[1, 2], [3, -1]], "max_tokens": 2}, 400),
    ({"prompt": [["a"]], "max_tokens": 2}, 400),
    ({"prompt": ["a"] * 5, "max_tokens": 2, "n": 13}, 400),  # 65 answers: over the 64 one request may have
    ({**OK, "best_of": 0}, 400),
    ({**OK, "best_of": 17}, 400),
    ({**OK, "best_of": True}, 400),
    ({**OK, "best_of": "2"}, 400),
    ({**OK, "n": 3, "best_of": 2}, 400),  # fewer to pick from than to return
    ({**OK, "best_of": 2, "stream": True}, 400),  # which answers are best is known only at the end
    ({**OK, "stop_token_ids": 5}, 400),
    ({**OK, "stop_token_ids": [True]}, 400),
    ({**OK, "stop_token_ids": [-1]}, 400),
    ({**OK, "stop_token_ids": [10**9]}, 400),
    ({**OK, "stop_token_ids": list(range(65))}, 400),
    ({**OK, "stop": 7}, 400),
    ({**OK, "stop": ["a", 5]}, 400),
    ({**OK, "stop": ["a", ""]}, 400),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({**OK, "stop": "x" * 257}, 400),
    ({**OK, "stop": {"a": 1}}, 400),
    ({**OK, "presence_penalty": 2.5}, 400),
    ({**OK, "frequency_penalty": True}, 400),
    ({**OK, "frequency_penalty": "0.5"}, 400),
    ({**OK, "logit_bias": [[5, 1]]}, 400),
    ({**OK, "logit_bias": {"5": 101}}, 400),
    ({**OK, "logit_bias": {"-5": 1}}, 400),
    ({**OK, "logit_bias": {"x": 1}}, 400),
    ({**OK, "logit_bias": {"999999999": 1}}, 400),
    ({**OK, "logit_bias": {"5": True}}, 400),
    ({**OK, "logit_bias": {str(i): 1 for i in range(301)}}, 400),
    ({**OK, "echo": "yes"}, 400),
    ({**OK, "echo": 1}, 400),
    ({**OK, "logprobs": 6}, 400),
    ({**OK, "logprobs": -1}, 400),
    ({**OK, "logprobs": True}, 400),
    ({**OK, "logprobs": "2"}, 400),
]
CHAT_FIELD_CASES = [
    {"logprobs": 3},
    {"logprobs": "yes"},
    {"logprobs": True, "top_logprobs": 21},
    {"logprobs": True, "top_logprobs": -1},
    {"logprobs": True, "top_logprobs": True},
    {"top_logprobs": 2},  # without logprobs: true
    {"logprobs": False, "top_logprobs": 2},
]
# options the server does not implement: refused when they ask for something, as
# (endpoint, field, values that ask for something, values that ask for nothing)
UNSUPPORTED = [
    ("completions", "suffix", ["}"], [None, ""]),
    ("chat/completions", "tools", [[{"type": "function", "function": {"name": "f"}}]], [None, []]),
    ("chat/completions", "tool_choice", ["required", {"type": "function", "function": {"name": "f"}}], ["auto"]),
    ("chat/completions", "response_format", [{"type": "json_object"}], [{"type": "text"}]),
]


@pytest.mark.parametrize(("name", "body", "status"), CASES, ids=[c[0] for c in CASES])
def test_malformed_bodies(cluster: Cluster, name: str, body: bytes, status: int) -> None:
    got, data = request(cluster, "POST", "/v1/completions", body)
    assert got == status and isinstance(data, dict) and data["error"]["message"], (name, data)


@pytest.mark.parametrize(("fields", "status"), FIELD_CASES)
def test_bad_fields(cluster: Cluster, fields: dict[str, Any], status: int) -> None:
    got, data = completion(cluster, **fields)
    assert got == status and data["error"]["type"] == "invalid_request_error", data


@pytest.mark.parametrize(
    ("endpoint", "field", "refused", "inert"), UNSUPPORTED, ids=[f"{e}-{f}" for e, f, *_ in UNSUPPORTED]
)
def test_unsupported_options_are_refused_unless_they_ask_for_nothing(
    cluster: Cluster, endpoint: str, field: str, refused: list[Any], inert: list[Any]
) -> None:
    """A request never silently gets other output than it asked for: an option the server does
    not implement is a 400 naming it, except at the value that asks for nothing (client
    libraries send those by default)."""
    base: dict[str, Any] = {"max_tokens": 2, "temperature": 0}
    base.update(
        {"messages": [{"role": "user", "content": "hi"}]} if endpoint.startswith("chat") else {"prompt": [1, 2]}
    )
    for value in refused:
        got, data = request(cluster, "POST", f"/v1/{endpoint}", json.dumps({**base, field: value}).encode())
        assert got == 400 and field in data["error"]["message"], (value, data)
    for value in inert:
        got, data = request(cluster, "POST", f"/v1/{endpoint}", json.dumps({**base, field: value}).encode())
        assert got == 200 and data["usage"]["completion_tokens"] == 2, (value, data)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_end_the_answer_at_the_first_of_them(cluster: Cluster, stream: bool) -> None:
    base = {"prompt": list(range(300, 340)), "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    got, data = completion(cluster, **base)
    assert got == 200, data
    free_run = data["choices"][0]["token_ids"]
    stop = free_run[3]
    want = free_run[: free_run.index(stop) + 1]
    got, data = completion(cluster, **base, stop_token_ids=[stop], stream=stream)
    assert got == 200, data
    if stream:  # chunks, each with the ids it adds, then the end marker
        chunks = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        ids, reason = data["choices"][0]["token_ids"], data["choices"][0]["finish_reason"]
    assert ids == want and reason == "stop"
    drained(cluster.url)


def _spanning_stop(ids: list[int], tok: Tokenizer) -> str:
    """A piece of text that starts in ``ids[j]`` and ends in ``ids[j + 1]`` (the first ``j`` with
    one that is whole characters; as little of each token as that allows): a stop string that
    straddles two tokens, with some of the first one's text before it."""
    for j in range(len(ids) - 2):
        a, b = tok.decode_bytes(ids[j : j + 1]), tok.decode_bytes(ids[j + 1 : j + 2])
        for x in range(len(a) - 1, -1, -1):
            for y in range(1, len(b) + 1):
                try:
                    return (a[x:] + b[:y]).decode("utf-8")
                except UnicodeDecodeError:
                    pass
    raise AssertionError(f"no stop string spans two of {ids}")


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_end_the_answer_before_the_first_of_them(cluster: Cluster, stream: bool, chat: bool) -> None:
    """A stop string straddling two tokens (the first pair that can: the prefill's token and
    decode's first where the text allows) ends the answer at the token completing it; the text
    stops before it, streamed or not; ``token_ids`` has every generated id up to that token."""
    tok = Tokenizer("llama3")
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    base: dict[str, Any] = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    base.update({"messages": [{"role": "user", "content": "tell me"}]} if chat else {"prompt": list(range(300, 340))})
    got, data = request(cluster, "POST", endpoint, json.dumps(base).encode())
    assert got == 200, data
    free_run = data["choices"][0]["token_ids"]
    stop = _spanning_stop(free_run, tok)
    k = next(k for k in range(1, 11) if stop.encode() in tok.decode_bytes(free_run[:k]))
    whole = tok.decode_bytes(free_run[:k])
    want_text = whole[: whole.find(stop.encode())].decode("utf-8", errors="replace")
    assert k < len(free_run)  # it ends the answer early
    got, data = request(
        cluster, "POST", endpoint, json.dumps({**base, "stop": ["\u0000never", stop], "stream": stream}).encode()
    )
    assert got == 200, data
    if stream:
        chunks = [json.loads(line[6:])["choices"][0] for line in data.splitlines() if line.startswith("data: {")]
        ids = [t for c in chunks for t in c.get("token_ids", [])]
        text = "".join(c["delta"].get("content", "") if chat else c["text"] for c in chunks)
        reason = chunks[-1]["finish_reason"]
    else:
        (choice,) = data["choices"]
        ids, reason = choice["token_ids"], choice["finish_reason"]
        text = choice["message"]["content"] if chat else choice["text"]
        assert data["usage"]["completion_tokens"] == k
    assert (ids, text, reason) == (free_run[:k], want_text, "stop")
    drained(cluster.url)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_logit_bias_and_penalties_shape_the_answer(cluster: Cluster, local_twin: Engine, chat: bool) -> None:
    """A bias of +100 makes a token every pick, the prefill's and decode's. Two tokens so biased,
    with penalties: the answer is an engine's of our own over the same weights (the penalties
    count the prefill's token on decode), and not the unpenalised one. The inert values change
    nothing."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    base: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    messages = [{"role": "user", "content": "hello"}]
    base.update({"messages": messages} if chat else {"prompt": list(range(700, 730))})
    prompt = Tokenizer("llama3").chat(messages) if chat else base["prompt"]

    def ids(**fields: Any) -> list[int]:
        got, data = request(cluster, "POST", endpoint, json.dumps({**base, **fields}).encode())
        assert got == 200, data
        return list(data["choices"][0]["token_ids"])

    free = ids()
    assert ids(logit_bias={"1234": 100}) == [1234] * 6
    assert ids(logit_bias={}, presence_penalty=0, frequency_penalty=0.0) == free
    pair = {"1234": 100, "4321": 100}  # two tokens far above the rest: the penalties decide between them
    shaped = ids(logit_bias=pair, frequency_penalty=2.0, presence_penalty=1.5)
    params = SamplingParams(
        max_tokens=6,
        ignore_eos=True,
        logit_bias=((1234, 100.0), (4321, 100.0)),
        frequency_penalty=2.0,
        presence_penalty=1.5,
    )
    (want,), _ = run(local_twin, [prompt], params)
    assert shaped == want and set(shaped) == {1234, 4321}
    assert shaped != ids(logit_bias=pair)
    drained(cluster.url)


def _choices(data: Any, chat: bool) -> dict[int, dict[str, Any]]:
    """Each choice's ids, text and finish reasons, from a whole response or a stream."""
    out: dict[int, dict[str, Any]] = {}
    parts = (
        [json.loads(line[6:])["choices"] for line in data.splitlines() if line.startswith("data: {")]
        if isinstance(data, str)
        else [data["choices"]]
    )
    for c in (c for p in parts for c in p):
        got = out.setdefault(c["index"], {"ids": [], "text": "", "reasons": []})
        got["ids"] += c.get("token_ids", [])
        got["text"] += (c.get("delta", {}).get("content") or "") if "delta" in c else c.get("text", "")
        if "message" in c:
            got["text"] += c["message"]["content"]
        if c.get("finish_reason"):
            got["reasons"].append(c["finish_reason"])
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_answers_one_prompt_once_prefilled_and_seeded_apart(cluster: Cluster, stream: bool, chat: bool) -> None:
    """``n`` choices: greedy ones are the single answer n times; sampled ones with a seed are the
    single answers of seeds seed, seed + 1, ...; the later choices take the prompt's KV from the
    cache the first one filled; usage counts the prompt once and every choice's tokens."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    words = "pools " * (20 + 3 * stream + 7 * chat)  # a prompt of its own per case: nothing cached before
    base: dict[str, Any] = {"max_tokens": 5, "ignore_eos": True}
    base.update({"messages": [{"role": "user", "content": words}]} if chat else {"prompt": words})

    def ask(**fields: Any) -> tuple[Any, dict[int, dict[str, Any]]]:
        got, data = request(cluster, "POST", endpoint, json.dumps({**base, **fields}).encode())
        assert got == 200, data
        return data, _choices(data, chat)

    before = get(f"{cluster.url}/admin/stats")["counters"]["cached_tokens"]
    data, greedy = ask(n=3, temperature=0, stream=stream, stream_options={"include_usage": True} if stream else None)
    cached = get(f"{cluster.url}/admin/stats")["counters"]["cached_tokens"] - before
    single = ask(temperature=0)[1][0]
    assert sorted(greedy) == [0, 1, 2]
    for c in greedy.values():
        assert (c["ids"], c["text"], c["reasons"]) == (single["ids"], single["text"], ["length"])
    usage = (
        [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")][-1]["usage"]
        if stream
        else data["usage"]
    )
    assert usage["completion_tokens"] == 15 and usage["prompt_tokens"] == usage["total_tokens"] - 15
    blocks = usage["prompt_tokens"] // 16 * 16
    assert cached >= 2 * blocks > 0  # choices 1 and 2 found the prompt's whole blocks cached
    sampled = ask(n=3, temperature=1.0, seed=40, stream=stream)[1]
    for i in range(3):
        assert sampled[i]["ids"] == ask(temperature=1.0, seed=40 + i)[1][0]["ids"]
    assert sampled[0]["ids"] != sampled[1]["ids"]
    drained(cluster.url)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_list_of_prompts_gets_each_prompts_own_answers(cluster: Cluster, stream: bool) -> None:
    """``prompt`` as a list of prompts (texts and token lists, as evaluation harnesses batch them):
    choice ``i * n + j`` is answer ``j`` of prompt ``i``, exactly what that prompt alone gets (its
    echo, its seeds), and usage adds up the prompts and every answer."""
    prompts: list[Any] = ["the pool " * (5 + stream), list(range(300, 340 + stream)), "memory " * 7]
    base: dict[str, Any] = {"max_tokens": 4, "temperature": 1.0, "seed": 3, "ignore_eos": True, "echo": True}
    got, data = completion(cluster, prompt=prompts, n=2, stream=stream, stream_options={"include_usage": True}, **base)
    assert got == 200, data
    batched = _choices(data, chat=False)
    assert sorted(batched) == list(range(6))
    prompt_tokens = 0
    for i, p in enumerate(prompts):
        got, alone = completion(cluster, prompt=p, n=2, **base)
        assert got == 200, alone
        prompt_tokens += alone["usage"]["prompt_tokens"]
        for j, c in enumerate(alone["choices"]):
            assert (batched[2 * i + j]["ids"], batched[2 * i + j]["text"]) == (c["token_ids"], c["text"]), (i, j)
    usage = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")][-1] if stream else data
    assert usage["usage"]["prompt_tokens"] == prompt_tokens and usage["usage"]["completion_tokens"] == 6 * 4
    got, best = completion(cluster, prompt=prompts[:2], n=1, best_of=2, **{**base, "echo": False})
    assert got == 200 and [c["index"] for c in best["choices"]] == [0, 1], best  # one best answer a prompt
    assert all(
        c["token_ids"] in (batched[2 * i]["ids"], batched[2 * i + 1]["ids"]) for i, c in enumerate(best["choices"])
    )
    drained(cluster.url)


def test_best_of_returns_the_answers_most_likely_per_token(cluster: Cluster) -> None:
    """``best_of`` k with ``n``: the k answers generated are those ``n = k`` gives (seeds seed,
    seed + 1, ...), and the ``n`` returned are the ones whose tokens have the highest mean
    log-probability, best first, indexed from 0; usage counts all k; log-probabilities show only
    where the request asked for them."""
    base = {"prompt": "memory pools " * 9, "max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    got, every = completion(cluster, **base, n=4, logprobs=0)
    assert got == 200, every
    means = [sum(c["logprobs"]["token_logprobs"]) / 6 for c in every["choices"]]
    order = sorted(range(4), key=lambda i: -means[i])
    assert order[:2] != [0, 1] and len({tuple(c["token_ids"]) for c in every["choices"]}) == 4  # ranking decides
    got, best = completion(cluster, **base, n=2, best_of=4)
    assert got == 200, best
    assert [c["token_ids"] for c in best["choices"]] == [every["choices"][i]["token_ids"] for i in order[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])
    assert best["usage"]["completion_tokens"] == 4 * 6
    got, shown = completion(cluster, **base, n=1, best_of=4, logprobs=0)
    assert got == 200 and len(shown["choices"]) == 1, shown
    lps, want = shown["choices"][0]["logprobs"], every["choices"][order[0]]["logprobs"]
    # (within rounding: a prompt computed whole and one read from the cache may differ in the last bits)
    assert lps["tokens"] == want["tokens"] and lps["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    got, same = completion(cluster, **base, n=2, best_of=2)  # best_of == n: the n answers, as they come
    assert [c["token_ids"] for c in same["choices"]] == [c["token_ids"] for c in every["choices"][:2]]
    drained(cluster.url)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_echo_puts_the_prompt_before_the_answer_scored_by_the_model(
    cluster: Cluster, local_twin: Engine, stream: bool
) -> None:
    """``echo`` returns the prompt before the answer; with ``logprobs``, every prompt token after
    the first comes with the log-probability the model gives it after those before it (an
    engine of our own over the same weights agrees), the first with none, as OpenAI's legacy
    API did (what evaluation harnesses score prompts with). A scored prompt is computed whole,
    even when it is cached."""
    tok = Tokenizer("llama3")
    prompt = f"Memory pools hold the KV of many requests at once ({stream})."
    ids = tok.encode(prompt)
    base: dict[str, Any] = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": stream}

    def ask(**fields: Any) -> tuple[str, dict[str, list[Any]], Any]:
        got, data = completion(cluster, **base, **fields)
        assert got == 200, data
        if stream:
            choices = [json.loads(line[6:])["choices"][0] for line in data.splitlines() if line.startswith("data: {")]
        else:
            choices = data["choices"]
        merged: dict[str, list[Any]] = {}
        for c in choices:
            for k, v in (c.get("logprobs") or {}).items():
                merged.setdefault(k, []).extend(v)
        return "".join(c["text"] for c in choices), merged, data

    answer, _, _ = ask()  # the prompt is cached from here on
    echoed, none, _ = ask(echo=True)
    assert echoed == prompt + answer and not none
    text, lp, data = ask(echo=True, logprobs=2)
    assert text == prompt + answer
    if not stream:
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # scored: computed whole
    n = len(ids)
    assert lp["tokens"][:n] == [tok.decode([t]) for t in ids] and len(lp["tokens"]) == n + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][n] == len(prompt)
    rid = local_twin.add_request(ids, SamplingParams(max_tokens=1, ignore_eos=True, prompt_logprobs=2))
    (first,) = [o for o in local_twin.step() if o.request_id == rid]
    want = first.prompt_logprobs
    assert want is not None and len(want) == n - 1
    assert lp["token_logprobs"][1:n] == pytest.approx([x.logprob for x in want], abs=1e-4)
    assert [sorted(d) for d in lp["top_logprobs"][1:n]] == [sorted(tok.decode([t]) for t, _ in x.top) for x in want]
    drained(cluster.url)


@pytest.mark.parametrize("fields", CHAT_FIELD_CASES)
def test_bad_chat_logprobs_options(cluster: Cluster, fields: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    got, data = request(cluster, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert got == 400 and "logprobs" in data["error"]["message"], data


@pytest.fixture(scope="module")
def local_twin() -> Iterator[Engine]:
    """An engine on this process with the cluster's model (same preset, same seed): the reference."""
    engine = Engine(LlamaModel(preset("tiny-llama3")).init_random(), EngineConfig(block_size=16, caching=False))
    yield engine
    engine.close()


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_logprobs_are_the_models_at_every_token(cluster: Cluster, local_twin: Engine, stream: bool, chat: bool) -> None:
    """Each token's log-probability and its top 3 alternatives, the prefill instance's first token
    and the decode instance's after it alike, are the log-softmax of the model's logits at that
    position (computed here by an engine of our own over the same weights), in OpenAI's shape."""
    tok, k, n = Tokenizer("llama3"), 3, 5
    body: dict[str, Any] = {"max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        messages = [{"role": "user", "content": "how do pools of memory work?"}]
        body.update(messages=messages, logprobs=True, top_logprobs=k)
        prompt = tok.chat(messages)
    else:
        prompt = list(range(500, 530))
        body.update(prompt=prompt, logprobs=k)
    got, data = request(
        cluster, "POST", "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode()
    )
    assert got == 200, data
    if stream:
        choices = [json.loads(line[6:])["choices"][0] for line in data.splitlines() if line.startswith("data: {")]
        parts = [c["logprobs"] for c in choices if c.get("logprobs")]
    else:
        choices = data["choices"]
        parts = [choices[0]["logprobs"]]
    ids = [t for c in choices for t in c.get("token_ids", [])]
    (want,), (logits,) = run(local_twin, [prompt], SamplingParams(max_tokens=n, ignore_eos=True, return_logits=True))
    assert ids == want
    ref = torch.log_softmax(logits, -1)
    values, top = ref.topk(k)
    if chat:
        content = [e for p in parts for e in p["content"]]
        assert [bytes(e["bytes"]) for e in content] == [tok.decode_bytes([t]) for t in ids]
        got_lp = [e["logprob"] for e in content]
        got_top = [[(bytes(x["bytes"]), x["logprob"]) for x in e["top_logprobs"]] for e in content]
    else:
        assert [t for p in parts for t in p["tokens"]] == [tok.decode(t for t in [i]) for i in ids]
        got_lp = [v for p in parts for v in p["token_logprobs"]]
        got_top = [[(x.encode(), v) for x, v in d.items()] for p in parts for d in p["top_logprobs"]]
        offsets = [o for p in parts for o in p["text_offset"]]
        assert offsets == [len(tok.decode(ids[:i])) for i in range(n)]
    assert got_lp == pytest.approx([float(ref[i, t]) for i, t in enumerate(ids)], abs=1e-4)
    for i in range(n):
        assert [b for b, _ in got_top[i]] == [tok.decode_bytes([int(t)]) for t in top[i]]
        assert [v for _, v in got_top[i]] == pytest.approx(values[i].tolist(), abs=1e-4)
    drained(cluster.url)


def test_bad_chat_messages(cluster: Cluster) -> None:
    for messages in (
        [],
        "hi",
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": ["plain strings are not parts"]}],
    ):
        got, data = request(cluster, "POST", "/v1/chat/completions", json.dumps({"messages": messages}).encode())
        assert got == 400 and data["error"]["message"], messages


def test_chat_content_parts_are_their_joined_text(cluster: Cluster) -> None:
    """OpenAI's list-of-parts form of a message's content: text parts only, read as their text
    joined, so the answer is the one the plain string gets."""

    def chat(content: Any) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
        got, data = request(cluster, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert got == 200, data
        return data

    plain = chat("hello there, memory pool")
    parts = chat([{"type": "text", "text": "hello there, "}, {"type": "text", "text": "memory pool"}])
    assert parts["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_api_key_routes_and_methods(cluster: Cluster) -> None:
    assert request(cluster, "POST", "/v1/completions", json.dumps(OK).encode(), key=None)[0] == 401
    assert request(cluster, "POST", "/v1/completions", json.dumps(OK).encode(), key="wrong")[0] == 401
    assert request(cluster, "GET", "/v1/nothing-here")[0] == 404
    assert request(cluster, "GET", "/v1/completions")[0] == 405
    assert request(cluster, "GET", "/health", key=None)[0] == 200  # health and metrics stay open


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_mid_stream_leaks_nothing(cluster: Cluster, n: int) -> None:
    """A client gone mid-stream: every choice is aborted on its instance then (far fewer tokens
    than asked for are generated) and nothing is left behind."""

    def produced() -> int:
        return sum(int(i["counters"]["output_tokens"]) for i in get(f"{cluster.url}/admin/stats")["instances"].values())

    before = produced()
    u = urlparse(cluster.url)
    body = json.dumps(
        {"prompt": list(range(500 + n, 560)), "max_tokens": 200, "stream": True, "ignore_eos": True, "n": n}
    )
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    seen = b""
    while b"data:" not in seen:  # streaming has begun (headers and chunks may arrive apart)
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    sock.close()  # gone mid-stream
    drained(cluster.url)
    assert produced() - before < 100 * n  # not the 200 each choice asked for


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_leaves_before_its_whole_answer_stops_it(cluster: Cluster, n: int) -> None:
    """A request that is not streamed writes nothing until every answer is done, so only a check
    of the connection notices a client gone meanwhile: every choice is aborted then (far fewer
    tokens than asked for are generated; before, each ran to its max_tokens for nobody) and
    nothing is left behind."""

    def produced() -> int:
        return sum(int(i["counters"]["output_tokens"]) for i in get(f"{cluster.url}/admin/stats")["instances"].values())

    before = produced()
    u = urlparse(cluster.url)
    body = json.dumps({"prompt": list(range(600 + n, 660)), "max_tokens": 400, "ignore_eos": True, "n": n})
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    assert wait_for(lambda: produced() - before >= 5, 60)  # it is being answered
    sock.close()  # gone before any byte of the answer
    drained(cluster.url)
    assert produced() - before < 200 * n  # not the 400 each choice asked for


def test_an_instance_whose_caller_left_before_its_answer_began_stops_the_request(cluster: Cluster) -> None:
    """The scheduler may drop a ``/generate`` call as the instance takes it (a choice of ``n``
    cancelled as it began): writing the answer's headers then fails, and the request must be
    aborted there, not left to run to ``max_tokens`` for nobody. (Found by CI: the instance
    wrote its headers outside the handler that aborts, and the request ran on.)"""
    from memserve.auth import control_token

    decode = get_json(cluster, "/admin/stats")["members"]["decode-1"]["url"]

    def produced() -> int:
        return int(get(f"{decode}/stats")["counters"]["output_tokens"])

    before, taken = produced(), get(f"{decode}/stats")["counters"]["requests"]
    body = json.dumps(
        {"id": "gone-early", "tokens": list(range(900, 940)), "params": {"max_tokens": 200, "ignore_eos": True}}
    )
    u = urlparse(decode)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(
        f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {control_token(cluster.secret)}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    sock.close()  # gone before the answer's headers
    assert wait_for(lambda: get(f"{decode}/stats")["counters"]["requests"] > taken)  # the engine took it
    drained(cluster.url)
    assert produced() - before < 100  # not the 200 it asked for


# -- fuzzing: random bodies, valid and not, against both endpoints --------------------------------
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 9)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3))
PROMPTS = st.lists(st.integers(0, 128_255), min_size=1, max_size=24) | st.text(max_size=40) | JSON
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]) | st.text(max_size=6), "content": st.text() | JSON},
        optional={"name": JSON},
    ),
    max_size=3,
)
COMMON = {
    "max_tokens": st.integers(-2, 6) | st.sampled_from([10**9, 2**63]) | JSON,
    "temperature": st.floats(0, 2) | JSON,
    "top_p": st.floats(0, 1) | JSON,
    "seed": st.integers(-5, 2**64) | JSON,
    "stream": st.booleans() | JSON,
    "ignore_eos": st.booleans() | JSON,
    "n": st.integers(-1, 3) | JSON,
    "best_of": st.integers(-1, 4) | JSON,
    "model": st.sampled_from(["memserve-default"]) | st.text(max_size=10),
    "user": st.text(max_size=10) | JSON,
    "stop": JSON,
    "logprobs": st.integers(-1, 6) | st.booleans() | JSON,
    "presence_penalty": st.floats(-3, 3) | JSON,
    "logit_bias": st.dictionaries(
        st.integers(-1, 130_000).map(str) | st.text(max_size=3), st.floats(-101, 101) | JSON, max_size=3
    )
    | JSON,
    "top_logprobs": st.integers(-1, 21) | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
}
EXTRA = st.dictionaries(st.text(max_size=10), JSON, max_size=2)


def _body(prompt_key: str, prompt: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    fields = st.fixed_dictionaries({}, optional={prompt_key: prompt, **COMMON})
    dumped = st.builds(lambda f, extra: json.dumps({**extra, **f}).encode(), fields, EXTRA)  # NaN: invalid JSON
    return dumped | st.binary(max_size=48) | JSON.map(lambda v: json.dumps(v).encode())


VALID = {
    "n": st.integers(1, 3),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 128_255).map(str), st.floats(-100, 100), max_size=3),
    "stop": st.text(max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**32),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


def _valid(prompt_key: str, prompt: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bodies that should succeed: the fuzz must reach generation and streaming too, not only refusals."""
    fields = st.fixed_dictionaries({prompt_key: prompt, "max_tokens": st.integers(1, 6)}, optional=VALID)
    return fields.map(lambda f: json.dumps(f).encode())


CHAT = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text()}), min_size=1)
FUZZ = st.one_of(
    st.tuples(st.just("/v1/completions"), _body("prompt", PROMPTS)),
    st.tuples(st.just("/v1/chat/completions"), _body("messages", MESSAGES)),
    st.tuples(st.just("/v1/completions"), _valid("prompt", st.lists(st.integers(0, 128_255), min_size=1) | st.text())),
    st.tuples(st.just("/v1/chat/completions"), _valid("messages", CHAT)),
)


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(FUZZ)
def test_fuzzed_bodies_get_an_answer_or_a_4xx_never_a_500(cluster: Cluster, case: tuple[str, bytes]) -> None:
    path, body = case
    status, data = request(cluster, "POST", path, body)
    event(f"HTTP {status}")  # the mix shows under --hypothesis-show-statistics
    assert status in (200, 400, 404, 413, 429), (status, data, body)
    if status != 200:
        err = data["error"]  # an OpenAI-style error body
        assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
    elif isinstance(data, str):  # a stream: chunks, then the end marker
        assert data.startswith("data: ") and data.rstrip().endswith("data: [DONE]"), data[-200:]
    else:
        choices = data["choices"]
        assert [c["index"] for c in choices] == list(range(len(choices))) and choices
        for choice in choices:
            assert all(isinstance(t, int) for t in choice["token_ids"]) and choice["finish_reason"] in (
                "stop",
                "length",
            )
            assert len(choice["token_ids"]) >= 1
        assert data["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


# control bodies that are not what the route expects: (route, body); the instance routes go to a member
CONTROL_CASES = [
    ("/admin/register", b"[1, 2]"),
    ("/admin/register", b"{not json"),
    ("/admin/register", b'{"name": "x"}'),
    ("/admin/register", b'{"name": ["x"], "role": "decode", "url": "http://127.0.0.1:9", "transport": ["h", 9]}'),
    ("/admin/register", b'{"name": "x", "role": "colocated", "url": "http://127.0.0.1:9", "transport": 9}'),
    ("/admin/register", b'{"name": "x", "role": "boss", "url": "http://127.0.0.1:9", "transport": ["127.0.0.1", 9]}'),
    ("/admin/register", b'{"name": "x", "role": "decode", "url": "http://127.0.0.1:9", "transport": ["127.0.0.1", 0]}'),
    (  # a registration is read whole first (test_scheduler_recovery.py: from a reachable instance)
        "/admin/register",
        b'{"name": "x", "role": "decode", "url": "http://127.0.0.1:9", "transport": ["127.0.0.1", 9],'
        b' "capacity_tokens": "lots"}',
    ),
    ("/connect", b"{not json"),
    ("/connect", b'{"name": "a", "host": "h"}'),
    ("/connect", b'{"name": "a", "host": "h", "port": "eighty"}'),
    ("/generate", b"{not json"),
    ("/generate", b"[]"),
    ("/push", b"{not json"),
    ("/push", b'{"peer": "decode-0"}'),
    ("/push", b'{"peer": "decode-0", "tokens": ["a"]}'),
    ("/push", b"null"),
]


@pytest.mark.parametrize(("path", "body"), CONTROL_CASES)
def test_malformed_control_bodies_get_a_400_and_change_nothing(cluster: Cluster, path: str, body: bytes) -> None:
    from memserve.auth import control_token

    token = control_token(cluster.secret)
    members = get_json(cluster, "/admin/stats")["members"]
    target = cluster if path.startswith("/admin/") else members["prefill-0"]["url"]
    status, data = request(target, "POST", path, body, key=token)
    assert status == 400 and "malformed" in str(data), (path, body, status, data)
    assert get_json(cluster, "/admin/stats")["members"] == members  # nobody joined, nobody left


def test_a_push_to_an_unknown_peer_is_a_502_naming_the_error(cluster: Cluster) -> None:
    from memserve.auth import control_token

    prompt = list(range(3000, 3040))
    assert completion(cluster, prompt=prompt, max_tokens=1, temperature=0)[0] == 200  # prefill-0 caches it
    url = get_json(cluster, "/admin/stats")["members"]["prefill-0"]["url"]
    body = json.dumps({"peer": "nobody", "tokens": prompt}).encode()
    status, data = request(url, "POST", "/push", body, key=control_token(cluster.secret))
    assert status == 502 and "nobody" in data["error"], (status, data)
    drained(cluster.url)  # its pool's invariants hold, nothing held


def get_json(c: Cluster, path: str) -> Any:
    status, data = request(c, "GET", path)
    assert status == 200, data
    return data


def test_the_server_still_works_after_all_that(cluster: Cluster) -> None:
    got, data = completion(cluster, **OK, temperature=0)
    assert got == 200 and len(data["choices"][0]["token_ids"]) == 2
    drained(cluster.url)
