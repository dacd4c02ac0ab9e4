"""Structured outputs and tool calls over HTTP: `pagedserve serve` on the default model (three
processes; the scheduler loads the tokenizer from --model), the official openai client. JSON
Schemas validate, choices match, forced tool calls always carry valid arguments (streamed ones
assembled by the client's own stream helper), bad constraints are 400s naming the field, and
the engine drains with every block free."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from benchmarks.structured_cases import SCHEMAS, prompt_for

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["timezone"],
        "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a time zone",
                                           "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture
def server(default_server):
    return default_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


def test_json_schemas_validate_over_http(server, client):
    for description, schema in SCHEMAS[:6]:
        out = client.chat.completions.create(
            model=server[1], messages=prompt_for(description), max_tokens=160, temperature=0.7, seed=7,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_completions_take_vllms_structured_outputs(server, client):
    out = client.completions.create(model=server[1], prompt="The sky is", max_tokens=8, n=3, temperature=1.0,
                                    extra_body={"structured_outputs": {"choice": ["blue", "grey", "red"]}})
    assert sorted(c.finish_reason for c in out.choices) == ["stop"] * 3
    assert {c.text for c in out.choices} <= {"blue", "grey", "red"}


def test_a_named_tool_always_gets_valid_arguments(server, client):
    for seed in (1, 2, 3):
        out = client.chat.completions.create(
            model=server[1], messages=ASK, tools=TOOLS, max_tokens=96, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and call.id
        jsonschema.validate(json.loads(call.function.arguments), TIME)


def test_required_tool_calls_stream_and_assemble_in_the_openai_client(server, client):
    with client.chat.completions.stream(model=server[1], messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=160, temperature=0.0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1                       # parallel_tool_calls defaults true
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_auto_tool_choice_answers_with_text_or_calls_that_parse(server, client):
    out = client.chat.completions.create(model=server[1], messages=ASK, tools=TOOLS, max_tokens=96,
                                         temperature=0.0)
    message = out.choices[0].message
    if message.tool_calls:                                           # the small model may just answer
        assert out.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.function.name in SCHEMA_OF
            json.loads(call.function.arguments)
    else:
        assert message.content


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
])
def test_bad_constraints_are_400s_naming_the_field(server, body, param):
    base, model = server
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": model, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(server, client):
    out = client.chat.completions.create(model=server[1], messages=ASK, max_tokens=5,
                                         extra_body={"structured_outputs": {"regex": "[0-9]{40}"}})
    assert out.choices[0].finish_reason == "length"


def test_every_block_is_free_after_the_structured_requests(server):
    base = server[0]
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    used = [line for line in metrics.splitlines() if line.startswith("pagedserve:kv_cache_usage_perc")]
    assert used and all(float(line.split()[-1]) == 0.0 for line in used), used
