"""A query's answer over the internal API: only the asked partner's query.response."""

from __future__ import annotations

import dataclasses

from inbound_records import sample_record
from outbound_env import Running, example
from test_api_answers import answer, received
from test_api_idempotency import entries, outbox_size
from test_api_messages import api

from gateway.audit.events import EventKind


async def reply(running: Running, query_id: str, sender: str, message_type: str) -> str:
    """A partner's message naming the query, as the inbound pipeline stores it."""
    record = dataclasses.replace(
        sample_record(sender=sender), in_reply_to=query_id, message_type=message_type
    )
    await running.gateway.store.store_inbound(record, [])
    return record.message_id


async def test_only_the_asked_partners_response_answers_a_query(us: Running) -> None:
    status, asked = await api(
        us,
        "POST",
        "/api/v1/queries",
        json={
            "partner": "MX-ANAM",
            "message_type": "query.shipment_lookup",
            "params": example(us.gateway, "query.shipment_lookup"),
            "timeout_s": 0,
        },
    )
    assert status == 202, asked
    query_id = asked["query_id"]
    path = f"/api/v1/queries/{query_id}"
    # another partner's response naming the query, and the asked partner's other messages
    await reply(us, query_id, "CA-CBSA", "query.response")
    await reply(us, query_id, "MX-ANAM", "shipment.status")
    status, body = await api(us, "GET", path)
    assert (status, body["state"], body["response"]) == (200, "queued", None)
    answer_id = await reply(us, query_id, "MX-ANAM", "query.response")
    status, body = await api(us, "GET", path)
    assert (status, body["state"]) == (200, "answered")
    assert (body["response"]["partner"], body["response"]["message_id"]) == ("MX-ANAM", answer_id)


async def test_an_outbound_response_is_no_query(us: Running) -> None:
    lookup = await received(us, "query.shipment_lookup")
    status, sent = await api(
        us,
        "POST",
        "/api/v1/messages",
        json=answer(us, "query.response", lookup),
        scopes=("c2c:send",),  # an answer asks nothing: sending it needs no c2c:query
    )
    assert status == 202, sent
    status, body = await api(us, "GET", f"/api/v1/queries/{sent['message_id']}")
    assert status == 404, body


def _question(us: Running) -> dict[str, object]:
    return {
        "recipient": "MX-ANAM",
        "message_type": "query.trader_lookup",
        "payload": example(us.gateway, "query.trader_lookup"),
    }


async def test_a_query_sent_as_a_message_needs_the_query_scope(us: Running) -> None:
    """The question POST /api/v1/queries asks only with c2c:query is not asked through
    POST /api/v1/messages with c2c:send alone."""
    status, body = await api(
        us, "POST", "/api/v1/messages", json=_question(us), scopes=("c2c:send",)
    )
    assert (status, body["detail"]) == (
        403,
        "query.trader_lookup (a query) needs the scope c2c:query",
    ), body
    assert await outbox_size(us) == 0
    assert await entries(us, EventKind.QUERY) == []
    assert await entries(us, EventKind.SUBMITTED) == []


async def test_a_query_sent_as_a_message_is_audited_as_a_query(us: Running) -> None:
    status, sent = await api(
        us, "POST", "/api/v1/messages", json=_question(us), scopes=("c2c:send", "c2c:query")
    )
    assert status == 202, sent
    [asked] = await entries(us, EventKind.QUERY)
    assert (asked["message_id"], asked["actor"]) == (sent["message_id"], "api:test-client")
    assert await entries(us, EventKind.SUBMITTED) == []
    status, body = await api(us, "GET", f"/api/v1/queries/{sent['message_id']}")
    assert (status, body["message_type"]) == (200, "query.trader_lookup"), body


async def test_an_unknown_partner_is_named_by_the_member_that_named_it(us: Running) -> None:
    question = {
        "partner": "GB-HMRC",
        "message_type": "query.trader_lookup",
        "params": example(us.gateway, "query.trader_lookup"),
        "timeout_s": 0,
    }
    status, body = await api(us, "POST", "/api/v1/queries", json=question)
    assert (status, body["detail"]) == (403, "partner GB-HMRC is not a configured partner"), body
    status, body = await api(us, "POST", "/api/v1/queries", json={**question, "partner": "gb"})
    assert (status, body["detail"]) == (400, "partner 'gb' is not a party id (CC-AGENCY)"), body
