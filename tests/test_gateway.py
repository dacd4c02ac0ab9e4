"""The OpenAI-compatible gateway against a scripted scheduler (tests/fake_scheduler.py).

A real uvicorn serves the app on a free port in a thread; clients are httpx and the official
`openai` package. No model runs: the fake scheduler streams the tokens of a scripted reply.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.gateway.detokenizer import IncrementalDetokenizer, StopStringMatcher, make_decode  # noqa: E402
from services.gateway.engine_client import EngineClient  # noqa: E402
from services.gateway.server import build_app  # noqa: E402
from tests.fake_scheduler import FakeScheduler, gateway_tokenizer  # noqa: E402
from tests.gateway_harness import fake, http, sched, serve_gateway  # noqa: E402,F401 (fixtures)

MODEL = "smol-test"
API_KEY = "sk-test-secret"
MAX_BODY = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tokenizer():
    return gateway_tokenizer()


@pytest.fixture(scope="module")
def server(fake):
    with serve_gateway(fake, MODEL, stats_ttl=0.05, max_model_len=0, max_body_bytes=MAX_BODY) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(fake):
    with serve_gateway(fake, MODEL, max_model_len=128, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def _chat(**kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
    body.update(kw)
    return body


def _sse_events(text: str) -> list:
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line."""
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# --------------------------------------------------------------------------------------------
# detokenizer and stop strings (units)


def test_detokenizer_holds_back_split_emoji(tokenizer):
    text = "Hi 😀 there 日本語 🎉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decode = make_decode(tokenizer)
    single = [decode([i]) for i in ids]
    assert any("\ufffd" in s for s in single), "the test needs a character split across tokens"
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # at least one token produced no text until its character completed


def test_detokenizer_byte_level_synthetic():
    """Tokens are raw bytes; an emoji's 4 bytes arrive one token at a time."""
    vocab = {i: bytes([i]) for i in range(256)}
    decode = lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    data = "a😀b€".encode()
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.push([b]) for b in data]
    assert deltas == ["a", "", "", "", "😀", "b", "", "", "€"]


def test_stop_string_spanning_deltas_is_never_emitted():
    m = StopStringMatcher(["STOP", "xyz"])
    out = [m.feed(d) for d in ["Hello S", "T", "ill ST", "O", "P and more"]]
    assert "".join(out) == "Hello STill "
    assert m.stopped and m.text == "Hello STill "
    assert out[0] == "Hello " and out[1] == ""   # "S" / "ST" held back as possible stop prefixes
    assert m.feed("ignored") == ""


def test_stop_earliest_match_and_release_on_finish():
    m = StopStringMatcher(["bc", "abcd"])
    assert m.feed("xab") == "x"
    assert m.feed("cd") == "" and m.stopped and m.text == "x"   # "abcd" starts first
    m2 = StopStringMatcher(["END"])
    assert m2.feed("the E") == "the "
    assert m2.finish() == "E" and not m2.stopped


# --------------------------------------------------------------------------------------------
# happy paths


