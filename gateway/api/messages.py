"""Internal API: submit, look up, list, retry and close messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from gateway.adapters.registry import partner_media_type
from gateway.api.auth import SCOPE_QUERY, claims_of, forbidden, readable
from gateway.api.problems import json_response, problem
from gateway.api.requests import Fields, json_object, path_uuid, query_fields
from gateway.api.services import SERVICES
from gateway.clock import format_rfc3339
from gateway.config import MAX_TTL_S
from gateway.errors import GatewayError, Malformed, NotAuthorized, TooLarge
from gateway.model import Direction, Priority, is_party_id
from gateway.outbound.operator import (
    MAX_OPERATOR_REASON,
    OperatorRefused,
    operator_close,
    operator_retry,
)
from gateway.outbound.submission import (
    Submission,
    is_query_type,
    named_in,
    record_refusal,
    submit_request,
)
from gateway.store.base import (
    INBOUND_DELIVERED,
    INBOUND_RECEIVED,
    InboundRecord,
    MessageFilter,
    OutboundRecord,
    OutboundState,
    Store,
)
from gateway.store.queries import InvalidCursor
from gateway.transports.https_server import SIGNATURE_HEADER

SUBMIT_MEMBERS = frozenset(
    {
        "recipient",
        "message_type",
        "schema_version",
        "payload",
        "correlation_id",
        "in_reply_to",
        "priority",
        "ttl_s",
        "respond_by",
        "legal_basis",
    }
)
LIST_STATES = frozenset({s.value for s in OutboundState} | {INBOUND_RECEIVED, INBOUND_DELIVERED})
MAX_PAGE = 500
DEFAULT_PAGE = 50
_R = TypeVar("_R")
#: narrowing GET /api/v1/messages/{id} when the id names several messages
ONE_QUERY = frozenset({"direction", "partner"})
LIST_QUERY = frozenset(
    {"direction", "partner", "type", "state", "since", "until", "correlation_id", "limit", "after"}
)
#: ``POST /api/v1/messages/{id}/close`` and ``/retry``: the operator's reason, and room for
#: its JSON escapes
REASON_MEMBERS = frozenset({"reason"})
REASON_BODY_BYTES = 16 * 1024
#: an operator action's refusal (``OperatorRefused.kind``) as an HTTP status
_REFUSED_STATUS = {"not_found": 404, "conflict": 409, "invalid": 400}
#: draft-ietf-httpapi-idempotency-key-header; a replayed answer says so (as Stripe's API does)
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


def actor_of(request: web.Request) -> str:
    return f"api:{claims_of(request).subject}"


def idempotency_key_of(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header: a structured-field string (``"..."``) or a bare token.

    Its characters are checked by the submission (so a bad key is audited like any refusal).
    """
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if len(values) > 1:
        raise Malformed(f"{IDEMPOTENCY_HEADER} given more than once")
    if not values:
        return None
    value = values[0].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def submission_from(
    document: dict[str, Any], *, actor: str, idempotency_key: str | None = None
) -> Submission:
    fields = Fields(document, allowed=SUBMIT_MEMBERS)
    priority = fields.choice("priority", frozenset(p.value for p in Priority))
    recipient = fields.required_text("recipient", limit=40)
    message_type = fields.required_text("message_type", limit=100)
    return Submission(
        recipient=recipient,
        message_type=message_type,
        schema_version=fields.text("schema_version", limit=20) or "1.0",
        payload=fields.obj("payload"),
        correlation_id=fields.uuid("correlation_id"),
        in_reply_to=fields.uuid("in_reply_to"),
        priority=Priority(priority) if priority else Priority.ROUTINE,
        ttl_s=fields.integer("ttl_s", low=1, high=MAX_TTL_S),
        respond_by=fields.timestamp("respond_by", utc=False),
        legal_basis=fields.text("legal_basis"),
        actor=actor,
        idempotency_key=idempotency_key,
    )


