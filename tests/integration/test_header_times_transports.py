"""Header times a partner gets wrong, over real mutual TLS and the real broker: a message
without ``expires_at`` and a time beyond the years a datetime holds are ``MALFORMED`` (with a
signed NACK), the same on both transports; never ``UNAVAILABLE`` (an internal error that tells
the partner to retry, forever), never accepted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from amqp_env import AMQP_PARTNER
from amqp_peer import amqp_gateway
from https_env import MX, make_message, post, rejections, running_gateway
from https_env import check_receipt as https_receipt
from rabbit import RabbitVhost

from gateway.envelope import body_digest
from gateway.errors import NackCode
from gateway.store.base import AuditFilter

OUT_OF_RANGE = "is out of range (years 0001 to 9999 UTC)"


def _without(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header.pop(name, None)

    return edit


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[name] = value

    return edit


CASES = [
    ("no expires_at", _without("expires_at"), "header.expires_at is required", None),
    ("null expires_at", _set("expires_at", None), "header.expires_at is required", None),
    (
        "respond_by leap second after 9999",
        _set("respond_by", "9999-12-31T23:59:60Z"),
        f"header.respond_by {OUT_OF_RANGE}: '9999-12-31T23:59:60Z'",
        f"header.respond_by {OUT_OF_RANGE}",
    ),
    (
        "respond_by leap second after 9999, with an offset",
        _set("respond_by", "9999-12-31T18:59:60-05:00"),
        f"header.respond_by {OUT_OF_RANGE}: '9999-12-31T18:59:60-05:00'",
        f"header.respond_by {OUT_OF_RANGE}",
    ),
    (
        "expires_at leap second after 9999",
        _set("expires_at", "9999-12-31T23:59:60Z"),
        f"header.expires_at {OUT_OF_RANGE}: '9999-12-31T23:59:60Z'",
        f"header.expires_at {OUT_OF_RANGE}",
    ),
]
IDS = [case[0] for case in CASES]


def edited(body: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """``body`` (a valid message, with an ``expires_at``) with its header edited."""
    document = json.loads(body)
    document["header"]["expires_at"] = "2099-01-01T00:00:00Z"
    edit(document["header"])
    return json.dumps(document, separators=(",", ":")).encode()


@pytest.mark.parametrize(("name", "edit", "reason", "detail"), CASES, ids=IDS)
async def test_over_https(
    tmp_path: Path,
    name: str,
    edit: Callable[[dict[str, Any]], None],
    reason: str,
    detail: str | None,
) -> None:
    async with running_gateway(tmp_path) as env:
        message_id, valid = make_message(env)
        body = edited(valid, edit)
        answer = await post(env, body)
        assert answer.status == 400, answer.body
        receipt = https_receipt(env, answer, message_id=message_id, body=body)
        assert (receipt.status, receipt.code, receipt.detail) == (
            "NACK",
            NackCode.MALFORMED,
            # the partner is told which member broke which rule, never the value it sent
            reason if detail is None else detail,
        )
        [entry] = await rejections(env, NackCode.MALFORMED)
        assert (entry["reason"], entry["transport"]) == (reason, "https")
        assert entry["body_digest"] == body_digest(body)
        assert await env.gateway.store.get_inbound(MX, message_id) is None
        # the same message with its header as PROTOCOL wants it is accepted
        assert (await post(env, edited(valid, lambda header: None))).status == 202


@pytest.mark.rabbitmq
@pytest.mark.parametrize(("name", "edit", "reason", "detail"), CASES, ids=IDS)
async def test_over_amqp(
    tmp_path: Path,
    rabbit_vhost: RabbitVhost,
    name: str,
    edit: Callable[[dict[str, Any]], None],
    reason: str,
    detail: str | None,
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        message_id, valid = env.message()
        body = edited(valid, edit)
        await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
        assert (receipt.status, receipt.code, receipt.detail) == (
            "NACK",
            NackCode.MALFORMED,
            # the partner is told which member broke which rule, never the value it sent
            reason if detail is None else detail,
        )
        rows = await env.gateway.store.audit_entries(
            AuditFilter(event="rejected", outcome=NackCode.MALFORMED.value)
        )
        [entry] = [json.loads(row.entry) for row in rows]
        assert (entry["reason"], entry["transport"]) == (reason, "amqp")
        assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is None
