"""Internal API routes over real TLS: submit, refuse, look up, list, page, retry, close,
OpenAPI."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from inbound_records import sample_record
from multidict import CIMultiDict
from outbound_env import (
    Running,
    auth,
    client_ssl,
    example,
    gateway_config,
    row_until,
    start_gateway,
    token,
)

from gateway.audit.events import EventKind
from gateway.config import GatewayConfig
from gateway.envelope import parse_envelope
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import AuditFilter, OutboundState


async def api(
    running: Running,
    method: str,
    path: str,
    *,
    json: Any = None,
    data: bytes | io.BytesIO | AsyncIterator[bytes] | None = None,
    scopes: tuple[str, ...] = ("c2c:send", "c2c:query", "admin"),
) -> tuple[int, Any]:
    headers = auth(token(running.config, scopes))
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            running.api_url + path,
            json=json,
            data=data,
            headers=headers,
            ssl=client_ssl(running.config),
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


def submission(
    running: Running, message_type: str = "shipment.status", **extra: Any
) -> dict[str, Any]:
    return submission_for(running.config, message_type, **extra)


def submission_for(config: GatewayConfig, message_type: str, **extra: Any) -> dict[str, Any]:
    return {
        "recipient": "MX-ANAM",
        "message_type": message_type,
        "payload": SchemaRegistry.load_builtin().examples(message_type, "1.0")[0],
        **extra,
    }


async def test_submit_stores_signed_message_and_audits_the_actor(us: Running) -> None:
    status, body = await api(us, "POST", "/api/v1/messages", json=submission(us))
    assert status == 202
    assert body["status"] == "queued"
    record = await us.gateway.store.get_outbound(body["message_id"])
    assert record is not None
    assert record.recipient == "MX-ANAM"
    assert record.submitted_by == "api:test-client"
    events = await us.gateway.store.audit_entries(AuditFilter(message_id=record.message_id))
    assert any(
        b'"event":"submitted"' in e.entry and b'"actor":"api:test-client"' in e.entry
        for e in events
    )
    status, view = await api(us, "GET", f"/api/v1/messages/{record.message_id}")
    assert status == 200
    assert view["envelope"]["header"]["sender"] == "US-CBP"
    assert view["envelope"]["payload"] == example(us.gateway, "shipment.status")
    assert view["signature"] == record.signature


@pytest.mark.parametrize(
    ("change", "status", "code", "detail_part"),
    [
        ({"recipient": "ZZ-NOBODY"}, 403, "NOT_AUTHORIZED", "not a configured partner"),
        ({"recipient": "mx"}, 400, "MALFORMED", "not a party id"),
        ({"message_type": "receipt"}, 403, "NOT_AUTHORIZED", "receipts are made by the gateway"),
        # PROTOCOL.md section 4: an unknown type is UNSUPPORTED_TYPE, whoever it is for
        ({"message_type": "shipment.nope"}, 400, "UNSUPPORTED_TYPE", "unknown message_type"),
        ({"schema_version": "9.9"}, 400, "UNSUPPORTED_TYPE", "unknown message_type/schema_version"),
        ({"payload": {}}, 400, "SCHEMA_INVALID", ""),
        ({"payload": None}, 400, "MALFORMED", "payload is required and must be a JSON object"),
        ({"surprise": 1}, 400, "MALFORMED", "unknown member(s): surprise"),
        (
            {"correlation_id": "not-a-uuid"},
            400,
            "MALFORMED",
            "correlation_id must be a lowercase UUID",
        ),
        ({"priority": "asap"}, 400, "MALFORMED", "priority must be one of routine, urgent"),
        ({"ttl_s": 0}, 400, "MALFORMED", "ttl_s must be an integer from 1 to 2592000"),
    ],
)
async def test_bad_submissions_are_refused_and_nothing_is_stored(
    us: Running, change: dict[str, Any], status: int, code: str, detail_part: str
) -> None:
    got_status, body = await api(us, "POST", "/api/v1/messages", json=submission(us) | change)
    assert (got_status, body["code"]) == (status, code), body
    assert detail_part in body["detail"]
    assert sum((await us.gateway.store.outbox_depth()).values()) == 0


async def test_a_message_over_the_partners_size_limit_is_refused_at_submission(
    tmp_path: Path,
) -> None:
    """The API limits the request's bytes; the envelope built from it is larger (its header),
    and the partner takes at most its ``max_body_bytes``. A message it would refuse unread is
    refused here, with nothing stored and the refusal audited, not queued to die."""
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    draft = submission_for(config, "shipment.status")
    request_bytes = len(json.dumps(draft).encode())
    partner = config.partners["MX-ANAM"]
    config = dataclasses.replace(
        config,
        partners={
            **config.partners,
            "MX-ANAM": dataclasses.replace(partner, max_body_bytes=request_bytes + 16),
        },
    )
    running = await start_gateway(config)
    try:
        status, body = await api(running, "POST", "/api/v1/messages", json=draft)
        assert (status, body["code"]) == (413, "TOO_LARGE"), body
        assert body["detail"].startswith("the signed message to MX-ANAM would be ")
        assert body["detail"].endswith(
            f" bytes, over the {request_bytes + 16} bytes MX-ANAM takes"
            " (max_body_bytes in its partner.toml)"
        )
        assert sum((await running.gateway.store.outbox_depth()).values()) == 0
        rows = await running.gateway.store.audit_entries(
            AuditFilter(event=EventKind.SUBMIT_REJECTED.value)
        )
        assert [b'"outcome":"TOO_LARGE"' in row.entry for row in rows] == [True]
    finally:
        await running.gateway.stop()


async def test_schema_error_names_the_pointer(us: Running) -> None:
    payload = example(us.gateway, "shipment.status")
    payload.pop(next(iter(payload)))
    status, body = await api(us, "POST", "/api/v1/messages", json=submission(us, payload=payload))
    assert status == 400
    assert body["code"] == "SCHEMA_INVALID"
    assert "pointer" in body


async def test_a_schema_errors_pointer_is_into_the_payload_or_params_as_documented(
    us: Running,
) -> None:
    """``pointer`` is relative to the submitted payload (``payload`` of a message, ``params``
    of a query), as the detail and the CLI's output are: the OpenAPI document says so."""
    payload = {**example(us.gateway, "shipment.status"), "status": 7}
    status, body = await api(us, "POST", "/api/v1/messages", json=submission(us, payload=payload))
    assert status == 400
    assert (body["code"], body["pointer"], body["detail"]) == (
        "SCHEMA_INVALID",
        "/status",
        "/status: must be of type string",
    )
    params = {**example(us.gateway, "query.shipment_lookup"), "query_ref": 7}
    query = {"partner": "MX-ANAM", "message_type": "query.shipment_lookup", "params": params}
    status, body = await api(us, "POST", "/api/v1/queries", json=query)
    assert status == 400
    assert (body["code"], body["pointer"]) == ("SCHEMA_INVALID", "/query_ref")
    status, document = await api(us, "GET", "/api/v1/openapi.json")
    described = document["components"]["schemas"]["Problem"]["properties"]["pointer"]
    for said in (
        "relative to the payload you submitted, not to the request body",
        "into payload for POST /api/v1/messages",
        "into params for POST /api/v1/queries",
    ):
        assert said in described["description"]


