"""The control APIs' authentication: a bearer token derived from the deployment's shared secret.

Instances' POST routes and the scheduler's ``/admin/register`` need it, so that only holders of the
secret drive an instance or join the deployment; the secret itself never travels (the token is an
HMAC of it). The token is static: on a network others can read, put TLS in front.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiohttp import web


def control_token(secret: str | bytes) -> str:
    """The bearer token of the control APIs (instances', the scheduler's ``/admin/register``): an
    HMAC of the deployment's secret, so the secret itself never travels."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, b"memserve control API", hashlib.sha256).hexdigest()


def holds_token(request: web.Request, token: str | None) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (any request does where
    ``token`` is ``None``); a constant-time compare."""
    given = request.headers.get("Authorization", "")
    return not token or hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def token_guard(token: str | None) -> Any:
    """aiohttp middleware: every POST outside ``/v1/`` needs ``Authorization: Bearer <token>``."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and not request.path.startswith("/v1/") and not holds_token(request, token):
            return web.json_response({"error": "a valid control token is required"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    return guard
