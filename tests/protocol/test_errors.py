"""The error taxonomy: every code has an HTTP status, and errors cross the wire intact."""

from __future__ import annotations

import pytest

from xllm.protocol import ErrorCode, ErrorInfo, ProtocolError, http_status


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_an_http_status(code):
    assert 400 <= http_status(code) <= 599


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.INVALID_REQUEST, 400),
        (ErrorCode.CONTEXT_LENGTH_EXCEEDED, 400),
        (ErrorCode.UNAUTHORIZED, 401),
        (ErrorCode.NOT_FOUND, 404),
        (ErrorCode.OVERLOADED, 429),
        (ErrorCode.INTERNAL, 500),
        (ErrorCode.NO_INSTANCE, 503),
        (ErrorCode.INSTANCE_FAILED, 503),
        (ErrorCode.TIMEOUT, 504),
    ],
)
def test_http_status_mapping(code, status):
    assert http_status(code) == status


def test_codes_are_lower_case_strings_on_the_wire():
    for code in ErrorCode:
        assert code == code.value == code.name.lower()


def test_protocol_error_carries_its_info():
    err = ProtocolError(ErrorCode.OVERLOADED, "too many requests in flight")
    assert err.info == ErrorInfo(ErrorCode.OVERLOADED, "too many requests in flight")
    assert err.code is ErrorCode.OVERLOADED
    assert "overloaded" in str(err)
    again = ProtocolError.from_info(err.info)
    assert again.info == err.info
