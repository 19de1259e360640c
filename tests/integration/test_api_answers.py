"""Submissions refused before they are queued, for what the partner would NACK once sent.

An answer (``query.response``, ``enforcement.assistance_response``) names in ``in_reply_to`` a
request the recipient sent us, of a type it answers, and echoes the request's reference;
a ``respond_by`` lies ahead; the witnessing types are the gateway's own. Each refusal
leaves nothing queued, and is audited with the submitter.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from inbound_records import sample_record
from outbound_env import Running, example
from test_api_idempotency import entries, outbox_size
from test_api_messages import api

from gateway.audit.events import EventKind
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.model import Header


async def received(
    us: Running, message_type: str, *, sender: str = "MX-ANAM", purged: bool = False
) -> dict[str, Any]:
    """A request ``sender`` sent us, as the inbound pipeline stores it (its schema example,
    in the canonical envelope); its payload, with its message id under ``message_id``."""
    payload = example(us.gateway, message_type)
    header = Header(
        message_id=new_message_id(),
        message_type=message_type,
        schema_version="1.0",
        sender=sender,
        recipient="US-CBP",
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    body = encode_envelope(header, payload)
    record = dataclasses.replace(
        sample_record(sender=sender),
        message_id=header.message_id,
        message_type=message_type,
        body=None if purged else body,
        body_digest=body_digest(body),
    )
    await us.gateway.store.store_inbound(record, [])
    return {**payload, "message_id": header.message_id}


def answer(us: Running, message_type: str, request: dict[str, Any], **echo: Any) -> dict[str, Any]:
    """``message_type`` answering ``request`` (its reference echoed, unless ``echo`` says
    otherwise), to MX-ANAM."""
    payload = us.gateway.registry.answer_example(message_type, "1.0", request)
    return {
        "recipient": "MX-ANAM",
        "message_type": message_type,
        "payload": {**payload, **echo},
        "in_reply_to": request["message_id"],
    }


async def refused(us: Running, submission: dict[str, Any], status: int) -> dict[str, Any]:
    code, body = await api(us, "POST", "/api/v1/messages", json=submission)
    assert code == status, body
    assert await outbox_size(us) == 0
    [entry] = await entries(us, EventKind.SUBMIT_REJECTED)
    assert entry["actor"] == "api:test-client"
    assert entry["reason"] == body["detail"]
    return dict(body)


async def test_an_answer_to_a_request_never_received_is_refused(us: Running) -> None:
    lookup = await received(us, "query.shipment_lookup")
    submission = answer(us, "query.response", lookup)
    submission["in_reply_to"] = unknown = new_message_id()
    body = await refused(us, submission, 400)
    assert body["detail"] == (
        f"in_reply_to {unknown} names no message received from MX-ANAM: an answer names the"
        " message_id of the partner's request"
    )


async def test_an_answer_to_another_partners_request_is_refused(us: Running) -> None:
    lookup = await received(us, "query.shipment_lookup", sender="CA-CBSA")
    body = await refused(us, answer(us, "query.response", lookup), 400)
    assert body["detail"].startswith(f"in_reply_to {lookup['message_id']} names no message")


async def test_an_answer_to_a_message_it_does_not_answer_is_refused(us: Running) -> None:
    alert = await received(us, "enforcement.risk_alert")
    lookup = await received(us, "query.shipment_lookup")
    submission = answer(us, "query.response", lookup)
    submission["in_reply_to"] = alert["message_id"]
    body = await refused(us, submission, 400)
    assert body["detail"] == (
        "in_reply_to names MX-ANAM's enforcement.risk_alert; query.response answers"
        " query.shipment_lookup or query.trader_lookup"
    )


async def test_an_answer_that_does_not_echo_the_reference_is_refused(us: Running) -> None:
    request = await received(us, "enforcement.assistance_request")
    submission = answer(
        us, "enforcement.assistance_response", request, request_ref="MX-ANAM-2026-MAA-999999"
    )
    body = await refused(us, submission, 400)
    assert body["code"] == "SCHEMA_INVALID"
    assert body["pointer"] == "/request_ref"
    assert body["detail"] == (
        "/request_ref: does not echo the request_ref of the request named in in_reply_to"
    )


async def test_answers_that_pair_are_queued(us: Running) -> None:
    lookup = await received(us, "query.trader_lookup")
    request = await received(us, "enforcement.assistance_request")
    for submission in (
        answer(us, "query.response", lookup),
        answer(us, "enforcement.assistance_response", request),
    ):
        status, body = await api(us, "POST", "/api/v1/messages", json=submission)
        assert status == 202, body
    assert await outbox_size(us) == 2


async def test_a_purged_request_leaves_only_its_type_to_check(us: Running) -> None:
    lookup = await received(us, "query.shipment_lookup", purged=True)
    submission = answer(us, "query.response", lookup, query_ref="MX-ANAM-Q-0000000")
    status, body = await api(us, "POST", "/api/v1/messages", json=submission)
    assert status == 202, body


async def test_a_respond_by_in_the_past_is_refused(us: Running) -> None:
    submission = {
        "recipient": "MX-ANAM",
        "message_type": "enforcement.assistance_request",
        "payload": example(us.gateway, "enforcement.assistance_request"),
        "respond_by": "2020-01-01T00:00:00Z",
    }
    body = await refused(us, submission, 400)
    assert body["detail"] == "respond_by 2020-01-01T00:00:00.000Z is not in the future"


async def test_witnessing_messages_are_not_submitted(us: Running) -> None:
    submission = {
        "recipient": "MX-ANAM",
        "message_type": "audit.checkpoint",
        "payload": example(us.gateway, "audit.checkpoint"),
    }
    body = await refused(us, submission, 403)
    assert body["detail"] == (
        "audit.checkpoint messages are made by the gateway's witnessing, not submitted"
    )