def test_chat_non_streaming_openai_client(client, sched):
    sched.reply = "Hello there, friend!"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=50, temperature=0.5, top_p=0.9, seed=7,
                                       presence_penalty=0.1, frequency_penalty=0.2, logit_bias={"42": -100, "7": 2.5},
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "stop_token_ids": [7], "ignore_eos": True,
                                                   "min_tokens": 2})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello there, friend!"
    assert r.choices[0].finish_reason == "stop"
    n_reply = len(sched.tokenizer.encode("Hello there, friend!", add_special_tokens=False))
    add = sched.requests[-1]
    assert r.usage.completion_tokens == n_reply + 1            # + EOS
    assert r.usage.prompt_tokens == len(add.prompt_token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    s = add.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.top_k, s.min_p) == (50, 0.5, 0.9, 7, 5, 0.05)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.1, 0.2, 1.1)
    assert (s.stop_token_ids, s.ignore_eos, s.min_tokens, s.n, s.logprobs) == ([7], True, 2, 1, None)
    assert s.logit_bias == {42: -100.0, 7: 2.5}
    # the chat template was applied
    prompt = sched.tokenizer.decode(add.prompt_token_ids)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_chat_streaming_openai_client_with_usage(client, sched):
    sched.reply = "Streaming 😀 works."
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streaming 😀 works."
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(sched.tokenizer.encode(sched.reply, add_special_tokens=False)) + 1
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_chat_stream_wire_format(http, sched):
    sched.reply = "One two three"
    r = http.post("/v1/chat/completions", json=_chat(stream=True, max_tokens=2))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e or e["usage"] is None for e in events)    # no include_usage
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "One two"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_failing_mid_way_ends_with_one_error_event_then_done(http, sched, path):
    """The tokens sent so far, then the error instead of a finish reason or the usage chunk."""
    sched.reply, sched.fail_after = "one two three four five", 2
    body = _chat() if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "x"}
    r = http.post(path, json=dict(body, stream=True, max_tokens=10, stream_options={"include_usage": True}))
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert "error" in events[-1] and events[-1]["error"]["code"] == "executor_error", events[-1]
    assert not any("error" in e for e in events[:-1])
    chunks = events[:-1]
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert any(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


def test_completions_token_ids_prompt_length_limit(client, sched):
    sched.reply = "alpha beta gamma delta epsilon"
    r = client.completions.create(model=MODEL, prompt=[19556, 905], max_tokens=3)
    assert sched.requests[-1].prompt_token_ids == [19556, 905]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens == 2
    assert r.choices[0].text == sched.tokenizer.decode(
        sched.tokenizer.encode(sched.reply, add_special_tokens=False)[:3])


def test_completions_streaming_openai_client(client, sched):
    sched.reply = "Once upon a time"
    chunks = list(client.completions.create(model=MODEL, prompt="Tell a story", stream=True,
                                            max_tokens=20, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon a time"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == len(sched.tokenizer.encode("Tell a story"))


def test_completions_default_max_tokens_is_16(http, sched):
    sched.reply = " ".join(["word"] * 40)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).json()
    assert sched.requests[-1].sampling.max_tokens == 16
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"


def test_n2_streaming_one_chunk_per_index(http, sched):
    sched.reply = "same answer"
    r = http.post("/v1/chat/completions", json=_chat(stream=True, n=2))
    events = _sse_events(r.text)
    assert all(len(e["choices"]) == 1 for e in events)
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == "same answer"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    assert sched.requests[-1].sampling.n == 2


def test_n2_non_streaming(client, sched):
    sched.reply = "twice"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "twice" for c in r.choices)
    assert r.usage.completion_tokens == 2 * (len(sched.tokenizer.encode("twice", add_special_tokens=False)) + 1)


def test_stop_string_spanning_tokens(client, sched, http):
    sched.reply = "The answer is forty-two. Then more text follows here."
    sched.token_delay = 0.002
    ids = sched.tokenizer.encode(sched.reply, add_special_tokens=False)
    stop = "rty-tw"      # spans the tokens of "forty-two"
    assert all(stop not in sched.tokenizer.decode([i]) for i in ids)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], stop=stop)
    assert r.choices[0].message.content == "The answer is fo"
    assert r.choices[0].finish_reason == "stop"
    assert sched.wait_for_abort(r.id) == [r.id]          # the scheduler was told to stop
    # streaming: the stop string (or a prefix of it) never reaches the client
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "q", "stream": True,
                                               "stop": ["nothing", "two."], "max_tokens": 100})
    events = _sse_events(resp.text)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == "The answer is forty-"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def _no_abort_pending(http, sched, request_id: str) -> bool:
    """True if the gateway sent no whole-request abort for ``request_id``: a later request on the
    same (ordered) scheduler connection is seen first, so an abort sent before it was recorded."""
    http.post("/v1/completions", json={"model": MODEL, "prompt": "barrier", "max_tokens": 1})
    assert sched.requests[-1].prompt_token_ids and sched.wait_for(lambda: not sched._active)
    return request_id not in sched.aborted