async def test_answers_need_in_reply_to(us: Running) -> None:
    status, body = await api(
        us, "POST", "/api/v1/messages", json=submission(us, "enforcement.assistance_response")
    )
    assert status == 400
    assert (
        body["detail"]
        == "enforcement.assistance_response answers another message: in_reply_to is required"
    )


async def test_not_json_is_a_clear_400(us: Running) -> None:
    status, body = await api(us, "POST", "/api/v1/messages", data=b"{not json")
    assert status == 400
    assert body["code"] == "MALFORMED"


async def test_a_body_arriving_in_pieces_is_read_whole(us: Running) -> None:
    """A body sent in several pieces (chunked, with pauses) is read to its end before it is
    parsed; past the limit it is 413, whether its length is declared or not."""
    compact = json.dumps(submission(us)).encode()
    body = b"{" + b" " * 700_000 + compact[1:]  # valid JSON, mostly padding
    assert 600_000 < len(body) < us.config.limits.max_body_bytes

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 50_000):
            yield data[start : start + 50_000]
            await asyncio.sleep(0.01)

    status, answer = await api(us, "POST", "/api/v1/messages", data=pieces(body))
    assert status == 202, answer
    assert (await us.gateway.store.outbox_depth())[OutboundState.QUEUED] == 1
    over = body + b" " * us.config.largest_body_bytes
    status, answer = await api(us, "POST", "/api/v1/messages", data=pieces(over))
    assert (status, answer["code"]) == (413, "TOO_LARGE")
    status, answer = await api(us, "POST", "/api/v1/messages", data=io.BytesIO(over))
    assert (status, answer["code"]) == (413, "TOO_LARGE")


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
async def test_an_encoded_body_is_refused_as_the_partner_endpoint_does(
    us: Running, encoding: str
) -> None:
    body = gzip.compress(json.dumps(submission(us)).encode())
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            us.api_url + "/api/v1/messages",
            data=body,
            headers={
                **auth(token(us.config, ("c2c:send",))),
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            },
            ssl=client_ssl(us.config),
        ) as response,
    ):
        problem = await response.json(content_type=None)
    assert (response.status, problem["code"]) == (400, "MALFORMED")
    assert (
        problem["detail"]
        == f"Content-Encoding '{encoding}' is not accepted: send the JSON as it is"
    )
    assert sum((await us.gateway.store.outbox_depth()).values()) == 0


