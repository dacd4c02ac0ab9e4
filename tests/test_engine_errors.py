"""The HTTP status of every engine failure docs/RELIABILITY.md and docs/ARCHITECTURE.md describe,
against the scripted scheduler (tests/fake_scheduler.py) behind a real uvicorn:

| failure | documented answer |
|---|---|
| the executor fails the request (``executor_error``) | 500 ``server_error``; mid-stream: one SSE error event |
| the scheduler is down (``engine_unavailable``) | 503 for new requests, /health 503 at once; mid-stream: SSE error event |
| the waiting queue is full (``queue_full``) | 429 ``rate_limit_error`` with ``Retry-After`` |
| the executor is not ready (``not_ready``) | 503 |

Draining (503 ``draining`` after SIGTERM) needs the launcher: tests/test_launcher.py.
"""
from __future__ import annotations

import json

import httpx
import pytest

from tests.fake_scheduler import FakeScheduler, gateway_tokenizer
from tests.gateway_harness import fake, http, sched, serve_gateway  # noqa: F401 (fixtures)

MODEL = "smol-test"
PATHS = ["/v1/completions", "/v1/chat/completions"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(fake):
    with serve_gateway(fake, MODEL, stats_ttl=0.0) as srv:
        yield srv


def _body(path: str, **kw) -> dict:
    if path.endswith("chat/completions"):
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}
    return {"model": MODEL, "prompt": "hi", **kw}


def _error(r: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == (type_, code), err
    assert err["message"]
    return err


def _stream_events(r: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_executor_error_before_any_token_is_500(http, sched, path, stream):
    sched.error = "executor_error"
    _error(http.post(path, json=_body(path, stream=stream)), 500, "server_error", "executor_error")


@pytest.mark.parametrize("path", PATHS)
def test_executor_error_after_some_tokens_is_500_without_streaming(http, sched, path):
    sched.reply, sched.fail_after = "one two three four five", 2
    _error(http.post(path, json=_body(path, max_tokens=10)), 500, "server_error", "executor_error")


@pytest.mark.parametrize("path", PATHS)
def test_queue_full_is_429_with_retry_after(http, sched, path):
    sched.error = "queue_full"
    r = http.post(path, json=_body(path))
    _error(r, 429, "rate_limit_error", "queue_full")
    assert int(r.headers["Retry-After"]) >= 1


def test_not_ready_is_503(http, sched):
    sched.error = "not_ready"
    _error(http.post("/v1/completions", json=_body("/v1/completions")), 503, "service_unavailable_error",
           "not_ready")


def test_scheduler_down_is_503_and_health_503_then_recovery():
    """A scheduler that goes away: the stream in flight ends with an engine_unavailable error
    event; /health answers 503 at once (its gateway's connect timeout is far longer than the
    client's timeout); new requests get 503 engine_unavailable (after the default 2 s wait for a
    scheduler); a scheduler back on the same address is served again."""
    tok = gateway_tokenizer()
    first = FakeScheduler(tok, reply=" ".join(["tok"] * 200), token_delay=0.02)
    addr = first.addr
    with serve_gateway(first, MODEL, stats_ttl=0.0, client_options={"connect_timeout": 120.0}) as patient, \
            serve_gateway(first, MODEL, stats_ttl=0.0) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for url in (patient.url, srv.url):
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        with httpx.stream("POST", f"{patient.url}/v1/completions", timeout=60,
                          json=_body("/v1/completions", stream=True, max_tokens=200)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            first.close()                                     # the scheduler dies mid-stream
            rest = [line for line in lines if line.startswith("data: ")]
        errors = [json.loads(line[6:])["error"] for line in rest if '"error"' in line]
        assert errors and errors[0]["code"] == "engine_unavailable", rest[-3:]
        health = httpx.get(f"{patient.url}/health", timeout=30)    # would wait 120 s if not at once
        assert health.status_code == 503 and health.json()["error"]["code"] == "not_ready"
        _error(c.post("/v1/completions", json=_body("/v1/completions")), 503, "service_unavailable_error",
               "engine_unavailable")
        _error(c.post("/v1/chat/completions", json=_body("/v1/chat/completions", stream=True)), 503,
               "service_unavailable_error", "engine_unavailable")
        second = FakeScheduler(tok, addr=addr)                 # restarted where the gateways expect it
        try:
            for url in (patient.url, srv.url):
                assert second.wait_for(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 200), url
                r = httpx.post(f"{url}/v1/completions", json=_body("/v1/completions"), timeout=30)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world!"
        finally:
            second.close()