def test_n2_stop_string_stops_only_that_sample_at_the_scheduler(client, sched, http):
    """Sample 0 holds after its stop string until the gateway aborts that sample; sample 1 runs to
    its end, so the request needs no abort. The abort frame is sent before the response ends, but the
    fake scheduler's thread may handle it a moment after the client has the response: wait for it."""
    sched.sample_replies = ["Alpha STOP" + " tail" * 40, "Beta" + " goes" * 20 + " on."]
    head = len(sched.tokenizer.encode("Alpha STOP", add_special_tokens=False))
    assert sched.tokenizer.encode(sched.sample_replies[0], add_special_tokens=False)[:head] == \
        sched.tokenizer.encode("Alpha STOP", add_special_tokens=False)
    sched.hold_after = {0: head}
    generated = sched.generated
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], n=2,
                                       stop="STOP", max_tokens=200)
    assert [(c.index, c.message.content, c.finish_reason) for c in r.choices] == [
        (0, "Alpha ", "stop"), (1, sched.sample_replies[1], "stop")]
    assert sched.wait_for(lambda: sched.aborted_samples, timeout=5) == [(r.id, 0)]
    full_1 = len(sched.tokenizer.encode(sched.sample_replies[1], add_special_tokens=False)) + 1
    assert sched.generated - generated == head + full_1     # sample 0's tail was never generated
    assert r.usage.completion_tokens == sched.generated - generated
    assert _no_abort_pending(http, sched, r.id)             # sample 1 finished: nothing to abort


def test_n2_streaming_each_sample_stops_on_its_own_stop_string(http, sched):
    sched.sample_replies = ["one STOP" + " tail" * 30, "two two two two STOP" + " tail" * 30]
    sched.token_delay = 0.01
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "q", "stream": True, "n": 2,
                                           "stop": ["STOP"], "max_tokens": 100})
    events = _sse_events(r.text)
    rid = events[0]["id"]
    for i, text in enumerate(["one ", "two two two two "]):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    # the first to stop: that sample only (handled by the fake's thread maybe after the response)
    assert sched.wait_for(lambda: sched.aborted_samples, timeout=5) == [(rid, 0)]
    assert sched.wait_for_abort(rid) == [rid]            # the last to stop: the whole request


def test_chat_logprobs(client, sched):
    sched.reply = "Yes indeed"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       logprobs=True, top_logprobs=2)
    assert sched.requests[-1].sampling.logprobs == 2
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert content[0].token == "Yes" and content[0].logprob == -0.25 and len(content[0].top_logprobs) == 2


def test_completion_logprobs(http, sched):
    sched.reply = "Yes indeed"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"][:2] == ["Yes", " indeed"] and lp["text_offset"][:2] == [0, 3]
    assert lp["top_logprobs"][0] == {"Yes": -0.25}


def test_models_health_openapi(http, sched):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 256
    assert http.get("/health").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


def test_metrics(http, sched):
    http.post("/v1/chat/completions", json=_chat())
    text = http.get("/metrics").text
    for name in ["num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "kv_cache_usage_perc", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_count", "prefix_cache_evictions_total", "recomputed_tokens_total",
                 "swapped_out_blocks_total", "swapped_in_blocks_total", "num_repeat_preemptions_total"]:
        assert f"pagedserve:{name}" in text, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    labels = (("engine", "0"), ("model_name", MODEL))
    assert samples[("pagedserve:prefix_cache_hits_total", labels)] == 4.0
    assert samples[("pagedserve:e2e_request_latency_seconds_count", labels)] >= 1.0     # the app serves the module
    count = [line for line in text.splitlines()
             if line.startswith("pagedserve:time_to_first_token_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1


def test_two_apps_have_separate_registries(fake, tokenizer):
    a = build_app(EngineClient(fake.addr), tokenizer, "a")
    b = build_app(EngineClient(fake.addr), tokenizer, "b")
    assert a.state.gateway.metrics.registry is not b.state.gateway.metrics.registry


# --------------------------------------------------------------------------------------------
# errors


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("body, param", [
    ({"n": 0}, "n"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"messages": []}, "messages"), ({"top_logprobs": 50}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_400_invalid_params(http, sched, body, param):
    err = _err(http.post("/v1/chat/completions", json=_chat(**body)), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert not sched.requests
    assert http.get("/health").status_code == 200       # still serving


def test_400_bad_json_and_bad_prompt(http, sched):
    _err(http.post("/v1/chat/completions", content=b"{not json"), 400)
    assert _err(http.post("/v1/completions", json={"model": MODEL, "prompt": [[1], [2]]}), 400)["param"] == "prompt"
    assert _err(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)["param"] == "prompt"


def test_400_prompt_longer_than_context(http, sched):
    sched.max_model_len = 256
    err = _err(http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(300))}), 400)
    assert "256" in err["message"] and "300" in err["message"] and err["code"] == "context_length_exceeded"
    err = _err(http.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 200, "max_tokens": 100}), 400)
    assert "256" in err["message"] and "300" in err["message"]
    assert not sched.requests