async def test_an_id_of_several_messages_is_named_not_guessed(us: Running) -> None:
    """A partner's ids are unique per sender only: one id may name our outbound message and
    other partners' inbound ones. The API lists them (409) instead of picking one."""
    status, sent = await api(us, "POST", "/api/v1/messages", json=submission(us))
    assert status == 202, sent
    message_id = sent["message_id"]
    for sender in ("MX-ANAM", "CA-CBSA"):
        twin = dataclasses.replace(sample_record(sender=sender), message_id=message_id)
        await us.gateway.store.store_inbound(twin, [])
    path = f"/api/v1/messages/{message_id}"
    status, body = await api(us, "GET", path)
    assert status == 409, body
    assert body["detail"] == (
        f"message_id {message_id} names 3 messages (outbound to MX-ANAM, inbound from CA-CBSA,"
        " inbound from MX-ANAM): give direction and partner"
    )
    status, body = await api(us, "GET", path + "?direction=outbound")
    assert (status, body["direction"], body["partner"]) == (200, "outbound", "MX-ANAM")
    status, body = await api(us, "GET", path + "?direction=inbound&partner=CA-CBSA")
    assert (status, body["direction"], body["partner"]) == (200, "inbound", "CA-CBSA")
    status, body = await api(us, "GET", path + "?partner=MX-ANAM")
    assert status == 409, body
    status, body = await api(us, "GET", path + "?partner=GB-HMRC")
    assert status == 404, body
    status, body = await api(us, "GET", path + "?partner=mx")
    assert (status, body["detail"]) == (400, "partner must be a party id (CC-AGENCY)")


async def test_submission_refusals_are_audited(us: Running) -> None:
    await api(us, "POST", "/api/v1/messages", json=submission(us, recipient="ZZ-NOBODY"))
    rows = await us.gateway.store.audit_entries(AuditFilter(event=EventKind.SUBMIT_REJECTED.value))
    assert len(rows) == 1
    assert b'"reason":"recipient ZZ-NOBODY is not a configured partner"' in rows[0].entry


