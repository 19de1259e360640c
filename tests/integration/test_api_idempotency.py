"""Idempotency-Key on the internal API, over real TLS: a retried submission sends nothing new."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from outbound_env import Running, auth, client_ssl, example, token

from gateway.audit.events import EventKind
from gateway.store.base import AuditFilter


async def post(
    running: Running,
    path: str,
    document: dict[str, Any],
    *,
    key: str | list[str] | None,
    subject: str = "test-client",
) -> tuple[int, Any, dict[str, str]]:
    headers = auth(token(running.config, ("c2c:send", "c2c:query"), subject=subject))
    keys = [key] if isinstance(key, str) else key or []
    async with aiohttp.ClientSession() as session:
        request_headers = [(name, value) for name, value in headers.items()]
        request_headers += [("Idempotency-Key", value) for value in keys]
        async with session.post(
            running.api_url + path,
            data=orjson.dumps(document),
            headers=[*request_headers, ("Content-Type", "application/json")],
            ssl=client_ssl(running.config),
        ) as response:
            body = await response.json(content_type=None)
            return response.status, body, dict(response.headers)


def submission(running: Running, **extra: Any) -> dict[str, Any]:
    return {
        "recipient": "MX-ANAM",
        "message_type": "shipment.status",
        "payload": example(running.gateway, "shipment.status"),
        **extra,
    }


async def entries(running: Running, event: EventKind) -> list[dict[str, Any]]:
    rows = await running.gateway.store.audit_entries(AuditFilter(event=event.value), limit=100)
    return [orjson.loads(row.entry) for row in rows]


async def outbox_size(running: Running) -> int:
    return sum((await running.gateway.store.outbox_depth()).values())


async def test_a_retried_submission_gets_the_first_message_back(us: Running) -> None:
    status, first, headers = await post(us, "/api/v1/messages", submission(us), key='"order-1"')
    assert status == 202, first
    assert "Idempotent-Replayed" not in headers
    # The bare-token form names the same key as the structured-field string.
    status, again, headers = await post(us, "/api/v1/messages", submission(us), key="order-1")
    assert status == 202, again
    assert again == first
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["Location"] == f"/api/v1/messages/{first['message_id']}"
    assert await outbox_size(us) == 1
    assert [e["message_id"] for e in await entries(us, EventKind.SUBMITTED)] == [
        first["message_id"]
    ]
    record = await us.gateway.store.get_outbound(first["message_id"])
    assert record is not None
    assert record.idempotency_key == "order-1"


async def test_concurrent_twins_make_one_message(us: Running) -> None:
    results = await asyncio.gather(
        *(post(us, "/api/v1/messages", submission(us), key="burst") for _ in range(6))
    )
    assert {status for status, _, _ in results} == {202}
    assert len({body["message_id"] for _, body, _ in results}) == 1
    assert sum(1 for _, _, headers in results if "Idempotent-Replayed" not in headers) == 1
    assert await outbox_size(us) == 1
    assert len(await entries(us, EventKind.SUBMITTED)) == 1


async def test_a_key_reused_for_another_request_is_refused_and_audited(us: Running) -> None:
    status, first, _ = await post(us, "/api/v1/messages", submission(us), key="order-2")
    assert status == 202
    changed = submission(us, priority="urgent")
    status, body, _ = await post(us, "/api/v1/messages", changed, key="order-2")
    assert status == 422, body
    assert body["code"] == "DUPLICATE_CONFLICT"
    assert first["message_id"] in body["detail"]
    assert await outbox_size(us) == 1
    [refusal] = await entries(us, EventKind.SUBMIT_REJECTED)
    assert refusal["outcome"] == "DUPLICATE_CONFLICT"
    assert refusal["actor"] == "api:test-client"
    assert "Idempotency-Key 'order-2'" in refusal["reason"]


async def test_keys_belong_to_their_token_subject(us: Running) -> None:
    _, alice, _ = await post(us, "/api/v1/messages", submission(us), key="k", subject="alice")
    _, bob, headers = await post(us, "/api/v1/messages", submission(us), key="k", subject="bob")
    assert alice["message_id"] != bob["message_id"]
    assert "Idempotent-Replayed" not in headers
    assert await outbox_size(us) == 2


async def test_without_a_key_each_submission_is_a_new_message(us: Running) -> None:
    for _ in range(2):
        status, _, _ = await post(us, "/api/v1/messages", submission(us), key=None)
        assert status == 202
    assert await outbox_size(us) == 2


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        ("", "1 to 255 printable ASCII characters"),
        ('""', "1 to 255 printable ASCII characters"),
        ("x" * 256, "1 to 255 printable ASCII characters"),
        ('"a\\"b"', "1 to 255 printable ASCII characters"),
        (["a", "b"], "Idempotency-Key given more than once"),
    ],
)
async def test_bad_keys_are_refused(us: Running, key: str | list[str], detail: str) -> None:
    status, body, _ = await post(us, "/api/v1/messages", submission(us), key=key)
    assert (status, body["code"]) == (400, "MALFORMED"), body
    assert detail in body["detail"]
    assert await outbox_size(us) == 0


async def test_a_bad_key_is_audited(us: Running) -> None:
    status, _, _ = await post(us, "/api/v1/messages", submission(us), key="tab\there")
    assert status == 400
    [refusal] = await entries(us, EventKind.SUBMIT_REJECTED)
    assert refusal["outcome"] == "MALFORMED"
    assert "idempotency key" in refusal["reason"]


async def test_a_retried_query_is_the_same_query(us: Running) -> None:
    document = {
        "partner": "MX-ANAM",
        "message_type": "query.shipment_lookup",
        "params": example(us.gateway, "query.shipment_lookup"),
        "timeout_s": 0,
    }
    status, first, headers = await post(us, "/api/v1/queries", document, key="ask-1")
    assert status == 202, first
    assert "Idempotent-Replayed" not in headers
    status, again, headers = await post(us, "/api/v1/queries", document, key="ask-1")
    assert status == 202, again
    assert again["query_id"] == first["query_id"]
    assert headers["Idempotent-Replayed"] == "true"
    assert len(await entries(us, EventKind.QUERY)) == 1
    # The same key on the messages endpoint is another request.
    status, body, _ = await post(us, "/api/v1/messages", submission(us), key="ask-1")
    assert status == 422, body