def test_400_scheduler_too_long(http, sched):
    sched.error = "too_long"
    err = _err(http.post("/v1/chat/completions", json=_chat()), 400)
    assert err["code"] == "too_long" and err["param"] == "messages"


def test_401_wrong_api_key(keyed_server, sched):
    url = keyed_server.url
    assert _err(httpx.post(url + "/v1/chat/completions", json=_chat()), 401)["type"] == "authentication_error"
    _err(httpx.post(url + "/v1/chat/completions", json=_chat(), headers={"Authorization": "Bearer nope"}), 401)
    ok = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}]).choices
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(url + "/health").status_code == 200   # health is open


def test_404_unknown_model(client, sched):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


def test_413_oversized_body(http, sched):
    err = _err(http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (MAX_BODY + 10)}), 413)
    assert str(MAX_BODY) in err["message"]
    # without a Content-Length header (chunked upload)
    r = http.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * (MAX_BODY + 10), b'"}']))
    _err(r, 413)


def test_429_queue_full_with_retry_after(http, client, sched):
    sched.error = "queue_full"
    r = http.post("/v1/chat/completions", json=_chat(stream=True))
    _err(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="x")


def test_503_not_ready(http, sched):
    sched.error = "not_ready"
    assert _err(http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)["code"] == "not_ready"
    sched.executor_ready = False                        # stats are cached (here for 0.05 s)
    assert sched.wait_for(lambda: http.get("/health").status_code == 503)
    sched.executor_ready = True
    assert sched.wait_for(lambda: http.get("/health").status_code == 200)


def test_unknown_route_is_openai_shaped(http):
    _err(http.get("/v1/nope"), 404)


# --------------------------------------------------------------------------------------------
# disconnects


def test_client_disconnect_mid_stream_aborts(server, sched):
    sched.reply = " ".join(["tok"] * 200)
    sched.token_delay = 0.02
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions", json=_chat(stream=True, max_tokens=200)) as r:
            rid = r.headers["x-request-id"]
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert got[0].startswith("data: ")
    assert sched.wait_for_abort(rid) == [rid]


def test_client_disconnect_non_streaming_aborts(server, sched):
    """The client leaves once its request is generating at the scheduler (held there: no race)."""
    sched.reply = " ".join(["tok"] * 200)
    sched.hold_after = {0: 3}
    before = sched.generated
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 200}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sched.wait_for(lambda: sched.generated > before and sched._active), "never generating"
    rid = sched.requests[-1].request_id
    assert sched.wait_for_abort(rid) == [rid]


# --------------------------------------------------------------------------------------------
# process hygiene


def test_gateway_imports_no_torch():
    code = ("import sys; import services.gateway.server; from shared.tokenizer import load_tokenizer; "
            "t = load_tokenizer(''); assert t.eos_token_id is not None; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# engine client and CLI


def test_concurrent_requests_are_routed_to_their_streams(server, sched):
    from concurrent.futures import ThreadPoolExecutor

    sched.token_delay = 0.001
    def call(i):
        with httpx.Client(base_url=server.url, timeout=20) as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": f"p{i}", "n": 1 + i % 3,
                                                "max_tokens": 2 + i})
            return i, r.json()

    sched.reply = "a b c d e f g h i j k l m n o p"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    want = sched.tokenizer.encode(sched.reply, add_special_tokens=False)
    for i, body in results:
        assert len(body["choices"]) == 1 + i % 3
        for ch in body["choices"]:
            assert ch["text"] == sched.tokenizer.decode(want[:2 + i]) and ch["finish_reason"] == "length"


