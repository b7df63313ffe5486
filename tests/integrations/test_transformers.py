"""HF transformers with a MemPool cache: exact tokens, only the new suffix computed, a shared pool."""

from __future__ import annotations

import copy
import dataclasses
import gc
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from mempool import MemPool, Tier
from mempool.errors import InvalidArgumentError, OutOfBlocksError

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from mempool.integrations.transformers import CACHE_ARG, MemPoolCache, PoolGenerator, pool_config_for  # noqa: E402

from ..conftest import DEVICES  # noqa: E402
from ..hf_models import OTHER_HF, SMALL_HF, tiny_hf  # noqa: E402

VOCAB = SMALL_HF["vocab_size"]


class Counted:
    """Counts the positions the model computes (the embedding layer sees every input token)."""

    def __init__(self, model: Any) -> None:
        self.positions = 0
        self.model = model

    def __enter__(self) -> Counted:
        self._handle = self.model.get_input_embeddings().register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, _: Any, args: tuple[torch.Tensor, ...], __: Any) -> None:
        self.positions += args[0].numel()


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_hf("llama")


@pytest.fixture
def pool(llama: Any) -> Iterator[MemPool]:
    p = MemPool(pool_config_for(llama, device_blocks=64, host_blocks=64, block_size=4))
    yield p
    p.close()


def ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long)


def hf(model: Any, tokens: list[int], n: int) -> list[int]:
    """HF with its default cache: the reference."""
    out = model.generate(ids(tokens), max_new_tokens=n, do_sample=False)
    return list(out[0].tolist())


def assert_nothing_held(pool: MemPool) -> None:
    pool.check_invariants()
    for tier, s in pool.stats().items():
        if tier in ("device", "host"):
            assert s["used"] == s["cached"] == s["evictable"], (tier, s)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_tokens_equal_hf_default_cache(kind: str) -> None:
    model = tiny_hf(kind)
    pool = MemPool(pool_config_for(model, device_blocks=64, block_size=4))
    gen = PoolGenerator(model, pool)
    rng = random.Random(1)
    for n in (1, 3, 4, 17, 40):
        prompt = [rng.randrange(VOCAB) for _ in range(n)]
        assert gen.generate(ids(prompt), max_new_tokens=12, do_sample=False)[0].tolist() == hf(model, prompt, 12)
    assert_nothing_held(pool)
    pool.close()


@pytest.mark.parametrize("kind", list(OTHER_HF))
def test_other_architectures_give_hf_default_caches_tokens_turn_after_turn(kind: str) -> None:
    """Three turns of one conversation, each after the last one's output: HF's tokens every turn,
    and each later turn finds everything before it cached."""
    model = tiny_hf(kind)
    pool = MemPool(pool_config_for(model, device_blocks=128, block_size=4))
    gen = PoolGenerator(model, pool)
    rng = random.Random(1)
    history: list[int] = []
    for turn in range(3):
        prompt = history + [rng.randrange(VOCAB) for _ in range(13)]
        cached_before = gen.stats["cached_tokens"]
        out = gen.generate(ids(prompt), max_new_tokens=10, do_sample=False)[0].tolist()
        assert out == hf(model, prompt, 10), turn
        assert gen.stats["cached_tokens"] - cached_before == max(0, len(history) - 1), turn
        history = out
    assert_nothing_held(pool)
    pool.close()
    if "sliding_window" in OTHER_HF[kind][2]:  # the window changes these tokens: it was applied
        assert hf(tiny_hf(kind, sliding_window=4096), prompt, 10) != out


def test_a_model_with_latent_attention_is_refused_before_anything_runs() -> None:
    config = transformers.DeepseekV3Config(**SMALL_HF, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12)
    with pytest.raises(InvalidArgumentError, match="latent attention"):
        pool_config_for(config, device_blocks=8)


