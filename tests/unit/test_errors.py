"""Every PROTOCOL.md section 4 code has exactly one GatewayError subclass and its HTTP status."""

from __future__ import annotations

import pytest

from gateway.errors import (
    ERROR_FOR_CODE,
    HTTP_STATUS,
    GatewayError,
    NackCode,
    RateLimited,
    SchemaInvalid,
    Stale,
)

PROTOCOL_TABLE = {
    "MALFORMED": 400,
    "SCHEMA_INVALID": 400,
    "UNSUPPORTED_TYPE": 400,
    "SIGNATURE_INVALID": 401,
    "UNKNOWN_KEY": 401,
    "SENDER_MISMATCH": 403,
    "NOT_AUTHORIZED": 403,
    "DUPLICATE_CONFLICT": 409,
    "TOO_LARGE": 413,
    "STALE": 422,
    "RATE_LIMITED": 429,
    "UNAVAILABLE": 503,
}


def test_codes_and_statuses_match_the_protocol_table() -> None:
    assert {code.value: status for code, status in HTTP_STATUS.items()} == PROTOCOL_TABLE
    assert set(ERROR_FOR_CODE) == set(NackCode)


@pytest.mark.parametrize("code", list(NackCode))
def test_each_subclass_carries_its_code(code: NackCode) -> None:
    cls = ERROR_FOR_CODE[code]
    assert issubclass(cls, GatewayError)
    if cls is SchemaInvalid:
        error: GatewayError = cls("x", pointer="/a")  # type: ignore[call-arg]
    elif cls is RateLimited:
        error = cls("x", retry_after_s=3)  # type: ignore[call-arg]
    else:
        error = cls("exact reason")
    assert error.code is code
    assert error.http_status == PROTOCOL_TABLE[code.value]
    assert error.detail  # a partner always gets a minimal detail


def test_reason_is_kept_apart_from_detail() -> None:
    error = Stale("created_at 2026-11-23T06:00:00.000Z is 3600s old")
    assert "3600s" in error.reason
    assert "3600s" not in error.detail
    assert SchemaInvalid("bad", pointer="/goods_items/0/hs_code").detail.endswith(
        "/goods_items/0/hs_code"
    )