def test_engine_client_spreads_over_schedulers(tokenizer):
    import asyncio

    from shared.messages import SamplingParams

    fakes = [FakeScheduler(tokenizer, reply="x " * 50, token_delay=0.01) for _ in range(2)]

    async def main():
        engine = EngineClient([f.addr for f in fakes])
        streams = [await engine.add(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=5)) for i in range(4)]
        counts = [sum(len(o.token_ids) for o in [o async for o in s]) for s in streams]
        stats = await engine.stats()
        await engine.close()
        return counts, stats

    try:
        counts, stats = asyncio.run(main())
        assert counts == [5] * 4
        assert [len(f.requests) for f in fakes] == [2, 2]
        assert stats.num_blocks == 200 and stats.executor_ready
    finally:
        for f in fakes:
            f.close()


def test_engine_client_routes_around_an_engine_whose_executor_is_not_ready(tokenizer):
    """Two schedulers, one still waiting for its executor: every request goes to the ready one
    (one of them would otherwise get not_ready), and to both once both are ready."""
    import asyncio

    from shared.messages import SamplingParams

    fakes = [FakeScheduler(tokenizer, reply="x " * 50, token_delay=0.01) for _ in range(2)]
    fakes[0].executor_ready = False

    async def main():
        engine = EngineClient([f.addr for f in fakes], stats_ttl=0.0)
        got = []
        for i in range(4):
            await engine.stats()                 # what the handlers do before each request
            got.append([o async for o in await engine.add(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2))])
        fakes[0].executor_ready = True
        await engine.stats()
        streams = [await engine.add(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=2)) for i in range(2)]
        for s in streams:
            got.append([o async for o in s])
        await engine.close()
        return got

    try:
        got = asyncio.run(main())
        assert all(sum(len(o.token_ids) for o in outs) == 2 for outs in got)
        assert [len(f.requests) for f in fakes] == [1, 5]
    finally:
        for f in fakes:
            f.close()


def test_metrics_carry_the_engine_label_of_each_scheduler(tokenizer):
    """Two schedulers behind one gateway: their stats come out under engine "0" and "1" (address
    order), and each request's latency and finish series under the engine that served it."""
    import asyncio

    from services.gateway.metrics import GatewayMetrics
    from shared.messages import SamplingParams

    fakes = [FakeScheduler(tokenizer, reply="x " * 50, token_delay=0.01) for _ in range(2)]
    fakes[1].num_blocks = 300

    async def main():
        engine = EngineClient([f.addr for f in fakes])
        metrics = GatewayMetrics(engine.engine_stats, MODEL)
        served, streams = [], []
        for i in range(4):                 # all in flight at once: they spread over both
            rid = f"r{i}"
            timer = metrics.timer()
            streams.append((timer, await engine.add(rid, [1 + i, 2, 3], SamplingParams(max_tokens=2))))
            timer.engine = engine.engine_of(rid)
            served.append(timer.engine)
        for timer, stream in streams:
            async for out in stream:
                timer.on_tokens(out.index, len(out.token_ids))
            timer.on_finish("length")
        await engine.stats()
        text = metrics.render().decode()
        await engine.close()
        return served, text

    try:
        served, text = asyncio.run(main())
    finally:
        for f in fakes:
            f.close()
    samples = {(x.name, x.labels.get("engine")): x.value
               for fam in text_string_to_metric_families(text) for x in fam.samples
               if x.labels.get("model_name") == MODEL}
    assert samples[("pagedserve:num_total_blocks", "0")] == 100
    assert samples[("pagedserve:num_total_blocks", "1")] == 300
    assert [len(f.requests) for f in fakes] == [served.count("0"), served.count("1")]
    for engine in ("0", "1"):
        assert samples.get(("pagedserve:time_to_first_token_seconds_count", engine), 0) == served.count(engine)
        assert samples.get(("pagedserve:request_success_total", engine), 0) == served.count(engine)


