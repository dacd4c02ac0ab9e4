"""The OpenAI-compatible HTTP gateway as an ASGI app (Starlette on uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, GET /openapi.json (handlers.py). Never touches block ids and never imports torch.

Hostile input is refused before it reaches the scheduler: body size (413), header size (uvicorn's
h11 limit and middleware.py, 431), every field's range and count (protocol.py), token ids outside
the vocabulary, requests longer than the context or larger than the whole KV cache (400). An API
key guards every route but /health. The command line is gateway/cli.py.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.config import GatewayConfig

from . import handlers as H
from .engine_client import EngineClient
from .errors import APIError
from .lifecycle import Lifecycle
from .middleware import LimitHeaders, RequireAPIKey

_DEFAULTS = GatewayConfig()
DEFAULT_MAX_BODY_BYTES = _DEFAULTS.max_body_bytes
DEFAULT_MAX_HEADER_BYTES = _DEFAULTS.max_header_bytes     # request line + headers (h11's incomplete-event limit)
DEFAULT_MAX_N = _DEFAULTS.max_n


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return APIError(exc.status_code, exc.detail, "invalid_request_error" if exc.status_code < 500
                    else "server_error", headers=exc.headers).response()


def build_app(engine_client: EngineClient, tokenizer, served_model_name: str, max_model_len: int = 0,
              api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_n: int = DEFAULT_MAX_N, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
              tool_call_parser: str = "auto", prefix_cache_salt_required: bool = False) -> Starlette:
    """The ASGI app. ``max_model_len`` 0 = learn it from the scheduler's stats."""
    routes = [
        Route("/v1/chat/completions", H.chat_completions, methods=["POST"]),
        Route("/v1/completions", H.completions, methods=["POST"]),
        Route("/v1/models", H.list_models, methods=["GET"]),
        Route("/health", H.health, methods=["GET"]),
        Route("/metrics", H.metrics, methods=["GET"]),
        Route("/openapi.json", H.openapi, methods=["GET"]),
    ]

    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await engine_client.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan,
                    middleware=[lifecycle.middleware(), Middleware(LimitHeaders, max_bytes=max_header_bytes),
                                Middleware(RequireAPIKey, api_key=api_key)])
    app.state.lifecycle = lifecycle
    app.state.gateway = H.Gateway(engine_client, tokenizer, served_model_name, max_model_len, max_body_bytes, max_n,
                                  tool_call_parser, prefix_cache_salt_required)
    return app
