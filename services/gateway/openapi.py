"""OpenAPI 3.1 description of the gateway, with schemas generated from the msgspec models."""
from __future__ import annotations

from functools import lru_cache

import msgspec

from . import protocol as P

_REF = "#/components/schemas/{name}"


def _ref(cls) -> dict:
    return {"$ref": _REF.format(name=cls.__name__)}


def _json(cls, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(cls)}}}


_ERRORS = {
    "400": _json(P.ErrorResponse, "Invalid parameters, or the prompt exceeds the context length"),
    "401": _json(P.ErrorResponse, "Missing or wrong API key"),
    "404": _json(P.ErrorResponse, "Unknown model"),
    "413": _json(P.ErrorResponse, "Request body too large"),
    "429": _json(P.ErrorResponse, "Scheduler queue full; retry after `Retry-After` seconds"),
    "503": _json(P.ErrorResponse, "Model executor not ready"),
}


def _generate(summary: str, req, resp, chunk) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
        "responses": {
            "200": {"description": "The completion, or with `stream: true` server-sent events "
                                   "(`data: {chunk}` lines ending with `data: [DONE]`)",
                    "content": {"application/json": {"schema": _ref(resp)},
                                "text/event-stream": {"schema": _ref(chunk)}}},
            **_ERRORS,
        },
    }}


@lru_cache(maxsize=1)
def openapi_schema() -> dict:
    _, components = msgspec.json.schema_components(
        [P.ChatCompletionRequest, P.ChatCompletionResponse, P.ChatCompletionChunk,
         P.CompletionRequest, P.CompletionResponse, P.ModelList, P.ErrorResponse],
        ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pagedserve", "version": "0.1.0",
                 "description": "OpenAI-compatible LLM serving on PagedAttention"},
        "paths": {
            "/v1/chat/completions": _generate("Chat completion", P.ChatCompletionRequest,
                                              P.ChatCompletionResponse, P.ChatCompletionChunk),
            "/v1/completions": _generate("Text completion", P.CompletionRequest,
                                         P.CompletionResponse, P.CompletionResponse),
            "/v1/models": {"get": {"summary": "Served models",
                                   "responses": {"200": _json(P.ModelList, "The served model")}}},
            "/health": {"get": {"summary": "Readiness",
                                "responses": {"200": {"description": "Executor ready"},
                                              "503": _json(P.ErrorResponse, "Executor not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {}}}}}},
        },
        "components": {"schemas": components},
    }
