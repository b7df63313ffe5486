"""Mutual challenge-response over a shared secret: the secret itself never travels.

Each side sends a fresh random nonce; each proves knowledge of the secret with an HMAC-SHA256
over its role, both nonces and both names, so a proof cannot be replayed or reflected back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["new_nonce", "proof", "verify"]


def new_nonce() -> str:
    return secrets.token_hex(16)


def proof(secret: bytes, role: str, client_nonce: str, server_nonce: str, client: str, server: str) -> str:
    msg = "\x00".join(("mempool-v1", role, client_nonce, server_nonce, client, server)).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def verify(
    secret: bytes, mac: object, role: str, client_nonce: str, server_nonce: str, client: str, server: str
) -> bool:
    if not isinstance(mac, str):
        return False
    return hmac.compare_digest(mac, proof(secret, role, client_nonce, server_nonce, client, server))