async def test_list_filters_and_pages(us: Running) -> None:
    ids = []
    for message_type in ("shipment.status", "enforcement.risk_alert", "shipment.status"):
        _, body = await api(us, "POST", "/api/v1/messages", json=submission(us, message_type))
        ids.append(body["message_id"])
    status, page = await api(us, "GET", "/api/v1/messages?type=shipment.status&direction=outbound")
    assert status == 200
    assert {item["message_id"] for item in page["items"]} == {ids[0], ids[2]}
    status, first = await api(us, "GET", "/api/v1/messages?limit=2")
    assert [item["message_id"] for item in first["items"]] == [ids[2], ids[1]]
    assert first["next_cursor"] is not None
    status, second = await api(us, "GET", f"/api/v1/messages?limit=2&after={first['next_cursor']}")
    assert [item["message_id"] for item in second["items"]] == [ids[0]]
    assert second["next_cursor"] is None
    for bad in (
        "limit=0",
        # digits to str.isdigit(), not to int() (a superscript), or not ASCII
        "limit=%C2%B2",
        "limit=%D9%A1",
        "limit=%EF%BC%91",
        "state=lost",
        "since=yesterday",
        "partner=mx",
        "colour=red",
        "after=zzz",
    ):
        status, body = await api(us, "GET", f"/api/v1/messages?{bad}")
        assert status == 400, bad
        assert body["status"] == 400


@pytest.mark.parametrize("name", ["since", "until"])
async def test_a_list_time_beyond_9999_is_a_clear_400(us: Running, name: str) -> None:
    status, body = await api(us, "GET", f"/api/v1/messages?{name}=9999-12-31T23:59:60Z")
    assert (status, body["code"]) == (400, "MALFORMED"), body
    assert body["detail"] == (
        f"{name} is out of range (years 0001 to 9999 UTC): '9999-12-31T23:59:60Z'"
    )


@pytest.mark.parametrize("respond_by", ["9999-12-31T23:59:60Z", "9999-12-31T18:59:60-05:00"])
async def test_a_respond_by_beyond_9999_is_a_clear_400(us: Running, respond_by: str) -> None:
    status, body = await api(
        us, "POST", "/api/v1/messages", json=submission(us, respond_by=respond_by)
    )
    assert (status, body["code"]) == (400, "MALFORMED"), body
    assert body["detail"] == f"respond_by is out of range (years 0001 to 9999 UTC): {respond_by!r}"
    assert sum((await us.gateway.store.outbox_depth()).values()) == 0


async def signed_header(us: Running, message_id: str) -> dict[str, Any]:
    """The header of the envelope the gateway signed and queued, parsed as a partner would."""
    record = await us.gateway.store.get_outbound(message_id)
    assert record is not None
    assert record.body is not None
    header: dict[str, Any] = json.loads(record.body)["header"]
    parse_envelope(record.body, max_bytes=len(record.body))
    return header


@pytest.mark.parametrize(
    ("respond_by", "signed"),
    [
        # (a deadline lies ahead: one past is refused, test_api_answers)
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59.000Z"),
        # PROTOCOL.md section 2: respond_by is RFC 3339 with any offset; it is signed in UTC
        ("2126-12-07T09:30:00+05:30", "2126-12-07T04:00:00.000Z"),
        ("2126-12-06T23:00:00-05:00", "2126-12-07T04:00:00.000Z"),
        ("2126-12-07t04:00:00.25z", "2126-12-07T04:00:00.250Z"),
    ],
)
async def test_respond_by_is_signed_as_rfc_3339_utc(
    us: Running, respond_by: str, signed: str
) -> None:
    status, body = await api(
        us, "POST", "/api/v1/messages", json=submission(us, respond_by=respond_by)
    )
    assert status == 202, body
    assert (await signed_header(us, body["message_id"]))["respond_by"] == signed


