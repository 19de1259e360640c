"""A MALFORMED answer says which member broke which rule, never the value sent (over real
mutual TLS): a partner's engineers fix their side from the answer alone, since the exact
reason, value quoted, is only in our audit log. A body a NACK can be tied to (its message id
readable) gets it in the signed receipt; one that cannot gets it in the problem document."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from https_env import Env, check_receipt, make_message, post, rejections, running_gateway

from gateway.errors import NackCode

#: planted in each bad message: it must not come back in the answer
PLANTED = "Zq7Planted"


def _header(name: str, value: Any) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        document = json.loads(body)
        document["header"][name] = value
        return json.dumps(document).encode()

    return edit


def _text(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        assert old in body
        return body.replace(old, new, 1)

    return edit


# (case, edit, signed receipt?, detail the partner gets, reason the audit log keeps)
CASES = [
    (
        "unknown header member",
        _header(PLANTED, 1),
        True,
        "header has a member PROTOCOL section 2 does not define",
        f"header has unknown member '{PLANTED}'",
    ),
    (
        "created_at not a date",
        _header("created_at", f"{PLANTED}T00:00:00Z"),
        True,
        "header.created_at is not an RFC 3339 UTC timestamp",
        f"header.created_at is not an RFC 3339 UTC timestamp: '{PLANTED}T00:00:00Z'",
    ),
    (
        "priority in capitals",
        _header("priority", "URGENT"),
        True,
        "header.priority must be 'routine' or 'urgent'",
        "header.priority must be 'routine' or 'urgent'",
    ),
    (
        "legal_basis too long",
        _header("legal_basis", PLANTED * 30),
        True,
        "header.legal_basis must be a string of 1-256 characters",
        "header.legal_basis must be a string of 1-256 characters",
    ),
    (
        "correlation_id not a UUID",
        _header("correlation_id", PLANTED),
        True,
        "header.correlation_id must be a UUID (8-4-4-4-12 hex digits)",
        "header.correlation_id must be a UUID (8-4-4-4-12 hex digits)",
    ),
    (
        "message_id not a UUID",
        _header("message_id", PLANTED),
        False,
        "header.message_id must be a UUID v4 or v7 (8-4-4-4-12 hex digits)",
        "header.message_id must be a UUID v4 or v7 (8-4-4-4-12 hex digits)",
    ),
    (
        "duplicate member name",
        _text(b'"payload": {', f'"payload": {{"{PLANTED}": 1, "{PLANTED}": 2, '.encode()),
        False,
        "an object has a duplicate member name",
        f"duplicate member name '{PLANTED}'",
    ),
    (
        "number beyond double range",
        _text(b'"payload": {', b'"payload": {"n": 7e400, '),
        False,
        "a number is outside IEEE-754 double range",
        "number 7e400 is outside IEEE-754 double range",
    ),
    (
        "third envelope member",
        _text(b'"payload": {', f'"{PLANTED}": 1, "payload": {{'.encode()),
        True,
        "envelope has a member other than header and payload",
        f"envelope has unknown member '{PLANTED}'",
    ),
]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path) as running:
        yield running


@pytest.mark.parametrize(
    ("edit", "signed", "detail", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_the_answer_names_the_rule_and_not_the_value(
    env: Env, edit: Callable[[bytes], bytes], signed: bool, detail: str, reason: str
) -> None:
    message_id, valid = make_message(env)
    body = edit(json.dumps(json.loads(valid), indent=1).encode())
    answer = await post(env, body)
    assert answer.status == 400, answer.body
    assert PLANTED.encode() not in answer.body
    if signed:
        receipt = check_receipt(env, answer, message_id=message_id, body=body)
        assert (receipt.status, receipt.code, receipt.detail) == (
            "NACK",
            NackCode.MALFORMED,
            detail,
        )
    else:
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert "C2C-Signature" not in answer.headers
        problem = answer.json()
        assert (problem["code"], problem["detail"]) == (NackCode.MALFORMED, detail)
    reasons = [entry["reason"] for entry in await rejections(env, NackCode.MALFORMED)]
    assert reason in reasons
