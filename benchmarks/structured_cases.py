"""Twenty JSON Schemas of the kinds clients send (nested objects, bounded arrays, enums, required
and optional fields, number ranges, string patterns, unions, nullables, $ref), each with a chat
prompt that asks for it. Used by the structured-output tests and the benchmark."""
from __future__ import annotations

_S = {"type": "string", "maxLength": 24}
_POINT = {"type": "object", "additionalProperties": False, "required": ["x", "y"],
          "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 10},
                         "y": {"type": "integer", "minimum": 0, "maximum": 10}}}


def _obj(required: list[str], **properties) -> dict:
    return {"type": "object", "additionalProperties": False, "required": required, "properties": properties}


SCHEMAS: list[tuple[str, dict]] = [
    ("a person with a name and an age",
     _obj(["name", "age"], name=_S, age={"type": "integer", "minimum": 0, "maximum": 120})),
    ("a favourite colour", _obj(["color"], color={"enum": ["red", "green", "blue"]})),
    ("a postal address",
     _obj(["street", "city", "zip"], street=_S, city={"type": "string", "maxLength": 16},
          zip={"type": "string", "pattern": "^[0-9]{5}$"})),
    ("two to four digits from 1 to 9",
     {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4}),
    ("a user's flags", _obj(["active", "admin"], active={"type": "boolean"}, admin={"type": "boolean"})),
    ("a temperature reading in Celsius",
     _obj(["celsius"], celsius={"type": "number", "minimum": -50, "maximum": 50})),
    ("an order with one to three line items",
     _obj(["items"], items={"type": "array", "minItems": 1, "maxItems": 3, "items": _obj(
         ["sku", "qty"], sku={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
         qty={"type": "integer", "minimum": 1, "maximum": 10})})),
    ("a date", _obj(["date"], date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"})),
    ("a log event with a level",
     _obj(["kind", "level"], kind={"const": "event"}, level={"enum": ["low", "medium", "high"]})),
    ("a rating, with an optional comment",
     _obj(["stars"], stars={"type": "integer", "minimum": 1, "maximum": 5},
          comment={"type": "string", "maxLength": 20})),
    ("a value that is a number or a word",
     _obj(["value"], value={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                      {"type": "string", "maxLength": 10}]})),
    ("a nickname, or null",
     _obj(["nickname"], nickname={"type": ["string", "null"], "maxLength": 12})),
    ("a deeply nested setting",
     _obj(["a"], a=_obj(["b"], b=_obj(["c"], c={"type": "integer", "minimum": 0, "maximum": 5})))),
    ("one to three fruits",
     {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["apple", "pear", "plum"]}}),
    ("an email address",
     _obj(["email"], email={"type": "string", "pattern": "^[a-z]{3,8}@[a-z]{3,8}\\.com$"})),
    ("a line from one point to another",
     {"$defs": {"point": _POINT}, **_obj(["start", "end"], start={"$ref": "#/$defs/point"},
                                         end={"$ref": "#/$defs/point"})}),
    ("yes or no", {"enum": ["yes", "no"]}),
    ("a two-digit number", {"type": "integer", "minimum": 10, "maximum": 99}),
    ("a product code and a count",
     _obj(["code", "count"], code={"type": "string", "minLength": 2, "maxLength": 4},
          count={"type": "integer", "minimum": 0, "maximum": 1000})),
    ("a book with a title, a year and up to two authors",
     _obj(["title", "year", "authors"], title=_S, year={"type": "integer", "minimum": 1900, "maximum": 2030},
          authors={"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 16}})),
]


def prompt_for(description: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON only: {description}."}]
