"""Tool calls through the gateway with a scripted scheduler that replies with recorded-style
model outputs: tool_choice auto parses them (the default model's list format, and Hermes' one
block per call), whole and streamed, and the official openai client assembles the streamed
calls; the scheduler receives the constraint for required / named choices and the tools in the
prompt."""
from __future__ import annotations

import json

import pytest

from shared.messages import GrammarSpec
from tests.gateway_harness import fake, sched, serve_gateway  # noqa: F401 (fixtures)

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]
SMOLLM2_REPLY = ('I will check.\n<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
                 '{"name": "get_weather", "arguments": {"city": "Rome"}}\n]</tool_call>')
HERMES_REPLY = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.fixture(scope="module", params=["smollm2", "hermes"])
def gateway(request, fake):  # noqa: F811
    with serve_gateway(fake, "smol-test", max_model_len=2048, tool_call_parser=request.param) as srv:
        yield request.param, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def reply_for(parser: str) -> str:
    return SMOLLM2_REPLY if parser == "smollm2" else HERMES_REPLY


def test_auto_parses_the_models_tool_calls(gateway, sched):  # noqa: F811
    parser, client = gateway
    sched.reply = reply_for(parser)
    out = client.chat.completions.create(model="smol-test", messages=ASK, tools=TOOLS, max_tokens=200)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert len({c.id for c in calls}) == 2
    assert choice.message.content == ("I will check." if parser == "smollm2" else None)
    prompt = sched.tokenizer.decode(sched.requests[-1].prompt_token_ids)
    assert "get_weather" in prompt and "<tools>" in prompt          # the tools reached the prompt
    assert sched.requests[-1].grammar is None                        # auto: the output is free


def test_streamed_calls_assemble_in_the_openai_client(gateway, sched):  # noqa: F811
    parser, client = gateway
    sched.reply = reply_for(parser)
    with client.chat.completions.stream(model="smol-test", messages=ASK, tools=TOOLS, max_tokens=200) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == ["Paris", "Rome"]


def test_a_reply_without_calls_is_plain_content(gateway, sched):  # noqa: F811
    _, client = gateway
    sched.reply = "It is sunny in Paris."
    out = client.chat.completions.create(model="smol-test", messages=ASK, tools=TOOLS, max_tokens=200)
    assert out.choices[0].message.content == "It is sunny in Paris." and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def test_named_and_required_choices_send_their_constraint(gateway, sched):  # noqa: F811
    _, client = gateway
    sched.reply = '{"city": "Oslo"}'
    out = client.chat.completions.create(model="smol-test", messages=ASK, tools=TOOLS, max_tokens=200,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert sched.requests[-1].grammar == GrammarSpec("json_schema", json.dumps(WEATHER, ensure_ascii=False))
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    sched.reply = '[{"name": "get_time", "arguments": {}}]'
    out = client.chat.completions.create(model="smol-test", messages=ASK, tools=TOOLS, max_tokens=200,
                                         tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(sched.requests[-1].grammar.value)
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_time"]


def test_earlier_calls_and_tool_results_reach_the_prompt(gateway, sched):  # noqa: F811
    _, client = gateway
    sched.reply = "Paris: 18 C."
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    out = client.chat.completions.create(model="smol-test", messages=history, tools=TOOLS, max_tokens=200)
    assert out.choices[0].message.content == "Paris: 18 C."
    prompt = sched.tokenizer.decode(sched.requests[-1].prompt_token_ids)
    assert "<tool_response>" in prompt and "18 C" in prompt and '"city": "Paris"' in prompt
