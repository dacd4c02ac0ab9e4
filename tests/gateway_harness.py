"""The gateway served by a real uvicorn around the scripted scheduler (tests/fake_scheduler.py),
shared by the gateway's test files.

A test file imports the fixtures it uses (``from tests.gateway_harness import fake, http, sched``;
pytest finds fixtures by name in the test module) and defines its own module-scoped ``server``
fixture with ``serve_gateway`` and the app options it tests: ``http`` talks to that ``server``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import httpx
import pytest

from services.gateway.engine_client import EngineClient
from services.gateway.server import build_app
from tests.fake_scheduler import FakeScheduler, ServerThread, gateway_tokenizer


@contextlib.contextmanager
def serve_gateway(fake: FakeScheduler, model: str, *, stats_ttl: float | None = None, log_level: str = "warning",
                  client_options: dict | None = None, **app_options) -> Iterator[ServerThread]:
    """A gateway app for ``model`` on ``fake`` (``app_options`` go to ``build_app``, ``client_options``
    to the EngineClient; ``stats_ttl`` None keeps its default), served until the block exits."""
    options = dict(client_options or {}, **({} if stats_ttl is None else {"stats_ttl": stats_ttl}))
    client = EngineClient(fake.addr, **options)
    app = build_app(client, gateway_tokenizer(), model, **app_options)
    srv = ServerThread(app, log_level=log_level)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def fake():
    f = FakeScheduler(gateway_tokenizer())
    yield f
    f.close()


@pytest.fixture
def sched(fake):
    """The module's fake scheduler with its script and records reset before and after the test."""
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=20) as c:
        yield c