def test_cli_parses_and_rejects_bad_address(capsys):
    from services.cli import build_parser
    from services.gateway import cli as gateway_cli

    parser, module = build_parser(["gateway", "--scheduler-addr", "bogus"])
    assert module is gateway_cli
    args = parser.parse_args(["gateway", "--scheduler-addr", "bogus", "--port", "9", "--api-key", "k"])
    assert (args.port, args.api_key, args.max_model_len) == (9, "k", 0)
    assert gateway_cli.run(args) == 2
    assert "bogus" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# cache_salt (prefix-cache isolation)


@pytest.fixture(scope="module")
def salted_server(fake):
    with serve_gateway(fake, MODEL, max_model_len=128, prefix_cache_salt_required=True) as srv:
        yield srv


@pytest.mark.parametrize("route, body", [("/v1/chat/completions", _chat()),
                                         ("/v1/completions", {"model": MODEL, "prompt": "Say hello"})])
def test_cache_salt_reaches_the_scheduler(http, sched, route, body):
    assert http.post(route, json=dict(body, cache_salt="tenant-a")).status_code == 200
    assert sched.requests[-1].cache_salt == "tenant-a"
    assert http.post(route, json=body).status_code == 200
    assert sched.requests[-1].cache_salt is None


@pytest.mark.parametrize("salt", ["", 7, "x" * 257])
def test_a_bad_cache_salt_is_a_400_naming_it(http, sched, salt):
    for route, body in (("/v1/chat/completions", _chat()), ("/v1/completions", {"prompt": "x"})):
        assert _err(http.post(route, json=dict(body, cache_salt=salt)), 400)["param"] == "cache_salt"
    assert not sched.requests


def test_prefix_cache_salt_required_rejects_unsalted_requests(salted_server, sched):
    url = salted_server.url
    for route, body in (("/v1/chat/completions", _chat()), ("/v1/completions", {"prompt": "x"})):
        err = _err(httpx.post(url + route, json=body), 400)
        assert err["param"] == "cache_salt" and "--prefix-cache-salt-required" in err["message"]
        assert not sched.requests
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "cache_salt": "t"})
    assert r.status_code == 200 and sched.requests[-1].cache_salt == "t"


def test_the_gateway_command_passes_salt_required_to_the_app_and_routing_to_the_engine_client(monkeypatch):
    from types import SimpleNamespace

    import shared.model_path
    import shared.tokenizer
    from services.gateway import cli
    from services.cli import build_parser

    built = {}
    monkeypatch.setattr(shared.model_path, "resolve_model", lambda model: SimpleNamespace(name="m"))
    monkeypatch.setattr(shared.tokenizer, "load_tokenizer", lambda src: None)
    monkeypatch.setattr(cli, "EngineClient", lambda addrs, routing: built.setdefault("routing", routing))
    monkeypatch.setattr(cli, "serve", lambda app, *a, **kw: None)
    monkeypatch.setattr(cli, "build_app", lambda *a, **kw: built.setdefault("args", a))
    for argv, want, routing in (([], False, "prefix"), (["--prefix-cache-salt-required", "--routing", "round-robin"],
                                                        True, "round-robin")):
        built.clear()
        parser, _ = build_parser(["gateway"])
        assert cli.run(parser.parse_args(["gateway", "--scheduler-addr", "ipc:///x", *argv])) == 0
        assert built["args"][-1] is want and built["routing"] == routing


def test_pagedserve_top_once_reads_a_live_gateway(server, http):
    http.post("/v1/chat/completions", json=_chat())
    r = subprocess.run([sys.executable, "-m", "services.cli", "top", "--url", server.url, "--once",
                        "--interval", "0.2"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stderr
    assert "requests and KV cache" in r.stdout and "TTFT" in r.stdout and "ready" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "services.cli", "top", "--url", server.url + "/v1/models",
                          "--once"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "pagedserve top:" in bad.stderr and "Traceback" not in bad.stderr