@pytest.mark.parametrize(
    ("field", "value"),
    [("cache_implementation", "static"), ("cache_implementation", "dynamic"), ("cache_implementation", "hybrid"),
     ("use_cache", False)],
)  # fmt: skip
def test_a_checkpoints_generation_defaults_that_bypass_the_pool_are_set_aside(field: str, value: object) -> None:
    """Checkpoints may name a cache in their generation config, which HF refuses beside a cache
    object (before 2026-11-24 every call failed with HF's ValueError), or carry use_cache=False
    from training (HF then ran without the pool's cache, and every call failed at its end with
    InvalidArgumentError): the pool's cache serves. A caller's use_cache=False is refused."""
    model = tiny_hf("llama")
    setattr(model.generation_config, field, value)
    pool = MemPool(pool_config_for(model, device_blocks=32, block_size=4))
    gen = PoolGenerator(model, pool)
    prompt = list(range(10, 40))
    for _ in range(2):  # the second time from the cache
        assert gen.generate(ids(prompt), max_new_tokens=6, do_sample=False)[0].tolist() == hf(model, prompt, 6)
    assert gen.stats["cached_tokens"] > 0
    if field == "use_cache":
        before = pool.stats()
        for kwargs in ({"use_cache": False}, {"generation_config": copy.deepcopy(model.generation_config)}):
            with pytest.raises(InvalidArgumentError, match="use_cache=False runs without a cache"):
                gen.generate(ids(prompt), **kwargs)
        assert pool.stats() == before
    assert_nothing_held(pool)
    pool.close()


def test_models_sharing_a_pool_never_see_each_others_kv(llama: Any, pool: MemPool) -> None:
    """Two models of the same shapes, other weights, one pool: by default each generator caches
    in its model's own namespace (before 2026-11-24 both used the pool's default one, and the
    second model was handed the first one's K/V: other tokens than HF's)."""
    other = tiny_hf("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    prompt = [random.Random(7).randrange(VOCAB) for _ in range(30)]
    first, second, again = PoolGenerator(llama, pool), PoolGenerator(other, pool), PoolGenerator(llama, pool)
    assert first.namespace == again.namespace != second.namespace
    assert first.generate(ids(prompt), max_new_tokens=6, do_sample=False)[0].tolist() == hf(llama, prompt, 6)
    assert second.generate(ids(prompt), max_new_tokens=6, do_sample=False)[0].tolist() == hf(other, prompt, 6)
    assert second.stats["cached_tokens"] == 0  # nothing of the first model's
    assert again.generate(ids(prompt), max_new_tokens=6, do_sample=False)[0].tolist() == hf(llama, prompt, 6)
    assert again.stats["cached_tokens"] > 0  # the same model object: its cache is shared
    assert_nothing_held(pool)


def test_second_turn_computes_only_the_new_suffix(llama: Any, pool: MemPool) -> None:
    gen = PoolGenerator(llama, pool)
    turn1 = [random.Random(2).randrange(VOCAB) for _ in range(30)]
    out1 = gen.generate(ids(turn1), max_new_tokens=10, do_sample=False)[0].tolist()
    assert gen.stats["cached_tokens"] == 0
    turn2 = out1 + [7, 8, 9, 10, 11]  # the conversation so far, then the user's next message
    with Counted(llama) as counted:
        out2 = gen.generate(ids(turn2), max_new_tokens=6, do_sample=False)[0].tolist()
    assert out2 == hf(llama, turn2, 6)
    # turn 1 cached all 39 tokens that had K/V: 9 whole blocks, and 3 in the tail of the 10th
    cached = len(out1) - 1
    assert gen.stats["cached_tokens"] == cached == 39
    assert pool.stats()["index"]["tail_tokens"] == 3
    assert counted.positions == (len(turn2) - cached) + (6 - 1)  # the suffix, then one per decode step
    assert_nothing_held(pool)


def test_second_turn_after_the_prefix_went_to_the_host_tier_and_back(llama: Any, pool: MemPool) -> None:
    gen = PoolGenerator(llama, pool)
    turn1 = [random.Random(3).randrange(VOCAB) for _ in range(25)]
    out1 = gen.generate(ids(turn1), max_new_tokens=8, do_sample=False)[0].tolist()
    cached = pool.stats()["device"]["cached"]
    assert pool.evict(cached, Tier.DEVICE) == cached  # demoted: device -> host
    assert pool.stats()["device"]["cached"] == 0 and pool.stats()["host"]["cached"] == cached
    turn2 = out1 + [1, 2, 3]
    with Counted(llama) as counted:
        out2 = gen.generate(ids(turn2), max_new_tokens=5, do_sample=False)[0].tolist()
    assert out2 == hf(llama, turn2, 5)
    assert gen.stats["cached_tokens"] == (len(out1) - 1) // 4 * 4
    assert counted.positions == len(turn2) - gen.stats["cached_tokens"] + 4
    assert pool.stats()["index"]["promoted"] >= cached  # brought back to the device, not recomputed
    assert_nothing_held(pool)


def test_seeded_sampling_equals_hf_default_cache(llama: Any, pool: MemPool) -> None:
    gen = PoolGenerator(llama, pool)
    prompt = list(range(40, 70))
    for _ in range(2):  # the second time from the cache
        torch.manual_seed(5)
        ours = gen.generate(ids(prompt), max_new_tokens=8, do_sample=True, top_k=20)[0].tolist()
        torch.manual_seed(5)
        theirs = llama.generate(ids(prompt), max_new_tokens=8, do_sample=True, top_k=20)[0].tolist()
        assert ours == theirs
    assert gen.stats["cached_tokens"] > 0


def test_many_conversations_share_a_small_pool(llama: Any) -> None:
    """Threads run interleaved multi-turn conversations through a pool that must evict and demote."""
    pool = MemPool(pool_config_for(llama, device_blocks=40, host_blocks=24, block_size=4))
    gen = PoolGenerator(llama, pool)
    rng = random.Random(4)
    system = [rng.randrange(VOCAB) for _ in range(12)]  # a shared system prompt

    def conversation(k: int) -> list[tuple[list[int], list[int]]]:
        turns, history = [], system + [k, k + 1]
        for turn in range(3):
            history = history + [(k * 7 + turn * 3 + j) % VOCAB for j in range(5)]
            out = gen.generate(ids(history), max_new_tokens=6, do_sample=False)[0].tolist()
            turns.append((history, out))
            history = out
        return turns

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(conversation, range(8)))
    for turns in results:
        for prompt, out in turns:
            assert out == hf(llama, prompt, 6)
    s = pool.stats()
    assert s["index"]["demoted"] > 0 and gen.stats["cached_tokens"] > 0  # evicted, demoted, and reused
    assert_nothing_held(pool)
    pool.close()


