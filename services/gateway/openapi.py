"""OpenAPI 3.1 description of the gateway, with schemas generated from the msgspec models.

It is what the fuzz tests (tests/test_fuzz_openapi.py) check the server against, so every status
a route can answer is listed with its body schema; errors are always ``ErrorResponse``.
"""
from __future__ import annotations

from functools import lru_cache

import msgspec

from . import protocol as P

_REF = "#/components/schemas/{name}"
_BEARER = [{"bearerAuth": []}]


def _ref(cls) -> dict:
    return {"$ref": _REF.format(name=cls.__name__)}


def _json(cls, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(cls)}}}


_UNAUTHORIZED = {"401": _json(P.ErrorResponse, "Missing or wrong API key (when the server has one)")}

_GENERATE_ERRORS = {
    "400": _json(P.ErrorResponse, "Invalid parameters, token ids outside the vocabulary, or a "
                                  "request longer than the context or larger than the KV cache"),
    **_UNAUTHORIZED,
    "404": _json(P.ErrorResponse, "Unknown model"),
    "413": _json(P.ErrorResponse, "Request body too large"),
    "429": {**_json(P.ErrorResponse, "Scheduler queue full; retry after `Retry-After` seconds"),
            "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}},
    "500": _json(P.ErrorResponse, "The model executor failed this request"),
    "503": _json(P.ErrorResponse, "Model executor not ready"),
}


def _sse_event(chunk) -> dict:
    """One server-sent event: a JSON chunk, an error object (the stream failed), or ``[DONE]``."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(chunk), _ref(P.ErrorResponse)]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _generate(summary: str, req, resp, chunk) -> dict:
    return {"post": {
        "summary": summary,
        "security": _BEARER,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
        "responses": {
            "200": {"description": "The completion, or with `stream: true` server-sent events "
                                   "(`data: {chunk}` lines ending with `data: [DONE]`)",
                    "content": {"application/json": {"schema": _ref(resp)},
                                "text/event-stream": {"schema": _sse_event(chunk)}}},
            **_GENERATE_ERRORS,
        },
    }}


def _get(summary: str, responses: dict, secured: bool = True) -> dict:
    op = {"summary": summary, "responses": {**responses, **(_UNAUTHORIZED if secured else {})}}
    if secured:
        op["security"] = _BEARER
    return {"get": op}


def _token_id_keys(components: dict) -> None:
    """msgspec writes ``dict[int, float]`` as an object without key constraints: add them."""
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        for option in components[name]["properties"]["logit_bias"]["anyOf"]:
            if option.get("type") == "object":
                option["propertyNames"] = {"pattern": "^[0-9]+$"}


@lru_cache(maxsize=1)
def openapi_schema() -> dict:
    _, components = msgspec.json.schema_components(
        [P.ChatCompletionRequest, P.ChatCompletionResponse, P.ChatCompletionChunk,
         P.CompletionRequest, P.CompletionResponse, P.ModelList, P.ErrorResponse, P.HealthStatus],
        ref_template=_REF)
    _token_id_keys(components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pagedserve", "version": "0.1.0",
                 "description": "OpenAI-compatible LLM serving on PagedAttention"},
        "paths": {
            "/v1/chat/completions": _generate("Chat completion", P.ChatCompletionRequest,
                                              P.ChatCompletionResponse, P.ChatCompletionChunk),
            "/v1/completions": _generate("Text completion", P.CompletionRequest,
                                         P.CompletionResponse, P.CompletionResponse),
            "/v1/models": _get("Served models", {"200": _json(P.ModelList, "The served model")}),
            "/health": _get("Readiness", {"200": _json(P.HealthStatus, "Executor ready"),
                                          "503": _json(P.ErrorResponse, "Executor not ready")},
                            secured=False),
            "/metrics": _get("Prometheus metrics", {"200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}),
            "/openapi.json": _get("This document", {"200": {
                "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}),
        },
        "components": {"schemas": components,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }
