"""The gateway's reading of structured-output fields (services/gateway/structured.py) and of
fields it does not implement (protocol.decode_request): every bad input is an InvalidRequest
naming its parameter, every good one one GrammarSpec."""
from __future__ import annotations

import json
import logging

import pytest

from services.gateway import protocol as P
from services.gateway.structured import grammar_of
from shared.messages import GrammarSpec


def chat(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return P.decode_request(json.dumps(body).encode(), P.ChatCompletionRequest)


def completion(**fields):
    return P.decode_request(json.dumps({"prompt": "hi", **fields}).encode(), P.CompletionRequest)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, want", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, GrammarSpec("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     GrammarSpec("json_schema", json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": SCHEMA}}, GrammarSpec("json_schema", json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, GrammarSpec("json_schema", json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "[a-z]+"}}, GrammarSpec("regex", "[a-z]+")),
    ({"structured_outputs": {"choice": ["a", "b c"]}}, GrammarSpec("choice", '["a", "b c"]')),
    ({"structured_outputs": {"grammar": 'start: "x"'}}, GrammarSpec("lark", 'start: "x"')),
    ({"structured_outputs": {"json_object": True, "disable_any_whitespace": True}}, GrammarSpec("json_object")),
])
def test_each_field_becomes_one_grammar(fields, want):
    assert grammar_of(chat(**fields)) == want
    assert grammar_of(completion(**fields)) == want


def test_gbnf_grammars_are_converted_to_lark():
    spec = grammar_of(chat(structured_outputs={"grammar": 'root ::= "yes" | "no"'}))
    assert spec.kind == "lark" and "start" in spec.value


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format", "invalid JSON Schema at type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"minimum": "x"}}}},
     "response_format", "minimum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"schema": {"type": "string", "format": "weird"}}}},
     "response_format", "weird"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs", "nowhere"),
    ({"structured_outputs": {"grammar": "root ::= ((("}}, "structured_outputs", "GBNF"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", None),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"structured_outputs": {"json_object": True, "disable_any_whitespace": False}},
     "structured_outputs", "disable_any_whitespace"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", "not both"),
])
def test_bad_constraints_name_their_field(fields, param, words):
    with pytest.raises(P.InvalidRequest) as e:
        grammar_of(chat(**fields))
    assert e.value.param == param
    if words:
        assert words in e.value.message


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("guided_json", {"type": "object"}),
    ("guided_regex", "a"), ("guided_choice", ["a"]), ("guided_grammar", "x"),
    ("best_of", 3), ("suffix", "x"), ("prediction", {"type": "content", "content": "x"}),
    ("audio", {"voice": "alloy"}), ("modalities", ["text", "audio"]), ("reasoning_effort", "low"),
])
def test_fields_other_apis_define_but_pagedserve_does_not_implement_are_refused(field, value):
    with pytest.raises(P.InvalidRequest) as e:
        chat(**{field: value})
    assert e.value.param == field


@pytest.mark.parametrize("field, value", [("best_of", 1), ("modalities", ["text"]),
                                          ("functions", None), ("suffix", None)])
def test_those_fields_at_values_that_change_nothing_are_accepted(field, value):
    chat(**{field: value})


def test_fields_no_api_defines_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.DEBUG, logger="pagedserve.gateway"):
        req = chat(frobnicate=1, store=True)
    assert req.messages[0].content == "hi"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["ignoring 1 request field(s) no API defines"]       # store: OpenAI's, no effect
    assert "frobnicate" in caplog.text                  # named at debug level only: it is client text


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(P.InvalidRequest, match="JSON object"):
        P.decode_request(b"[1, 2]", P.ChatCompletionRequest)