async def test_lookup_and_retry_refusals(us: Running) -> None:
    missing = "01890000-0000-7000-8000-000000000000"
    status, body = await api(us, "GET", f"/api/v1/messages/{missing}")
    assert (status, body["detail"]) == (404, f"no message with message_id {missing}")
    status, body = await api(us, "GET", "/api/v1/messages/not-a-uuid")
    assert (status, body["detail"]) == (400, "message_id must be a lowercase UUID")
    status, body = await api(us, "POST", f"/api/v1/messages/{missing}/retry")
    assert (status, body["detail"]) == (404, f"no outbound message with message_id {missing}")
    _, queued = await api(us, "POST", "/api/v1/messages", json=submission(us))
    mid = queued["message_id"]
    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/retry")
    assert status == 409
    assert body["detail"].endswith("only dead, closed or rejected messages can be retried")


async def dead_message(running: Running) -> str:
    """A message the gateway gave up on: its partner unreachable (a closed port) until it
    expired a second after it was submitted."""
    status, body = await api(running, "POST", "/api/v1/messages", json=submission(running, ttl_s=1))
    assert status == 202, body
    message_id: str = body["message_id"]
    await row_until(running.gateway.store, message_id, lambda r: r.state is OutboundState.DEAD)
    return message_id


async def metrics_text(running: Running) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.api_url + "/metrics", ssl=client_ssl(running.config)) as response,
    ):
        assert response.status == 200
        return await response.text()


async def test_a_dead_message_that_cannot_be_sent_again_is_closed_with_a_reason(
    us: Running,
) -> None:
    """C2COutboxDead counts dead messages: one whose body retention purged can never be
    retried, and the operator closes its case instead of silencing the alert."""
    mid = await dead_message(us)
    store = us.gateway.store
    assert await store.purge_bodies(datetime.now(UTC) + timedelta(days=1)) == 1
    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/retry")
    assert status == 409
    assert "its body was purged by retention: it cannot be signed again" in body["detail"]
    assert 'c2c_outbox_depth{state="dead"} 1.0' in await metrics_text(us)

    reason = "body purged by retention; MX-ANAM confirmed by phone it has the filing"
    status, body = await api(
        us, "POST", f"/api/v1/messages/{mid}/close", json={"reason": f" {reason} "}
    )
    assert (status, body) == (200, {"message_id": mid, "status": "closed"})
    status, view = await api(us, "GET", f"/api/v1/messages/{mid}")
    assert (status, view["state"], view["next_attempt_at"]) == (200, "closed", None)
    assert (view["last_error"] or "").startswith("expired at ")
    entry = json.loads((await store.audit_entries(AuditFilter(message_id=mid)))[-1].entry)
    assert {k: entry[k] for k in ("event", "outcome", "actor", "reason", "recipient")} == {
        "event": "operator_action",
        "outcome": "close",
        "actor": "api:test-client",
        "reason": f"operator closed a dead message: {reason}",
        "recipient": "MX-ANAM",
    }
    text = await metrics_text(us)
    assert 'c2c_outbox_depth{state="dead"} 0.0' in text
    assert 'c2c_outbox_depth{state="closed"} 1.0' in text
    status, body = await api(us, "GET", "/api/v1/messages?state=closed")
    assert (status, [item["message_id"] for item in body["items"]]) == (200, [mid])

    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/close", json={"reason": "x"})
    assert (status, body["detail"]) == (
        409,
        f"message {mid} is closed; only a dead message can be closed",
    )


