"""Limits and overload at the gateway, against the scripted scheduler (tests/fake_scheduler.py).

Every refused request gets an OpenAI-shaped 4xx naming the parameter, never reaches the
scheduler, and the server keeps serving. Overload: a bounded queue answers 429 with Retry-After,
and /health and /metrics answer while hundreds of streams are open.
"""
from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from services.gateway import protocol as P
from services.gateway.server import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_N
from tests.fake_scheduler import FakeScheduler, gateway_tokenizer
from tests.gateway_harness import fake, http, sched, serve_gateway  # noqa: F401 (fixtures)

MODEL = "smol-test"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(fake):
    with serve_gateway(fake, MODEL, stats_ttl=0.05) as srv:
        yield srv


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **kw}


def _refused(http: httpx.Client, sched: FakeScheduler, path: str, body: dict, param: str,
             status: int = 400) -> dict:
    """The request is refused with ``status`` naming ``param``, the scheduler never saw it, and the
    gateway still serves."""
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert not sched.requests
    assert http.get("/health").status_code == 200
    return err


# --------------------------------------------------------------------------------------------
# per-field limits

_STOP_MAX = ["s" * P.MAX_STOP_STRING_CHARS] * P.MAX_STOP_STRINGS


@pytest.mark.parametrize("fields, param", [
    ({"n": DEFAULT_MAX_N + 1}, "n"),
    ({"n": P.MAX_N + 1}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"stop": ["x"] * (P.MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "y" * (P.MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "z" * (P.MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ({"stop_token_ids": [1] * (P.MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ({"stop_token_ids": [10 ** 7]}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(P.MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"chat_template_kwargs": {"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}},
     "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
])
def test_chat_field_limits(http, sched, fields, param):
    err = _refused(http, sched, "/v1/chat/completions", _chat(**fields), param)
    assert err["type"] == "invalid_request_error"


def test_values_at_the_limits_are_accepted(http, sched):
    vocab = len(gateway_tokenizer())
    bias = {str(vocab - 1 - i): (-100 if i % 2 else 100) for i in range(P.MAX_LOGIT_BIAS)}
    r = http.post("/v1/chat/completions", json=_chat(
        n=DEFAULT_MAX_N, max_tokens=4, stop=_STOP_MAX, logit_bias=bias,
        stop_token_ids=[vocab - 1] * P.MAX_STOP_TOKEN_IDS, chat_template_kwargs={"enable_thinking": False}))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == DEFAULT_MAX_N
    assert sched.requests[-1].sampling.n == DEFAULT_MAX_N


def test_prompt_token_ids_must_be_in_the_vocabulary(http, sched):
    vocab = len(gateway_tokenizer())
    err = _refused(http, sched, "/v1/completions", {"prompt": [1, vocab], "max_tokens": 2}, "prompt")
    assert str(vocab) in err["message"]
    _refused(http, sched, "/v1/completions", {"prompt": [[vocab + 5]]}, "prompt")
    _refused(http, sched, "/v1/completions", {"prompt": [-1]}, "prompt")
    ok = http.post("/v1/completions", json={"prompt": [1, vocab - 1], "max_tokens": 2})
    assert ok.status_code == 200 and sched.requests[-1].prompt_token_ids == [1, vocab - 1]


def test_prompt_plus_max_tokens_beyond_the_context(http, sched):
    sched.max_model_len = 256
    err = _refused(http, sched, "/v1/chat/completions", _chat(max_completion_tokens=10 ** 6), "max_tokens")
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    err = _refused(http, sched, "/v1/completions", {"prompt": [7] * 256}, "prompt")
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("n, max_tokens, ok", [
    (1, 63, True),            # 64 tokens: exactly the 4 blocks
    (1, 64, False),           # 65 tokens: a 5th block
    (4, 63, True),            # samples are preempted and finish in turn: only one must fit
    (4, 100, False),
])
def test_request_larger_than_the_whole_kv_cache_is_400_not_a_stall(http, sched, n, max_tokens, ok):
    """Refused before the scheduler, which would cut such a sequence short at its capacity."""
    sched.num_blocks = 4                  # 4 blocks of 16 tokens
    time.sleep(0.1)                       # let the cached stats expire
    body = {"prompt": [5], "n": n, "max_tokens": max_tokens}
    if ok:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    else:
        err = _refused(http, sched, "/v1/completions", body, "max_tokens")
        assert err["code"] == "kv_cache_exceeded" and "4" in err["message"]


def test_default_max_tokens_fits_a_kv_cache_smaller_than_the_context(http, sched):
    """No max_tokens: the completion may fill what is left of the KV cache, not 400 for it."""
    sched.num_blocks = 4                  # 64 tokens of KV cache, context 256
    time.sleep(0.1)                       # let the cached stats expire
    r = http.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 200, r.text
    add = sched.requests[-1]
    assert add.sampling.max_tokens == 4 * 16 - len(add.prompt_token_ids)


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1])


def test_oversized_headers_are_refused_and_the_server_keeps_serving(server, http, sched):
    big = b"X-Junk: " + b"a" * (DEFAULT_MAX_HEADER_BYTES + 1024) + b"\r\n"
    reply = _raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + big + b"\r\n")
    assert _status(reply) == 431 and b"headers_too_large" in reply
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(DEFAULT_MAX_HEADER_BYTES // 8))
    assert _status(_raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + many + b"\r\n")) == 431
    # a header block far past the limit, sent in pieces, is cut off by the HTTP layer itself
    huge = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(100))
    assert _status(_raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + huge + b"\r\n")) \
        in (400, 431)
    # headers under the limit are fine, and the server is unharmed
    reply = _raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      b"X-Fine: " + b"b" * 1000 + b"\r\n\r\n")
    assert _status(reply) == 200
    assert http.post("/v1/chat/completions", json=_chat()).status_code == 200
    assert not sched.requests[:-1]


# --------------------------------------------------------------------------------------------
# overload


def test_bounded_queue_answers_429_with_retry_after_then_recovers(server, sched):
    """With room for 2 requests, a third gets 429 + Retry-After while they run (held after their
    first token until the test lets them go: no race); once they are done the next one is served."""
    sched.max_active, sched.hold_after = 2, {0: 1}
    sched.reply = " ".join(["tok"] * 20)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        streams = [c.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            r = c.post("/v1/chat/completions", json=_chat())
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert c.get("/health").status_code == 200
            sched.hold_after = None
            for resp in responses:
                assert resp.read().endswith(b"data: [DONE]\n\n")
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        ok = c.post("/v1/chat/completions", json=_chat())
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop"


def test_health_and_metrics_answer_while_200_streams_are_open(server, sched):
    """A liveness check under load (generous timeout), not a latency threshold. Then every client
    leaves and every request is aborted at the scheduler."""
    sched.reply = " ".join(["tok"] * 500)
    sched.token_delay = 0.2
    num_streams = 200

    async def main():
        limits = httpx.Limits(max_connections=num_streams + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            opened = asyncio.Event()
            started = 0
            release = asyncio.Event()

            async def stream(i: int) -> str:
                nonlocal started
                async with c.stream("POST", "/v1/completions",
                                    json={"prompt": f"p{i}", "stream": True, "max_tokens": 200}) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
                    started += 1
                    if started == num_streams:
                        opened.set()
                    await release.wait()
                    return r.headers["x-request-id"]

            tasks = [asyncio.create_task(stream(i)) for i in range(num_streams)]
            waiter = asyncio.create_task(opened.wait())
            await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in tasks if t.done()]
            if failed or not opened.is_set():
                release.set()
                waiter.cancel()
                await asyncio.gather(*tasks)        # raises the first stream's failure
                raise AssertionError(f"only {started} of {num_streams} streams opened")
            health = await asyncio.wait_for(c.get("/health"), 10)
            metrics = await asyncio.wait_for(c.get("/metrics"), 10)
            release.set()
            ids = await asyncio.gather(*tasks)
            return health, metrics, ids

    health, metrics, ids = asyncio.run(main())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert metrics.status_code == 200 and "pagedserve:num_requests_running" in metrics.text
    deadline = time.monotonic() + 20
    while set(ids) - set(sched.aborted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(ids) <= set(sched.aborted)          # every stream the clients left was aborted
    assert not sched._active
