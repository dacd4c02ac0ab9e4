"""Graceful drain of the gateway on SIGTERM / SIGINT.

The first signal starts draining: new requests get 503 (``code: draining``, with ``Retry-After``),
``/health`` answers 503 ``{"status": "draining"}``, ``/metrics`` keeps working, and requests in
flight run to completion. uvicorn is told to exit once none is left or ``drain_timeout`` seconds
have passed (then uvicorn cancels what remains, which aborts those requests at the scheduler). A
second signal exits at once, as uvicorn does by default. The process exits 0 after a drain.
"""
from __future__ import annotations

import logging
import time

import msgspec
from starlette.middleware import Middleware

from shared.config import GatewayConfig

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("pagedserve.gateway")

DEFAULT_DRAIN_TIMEOUT = GatewayConfig.drain_timeout
_UNGATED = frozenset({"/metrics", "/openapi.json"})     # served while draining, not counted


class Lifecycle:
    """Draining flag and the count of HTTP requests in flight (health and metrics excluded)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def middleware(self) -> Middleware:
        return Middleware(DrainGate, lifecycle=self)


class DrainGate:
    """ASGI middleware: counts requests in flight; while draining, refuses new ones."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in _UNGATED:
            return await self.app(scope, receive, send)
        lc = self.lifecycle
        if lc.draining:
            if path == "/health":
                body = {"status": "draining"}
            else:
                body = ErrorResponse(ErrorInfo("the server is shutting down; retry on another instance",
                                               "service_unavailable_error", code="draining"))
            return await _send_json(send, 503, body, retry_after=path != "/health")
        if path == "/health":
            return await self.app(scope, receive, send)
        lc.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            lc.in_flight -= 1


async def _send_json(send, status: int, body, retry_after: bool) -> None:
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": msgspec.json.encode(body)})


def serve(app, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, **uvicorn_options) -> None:
    """``uvicorn.run`` with a drain on the first SIGTERM / SIGINT (``app.state.lifecycle``)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        deadline = None

        def handle_exit(self, sig, frame) -> None:
            lc: Lifecycle = app.state.lifecycle
            if lc.draining:                       # a second signal: uvicorn's own (fast) exit
                return super().handle_exit(sig, frame)
            lc.draining = True
            self.deadline = time.monotonic() + drain_timeout
            log.info("draining: refusing new requests, %d in flight, up to %.0fs", lc.in_flight, drain_timeout)

        async def on_tick(self, counter: int) -> bool:
            lc: Lifecycle = app.state.lifecycle
            if self.deadline is not None and not self.should_exit:
                if lc.in_flight == 0:
                    log.info("drained: no request in flight")
                    self.should_exit = True
                elif time.monotonic() >= self.deadline:
                    log.warning("drain timeout: %d requests still in flight are cancelled", lc.in_flight)
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, timeout_graceful_shutdown=5, **uvicorn_options)
    DrainingServer(config).run()
