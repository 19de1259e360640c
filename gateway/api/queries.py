"""Internal API: ask a partner a question and wait (a bounded time) for its answer.

The query is an ordinary outbound message; the answer is the partner's ``query.response``
whose ``in_reply_to`` names it, found in the inbox. Waiting reads the store, so the answer is
found whichever replica received it. Past ``timeout_s`` the caller gets 202 and polls
``GET /api/v1/queries/{id}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.api.messages import REPLAYED_HEADER, inbound_view, read_submission
from gateway.api.problems import json_response, problem
from gateway.api.requests import Fields, path_uuid
from gateway.api.services import SERVICES, ApiServices
from gateway.errors import Malformed
from gateway.outbound.submission import (
    QUERY_RESPONSE_TYPE,
    Submission,
    is_query_type,
    submit_request,
)
from gateway.store.base import OutboundRecord, OutboundState

QUERY_MEMBERS = frozenset(
    {"partner", "message_type", "schema_version", "params", "timeout_s", "correlation_id"}
)
RESPONSE_TYPE = QUERY_RESPONSE_TYPE
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
#: states in which no answer can come any more
FINAL_STATES = frozenset({OutboundState.REJECTED, OutboundState.DEAD, OutboundState.CLOSED})


def query_submission(
    document: dict[str, Any], *, actor: str, idempotency_key: str | None = None
) -> tuple[Submission, float]:
    fields = Fields(document, allowed=QUERY_MEMBERS)
    message_type = fields.required_text("message_type", limit=100)
    if not is_query_type(message_type):
        raise Malformed(f"message_type must be a query type (query.*), not {message_type!r}")
    timeout_s = fields.number("timeout_s", low=0, high=MAX_TIMEOUT_S)
    submission = Submission(
        recipient=fields.required_text("partner", limit=40),
        recipient_member="partner",
        message_type=message_type,
        schema_version=fields.text("schema_version", limit=20) or "1.0",
        payload=fields.obj("params"),
        correlation_id=fields.uuid("correlation_id"),
        actor=actor,
        idempotency_key=idempotency_key,
    )
    return submission, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s


async def _answer(services: ApiServices, query: OutboundRecord) -> dict[str, Any] | None:
    """The asked partner's ``query.response`` to the query: nobody else's, and not another
    message of the partner's that happens to name the query."""
    reply = await services.store.find_inbound_reply(
        query.message_id, sender=query.recipient, message_type=RESPONSE_TYPE
    )
    return None if reply is None else inbound_view(reply)


def is_query(record: OutboundRecord) -> bool:
    return is_query_type(record.message_type)


def _view(query: OutboundRecord, answer: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "query_id": query.message_id,
        "partner": query.recipient,
        "message_type": query.message_type,
        "state": "answered" if answer is not None else query.state.value,
        "last_error": query.last_error,
        "response": answer,
    }


async def post_query(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    submission, timeout_s = await read_submission(
        request,
        lambda document, actor, key: query_submission(document, actor=actor, idempotency_key=key),
        recipient_member="partner",
    )
    submitted = await submit_request(services.submission(), submission)
    query = submitted.record
    replayed = {REPLAYED_HEADER: "true"} if submitted.replayed else {}
    services.wake()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        answer = await _answer(services, query)
        if answer is not None:
            return json_response(_view(query, answer), headers=replayed)
        current = await services.store.get_outbound(query.message_id)
        if current is not None:
            query = current
        if query.state in FINAL_STATES or loop.time() >= deadline:
            break
        await asyncio.sleep(min(services.query_poll_s, max(0.0, deadline - loop.time())))
    return json_response(
        _view(query, None),
        status=202,
        headers={"Location": f"/api/v1/queries/{query.message_id}", **replayed},
    )


async def get_query(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    query_id = path_uuid(request, "query_id")
    query = await services.store.get_outbound(query_id)
    if query is None or not is_query(query):
        return problem(404, f"no query with query_id {query_id}")
    return json_response(_view(query, await _answer(services, query)))
