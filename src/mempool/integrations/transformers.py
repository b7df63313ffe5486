"""Hugging Face transformers on MemPool: a ``Cache`` whose K/V live in pool blocks, and prefix
caching around ``model.generate``.

    pool = MemPool(pool_config_for(model, device_blocks=4096, host_blocks=16384))
    gen = PoolGenerator(model, pool)
    out = gen.generate(input_ids, max_new_tokens=64)   # what model.generate returns

Per request, :class:`PoolGenerator` matches the prompt in the pool, hands HF a
:class:`MemPoolCache` that already holds the cached prefix (HF then runs only the rest of the
prompt through the model), and inserts prompt + output into the pool when generation ends. Many
conversations (threads) may share one pool; eviction and host-tier demotion are the pool's own.

Scope: decoder-only models whose layers cache K and V of one head size (Llama, Qwen2/3, Mistral,
Mixtral, Gemma 1-3, Phi-3, OLMo 2, Falcon, GPT-2, GPT-NeoX, ...: each named one is tested),
one sequence per cache (batch size 1), greedy or sampled decoding; no beam search, no assisted
decoding. Sliding-window layers keep their whole K/V in the pool (a later turn may need any of it)
and HF's mask applies the window. Models with multi-head latent attention (DeepSeek-V2/V3) are
refused. Needs the ``hf`` extra (``transformers``).
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from mempool.alloc import gather_view
from mempool.config import PoolConfig
from mempool.errors import BackendUnavailableError, InvalidArgumentError, OutOfBlocksError
from mempool.index.keys import encode_tokens, token_list
from mempool.index.match import Match
from mempool.pool import MemPool
from mempool.types import Blocks, Tier

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.generation.utils import ALL_CACHE_NAMES
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailableError(
        "mempool.integrations.transformers needs transformers: pip install 'mempool[hf]'"
    ) from exc

__all__ = ["CACHE_ARG", "MemPoolCache", "MemPoolLayer", "PoolGenerator", "pool_config_for"]

#: The keyword HF models' ``generate`` and ``forward`` take a cache under: ``cache`` from
#: transformers 5.24 (which deprecates the old name), ``past_key_values`` before.
CACHE_ARG = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


def pool_config_for(
    model: Any,
    *,
    device_blocks: int,
    host_blocks: int = 0,
    block_size: int = 16,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PoolConfig:
    """A :class:`PoolConfig` whose block layout fits ``model`` (a ``PreTrainedModel`` or its config):
    its layers, KV heads, head size, and (for a model) its dtype and device.

    Raises:
        InvalidArgumentError: the model caches K and V of different sizes (multi-head latent
            attention), which no block layout of the pool holds.
    """
    config = getattr(model, "config", model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None):
        raise InvalidArgumentError(
            f"{type(text).__name__} uses multi-head latent attention, whose cached K and V differ in size; "
            "a MemPool block holds K and V of one head size"
        )
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    is_model = isinstance(model, torch.nn.Module)
    kv_dtype: torch.dtype | str = dtype if dtype is not None else (model.dtype if is_model else torch.float32)
    where = device if device is not None else (model.device if is_model else "cpu")
    return PoolConfig(
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        device_blocks=device_blocks,
        host_blocks=host_blocks,
        dtype=kv_dtype,
        device=str(where),
    )


class _BlockTable:
    """One sequence's device blocks: the locked cached prefix, then blocks of its own."""

    def __init__(self, pool: MemPool, prefix: Match | None) -> None:
        self.pool = pool
        self.block_size = pool.config.block_size
        self.storage = pool.storage(Tier.DEVICE)
        self.match = prefix
        self.own: Blocks | None = None
        self.ids: list[int] = [] if prefix is None else prefix.blocks.tolist()
        self._index: torch.Tensor | None = None
        self._slots: tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.released = False

    def reserve(self, tokens: int) -> None:
        """Blocks for ``tokens`` tokens; :class:`OutOfBlocksError` if the pool has none to give."""
        need = -(-tokens // self.block_size) - len(self.ids)
        if need <= 0:
            return
        more = self.pool.alloc(need)
        if more is None:
            raise OutOfBlocksError(f"the device tier cannot supply {need} more blocks for this sequence")
        self.own = more if self.own is None else self.own.concat(more)
        self.ids += more.tolist()
        self._index = self._slots = None

    def index(self) -> torch.Tensor:
        """The block ids as a tensor on the storage's device."""
        if self._index is None:
            self._index = torch.tensor(self.ids, dtype=torch.long, device=self.storage.device)
        return self._index

    def slots(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block and offset of positions ``start..end-1``, and the blocks of positions ``0..end-1``
        (computed once per forward: every layer asks for the same)."""
        if self._slots is None or self._slots[0] != (start, end):
            index = self.index()
            pos = torch.arange(start, end, device=index.device)
            used = index[: -(-end // self.block_size)]
            self._slots = ((start, end), index[pos // self.block_size], pos % self.block_size, used)
        return self._slots[1:]

    def release(self) -> None:
        """Unlock the prefix and free the own blocks (idempotent)."""
        self.released = True
        match, own, self.match, self.own, self.ids = self.match, self.own, None, None, []
        self._index = self._slots = None
        if match is not None:
            match.release()
        if own is not None and len(own):
            self.pool.free(own)


class _Reaper:
    """Releases the block tables of caches dropped without ``close()``, on a thread of its own."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_BlockTable] = queue.SimpleQueue()  # put() is re-entrant
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Make sure the thread runs (again after a fork); never call from a finalizer."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mempool-cache-reaper", daemon=True)
                self._thread.start()

    def put(self, table: _BlockTable) -> None:
        self._queue.put(table)

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            try:
                table.release()
            except Exception:  # a closed pool, say: nothing else can be done with it
                logging.getLogger(__name__).exception("releasing a dropped MemPoolCache failed")
            del table  # the pool may go once the last table leaves


_REAPER = _Reaper()

#: Assisted decoding forgets rejected draft tokens by cropping the cache, and transformers 5.15 on
#: runs the whole prompt again on its first step when the cache already holds a prefix (its own
#: ``DynamicCache`` included: other tokens than without the prefix); so it is refused.
_NO_ASSISTED = "assisted decoding (assistant_model, prompt_lookup_num_tokens, ...) is not supported with a MemPoolCache"
_ASSISTED_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class MemPoolLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One decoder layer's K/V, stored in the pool blocks of a :class:`MemPoolCache`.

    ``update`` writes the new K/V into the blocks and returns the layer's whole K/V gathered from
    them, ``[1, kv_heads, length, head_dim]`` (the new states themselves when nothing came before).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, table: _BlockTable, layer: int, length: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.table, self.layer, self.length = table, layer, length
        self.keys = self.values = None
        self.is_initialized = False  # transformers 4.56's mixin does not set it

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        # value_states: transformers 5 passes it, 4.x does not
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.table
        if t.released:  # e.g. generate's returned past_key_values, used again: its K/V are gone
            raise InvalidArgumentError(
                "this MemPoolCache is closed and its blocks went back to the pool; make a new one "
                "(PoolGenerator makes one per call)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = t.storage.keys(self.layer), t.storage.values(self.layer)  # [blocks, bs, heads, dim]
        if key_states.shape[0] != 1:
            raise InvalidArgumentError(f"a MemPoolCache holds one sequence, got a batch of {key_states.shape[0]}")
        for states in (key_states, value_states):
            if tuple(states.shape[1::2]) != (keys.shape[2], keys.shape[3]) or states.dtype != keys.dtype:
                raise InvalidArgumentError(
                    f"K/V of {tuple(key_states.shape)} / {tuple(value_states.shape)} {states.dtype} do not fit "
                    f"the pool's blocks ({keys.shape[2]} heads x {keys.shape[3]}, {keys.dtype}): see pool_config_for"
                )
        start, end = self.length, self.length + key_states.shape[-2]
        t.reserve(end)
        block, offset, used = t.slots(start, end)
        keys[block, offset] = key_states[0].transpose(0, 1)
        values[block, offset] = value_states[0].transpose(0, 1)
        self.length = end
        if start == 0:  # nothing before them: the layer's K/V are the new states themselves
            return key_states, value_states
        k = gather_view(keys, used).flatten(0, 1)[:end].transpose(0, 1).unsqueeze(0)
        v = gather_view(values, used).flatten(0, 1)[:end].transpose(0, 1).unsqueeze(0)
        return k, v

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # query: the new tokens' count (transformers 5.10 on), or their cache positions (before)
        n = query if isinstance(query, int) else int(query.shape[0])
        return self.length + n, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1  # no maximum: the pool's blocks are the limit

    get_max_cache_shape = get_max_length  # its name until transformers 5.15

    def crop(self, tokens: int) -> None:
        raise InvalidArgumentError(_NO_ASSISTED)

    def offload(self) -> None:  # the blocks live in the pool: nothing to move
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        raise InvalidArgumentError("a MemPoolCache cannot be reset; make a new one per sequence")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidArgumentError("a MemPoolCache holds one sequence: beam search is not supported")


class MemPoolCache(Cache):  # type: ignore[misc]
    """An HF ``Cache`` for one sequence whose K/V live in MemPool blocks.

    Made with a ``prompt``, it starts holding the longest cached prefix of it (whole blocks on the
    device tier, promoted from the host tier when there is room, locked while the cache lives,
    then what a kept tail holds of the next block, copied into a block of its own), so HF
    computes only the rest; with ``reuse=False`` it starts empty (HF computes every position).
    :meth:`commit` caches the sequence's whole blocks in the pool;
    :meth:`close` (or leaving the ``with`` block) gives the cache's blocks back. A cache is used by
    one thread at a time; many caches may share one pool across threads.
    """

    def __init__(self, pool: MemPool, prompt: Iterable[int] = (), *, namespace: Any = None, reuse: bool = True) -> None:
        self.pool, self.namespace = pool, namespace
        self._closed = True  # until the table exists: close() (and __del__) have nothing to give back
        _REAPER.start()  # first (it may fail: nothing is held yet), and here, not in a finalizer (it takes a lock)
        self.prompt = token_list(prompt)
        # keep the last prompt token uncached: its logits pick the first new token
        match = pool.match(self.prompt[:-1], namespace, promote=True) if reuse and len(self.prompt) > 1 else None
        self.cached_tokens = 0 if match is None else match.num_tokens
        self._table = _BlockTable(pool, match)
        self._closed = False
        try:
            if match is not None:  # a few more tokens, from a finished sequence's partly filled last block
                self.cached_tokens += self._copy_tail(namespace)
            self._layers = [MemPoolLayer(self._table, i, self.cached_tokens) for i in range(pool.config.num_layers)]
            layers: list[Any] = list(self._layers)
            super().__init__(layers=layers)
        except BaseException:
            self.close()
            raise

    def _copy_tail(self, namespace: Any) -> int:
        try:
            self._table.reserve(self.cached_tokens + 1)
        except OutOfBlocksError:
            return 0  # no block to copy into: HF computes those tokens (and asks for blocks itself)
        assert self._table.own is not None
        return self.pool.copy_tail(self.prompt[:-1], self.cached_tokens, self._table.own[-1:], namespace)

    @property
    def computed_tokens(self) -> int:
        """Positions the model computed into this cache (beyond the cached prefix)."""
        return self._layers[0].length - self.cached_tokens

    def commit(self, tokens: Iterable[int]) -> int:
        """Cache the whole blocks of ``tokens`` (the sequence: prompt + output) that hold K/V, and
        the partly filled last one as a tail (see :meth:`MemPool.insert_tail`); returns how many
        whole blocks the pool newly indexed."""
        if self._closed:
            raise InvalidArgumentError("the cache is closed")
        seq = token_list(tokens)
        length = min(layer.length for layer in self._layers)
        if len(seq) < length or seq[: len(self.prompt)] != self.prompt[: len(seq)]:
            raise InvalidArgumentError("tokens must be the cache's sequence: its prompt, then what was generated")
        blocks = Blocks(Tier.DEVICE, self._table.ids[: -(-length // self._table.block_size)])
        return self.pool.insert_sequence(seq[:length], blocks, self.namespace)

    def close(self) -> None:
        """Give the blocks back: unlock the prefix, free the rest (what was committed stays cached)."""
        if not self._closed:
            self._closed = True
            self._table.release()

    def __enter__(self) -> MemPoolCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a cache dropped without close() must not leak blocks or locks
        # Not released here: the collector may run this while the same thread is inside the pool
        # (holding its re-entrant lock, half-way through an eviction, say). The reaper thread
        # releases it once the pool is free; ``put`` is safe to call from a finalizer.
        if not getattr(self, "_closed", True):
            self._closed = True
            _REAPER.put(self._table)


_MODEL_NAMESPACES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_MODEL_NAMESPACES_LOCK = threading.Lock()


def _namespace_of(model: Any) -> str:
    """A namespace of ``model``'s own, the same for every generator over this model object."""
    with _MODEL_NAMESPACES_LOCK:
        try:
            name = _MODEL_NAMESPACES.get(model)
            if name is None:
                name = _MODEL_NAMESPACES[model] = f"{type(model).__name__}-{uuid.uuid4().hex}"
        except TypeError:  # not weakly referable: a namespace of this generator's own
            name = f"{type(model).__name__}-{uuid.uuid4().hex}"
        return name


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a list or tuple with one in it (images as a list of tensors, say)."""
    if isinstance(value, list | tuple):
        return any(_holds_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)


def _asked(name: str, kwargs: dict[str, Any], config: Any) -> bool:
    """Whether a ``generate`` call asks for ``name``: its keyword, else its generation config's."""
    value = kwargs.get(name)
    return bool(getattr(config, name, False) if value is None else value)


class PoolGenerator:
    """``model.generate`` with prefix caching in ``pool``: a drop-in for one sequence at a time.

    ``namespace`` keeps this model's cached K/V apart from other models' in a shared pool. By
    default it is one of the model object's own (generators over the same model share it; other
    models, even of the same shapes, never see its K/V); :attr:`namespace` says which, for a
    :class:`MemPoolCache` that should share it. Weights changed in place (another LoRA adapter
    set, a training step) make other K/V: give each such state a generator with a namespace of
    its own (``namespace=("my-model", "adapter-b")``, say).

    A call that asks for the hidden states or attentions of every position
    (``return_dict_in_generate`` with ``output_hidden_states`` or ``output_attentions``) runs the
    whole prompt through the model, as ``model.generate`` does (a cached prefix would leave its
    positions out of them), and still caches the sequence for the next call. A call with model
    inputs beside the ids (any other keyword holding tensors: ``inputs_embeds``, ``pixel_values``,
    ``position_ids``, ...), or on a model in training mode (dropout), neither reuses nor caches
    K/V: they are not the ids' alone.

    Thread-safe: threads may call :meth:`generate` concurrently (each gets its own cache; the
    model's forward must tolerate that, as HF models do in inference).
    """

    def __init__(self, model: Any, pool: MemPool, *, namespace: Any = None) -> None:
        """Raises ``InvalidArgumentError`` where ``pool``'s block layout does not fit ``model`` (make
        the pool with :func:`pool_config_for`): fewer layers failed mid-forward, more were never
        written, and no K/V was ever cached."""
        try:
            want = pool_config_for(model, device_blocks=1, block_size=pool.config.block_size).layout
        except InvalidArgumentError:  # no layout of the pool fits it (multi-head latent attention)
            raise
        except (AttributeError, TypeError, ValueError):  # a config that does not tell: the layers check each call
            want = pool.config.layout
        if pool.config.layout != want:
            raise InvalidArgumentError(
                f"the pool's blocks ({pool.config.layout}) do not fit the model's K/V ({want}): see pool_config_for"
            )
        self.model, self.pool = model, pool
        self.namespace = _namespace_of(model) if namespace is None else namespace
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "computed_tokens": 0}

    def _prompt(self, input_ids: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """``input_ids`` as a ``[1, n]`` integer tensor of ids the model's vocabulary has."""
        if isinstance(input_ids, torch.Tensor):
            encode_tokens(input_ids.flatten())  # integers in [0, 2**31), as a list is checked below
            ids = input_ids
        else:
            ids = torch.tensor([token_list(input_ids)])
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise InvalidArgumentError(f"one non-empty prompt of shape [1, n] is needed, got {tuple(ids.shape)}")
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        if vocab is not None and int(ids.max()) >= vocab:
            raise InvalidArgumentError(f"token ids must lie in [0, {vocab}), got {int(ids.max())}")
        return ids

    def generate(self, input_ids: torch.Tensor | Iterable[int], **kwargs: Any) -> Any:
        """Run ``model.generate`` on one prompt (``[1, n]`` ids, or a list), reusing and extending the
        pool's cache; returns what ``model.generate`` returns.

        Raises:
            InvalidArgumentError: a batch, padding, beam search, assisted decoding, more than one
                return sequence, ``use_cache=False`` (a keyword, or a ``generation_config``'s; the
                model's own generation config's is set aside), or a cache of the caller's (``cache``,
                ``past_key_values`` or ``cache_implementation``; a ``cache_implementation`` in the
                model's generation config is set aside for the call).
            OutOfBlocksError: the pool could not hold the sequence (nothing is left held).
        """
        ids = self._prompt(input_ids)
        for name in {"past_key_values", CACHE_ARG}:
            if name in kwargs:
                raise InvalidArgumentError(f"PoolGenerator brings its own cache; do not pass {name}")
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        if any(kwargs.get(name) is not None or getattr(config, name, None) is not None for name in _ASSISTED_ARGS):
            raise InvalidArgumentError(_NO_ASSISTED)
        no_cache = "use_cache=False runs without a cache: call model.generate itself for that"
        if kwargs.get("use_cache") is False:
            raise InvalidArgumentError(no_cache)
        if kwargs.get("use_cache") is None and getattr(config, "use_cache", True) is False:
            if kwargs.get("generation_config") is not None:
                raise InvalidArgumentError(f"the generation_config's {no_cache}")
            # the model's own: a checkpoint trained with use_cache=False carries it into its
            # generation config; HF would run without the pool's cache (and fail it at the end)
            kwargs["use_cache"] = True
        if kwargs.get("cache_implementation") is not None:
            raise InvalidArgumentError("PoolGenerator brings its own cache; do not pass cache_implementation")
        if getattr(config, "cache_implementation", None) is not None:
            # a checkpoint's default ("static", say), which HF refuses beside a cache object; HF
            # reads an unset field of a generation_config passed in from the model's: so a keyword
            kwargs["cache_implementation"] = None
        for name in ("num_beams", "num_return_sequences"):
            value = kwargs.get(name)
            where = "" if value is not None else " (the generation config's: pass 1 to override it)"
            if int((getattr(config, name, 1) if value is None else value) or 1) != 1:
                raise InvalidArgumentError(f"{name} > 1 is not supported (one sequence per cache){where}")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(torch.all(mask == 1)):
            raise InvalidArgumentError("padding is not supported: pass one unpadded prompt")
        prompt = ids[0].tolist()
        # hidden states or attentions of every prompt position, as model.generate returns them:
        # the model must compute every position (a cached prefix would leave those out)
        per_position = _asked("return_dict_in_generate", kwargs, config) and any(
            _asked(name, kwargs, config) for name in ("output_hidden_states", "output_attentions")
        )
        # K/V that are not the ids' alone (model inputs beside them: inputs_embeds, pixel_values,
        # position_ids, ...; or a model in training mode: dropout) are neither reused nor cached
        # under the ids (that would give the next call with those ids other tokens)
        ids_alone = not (
            bool(getattr(self.model, "training", False))
            or any(_holds_tensors(v) for k, v in kwargs.items() if k != "attention_mask")
        )
        with MemPoolCache(self.pool, prompt, namespace=self.namespace, reuse=ids_alone and not per_position) as cache:
            out = self.model.generate(ids, **{CACHE_ARG: cache}, **kwargs)
            sequence = out if isinstance(out, torch.Tensor) else out.sequences
            if ids_alone:
                cache.commit(sequence[0].tolist())
        with self._lock:
            s = self.stats
            s["requests"] += 1
            s["prompt_tokens"] += len(prompt)
            s["cached_tokens"] += cache.cached_tokens
            s["computed_tokens"] += cache.computed_tokens
        return out
