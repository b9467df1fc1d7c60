"""One error taxonomy for every service, converted at each boundary.

Contract:
  * A failure that crosses a process boundary travels as an `ErrorInfo` (a code from
    `ErrorCode` plus a human-readable message) inside the reply or stream message that
    would have carried the result (`SubmitReply.error`, `TokenDelta.error`).
  * Inside a process, code raises `ProtocolError(code, message)`; the handler at the
    boundary catches it and puts `err.info` on the wire. A request refused as invalid
    raises `RequestRejected`, which is a `ValueError` too: the code comes with the error,
    and nothing reads it back out of the message text.
  * The gateway turns a code into an HTTP status with `http_status` — the one place
    that mapping lives.

Codes are lower-case strings on the wire, so logs and other languages read them as-is.
Adding a code is a schema change: old decoders reject the unknown value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"
    """The request is malformed or a parameter is out of range (a user error)."""
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    """Prompt plus max_tokens does not fit the model's context (a user error)."""
    NOT_FOUND = "not_found"
    """Unknown model, request id or instance."""
    UNAUTHORIZED = "unauthorized"
    """Missing or wrong credentials."""
    OVERLOADED = "overloaded"
    """Too much work in flight; the client should back off and retry."""
    NO_INSTANCE = "no_instance"
    """No live instance can serve the request (none registered, or none with the model)."""
    INSTANCE_FAILED = "instance_failed"
    """The instance serving the request died or failed it mid-way."""
    TIMEOUT = "timeout"
    """A deadline passed before an answer came back."""
    INTERNAL = "internal"
    """A bug: an invariant broke. The message says which."""


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    # OpenAI answers 400 for an over-long context too, and clients key on that.
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.NO_INSTANCE: 503,
    ErrorCode.INSTANCE_FAILED: 503,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: ErrorCode) -> int:
    """The HTTP status the gateway answers for `code`."""
    return _HTTP_STATUS[code]


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error on the wire: what went wrong, in a code a program can branch on."""

    code: ErrorCode
    """The class of failure; decides the HTTP status and whether a retry can help."""
    message: str
    """For humans: what was wrong and, for user errors, how to fix it."""


class ProtocolError(Exception):
    """An error meant to cross a service boundary; carries the `ErrorInfo` to send."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.info = ErrorInfo(code, message)

    @property
    def code(self) -> ErrorCode:
        return self.info.code

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ProtocolError:
        """Re-raise on this side an error that came over the wire."""
        return cls(info.code, info.message)


class RequestRejected(ProtocolError, ValueError):
    """A request refused before it ran, for a reason the client must fix (a user error:
    `INVALID_REQUEST`, `CONTEXT_LENGTH_EXCEEDED`). A ValueError too, so input validation
    that catches ValueError keeps catching it; `str()` is the message alone."""

    def __str__(self) -> str:
        return self.info.message