@pytest.mark.parametrize("seed", range(16))
def test_random_pools_and_conversations_give_hf_default_caches_tokens(llama: Any, seed: int) -> None:
    """A random pool (block size 1-16, a tight device tier, a host tier or none) and random
    conversations, some sharing a head, with evictions between turns, some calls with embeddings
    of their own or asking for hidden states: every turn has HF's own tokens (and hidden states),
    or (a sequence the pool cannot hold) an OutOfBlocksError; nothing leaks."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 4, 8, 16])
    dev, host = rng.randint(max(4, 40 // bs), max(8, 160 // bs)), rng.choice([0, rng.randint(2, 40)])
    pool = MemPool(pool_config_for(llama, device_blocks=dev, host_blocks=host, block_size=bs))
    gen = PoolGenerator(llama, pool)
    heads = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(2)]
    history = {i: rng.choice(heads) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for i in range(3)}
    done = 0
    for _ in range(3):
        for i in list(history):
            n = rng.randint(1, 8)
            kwargs: dict[str, Any] = {"max_new_tokens": n, "do_sample": False}
            mode = rng.choice(["plain", "plain", "plain", "embeds", "hidden"])
            if mode == "embeds":  # K/V that are not the ids' alone: never cached under them
                noise = torch.Generator().manual_seed(rng.randrange(2**31))
                kwargs["inputs_embeds"] = torch.randn(1, len(history[i]), llama.config.hidden_size, generator=noise)
            elif mode == "hidden":
                kwargs.update(return_dict_in_generate=True, output_hidden_states=True)
            try:
                ours = gen.generate(ids(history[i]), **kwargs)
            except OutOfBlocksError:
                assert -(-(len(history[i]) + n) // bs) > dev  # only what the device tier cannot hold
                del history[i]
                continue
            theirs = llama.generate(ids(history[i]), **kwargs)
            if mode == "hidden":
                same_outputs(ours.hidden_states, theirs.hidden_states)
                ours, theirs = ours.sequences, theirs.sequences
            out = ours[0].tolist()
            assert out == theirs[0].tolist()
            done += 1
            history[i] = out + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.3:
                pool.evict(rng.randint(1, dev), Tier.HOST if host and rng.random() < 0.5 else Tier.DEVICE)
            pool.check_invariants()
    assert done
    assert_nothing_held(pool)
    pool.close()


def test_bad_requests_change_nothing(llama: Any, pool: MemPool) -> None:
    gen = PoolGenerator(llama, pool)
    gen.generate(ids(list(range(20))), max_new_tokens=3, do_sample=False)
    before = pool.stats()
    for args, kwargs in [
        ((torch.zeros((2, 5), dtype=torch.long),), {}),  # a batch
        ((torch.zeros((1, 0), dtype=torch.long),), {}),  # empty
        (([1.5, 2.5],), {}),  # floats: were truncated to ids 1 and 2
        ((torch.tensor([[1.0, 2.0]]),), {}),
        ((ids([1, VOCAB]),), {}),  # beyond the model's vocabulary: was HF's IndexError mid-forward
        (({"input_ids": ids([1, 2])},), {}),
        (("1 2 3",), {}),
        ((ids([1, 2, 3]),), {"num_beams": 2}),
        ((ids([1, 2, 3]),), {"num_return_sequences": 2, "do_sample": True}),
        ((ids([1, 2, 3]),), {"attention_mask": torch.tensor([[0, 1, 1]])}),
        ((ids([1, 2, 3]),), {"past_key_values": None}),
        ((ids([1, 2, 3]),), {CACHE_ARG: None}),
        ((ids([1, 2, 3]),), {"use_cache": False}),
        ((ids([1, 2, 3]),), {"cache_implementation": "static"}),
        ((ids([1, 2, 3]),), {"prompt_lookup_num_tokens": 3}),  # assisted decoding
        ((ids([1, 2, 3]),), {"assistant_model": llama}),
        ((ids([1, 2, 3]),), {"generation_config": transformers.GenerationConfig(prompt_lookup_num_tokens=3)}),
        ((ids([1, 2, 3]),), {"generation_config": transformers.GenerationConfig(num_beams=3)}),  # raised mid-forward
    ]:
        with pytest.raises(InvalidArgumentError):
            gen.generate(*args, max_new_tokens=2, **kwargs)
    assert pool.stats() == before


def test_assisted_decoding_through_a_cache_of_ones_own_is_refused_and_changes_nothing(
    llama: Any, pool: MemPool
) -> None:
    """Assisted decoding crops the cache, and transformers 5.15 on runs the whole prompt again over
    a cache that holds a prefix: refused (by HF, or by the cache's ``crop``), nothing cached."""
    prompt = list(range(10, 30)) * 2
    gen = PoolGenerator(llama, pool)
    gen.generate(ids(prompt[:20]), max_new_tokens=3, do_sample=False)
    before = pool.stats()
    with MemPoolCache(pool, prompt, namespace=gen.namespace) as cache, pytest.raises(ValueError):
        assert cache.cached_tokens > 0
        llama.generate(ids(prompt), max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3, **{CACHE_ARG: cache})
    assert pool.stats() == before
    assert_nothing_held(pool)


def test_a_sequence_larger_than_the_pool_raises_and_holds_nothing(llama: Any) -> None:
    pool = MemPool(pool_config_for(llama, device_blocks=6, block_size=4))  # 24 tokens
    gen = PoolGenerator(llama, pool)
    gen.generate(ids(list(range(10))), max_new_tokens=2, do_sample=False)  # leaves a cached prefix
    with pytest.raises(OutOfBlocksError):
        gen.generate(ids(list(range(10)) + list(range(50, 70))), max_new_tokens=4, do_sample=False)
    assert_nothing_held(pool)
    assert gen.generate(ids(list(range(10))), max_new_tokens=2, do_sample=False)[0].tolist() == hf(
        llama, list(range(10)), 2
    )
    pool.close()


def test_a_cache_that_does_not_fit_the_model_is_refused(llama: Any) -> None:
    wrong = MemPool(pool_config_for(llama, device_blocks=8, block_size=4, dtype=torch.float16))
    with MemPoolCache(wrong, [1, 2, 3]) as cache, pytest.raises(InvalidArgumentError, match="do not fit"):
        llama(ids([1, 2, 3]), **{CACHE_ARG: cache})
    assert_nothing_held(wrong)
    with MemPoolCache(wrong, [1, 2, 3]) as cache, pytest.raises(InvalidArgumentError, match=r"the cache.s sequence"):
        cache.commit([9, 9, 9])  # not the cache's sequence
    for tokens in ([1.5, 2.0], "123", torch.tensor([1.0, 2.0])):  # floats were truncated to ids
        with pytest.raises(InvalidArgumentError, match="tokens must"):
            MemPoolCache(wrong, tokens)
        with MemPoolCache(wrong, [1, 2]) as cache, pytest.raises(InvalidArgumentError, match="tokens must"):
            cache.commit(tokens)
    assert_nothing_held(wrong)
    wrong.close()
    right = MemPool(pool_config_for(llama, device_blocks=8, block_size=4))
    k = torch.ones(1, right.config.num_kv_heads, 3, right.config.head_dim)
    storage = right.storage(Tier.DEVICE)
    with MemPoolCache(right, [1, 2, 3]) as cache:
        before, used = storage.keys(0).clone(), right.stats()["device"]["used"]
        for v in (k[..., :-1], k[:, :1], k.double()):  # keys fit, values do not: nothing is written
            with pytest.raises(InvalidArgumentError, match="do not fit"):
                cache.update(k, v, 0)
        assert cache.get_seq_length() == 0 and right.stats()["device"]["used"] == used
        assert torch.equal(storage.keys(0), before)
    assert_nothing_held(right)
    right.close()


def test_a_cache_with_no_block_for_the_tail_starts_at_the_whole_blocks(llama: Any) -> None:
    """Opening a cache copies a kept tail into a block of its own; with none free it starts from
    the cached whole blocks instead (HF then computes the tail's tokens), holding nothing extra."""
    pool = MemPool(pool_config_for(llama, device_blocks=6, block_size=4))
    gen = PoolGenerator(llama, pool)
    prompt = list(range(10))
    out = gen.generate(ids(prompt), max_new_tokens=2, do_sample=False)[0].tolist()
    seq = out + [5]  # the next turn: K/V of 11 of its tokens are cached, as 2 blocks and a tail of 3
    with MemPoolCache(pool, seq, namespace=gen.namespace) as cache:
        assert cache.cached_tokens == 11  # with a free block, the tail's 3 tokens come along
    with pool.match(seq[:-1], gen.namespace) as held:  # keep the whole blocks cached while every other block is taken
        assert held.num_tokens == 8
        hogs = []
        while (more := pool.alloc(1)) is not None:
            hogs.append(more)
        with MemPoolCache(pool, seq, namespace=gen.namespace) as cache:
            assert cache.cached_tokens == 8 and cache.computed_tokens == 0
        for h in hogs:
            pool.free(h)
    assert_nothing_held(pool)
    pool.close()


def test_a_closed_or_misused_cache_refuses(llama: Any, pool: MemPool) -> None:
    cache = MemPoolCache(pool, [1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="one sequence"):
        llama(torch.tensor([[1, 2, 3], [4, 5, 6]]), **{CACHE_ARG: cache})  # a batch of 2
    cache.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        cache.commit([1, 2, 3])
    cache.close()  # idempotent
    assert_nothing_held(pool)
    gen = PoolGenerator(llama, pool)  # a 1-D prompt is one sequence
    assert gen.generate(torch.tensor([7, 8, 9]), max_new_tokens=2, do_sample=False)[0].tolist() == hf(
        llama, [7, 8, 9], 2
    )
    # generate's returned cache, used again: the model ran on K/V of blocks back in the pool (new
    # blocks, whatever they held), and those blocks were never freed
    out = gen.generate(ids(list(range(5, 30))), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    before = pool.stats()
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="closed"):
        llama(torch.tensor([[7]]), **{CACHE_ARG: out[CACHE_ARG] if CACHE_ARG in out else out.past_key_values})
    assert pool.stats() == before
    assert_nothing_held(pool)


def test_a_cache_dropped_without_close_gives_everything_back_but_never_from_inside_the_pool(
    llama: Any, pool: MemPool
) -> None:
    """The collector may drop a cache while this very thread is inside the pool, holding its
    re-entrant lock (half-way through an eviction, say): the cache's blocks and lock must not be
    given back from there, but once the pool is free again."""
    prompt = [random.Random(5).randrange(VOCAB) for _ in range(14)]
    with torch.no_grad(), MemPoolCache(pool, prompt) as first:  # cache the prompt's whole blocks, and a tail
        llama(ids(prompt), **{CACHE_ARG: first})
        first.commit(prompt)
    baseline = pool.stats()["device"]
    cache = MemPoolCache(pool, prompt + [3, 4, 5])  # locks the cached prefix, takes blocks of its own
    cache._table.reserve(len(prompt) + 3)
    held = pool.stats()
    assert held["index"]["device_locked"] > 0 and held["device"]["used"] > baseline["used"]
    with pool._lock:  # as inside a pool call on this thread
        del cache
        gc.collect()
        assert pool.stats() == held  # nothing given back from in here
    deadline = time.monotonic() + 10
    while pool.stats()["device"] != baseline:  # given back by the reaper once the lock is free
        assert time.monotonic() < deadline, (pool.stats()["device"], baseline)
        time.sleep(0.01)
    assert pool.stats()["index"]["device_locked"] == 0
    assert_nothing_held(pool)


@pytest.mark.parametrize("device", DEVICES)
def test_on_each_device_the_pool_cache_gives_hf_default_caches_tokens(llama: Any, device: str) -> None:
    """The model and the device tier on the case's device (the host tier pinned on a GPU's): greedy
    turns equal HF's own on that device, the second over the cached prefix, the third after it
    went to the host and back."""
    model = copy.deepcopy(llama).to(device)
    pool = MemPool(pool_config_for(model, device_blocks=64, host_blocks=64, block_size=4))
    assert pool.config.device.startswith(device) and pool.storage(Tier.HOST).pinned == (device == "cuda")
    gen = PoolGenerator(model, pool)

    def both(tokens: list[int], n: int) -> list[int]:
        ours = gen.generate(ids(tokens).to(device), max_new_tokens=n, do_sample=False)[0].tolist()
        theirs = model.generate(ids(tokens).to(device), max_new_tokens=n, do_sample=False)[0].tolist()
        assert ours == theirs
        return list(ours)

    out1 = both([random.Random(4).randrange(VOCAB) for _ in range(30)], 10)
    out2 = both(out1 + [5, 6, 7], 6)
    assert gen.stats["cached_tokens"] == len(out1) - 1
    cached = pool.stats()["device"]["cached"]
    assert pool.evict(cached, Tier.DEVICE) == cached
    before = gen.stats["cached_tokens"]
    both(out2 + [8, 9], 4)
    assert gen.stats["cached_tokens"] - before >= (len(out2) - 1) // 4 * 4  # its whole blocks, from the host
    assert pool.stats()["index"]["promoted"] >= (len(out2) - 1) // 4
    assert_nothing_held(pool)
    pool.close()


@pytest.mark.parametrize("asked", ["output_hidden_states", "output_attentions"])
def test_per_position_outputs_cover_the_whole_prompt_as_hf_returns_them(llama: Any, pool: MemPool, asked: str) -> None:
    """With a cached prefix, the model computed only the rest: hidden states / attentions of 1 of
    the prompt's 25 positions came back where HF's default cache gives all 25, silently."""
    gen = PoolGenerator(llama, pool)
    prompt = ids(list(range(5, 30)))
    gen.generate(prompt, max_new_tokens=3, do_sample=False)  # cached now
    kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, asked: True}
    with Counted(llama) as counted:
        ours = gen.generate(prompt, **kwargs)
    theirs = llama.generate(prompt, **kwargs)
    assert counted.positions == 25 + 2 and gen.stats["cached_tokens"] == 0  # the whole prompt, then 2 steps
    assert torch.equal(ours.sequences, theirs.sequences)
    name = "hidden_states" if asked == "output_hidden_states" else "attentions"
    same_outputs(getattr(ours, name), getattr(theirs, name))  # per step, per layer (None: not given)
    gen.generate(prompt, max_new_tokens=3, do_sample=False)
    assert gen.stats["cached_tokens"] > 0  # the next call without them reuses the cache again
    assert_nothing_held(pool)


def same_outputs(ours: Any, theirs: Any) -> None:
    """Nested tuples of tensors (or ``None``, where a transformers release gives none) alike."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    elif theirs is None:
        assert ours is None
    else:
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            same_outputs(a, b)


def test_a_call_with_inputs_beside_the_ids_neither_reuses_nor_caches_kv(llama: Any, pool: MemPool) -> None:
    """``inputs_embeds`` (soft prompts, images spliced in): the K/V were cached under the ids, and
    the next plain call with those ids got other tokens than HF's (reproduced: 3 of 4 differed)."""
    gen = PoolGenerator(llama, pool)
    prompt = ids(list(range(5, 30)))
    embeds = torch.randn(1, 25, llama.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = pool.stats()
    ours = gen.generate(prompt, inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, llama.generate(prompt, inputs_embeds=embeds, max_new_tokens=4, do_sample=False))
    assert pool.stats() == before  # nothing cached
    plain = gen.generate(prompt, max_new_tokens=4, do_sample=False)[0].tolist()
    assert plain == hf(llama, prompt[0].tolist(), 4)
    again = gen.generate(prompt, inputs_embeds=embeds, max_new_tokens=4, do_sample=False)  # the ids are cached now
    assert torch.equal(again, ours) and gen.stats["cached_tokens"] == 0  # ... and not reused for other inputs
    assert_nothing_held(pool)


def test_model_inputs_are_told_from_generation_options() -> None:
    """What makes a call's K/V not the ids' alone: a tensor, or a list of them (images, say)."""
    from mempool.integrations.transformers import _holds_tensors

    assert _holds_tensors(torch.zeros(2)) and _holds_tensors([torch.zeros(2)]) and _holds_tensors(((torch.zeros(1),),))
    assert not any(_holds_tensors(v) for v in (None, 5, [1, 2], [[3]], "x", {"a": 1}, transformers.GenerationConfig()))


def test_a_model_in_training_mode_neither_reuses_nor_caches_kv() -> None:
    """Dropout makes K/V other than the ids' (GPT-2: 0.1): cached, they would be reused in eval mode."""
    model = tiny_hf("gpt2")
    pool = MemPool(pool_config_for(model, device_blocks=64, block_size=4))
    gen, prompt = PoolGenerator(model, pool), ids(list(range(5, 30)))
    gen.generate(prompt, max_new_tokens=3, do_sample=False)  # eval mode: cached
    cached = pool.stats()
    model.train()
    try:
        gen.generate(prompt, max_new_tokens=3, do_sample=False)
    finally:
        model.eval()
    assert pool.stats() == cached and gen.stats["cached_tokens"] == 0  # the train-mode call added nothing
    assert gen.generate(prompt, max_new_tokens=3, do_sample=False)[0].tolist() == hf(model, prompt[0].tolist(), 3)
    assert gen.stats["cached_tokens"] > 0
    assert_nothing_held(pool)


@pytest.mark.parametrize(
    "change", [{"num_layers": 1}, {"num_layers": 4}, {"num_kv_heads": 1}, {"dtype": torch.float16}], ids=str
)
def test_a_pool_whose_blocks_do_not_fit_the_model_is_refused_by_the_generator(
    llama: Any, change: dict[str, Any]
) -> None:
    """Fewer layers than the model's was an IndexError mid-forward; more ran, but never cached a
    token (the unused layers' length held the cached length at 0)."""
    pool = MemPool(dataclasses.replace(pool_config_for(llama, device_blocks=16, block_size=4), **change))
    with pytest.raises(InvalidArgumentError, match="do not fit the model's K/V"):
        PoolGenerator(llama, pool)
    assert_nothing_held(pool)
    pool.close()
