"""A request's structured-output fields -> the one ``GrammarSpec`` the scheduler enforces.

OpenAI's ``response_format`` (json_object, json_schema) and vLLM's ``structured_outputs`` (json,
regex, choice, grammar, json_object) say the same things; both become a GrammarSpec, checked here
completely (shared/grammar.py: a schema against its meta-schema and what llguidance implements,
a regex, a grammar) so a bad one is a 400 naming the field before anything is queued.
"""
from __future__ import annotations

import json
from typing import Optional

from shared.grammar import GrammarError, check
from shared.messages import GrammarSpec

from . import protocol as P


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise P.InvalidRequest(f"{param}: the JSON Schema is not valid JSON: {e}", param=param) from None
    return json.dumps(schema, ensure_ascii=False)


def _from_response_format(rf: P.ResponseFormat) -> Optional[GrammarSpec]:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec("json_object")
    if rf.json_schema is None or rf.json_schema.schema is None:
        raise P.InvalidRequest("response_format of type json_schema needs json_schema.schema",
                               param="response_format")
    return GrammarSpec("json_schema", _schema_text(rf.json_schema.schema, "response_format"))


def _from_structured_outputs(so: P.StructuredOutputs) -> GrammarSpec:
    param = "structured_outputs"
    if so.whitespace_pattern is not None:
        raise P.InvalidRequest("structured_outputs.whitespace_pattern is not supported (JSON is "
                               "generated without whitespace)", param=param)
    if so.structural_tag is not None:
        raise P.InvalidRequest("structured_outputs.structural_tag is not supported", param=param)
    if so.disable_any_whitespace is False:
        raise P.InvalidRequest("structured_outputs.disable_any_whitespace=false is not supported: "
                               "JSON is always generated without whitespace", param=param)
    if so.disable_additional_properties:
        raise P.InvalidRequest("structured_outputs.disable_additional_properties is not supported; "
                               "set additionalProperties: false in the schema", param=param)
    given = {name: value for name, value in (("json", so.json), ("regex", so.regex), ("choice", so.choice),
                                             ("grammar", so.grammar), ("json_object", so.json_object or None))
             if value is not None}
    if len(given) != 1:
        raise P.InvalidRequest("structured_outputs needs exactly one of json, regex, choice, grammar, "
                               f"json_object (got {', '.join(given) or 'none'})", param=param)
    (name, value), = given.items()
    if name == "json":
        return GrammarSpec("json_schema", _schema_text(value, param))
    if name == "json_object":
        return GrammarSpec("json_object")
    if name == "choice":
        return GrammarSpec("choice", json.dumps(value, ensure_ascii=False))
    if name == "grammar":
        return GrammarSpec("lark", _as_lark(value))
    return GrammarSpec("regex", value)


def _as_lark(grammar: str) -> str:
    """Lark as it is; GBNF (llama.cpp's EBNF: ``root ::= ...``) converted by llguidance."""
    if "::=" not in grammar:
        return grammar
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    try:
        return gbnf_to_lark(grammar)
    except GbnfToLarkError as e:
        raise P.InvalidRequest(f"structured_outputs.grammar: not valid GBNF: {e}",
                               param="structured_outputs") from None


def grammar_of(req: P._SamplingFields) -> Optional[GrammarSpec]:
    """The request's constraint, checked; None when it asks for none. InvalidRequest otherwise."""
    if req.response_format is not None and req.structured_outputs is not None:
        raise P.InvalidRequest("give response_format or structured_outputs, not both", param="structured_outputs")
    if req.structured_outputs is not None:
        spec, param = _from_structured_outputs(req.structured_outputs), "structured_outputs"
    elif req.response_format is not None:
        spec, param = _from_response_format(req.response_format), "response_format"
    else:
        return None
    if spec is not None:
        check_spec(spec, param)
    return spec


def check_spec(spec: GrammarSpec, param: str) -> None:
    try:
        check(spec)
    except GrammarError as e:
        raise P.InvalidRequest(f"{param}: {e}", param=param) from None
