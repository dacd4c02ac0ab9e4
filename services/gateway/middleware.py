"""ASGI middleware of the gateway: the API key and the header-size limit."""
from __future__ import annotations

import hmac
from typing import Optional

from starlette.requests import Request

from .errors import APIError

OPEN_PATHS = frozenset({"/health"})      # the only route served without the API key


def _authorized(headers, api_key: bytes) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return hmac.compare_digest(token.strip().encode(), api_key) and scheme.lower() == "bearer"


class RequireAPIKey:
    """``Authorization: Bearer KEY`` on every HTTP route but OPEN_PATHS, compared in constant
    time. Unknown routes are refused too, so nothing is learnt without the key."""

    def __init__(self, app, api_key: Optional[str]):
        self.app, self.api_key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.api_key is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not _authorized(Request(scope).headers, self.api_key):
                response = APIError(401, "Incorrect API key provided.", "authentication_error",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class LimitHeaders:
    """431 when the request line + headers exceed ``max_bytes``. uvicorn's h11 limit only bounds
    headers that arrive in pieces; one read can bring up to 64 KiB at once."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
                sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.max_bytes:
                response = APIError(431, f"request headers exceed the limit of {self.max_bytes} bytes",
                                    code="headers_too_large").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