async def read_submission(
    request: web.Request,
    build: Callable[[dict[str, Any], str, str | None], _R],
    *,
    recipient_member: str = "recipient",
) -> _R:
    """``build(document, actor, idempotency key)`` of the request's JSON body. A request
    refused here, before ``submit_request`` (which audits its own refusals), is audited too:
    a header given twice, a body too large, not JSON, an unknown or mistyped member."""
    services = request.app[SERVICES]
    actor = actor_of(request)
    document: object = None
    try:
        key = idempotency_key_of(request)
        limit = services.config.largest_body_bytes
        try:
            document = await json_object(request, max_bytes=limit)
        except TooLarge as exc:
            raise TooLarge(
                f"{exc.reason} (the largest max_body_bytes of [limits] and the partners)"
            ) from None
        return build(document, actor, key)
    except GatewayError as exc:
        await record_refusal(
            services.submission(),
            exc,
            actor=actor,
            **named_in(document, recipient_member=recipient_member),
        )
        raise


async def post_message(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    submission = await read_submission(
        request,
        lambda document, actor, key: submission_from(document, actor=actor, idempotency_key=key),
    )
    if is_query_type(submission.message_type) and SCOPE_QUERY not in claims_of(request).scopes:
        # the same question through /api/v1/queries needs c2c:query: not c2c:send alone here
        what = f"{submission.message_type} (a query)"
        refused = NotAuthorized(f"{what} needs the scope {SCOPE_QUERY}; the token has not")
        await record_refusal(
            services.submission(),
            refused,
            actor=submission.actor,
            recipient=submission.recipient,
            message_type=submission.message_type,
        )
        return forbidden({SCOPE_QUERY}, what=what)
    submitted = await submit_request(services.submission(), submission)
    record = submitted.record
    services.wake()
    headers = {"Location": f"/api/v1/messages/{record.message_id}"}
    if submitted.replayed:
        headers[REPLAYED_HEADER] = "true"
    return json_response(
        {"message_id": record.message_id, "status": record.state.value},
        status=202,
        headers=headers,
    )


def _json_or_none(body: bytes | None) -> Any:
    if body is None:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # A native-format body (XML, EDIFACT) is shown as text.
        return body.decode("utf-8", errors="replace")


def _opt_time(value: Any) -> str | None:
    return None if value is None else format_rfc3339(value)


def outbound_view(record: OutboundRecord) -> dict[str, Any]:
    receipt = None
    if record.receipt_body is not None:
        receipt = {
            "envelope": _json_or_none(record.receipt_body),
            "signature": record.receipt_signature,
        }
    return {
        "direction": Direction.OUTBOUND.value,
        "message_id": record.message_id,
        "partner": record.recipient,
        "message_type": record.message_type,
        "schema_version": record.schema_version,
        "correlation_id": record.correlation_id,
        "in_reply_to": record.in_reply_to,
        "priority": record.priority.value,
        "state": record.state.value,
        "attempts": record.attempts,
        "last_error": record.last_error,
        "created_at": format_rfc3339(record.created_at),
        "updated_at": format_rfc3339(record.updated_at),
        "expires_at": _opt_time(record.expires_at),
        "next_attempt_at": format_rfc3339(record.next_attempt_at)
        if record.state in (OutboundState.QUEUED, OutboundState.SENT)
        else None,
        "body_digest": record.body_digest,
        "submitted_by": record.submitted_by,
        "idempotency_key": record.idempotency_key,
        "envelope": _json_or_none(record.body),
        "signature": record.signature,
        "receipt": receipt,
    }


def inbound_view(record: InboundRecord) -> dict[str, Any]:
    return {
        "direction": Direction.INBOUND.value,
        "message_id": record.message_id,
        "partner": record.sender,
        "message_type": record.message_type,
        "schema_version": record.schema_version,
        "correlation_id": record.correlation_id,
        "in_reply_to": record.in_reply_to,
        "state": INBOUND_DELIVERED if record.relayed else INBOUND_RECEIVED,
        "received_at": format_rfc3339(record.received_at),
        "transport": record.transport,
        "body_digest": record.body_digest,
        "envelope": _json_or_none(record.body),
        "signature": record.signature,
        "receipt": {
            "envelope": _json_or_none(record.receipt_body),
            "signature": record.receipt_signature,
        },
        # a version of a document (gateway/documents.py): GET /api/v1/documents lists them
        "document_ref": record.document_ref,
        "document_version": record.document_version,
        "message_function": record.message_function,
    }


def message_view(record: OutboundRecord | InboundRecord) -> dict[str, Any]:
    return outbound_view(record) if isinstance(record, OutboundRecord) else inbound_view(record)


async def find_records(
    store: Store,
    partners: Iterable[str],
    message_id: str,
    *,
    direction: Direction | None = None,
    partner: str | None = None,
) -> list[OutboundRecord | InboundRecord]:
    """Every message with this id, narrowed by direction and partner. Our ids are unique, but
    a partner's are unique per sender only (PROTOCOL.md section 2), and may equal ours."""
    records: list[OutboundRecord | InboundRecord] = []
    if direction in (None, Direction.OUTBOUND):
        outbound = await store.get_outbound(message_id)
        if outbound is not None and partner in (None, outbound.recipient):
            records.append(outbound)
    if direction in (None, Direction.INBOUND):
        # partners are few, so each is asked
        for sender in sorted(partners) if partner is None else [partner]:
            inbound = await store.get_inbound(sender, message_id)
            if inbound is not None:
                records.append(inbound)
    return records


async def find_messages(
    store: Store,
    partners: Iterable[str],
    message_id: str,
    *,
    direction: Direction | None = None,
    partner: str | None = None,
) -> list[dict[str, Any]]:
    """``find_records``' messages as the API shows them."""
    records = await find_records(store, partners, message_id, direction=direction, partner=partner)
    return [message_view(record) for record in records]


def several_messages(
    message_id: str, views: list[dict[str, Any]], *, narrow: str = "direction and partner"
) -> str:
    named = ", ".join(
        f"{'outbound to' if view['direction'] == 'outbound' else 'inbound from'} {view['partner']}"
        for view in views
    )
    return f"message_id {message_id} names {len(views)} messages ({named}): give {narrow}"


def _partner_of(record: OutboundRecord | InboundRecord) -> str:
    return record.recipient if isinstance(record, OutboundRecord) else record.sender


async def _the_message(request: web.Request) -> OutboundRecord | InboundRecord | web.Response:
    """The one message ``/api/v1/messages/{message_id}`` names, narrowed by ``direction`` and
    ``partner`` and limited to the directions the token may read; else the problem to answer."""
    message_id = path_uuid(request, "message_id")
    fields = query_fields(request, ONE_QUERY)
    direction = fields.choice("direction", frozenset(d.value for d in Direction))
    partner = fields.text("partner", limit=40)
    if partner is not None and not is_party_id(partner):
        raise Malformed("partner must be a party id (CC-AGENCY)")
    services = request.app[SERVICES]
    records = await find_records(
        services.store,
        services.config.partners,
        message_id,
        direction=Direction(direction) if direction else _only_readable(request),
        partner=partner,
    )
    if not records:
        return problem(404, f"no message with message_id {message_id}")
    if len(records) > 1:
        return problem(409, several_messages(message_id, [message_view(r) for r in records]))
    return records[0]


async def get_message(request: web.Request) -> web.Response:
    found = await _the_message(request)
    return found if isinstance(found, web.Response) else json_response(message_view(found))


def _signed_bytes(
    request: web.Request, record: OutboundRecord | InboundRecord, body: bytes, signature: str
) -> web.Response:
    """Exactly ``body`` as stored, its detached JWS in the header that carries it on the wire
    (PROTOCOL.md section 5): what the signature covers, to verify it again."""
    return web.Response(
        body=body,
        content_type=partner_media_type(request.app[SERVICES].config.partners, _partner_of(record)),
        headers={SIGNATURE_HEADER: signature},
    )


async def get_message_body(request: web.Request) -> web.Response:
    """``GET /api/v1/messages/{message_id}/body``: the message's bytes as sent or received."""
    found = await _the_message(request)
    if isinstance(found, web.Response):
        return found
    if found.body is None:
        # body retention (``Store.purge_bodies``) nulls the body alone
        return problem(
            410,
            f"the body of message {found.message_id} was removed after the retention period"
            " ([retention] body_retention_days): its digest (body_digest) and signature are"
            " kept with the message, and the digest in the audit log",
            body_digest=found.body_digest,
        )
    return _signed_bytes(request, found, found.body, found.signature)


async def get_receipt_body(request: web.Request) -> web.Response:
    """``GET /api/v1/messages/{message_id}/receipt/body``: the receipt's bytes, ours for an
    inbound message, the partner's for an outbound one. Retention never removes receipts."""
    found = await _the_message(request)
    if isinstance(found, web.Response):
        return found
    body, signature = found.receipt_body, found.receipt_signature
    if body is None or signature is None:
        # an inbound message is stored with the receipt that answered it: only ours wait
        waiting = (
            f"to {found.recipient} has no receipt: it is {found.state.value}, no receipt has come"
            if isinstance(found, OutboundRecord)
            else f"from {found.sender} has no receipt stored"
        )
        return problem(404, f"message {found.message_id} {waiting}")
    return _signed_bytes(request, found, body, signature)


def message_filter(request: web.Request) -> tuple[MessageFilter, int, str | None]:
    fields = query_fields(request, LIST_QUERY)
    direction = fields.choice("direction", frozenset(d.value for d in Direction))
    partner = fields.text("partner", limit=40)
    if partner is not None and not is_party_id(partner):
        raise Malformed("partner must be a party id (CC-AGENCY)")
    limit = fields.decimal("limit", low=1, high=MAX_PAGE)
    filt = MessageFilter(
        direction=Direction(direction) if direction else None,
        partner=partner,
        message_type=fields.text("type", limit=100),
        state=fields.choice("state", LIST_STATES),
        since=fields.timestamp("since"),
        until=fields.timestamp("until"),
        correlation_id=fields.uuid("correlation_id"),
    )
    return filt, limit or DEFAULT_PAGE, fields.text("after", limit=400)


def _only_readable(request: web.Request) -> Direction | None:
    """The direction a request that names none is limited to: the one its token may read
    when it may not read both (a message of the other is then "no such message")."""
    directions = readable(request)
    return next(iter(directions)) if len(directions) == 1 else None


async def list_messages(request: web.Request) -> web.Response:
    filt, limit, after = message_filter(request)
    if filt.direction is None:
        filt = dataclasses.replace(filt, direction=_only_readable(request))
    try:
        page = await request.app[SERVICES].store.list_messages(filt, limit=limit, after=after)
    except InvalidCursor:
        return problem(400, "after is not a cursor this API returned", code="MALFORMED")
    return json_response(
        {
            "items": [
                {
                    "direction": item.direction.value,
                    "message_id": item.message_id,
                    "partner": item.partner,
                    "message_type": item.message_type,
                    "schema_version": item.schema_version,
                    "correlation_id": item.correlation_id,
                    "state": item.state,
                    "at": format_rfc3339(item.at),
                    "attempts": item.attempts,
                    "body_digest": item.body_digest,
                }
                for item in page.items
            ],
            "next_cursor": page.next_cursor,
        }
    )


async def retry_message(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    message_id = path_uuid(request, "message_id")
    # the body is optional: a retry asked with none is audited without a reason
    why = None
    if request.body_exists:
        document = await json_object(request, max_bytes=REASON_BODY_BYTES)
        why = Fields(document, allowed=REASON_MEMBERS).required_text(
            "reason", limit=MAX_OPERATOR_REASON
        )
    try:
        record = await operator_retry(
            services.store,
            party=services.config.party,
            message_id=message_id,
            actor=actor_of(request),
            now=services.clock.now(),
            config=services.config,
            signing_keys=services.signing_keys,
            why=why,
        )
    except OperatorRefused as exc:
        return _refused(exc)
    services.wake()
    return json_response({"message_id": record.message_id, "status": record.state.value})


async def close_message(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    message_id = path_uuid(request, "message_id")
    document = await json_object(request, max_bytes=REASON_BODY_BYTES)
    reason = Fields(document, allowed=REASON_MEMBERS).required_text(
        "reason", limit=MAX_OPERATOR_REASON
    )
    try:
        record = await operator_close(
            services.store,
            party=services.config.party,
            message_id=message_id,
            actor=actor_of(request),
            reason=reason,
            now=services.clock.now(),
        )
    except OperatorRefused as exc:
        return _refused(exc)
    return json_response({"message_id": record.message_id, "status": record.state.value})


def _refused(exc: OperatorRefused) -> web.Response:
    return problem(_REFUSED_STATUS[exc.kind], exc.reason)