async def test_a_retry_undoes_a_close(us: Running) -> None:
    mid = await dead_message(us)
    status, body = await api(
        us, "POST", f"/api/v1/messages/{mid}/close", json={"reason": "closed by mistake"}
    )
    assert (status, body["status"]) == (200, "closed")
    status, body = await api(
        us, "POST", f"/api/v1/messages/{mid}/retry", json={"reason": "closed by mistake, INC-4711"}
    )
    assert (status, body) == (200, {"message_id": mid, "status": "queued"})
    rows = await us.gateway.store.audit_entries(
        AuditFilter(message_id=mid, event=EventKind.OPERATOR_ACTION)
    )
    entries = [json.loads(row.entry) for row in rows]
    assert [(e["outcome"], e["actor"]) for e in entries] == [
        ("close", "api:test-client"),
        ("retry", "api:test-client"),
    ]
    assert entries[0]["reason"] == "operator closed a dead message: closed by mistake"
    # it had expired: queued again, it is signed again; the operator's reason comes last
    assert entries[1]["reason"].startswith("operator retry of a closed message that expired at")
    assert entries[1]["reason"].endswith("; the operator's reason: closed by mistake, INC-4711")


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        ({"reason": " "}, "a reason is required: say why it is sent again"),
        (
            {"reason": "fixed\tendpoint"},
            "the reason has a control character or line break (U+0009) at character 6: give"
            " it as one line of text",
        ),
        ({"why": "fixed"}, "unknown member(s): why; allowed: reason"),
    ],
)
async def test_a_retry_reason_is_one_line_of_text(
    us: Running, document: dict[str, Any], detail: str
) -> None:
    mid = await dead_message(us)
    size = await us.gateway.store.audit_size()
    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/retry", json=document)
    assert (status, body["detail"]) == (400, detail)
    row = await us.gateway.store.get_outbound(mid)
    assert row is not None
    assert row.state is OutboundState.DEAD
    assert await us.gateway.store.audit_size() == size


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (None, "Content-Type must be application/json, not 'application/octet-stream'"),
        ({}, "reason is required"),
        ({"reason": ""}, "reason must be a non-empty string of at most 500 characters"),
        ({"reason": 7}, "reason must be a non-empty string of at most 500 characters"),
        ({"reason": "x" * 501}, "reason must be a non-empty string of at most 500 characters"),
        ({"reason": " \t "}, "a reason is required: say why the message will not be sent again"),
        (
            {"reason": "purged\nby retention"},
            "the reason has a control character or line break (U+000A) at character 7: give"
            " it as one line of text",
        ),
        (
            {"reason": "purged\u2028by retention"},
            "the reason has a control character or line break (U+2028) at character 7: give"
            " it as one line of text",
        ),
        ({"reason": "purged", "force": True}, "unknown member(s): force; allowed: reason"),
    ],
)
async def test_a_close_needs_a_reason_of_one_line(
    us: Running, document: dict[str, Any] | None, detail: str
) -> None:
    """Refused before anything is read or written: the dead message stays dead, unaudited."""
    mid = await dead_message(us)
    size = await us.gateway.store.audit_size()
    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/close", json=document)
    assert (status, body["detail"]) == (400, detail)
    row = await us.gateway.store.get_outbound(mid)
    assert row is not None
    assert row.state is OutboundState.DEAD
    assert await us.gateway.store.audit_size() == size


async def test_close_refusals(us: Running) -> None:
    missing = "01890000-0000-7000-8000-000000000000"
    status, body = await api(
        us, "POST", f"/api/v1/messages/{missing}/close", json={"reason": "purged"}
    )
    assert (status, body["detail"]) == (404, f"no outbound message with message_id {missing}")
    status, body = await api(
        us, "POST", "/api/v1/messages/not-a-uuid/close", json={"reason": "purged"}
    )
    assert (status, body["detail"]) == (400, "message_id must be a lowercase UUID")
    _, queued = await api(us, "POST", "/api/v1/messages", json=submission(us))
    mid = queued["message_id"]
    status, body = await api(us, "POST", f"/api/v1/messages/{mid}/close", json={"reason": "x"})
    assert status == 409
    assert body["detail"] in (
        f"message {mid} is queued; only a dead message can be closed",
        f"message {mid} is sent; only a dead message can be closed",
    )


async def test_unknown_routes_and_methods_are_problems(us: Running) -> None:
    status, body = await api(us, "GET", "/api/v1/nothing")
    assert (status, body["title"]) == (404, "Not Found")
    status, body = await api(us, "DELETE", "/api/v1/messages")
    assert (status, body["title"]) == (405, "Method Not Allowed")


