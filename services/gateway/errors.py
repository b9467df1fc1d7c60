"""Every gateway error becomes an HTTP status and an OpenAI error body here, and only here.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_request"}}

`classify(exc)` is the one mapping from an exception to (status, body fields): protocol
errors (`ProtocolError`, from the scheduler or an instance) and the gateway's own
(`ApiError`) go through `xllm.protocol.http_status`; aiohttp's HTTP exceptions (unknown
route, body larger than --max-body-bytes) keep their status; anything else is a bug → 500.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from aiohttp import web

from xllm.protocol import ErrorCode, ProtocolError, http_status

log = logging.getLogger(__name__)


class ApiError(ProtocolError):
    """An error the gateway raises itself; `param` names the offending request field."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None):
        super().__init__(code, message)
        self.param = param


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, message, param)


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    message: str
    code: str
    param: str | None = None

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else _INVALID)

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": error | {"code": self.code}}


_INVALID = "invalid_request_error"
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
RETRY_AFTER = {429: "1", 503: "2"}
"""Statuses a client should retry (overloaded; no instance, or one lost) → seconds to wait."""
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def classify(exc: BaseException) -> HttpError:
    """The one function: what status and error body `exc` becomes."""
    if isinstance(exc, ProtocolError):
        param = exc.param if isinstance(exc, ApiError) else None
        return HttpError(http_status(exc.code), exc.info.message, exc.code.value, param)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return HttpError(413, f"the request body is too large: {exc.text}", "request_too_large")
    if isinstance(exc, web.HTTPException):
        code = _HTTP_CODES.get(exc.status, ErrorCode.INVALID_REQUEST.value)
        return HttpError(exc.status, exc.text or exc.reason, code)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return HttpError(400, f"the body is not valid JSON: {exc}", ErrorCode.INVALID_REQUEST.value)
    if isinstance(exc, TimeoutError):
        return HttpError(504, "the request timed out", ErrorCode.TIMEOUT.value)
    return HttpError(500, f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL.value)


def error_response(exc: BaseException) -> web.Response:
    """The JSON response for `exc` (5xx are logged with their traceback)."""
    err = classify(exc)
    if err.status >= 500 and not isinstance(exc, ProtocolError):
        log.error("request failed: %s", err.message, exc_info=exc)
    retry = RETRY_AFTER.get(err.status)
    headers = {"Retry-After": retry} if retry else None
    return web.json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turns whatever a handler raises into an OpenAI error response."""
    try:
        return await handler(request)
    except (ConnectionResetError, web.HTTPSuccessful, web.HTTPRedirection):
        raise  # the client is gone / not an error: nothing to answer
    except Exception as exc:
        return error_response(exc)
