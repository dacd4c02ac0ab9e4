"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status."""
from __future__ import annotations

from typing import Optional

import msgspec
from starlette.responses import Response

from . import protocol as P
from .engine_client import EngineError

_json = msgspec.json.Encoder()

# scheduler RequestError code -> (HTTP status, OpenAI error type)
_ENGINE_ERRORS = {
    "queue_full": (429, "rate_limit_error"),
    "too_long": (400, "invalid_request_error"),
    "invalid": (400, "invalid_request_error"),
    "not_ready": (503, "service_unavailable_error"),
    "executor_error": (500, "server_error"),
    "engine_unavailable": (503, "service_unavailable_error"),
}


def json_response(obj, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(_json.encode(obj), status, headers, media_type="application/json")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def info(self) -> P.ErrorInfo:
        return P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> Response:
        return json_response(P.ErrorResponse(self.info()), self.status, self.headers)

    @classmethod
    def from_engine(cls, e: EngineError, param: Optional[str] = None) -> "APIError":
        status, type_ = _ENGINE_ERRORS.get(e.code, (500, "server_error"))
        headers = {"Retry-After": "1"} if e.code == "queue_full" else None
        return cls(status, e.message, type_, param if e.code == "too_long" else None, e.code, headers)
