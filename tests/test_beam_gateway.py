"""Beam search over HTTP (vLLM's extras ``use_beam_search`` with ``n`` as the beam width,
``length_penalty``, ``early_stopping``) against the scripted scheduler, which answers a beam
request with its n hypotheses whole, in one message, as the real one does: the mapping to
SamplingParams, the n choices (index = rank), and a 400 naming the parameter for everything that
does not fit beam search."""
from __future__ import annotations

import json

import openai
import pytest

from services.gateway import protocol as P
from tests.gateway_harness import fake, http, sched, serve_gateway  # noqa: F401 (fixtures)

MODEL = "smol-test"
MAX_N = 12           # above the beam limit, so both limits can be hit


@pytest.fixture(scope="module")
def server(fake):
    with serve_gateway(fake, MODEL, stats_ttl=0.05, max_model_len=0, max_n=MAX_N) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def completion(**fields):
    return P.decode_request(json.dumps({"prompt": "hi", **fields}).encode(), P.CompletionRequest)


def test_beam_fields_map_to_sampling_params():
    s = completion(use_beam_search=True, n=3, length_penalty=0.5, early_stopping=True).to_sampling(20)
    assert (s.use_beam_search, s.n, s.length_penalty, s.early_stopping, s.temperature, s.max_tokens) == \
        (True, 3, 0.5, True, 0.0, 20)
    s = completion(use_beam_search=True, n=2, temperature=0).to_sampling(5)
    assert (s.use_beam_search, s.length_penalty, s.early_stopping, s.temperature) == (True, 1.0, False, 0.0)
    assert not completion(n=2).to_sampling(5).use_beam_search


def test_completions_n_choices_best_first(client, sched):
    sched.sample_replies = ["the best one", "second best", "third"]
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=10,
                                  extra_body={"use_beam_search": True, "n": 3, "length_penalty": 0.8})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == ["the best one", "second best", "third"]
    assert [c.finish_reason for c in r.choices] == ["stop"] * 3
    sent = sched.requests[-1].sampling
    assert (sent.use_beam_search, sent.n, sent.length_penalty, sent.temperature) == (True, 3, 0.8, 0.0)
    tokens = sum(len(sched.tokenizer.encode(t, add_special_tokens=False)) + 1 for t in sched.sample_replies)
    assert r.usage.completion_tokens == tokens


def test_chat_n_choices_and_length(client, sched):
    sched.reply = "a long answer that is cut at four tokens"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body={"use_beam_search": True, "n": 2, "early_stopping": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert all(c.message.content and c.message.role == "assistant" for c in r.choices)
    assert sched.requests[-1].sampling.early_stopping is True


BEAM = {"use_beam_search": True, "n": 2}


@pytest.mark.parametrize("path, fields, param", [
    ("completions", {"stream": True}, "stream"),
    ("chat", {"stream": True}, "stream"),
    ("completions", {"temperature": 0.7}, "temperature"),
    ("completions", {"top_p": 0.9}, "top_p"),
    ("completions", {"top_k": 5}, "top_k"),
    ("completions", {"min_p": 0.1}, "min_p"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ("completions", {"seed": 1}, "seed"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"logit_bias": {"5": 1.0}}, "logit_bias"),
    ("completions", {"min_tokens": 2}, "min_tokens"),
    ("completions", {"ignore_eos": True}, "ignore_eos"),
    ("completions", {"stop": ["x"]}, "stop"),
    ("completions", {"stop_token_ids": [5]}, "stop_token_ids"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("completions", {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "tool_choice": "required"}, "tool_choice"),
    ("completions", {"n": MAX_N + 1}, "n"),                 # above --max-n
    ("completions", {"n": P.MAX_BEAM_WIDTH + 1}, "n"),      # above what the scheduler takes
    ("completions", {"use_beam_search": False, "length_penalty": 0.5}, "length_penalty"),
    ("chat", {"use_beam_search": False, "early_stopping": True}, "early_stopping"),
])
def test_400_names_the_parameter_that_does_not_fit_beam_search(http, sched, path, fields, param):
    body = {"model": MODEL, "max_tokens": 4, **BEAM, **fields}
    if path == "chat":
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    r = http.post(f"/v1/{'chat/completions' if path == 'chat' else 'completions'}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert not sched.requests


def test_neutral_values_are_accepted_with_beams(client, sched):
    """Values that change nothing (temperature 0, top_p 1, top_k -1, no stop) are not refused."""
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0, top_p=1, stop=[],
                                  extra_body={"use_beam_search": True, "n": 2, "top_k": -1})
    assert len(r.choices) == 2
