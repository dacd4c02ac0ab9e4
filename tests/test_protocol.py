"""The gateway's request models on their own (unit tier): what each OpenAI field becomes on the
wire, and which parameter a bad body names. The HTTP tests (test_gateway, test_limits) cover the
same fields through a server; these pin the mapping without one."""
from __future__ import annotations

import json

import pytest

from services.gateway.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart,
                                       InvalidRequest, decode_request)
from shared.messages import SamplingParams

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def chat(**fields) -> ChatCompletionRequest:
    return decode_request(json.dumps({**CHAT, **fields}).encode(), ChatCompletionRequest)


def completion(**fields) -> CompletionRequest:
    return decode_request(json.dumps({"prompt": "hi", **fields}).encode(), CompletionRequest)


def test_unset_fields_keep_the_engine_defaults():
    assert chat().to_sampling(max_tokens=7) == SamplingParams(max_tokens=7)
    assert completion().to_sampling(max_tokens=7) == SamplingParams(max_tokens=7)


def test_every_sampling_field_reaches_the_wire():
    fields = dict(n=3, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
                  presence_penalty=0.3, frequency_penalty=-0.4, seed=11, ignore_eos=True, min_tokens=2,
                  stop_token_ids=[4, 5])
    got = completion(**fields, logit_bias={"9": -3.0}, logprobs=2).to_sampling(max_tokens=8)
    assert got == SamplingParams(max_tokens=8, logit_bias={9: -3.0}, logprobs=2, **fields)


def test_min_tokens_is_clamped_to_max_tokens():
    assert chat(min_tokens=10).to_sampling(max_tokens=4).min_tokens == 4
    assert chat(min_tokens=3).to_sampling(max_tokens=4).min_tokens == 3


@pytest.mark.parametrize("stop, expected", [(None, []), ("end", ["end"]), (["a", "", "b"], ["a", "b"]),
                                            ("", [])])
def test_stop_strings(stop, expected):
    assert chat(stop=stop).stop_strings == expected


def test_include_usage_needs_stream_options():
    assert not chat().include_usage
    assert not chat(stream_options={"include_usage": False}).include_usage
    assert chat(stream_options={"include_usage": True}).include_usage


def test_chat_prefers_max_completion_tokens():
    assert chat().requested_max_tokens() is None
    assert chat(max_tokens=5).requested_max_tokens() == 5
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens() == 9
    assert completion(max_tokens=6).requested_max_tokens() == 6


@pytest.mark.parametrize("fields, expected", [({}, None), ({"logprobs": False, "top_logprobs": 3}, None),
                                              ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3)])
def test_chat_logprobs(fields, expected):
    assert chat(**fields).requested_logprobs() == expected
    assert chat(**fields).to_sampling(max_tokens=1).logprobs == expected


def test_completion_logprobs():
    assert completion().requested_logprobs() is None
    assert completion(logprobs=0).requested_logprobs() == 0
    assert completion(logprobs=4).requested_logprobs() == 4


def test_token_id_fields_name_their_parameter():
    req = chat(stop_token_ids=[7], logit_bias={"3": 1.0, "5": -1.0})
    assert req.token_id_fields() == {"stop_token_ids": [7], "logit_bias": [3, 5]}
    assert chat().token_id_fields() == {"stop_token_ids": [], "logit_bias": []}


def test_message_text():
    assert ChatMessage(role="user").text() == ""
    assert ChatMessage(role="user", content="x").text() == "x"
    parts = [ContentPart(type="text", text="a"), ContentPart(type="text", text="b")]
    assert ChatMessage(role="user", content=parts).text() == "ab"
    with pytest.raises(ValueError, match="image_url"):
        ChatMessage(role="user", content=[ContentPart(type="image_url")]).text()
    with pytest.raises(ValueError, match="text only"):
        ChatMessage(role="user", content=[ContentPart(type="text")]).text()


@pytest.mark.parametrize("prompt, expected", [("hi", "hi"), ([1, 2], [1, 2]), (["hi"], "hi"), ([[3, 4]], [3, 4])])
def test_single_prompt(prompt, expected):
    assert completion(prompt=prompt).single_prompt() == expected


@pytest.mark.parametrize("prompt, message", [(["a", "b"], "batched"), ([[1], [2]], "batched"),
                                             ([[]], "must not be empty")])
def test_single_prompt_refuses_batches_and_empty_token_lists(prompt, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        completion(prompt=prompt).single_prompt()
    assert e.value.param == "prompt"


@pytest.mark.parametrize("fields, param", [({"temperature": 11}, "temperature"), ({"n": 0}, "n"),
                                           ({"top_p": 0}, "top_p"), ({"messages": []}, "messages")])
def test_a_bad_value_names_its_parameter(fields, param):
    with pytest.raises(InvalidRequest) as e:
        chat(**fields)
    assert e.value.param == param


def test_a_body_that_is_not_json_names_no_parameter():
    with pytest.raises(InvalidRequest, match="not valid JSON") as e:
        decode_request(b"{", ChatCompletionRequest)
    assert e.value.param is None
