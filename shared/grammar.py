"""Structured-output constraints as llguidance grammars: one translation for the gateway (which
checks a request's constraint before it is queued) and the scheduler (which compiles it).

Why llguidance: it has no dependencies (no torch, so the scheduler stays torch-free), computes a
token mask on the CPU in tens of microseconds, compiles JSON Schema, regular expressions and Lark
grammars lazily (milliseconds, not the seconds of automaton-building engines), and bounds the
work a hostile grammar can cost (``LLParserLimits``). xgrammar pulls torch and triton.

JSON is generated compact (``whitespace_flexible`` off): no whitespace between tokens, so a small
model cannot wander into endless newlines inside an object.
"""
from __future__ import annotations

import json

from shared.messages import GrammarSpec

_JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_CHOICES = 1024


class GrammarError(ValueError):
    """The constraint is not valid, or uses what llguidance does not implement; the message names it."""


def choice_lark(choices: list[str]) -> str:
    """A Lark grammar matching exactly one of ``choices``."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON TopLevelGrammar) of ``spec``; GrammarError if the spec
    cannot even be read (checking what it means is ``check``'s job)."""
    from llguidance import LLMatcher

    try:
        return _to_llguidance(LLMatcher, spec.kind, spec.value)
    except ValueError as e:            # llguidance's own refusals (GrammarError is one too)
        raise GrammarError(str(e)) from None


def _to_llguidance(LLMatcher, kind: str, value: str) -> str:
    if kind == "json_schema" and value.strip() in ("true", "false"):      # boolean schemas
        if value.strip() == "false":
            raise GrammarError("the JSON Schema `false` matches nothing")
        value = "{}"
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(value, defaults=_JSON_DEFAULTS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "lark":
        return LLMatcher.grammar_from_lark(value)
    if kind == "choice":
        try:
            choices = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"choice: not a JSON list of strings ({e})") from None
        if (not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in choices)):
            raise GrammarError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        return LLMatcher.grammar_from_lark(choice_lark(choices))
    raise GrammarError(f"unknown grammar kind {kind!r}")


def check_json_schema(schema) -> None:
    """GrammarError unless ``schema`` is valid JSON Schema (against its draft's meta-schema)."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON Schema is an object or a boolean, not {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"invalid JSON Schema{f' at {where}' if where else ''}: {e.message}") from None


def check(spec: GrammarSpec) -> str:
    """Validate ``spec`` completely (a JSON Schema against its meta-schema, then what llguidance
    accepts: a keyword it does not implement, a bad regex, an unknown Lark rule); return its
    llguidance grammar. GrammarError naming the problem otherwise."""
    from llguidance import LLMatcher

    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON Schema is not valid JSON: {e}") from None
        check_json_schema(schema)
    grammar = to_llguidance(spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError("; ".join(m.strip() for m in messages) or "the grammar is not valid")
    return grammar