async def test_metrics_and_readiness(us: Running) -> None:
    await api(us, "POST", "/api/v1/messages", json=submission(us))
    async with (
        aiohttp.ClientSession() as session,
        session.get(us.api_url + "/metrics", ssl=client_ssl(us.config)) as response,
    ):
        text = await response.text()
    assert response.status == 200
    assert (
        'c2c_outbox_depth{state="queued"} 1.0' in text
        or 'c2c_outbox_depth{state="sent"} 1.0' in text
    )
    # per partner, read from the store at the scrape
    assert 'c2c_outbound_pending{partner="MX-ANAM"} 1.0' in text
    assert 'c2c_outbound_pending{partner="CA-CBSA"} 0.0' in text
    assert 'c2c_outbound_oldest_pending_age_seconds{partner="CA-CBSA"} 0.0' in text
    [age] = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('c2c_outbound_oldest_pending_age_seconds{partner="MX-ANAM"}')
    ]
    assert 0.0 < age < 60.0
    status, ready = await api(us, "GET", "/readyz")
    assert (status, ready) == (200, {"status": "ready", "checks": {"store": "ok"}})


async def test_openapi_document_matches_the_router(us: Running) -> None:
    status, document = await api(us, "GET", "/api/v1/openapi.json")
    assert status == 200
    assert document["openapi"] == "3.1.0"
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = {
        (route.method, route.resource.canonical)
        for route in us.api.app.router.routes()
        if route.resource is not None
    }
    assert documented == routed


async def test_what_partners_sent_is_read_with_c2c_receive(us: Running) -> None:
    """Inbound messages are every partner's enforcement data: a token that may send or query
    reads our messages (their state and receipts), not theirs; c2c:receive reads theirs."""
    status, sent = await api(us, "POST", "/api/v1/messages", json=submission(us))
    assert status == 202, sent
    ours = sent["message_id"]
    record = sample_record(sender="MX-ANAM")
    await us.gateway.store.store_inbound(record, [])
    theirs = record.message_id
    needs_receive = "this operation needs one of the scopes admin c2c:receive"
    needs_outbound = "this operation needs one of the scopes admin c2c:query c2c:send"
    for scopes, sees in (
        (("c2c:send",), "outbound"),
        (("c2c:query",), "outbound"),
        (("c2c:receive",), "inbound"),
    ):
        mine, other = (ours, theirs) if sees == "outbound" else (theirs, ours)
        status, body = await api(us, "GET", f"/api/v1/messages/{mine}", scopes=scopes)
        assert (status, body["direction"]) == (200, sees), (scopes, body)
        # the other direction's message is not there for this token, as an unknown id
        status, body = await api(us, "GET", f"/api/v1/messages/{other}", scopes=scopes)
        assert (status, body["detail"]) == (404, f"no message with message_id {other}"), scopes
        status, body = await api(us, "GET", "/api/v1/messages", scopes=scopes)
        assert status == 200, body
        assert [item["message_id"] for item in body["items"]] == [mine], (scopes, body)
        refused = "outbound" if sees == "inbound" else "inbound"
        for path in (
            f"/api/v1/messages?direction={refused}",
            f"/api/v1/messages/{other}?direction={refused}",
        ):
            status, body = await api(us, "GET", path, scopes=scopes)
            assert status == 403, (scopes, path, body)
            assert body["detail"] == (needs_outbound if refused == "outbound" else needs_receive)
        documents = "/api/v1/documents?partner=MX-ANAM&type=shipment.advance_data&ref=X1"
        status, body = await api(us, "GET", documents, scopes=scopes)
        assert status == (404 if sees == "inbound" else 403), (scopes, body)
    status, body = await api(us, "GET", "/api/v1/messages", scopes=("admin",))
    assert {item["message_id"] for item in body["items"]} == {ours, theirs}


async def test_who_read_which_message_is_logged(us: Running) -> None:
    record = sample_record(sender="MX-ANAM")
    await us.gateway.store.store_inbound(record, [])
    path = f"/api/v1/messages/{record.message_id}"
    with structlog.testing.capture_logs() as logs:
        status, _ = await api(us, "GET", path, scopes=("c2c:receive",))
        assert status == 200
        status, _ = await api(us, "GET", path + "?direction=inbound", scopes=("c2c:send",))
        assert status == 403
        status, _ = await api(us, "GET", "/healthz")
    lines = [line for line in logs if line["event"] == "api_access"]
    assert [(line["subject"], line["path"], line["query"], line["status"]) for line in lines] == [
        ("test-client", path, None, 200)
    ], lines


