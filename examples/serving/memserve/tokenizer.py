"""An offline BPE tokenizer (``quicktok-v1`` bundles its vocabularies) and a chat template.

The template is built by concatenating per-message token lists, so the tokens of a conversation's
first k messages are always a prefix of the tokens of its first k+1: multi-turn prompts hit the
prefix cache exactly (re-tokenizing joined text could merge tokens across a message boundary).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .config import ModelConfigError


@dataclass(frozen=True)
class _Template:
    bos: str | None
    header: str  # formatted with role
    footer: str
    stops: tuple[str, ...]
    special: bool  # markers are special tokens (encoded as one id each)


_TEMPLATES = {
    "llama3": _Template(
        "<|begin_of_text|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        ("<|eot_id|>", "<|end_of_text|>"),
        special=True,
    ),
    # cl100k has no chat markers among its special tokens: ChatML spelled as text, <|endoftext|> stops
    "cl100k_base": _Template(None, "<|im_start|>{role}\n", "<|im_end|>\n", ("<|endoftext|>",), special=False),
}

ROLES = ("system", "user", "assistant", "tool")
_REPLACEMENT = "\ufffd".encode()


class Tokenizer:
    """``encode``/``decode`` text and render chat messages for one bundled encoding.

    Raises:
        ModelConfigError: quicktok is not installed, or the encoding has no template here.
    """

    def __init__(self, name: str = "llama3") -> None:
        if name not in _TEMPLATES:
            raise ModelConfigError(f"no chat template for encoding {name!r}; known: {sorted(_TEMPLATES)}")
        try:
            import quicktok
        except ImportError as exc:
            raise ModelConfigError("the tokenizer needs quicktok-v1: pip install 'mempool[serving]'") from exc
        self.name = name
        self._enc = quicktok.get_encoding(name)
        self._tpl = _TEMPLATES[name]
        self.stop_ids: frozenset[int] = frozenset(self._enc.encode_single_token(s) for s in self._tpl.stops)
        self.eos_id = min(self.stop_ids)
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token spellings in it are encoded as plain text."""
        return list(self._enc.encode_ordinary(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 at a token boundary is replaced, never raised)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of ``ids`` (a token may end inside a character). An id this encoding
        lacks (a model whose vocabulary is larger than the tokenizer's emits one) decodes to U+FFFD."""
        ids = list(ids)
        try:
            return bytes(self._enc.decode_bytes(ids))
        except (KeyError, TypeError, ValueError):  # an id it lacks: a KeyError; a negative one: a TypeError
            return b"".join(self._token_bytes(i) for i in ids)

    def _token_bytes(self, token: int) -> bytes:
        try:
            return bytes(self._enc.decode_bytes([token]))
        except (KeyError, TypeError, ValueError):
            return _REPLACEMENT

    def _marker(self, text: str) -> list[int]:
        """Tokens of a template marker (a fresh list: callers extend it)."""
        if text not in self._cache:
            ids = (
                self._enc.encode(text, allowed_special="all") if self._tpl.special else self._enc.encode_ordinary(text)
            )
            self._cache[text] = tuple(ids)
        return list(self._cache[text])

    def bos(self) -> list[int]:
        """Tokens that open a conversation."""
        return self._marker(self._tpl.bos) if self._tpl.bos else []

    def message(self, role: str, content: str) -> list[int]:
        """Tokens of one rendered message (header, content, footer)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return self._marker(self._tpl.header.format(role=role)) + self.encode(content) + self._marker(self._tpl.footer)

    def generation_prompt(self) -> list[int]:
        """Tokens that open the assistant's reply."""
        return self._marker(self._tpl.header.format(role="assistant"))

    def end_of_turn(self) -> list[int]:
        """Tokens that close a reply the model did not close itself (stopped by ``max_tokens``)."""
        return self._marker(self._tpl.footer)

    def chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Render ``messages`` (``{"role", "content"}`` mappings) as prompt tokens."""
        out = self.bos()
        for m in messages:
            out += self.message(m["role"], m["content"])
        return out + (self.generation_prompt() if add_generation_prompt else [])
