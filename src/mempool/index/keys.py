"""Token validation and the byte keys the radix tree compares.

Tokens become one ``bytes`` object of native int32 values: a block of ``block_size``
tokens is a slice of ``4 * block_size`` bytes. Python hashes and compares bytes in C (hash
cached, equality is memcmp), so lookups are exact (no hash-collision risk) and cost one dict
probe per edge, not per token.
"""

from __future__ import annotations

import array
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mempool.errors import InvalidTokensError

__all__ = ["MAX_TOKEN", "TOKEN_BYTES", "decode_key", "encode_tokens"]

TOKEN_BYTES = 4
MAX_TOKEN = 2**31 - 1
_INT32 = np.dtype(np.int32)
_MIN = np.minimum.reduce


def token_list(tokens: Any) -> list[int]:
    """``tokens`` validated as :func:`encode_tokens` does (any iterable of ints too), as a list.

    Raises:
        InvalidTokensError: with the reason.
    """
    kept = (list, tuple, range, np.ndarray, torch.Tensor, str, bytes, dict, set, frozenset)  # judged as they are
    if isinstance(tokens, Iterable) and not isinstance(tokens, kept):
        tokens = list(tokens)  # a generator, say
    return list(np.frombuffer(encode_tokens(tokens), dtype=np.int32).tolist())


def encode_tokens(tokens: Any) -> bytes:
    """Validate ``tokens`` and return them as int32 bytes.

    Accepts a list, tuple, range, 1-D numpy array or 1-D torch tensor of integers in
    ``[0, 2**31)``. Integer-valued dtypes only: floats, bools, strings and objects are refused.

    Raises:
        InvalidTokensError: with the reason.
    Complexity: O(n) in C (a Python list converts at ~13 ns per token, an array at ~1 ns).
    """
    if type(tokens) is np.ndarray:  # the engine's usual form: skip the other checks
        if tokens.dtype is _INT32 and tokens.ndim == 1:  # native int32: only the sign to check
            if tokens.size and _MIN(tokens) < 0:
                raise InvalidTokensError("token ids must be in [0, 2**31), got a negative id")
            return tokens.tobytes()
        arr = tokens
    elif isinstance(tokens, (list, tuple, range)):
        # array('i') converts in C and refuses floats, strings and ints beyond int32 by itself.
        try:
            packed = array.array("i", tokens)
        except (TypeError, OverflowError) as exc:
            raise InvalidTokensError(f"tokens must be a flat sequence of ints in [0, 2**31): {exc}") from exc
        if packed and min(np.frombuffer(packed, dtype=np.int32).min(), 0) < 0:
            raise InvalidTokensError("token ids must be in [0, 2**31), got a negative id")
        return packed.tobytes()
    elif isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidTokensError(f"tokens must be integers, got a {tokens.dtype} tensor")
        arr = tokens.detach().to("cpu").numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        raise InvalidTokensError(f"tokens must be a list, tuple, array or tensor of ints, got {type(tokens).__name__}")
    if arr.ndim != 1:
        raise InvalidTokensError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise InvalidTokensError(f"tokens must be integers, got dtype {arr.dtype}")
    lo = int(arr.min())
    hi = int(arr.max()) if arr.dtype.itemsize > 4 or arr.dtype.kind == "u" else 0  # int32 cannot exceed
    if lo < 0 or hi > MAX_TOKEN:
        raise InvalidTokensError(f"token ids must be in [0, 2**31), got {lo if lo < 0 else hi}")
    return arr.astype(np.int32, copy=False).tobytes()


def decode_key(key: bytes) -> list[int]:
    """The token ids a key holds (for display and tests)."""
    return [int(t) for t in np.frombuffer(key, dtype=np.int32)]


def common_prefix_tokens(a: bytes, b: bytes) -> int:
    """Number of leading tokens two keys share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n // TOKEN_BYTES
    x = np.frombuffer(a, dtype=np.int32, count=n // TOKEN_BYTES)
    y = np.frombuffer(b, dtype=np.int32, count=n // TOKEN_BYTES)
    return int(np.flatnonzero(x != y)[0])