async def _post_raw(
    running: Running, body: bytes, headers: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            running.api_url + "/api/v1/messages",
            data=io.BytesIO(body),
            headers=CIMultiDict(
                [*auth(token(running.config, ("c2c:send",))).items(), *headers.items()]
            ),
            ssl=client_ssl(running.config),
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_a_request_refused_before_it_is_read_is_audited_too(us: Running) -> None:
    """Not only what the submission's checks refuse: a request whose body or headers cannot
    be read into a submission is audited with its exact reason, naming what it named."""
    good = json.dumps(submission(us)).encode()
    json_type = {"Content-Type": "application/json"}
    cases = [
        (b"{not json", json_type, None),
        (json.dumps({**submission(us), "colour": "blue"}).encode(), json_type, "MX-ANAM"),
        (good, {"Content-Type": "text/plain"}, None),
        (
            good,
            CIMultiDict([*json_type.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]),
            None,
        ),
        (json.dumps(submission(us, "query.trader_lookup")).encode(), json_type, "MX-ANAM"),
    ]
    statuses = [(await _post_raw(us, body, headers))[0] for body, headers, _ in cases]
    assert statuses == [400, 400, 400, 400, 403]
    rows = await us.gateway.store.audit_entries(
        AuditFilter(event=EventKind.SUBMIT_REJECTED.value), limit=10
    )
    entries = [json.loads(row.entry) for row in rows]
    assert [(e["actor"], e["outcome"], e.get("recipient")) for e in entries] == [
        ("api:test-client", "MALFORMED", None),
        ("api:test-client", "MALFORMED", "MX-ANAM"),
        ("api:test-client", "MALFORMED", None),
        ("api:test-client", "MALFORMED", None),
        ("api:test-client", "NOT_AUTHORIZED", "MX-ANAM"),
    ]
    assert entries[0]["reason"].startswith("invalid JSON")
    assert entries[1]["reason"].startswith("unknown member(s): colour")
    assert entries[2]["reason"] == "Content-Type must be application/json, not 'text/plain'"
    assert entries[4]["reason"] == (
        "query.trader_lookup (a query) needs the scope c2c:query; the token has not"
    )
    assert sum((await us.gateway.store.outbox_depth()).values()) == 0


async def test_a_submission_is_read_up_to_the_largest_body_a_partner_takes(
    tmp_path: Path,
) -> None:
    """MX-ANAM takes 2 MiB (manifests): a submission to it is not refused at [limits]' 1 MiB
    before its own limit is applied; past the largest limit the 413 names the setting."""
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    partner = dataclasses.replace(config.partners["MX-ANAM"], max_body_bytes=2 * 1024 * 1024)
    config = dataclasses.replace(config, partners={**config.partners, "MX-ANAM": partner})
    assert config.limits.max_body_bytes == 1024 * 1024
    running = await start_gateway(config)
    try:
        compact = json.dumps(submission_for(config, "shipment.status")).encode()
        padded = b"{" + b" " * 1_500_000 + compact[1:]  # the envelope built from it is small
        status, answer = await _post_raw(running, padded, {"Content-Type": "application/json"})
        assert status == 202, answer
        over = b"{" + b" " * (2 * 1024 * 1024) + compact[1:]
        status, answer = await _post_raw(running, over, {"Content-Type": "application/json"})
        assert (status, answer["code"]) == (413, "TOO_LARGE"), answer
        assert answer["detail"] == (
            f"body of {len(over)} bytes exceeds the limit of {2 * 1024 * 1024} bytes"
            " (the largest max_body_bytes of [limits] and the partners)"
        )
    finally:
        await running.gateway.stop()
