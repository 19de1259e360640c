"""Submission: an internal system's message becomes a signed, stored outbox row.

The stages run in the order of ``STAGES``; each enriches the context or raises a
``GatewayError``. Nothing is stored unless every stage passed, and the row is stored with
its ``submitted`` audit event in one transaction, so a 202 means the message is durable.
The signature is made here, once: the dispatcher sends these exact bytes on every attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict

import orjson
import structlog

from gateway.adapters.registry import adapter_for, from_canonical_off_loop
from gateway.answers import check_echo
from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import Clock, format_rfc3339
from gateway.config import GatewayConfig, PartnerConfig
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import Alg, SigningKey, current_key
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import (
    GatewayError,
    Malformed,
    NotAuthorized,
    TooLarge,
    Unavailable,
    UnsupportedType,
)
from gateway.model import Header, Priority, is_party_id
from gateway.schemas.registry import ANSWERS, SchemaRegistry
from gateway.store.base import OutboundRecord, Store, same_request

log = structlog.get_logger(__name__)

RECEIPT_TYPE = "receipt"
#: the witnessing types (docs/witnessing.md): made and answered by the gateway itself
GATEWAY_TYPE_PREFIX = "audit."
MAX_IDEMPOTENCY_KEY = 255
#: the answer to a query: a message type of the query.* family that asks nothing
QUERY_RESPONSE_TYPE = "query.response"


def is_query_type(message_type: str) -> bool:
    """A question to a partner (``query.*`` but the response): asked through the queries API
    or submitted as a message, it needs the ``c2c:query`` scope and is audited as ``query``."""
    return message_type.startswith("query.") and message_type != QUERY_RESPONSE_TYPE


@dataclass(frozen=True, kw_only=True)
class Submission:
    """What an internal system asks to send (API body or ``c2c.submit`` message)."""

    recipient: str
    message_type: str
    payload: Mapping[str, Any]
    actor: str
    #: the request member that named the recipient, for the errors about it (a query names
    #: it ``partner``)
    recipient_member: str = "recipient"
    schema_version: str = "1.0"
    correlation_id: str | None = None
    in_reply_to: str | None = None
    priority: Priority = Priority.ROUTINE
    #: seconds until the message expires; None: the outbox default
    ttl_s: int | None = None
    respond_by: datetime | None = None
    legal_basis: str | None = None
    #: the submitter's key for retries (``Idempotency-Key``, AMQP ``message_id``): the same
    #: key and request from the same actor yield the message the first one created
    idempotency_key: str | None = None
    #: made by the gateway itself (witnessing), which alone may send the ``audit.*`` types
    by_gateway: bool = False

    @property
    def audit_event(self) -> Literal[EventKind.SUBMITTED, EventKind.QUERY]:
        """The audit event of the stored row: ``QUERY`` for a question to a partner
        (``is_query_type``), however it was submitted (queries API, messages API,
        ``c2c.submit``, ``send``), so auditors find who asked a partner what without reading
        message types."""
        return EventKind.QUERY if is_query_type(self.message_type) else EventKind.SUBMITTED


@dataclass(frozen=True, kw_only=True, slots=True)
class Submitted:
    record: OutboundRecord
    #: the request repeated an earlier one's Idempotency-Key: nothing new was stored
    replayed: bool = False


def check_idempotency_key(value: str) -> None:
    """Malformed unless the key is 1 to 255 printable ASCII characters other than ``"`` and
    ``\\``."""
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not all(
        " " <= ch <= "~" and ch not in '"\\' for ch in value
    ):
        raise Malformed(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ' other than " and \\'
        )


def request_digest(submission: Submission) -> str:
    """A digest of what a submission asks for (not who asks, nor its key): two requests with
    the same digest would build the same message, but for its id and times."""
    request = {
        "kind": submission.audit_event.value,
        "recipient": submission.recipient,
        "message_type": submission.message_type,
        "schema_version": submission.schema_version,
        "payload": submission.payload,
        "correlation_id": submission.correlation_id,
        "in_reply_to": submission.in_reply_to,
        "priority": submission.priority.value,
        "ttl_s": submission.ttl_s,
        "respond_by": None
        if submission.respond_by is None
        else format_rfc3339(submission.respond_by),
        "legal_basis": submission.legal_basis,
    }
    try:
        return body_digest(orjson.dumps(request, option=orjson.OPT_SORT_KEYS))
    except orjson.JSONEncodeError as exc:
        raise Malformed(f"the payload cannot be encoded as JSON: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class SubmissionServices:
    config: GatewayConfig
    registry: SchemaRegistry
    signing_keys: Sequence[SigningKey]
    store: Store
    clock: Clock


@dataclass(kw_only=True)
class SubmitContext:
    submission: Submission
    services: SubmissionServices
    now: datetime
    partner: PartnerConfig | None = None
    transport: Literal["https", "amqp"] | None = None
    header: Header | None = None
    body: bytes | None = field(default=None, repr=False)
    signature: str | None = field(default=None, repr=False)
    kid: str | None = None
    digest: str | None = None
    record: OutboundRecord | None = None


Stage = Callable[[SubmitContext], Awaitable[None]]


def current_signing_key(
    keys: Sequence[SigningKey], now: datetime, alg: Alg | None = None
) -> SigningKey:
    """The key to sign with now: valid now (of ``alg``, a partner's ``sign_with``, when
    given), the newest one during a rotation overlap."""
    key = current_key(keys, now, alg)
    if key is None:
        of = "" if alg is None else f"{alg} "
        raise Unavailable(f"no own {of}signing key is valid at {now.isoformat()}; rotate keys")
    return key


async def resolve_partner(ctx: SubmitContext) -> None:
    recipient = ctx.submission.recipient
    member = ctx.submission.recipient_member
    if not is_party_id(recipient):
        raise Malformed(f"{member} {recipient[:40]!r} is not a party id (CC-AGENCY)")
    partner = ctx.services.config.partners.get(recipient)
    if partner is None:
        raise NotAuthorized(
            f"{member} {recipient} is not a configured partner",
            detail=f"{member} {recipient} is not a configured partner",
        )
    if partner.https.url is not None:
        ctx.transport = "https"
    elif partner.amqp.enabled:
        ctx.transport = "amqp"
    else:
        raise NotAuthorized(
            f"partner {recipient} has no outbound transport (https.url or amqp) configured",
            detail=f"partner {recipient} cannot be reached: no transport configured",
        )
    ctx.partner = partner


async def authorize_type(ctx: SubmitContext) -> None:
    assert ctx.partner is not None
    message_type = ctx.submission.message_type
    if message_type == RECEIPT_TYPE:
        raise NotAuthorized(
            "receipts are made by the gateway, not submitted",
            detail="receipts are made by the gateway, not submitted",
        )
    schema_version = ctx.submission.schema_version
    if not ctx.services.registry.is_known(message_type, schema_version):
        # PROTOCOL.md section 4: unknown pairs are UNSUPPORTED_TYPE, whoever they are for
        raise UnsupportedType(
            f"unknown message_type/schema_version {message_type[:60]!r}/{schema_version[:20]!r}"
        )
    if message_type.startswith(GATEWAY_TYPE_PREFIX) and not ctx.submission.by_gateway:
        # a checkpoint signed with our key and offered by hand is refused by the partner's
        # witness anyway, and is not an internal system's to offer
        refusal = f"{message_type} messages are made by the gateway's witnessing, not submitted"
        raise NotAuthorized(refusal, detail=refusal)
    if message_type not in ctx.partner.outbound_types:
        allowed = ", ".join(sorted(ctx.partner.outbound_types)) or "none"
        raise NotAuthorized(
            f"{message_type[:60]!r} may not be sent to {ctx.partner.id} (allowed: {allowed})",
            detail=f"message type may not be sent to {ctx.partner.id} (allowed: {allowed})",
        )


async def validate_payload(ctx: SubmitContext) -> None:
    submission = ctx.submission
    registry = ctx.services.registry
    registry.validate(submission.message_type, submission.schema_version, submission.payload)
    if (
        registry.requires_in_reply_to(submission.message_type, submission.schema_version)
        and submission.in_reply_to is None
    ):
        raise Malformed(
            f"{submission.message_type} answers another message: in_reply_to is required",
            detail=f"{submission.message_type} answers another message: in_reply_to is required",
        )


async def check_respond_by(ctx: SubmitContext) -> None:
    respond_by = ctx.submission.respond_by
    if respond_by is not None and respond_by <= ctx.now:
        refusal = f"respond_by {format_rfc3339(respond_by)} is not in the future"
        raise Malformed(refusal, detail=refusal)


async def pair_answer(ctx: SubmitContext) -> None:
    """An answer names, in ``in_reply_to``, a request the recipient sent us, of a type it
    answers, and echoes its reference: what the partner's gateway checks (``pair_answer`` of
    the inbound stages), refused here rather than NACKed after it is queued and sent.

    The request must be in our inbox: every message a partner sent us came through it. Its
    body purged by retention leaves only the type to check."""
    assert ctx.partner is not None
    submission = ctx.submission
    pairing = ANSWERS.get(submission.message_type)
    if pairing is None or submission.in_reply_to is None:
        return
    asked = await ctx.services.store.get_inbound(ctx.partner.id, submission.in_reply_to)
    if asked is None:
        refusal = (
            f"in_reply_to {submission.in_reply_to} names no message received from"
            f" {ctx.partner.id}: an answer names the message_id of the partner's request"
        )
        raise Malformed(refusal, detail=refusal)
    request_types, member = pairing
    if asked.message_type not in request_types:
        answered = " or ".join(sorted(request_types))
        refusal = (
            f"in_reply_to names {ctx.partner.id}'s {asked.message_type};"
            f" {submission.message_type} answers {answered}"
        )
        raise Malformed(refusal, detail=refusal)
    if asked.body is not None:
        await check_echo(
            adapter_for(ctx.partner),
            asked.body,
            submission.payload,
            member,
            request_id=asked.message_id,
        )


async def check_legal_basis(ctx: SubmitContext) -> None:
    assert ctx.partner is not None
    required = ctx.partner.legal_basis
    given = ctx.submission.legal_basis
    if required is not None and given is not None and given != required:
        raise NotAuthorized(
            f"legal_basis {given[:80]!r} is not the agreement configured for {ctx.partner.id}",
            detail=f"legal_basis must be the agreement configured for {ctx.partner.id}",
        )


async def build_envelope(ctx: SubmitContext) -> None:
    assert ctx.partner is not None
    submission = ctx.submission
    ttl_s = submission.ttl_s or ctx.services.config.outbox.default_ttl_s
    ctx.header = Header(
        message_id=new_message_id(),
        message_type=submission.message_type,
        schema_version=submission.schema_version,
        sender=ctx.services.config.party,
        recipient=ctx.partner.id,
        created_at=ctx.now,
        expires_at=ctx.now + timedelta(seconds=ttl_s),
        correlation_id=submission.correlation_id,
        in_reply_to=submission.in_reply_to,
        priority=submission.priority,
        respond_by=submission.respond_by,
        legal_basis=submission.legal_basis or ctx.partner.legal_basis,
    )
    canonical = encode_envelope(ctx.header, submission.payload)
    # a native adapter runs in a worker thread; its failure (an exception, or a result that is
    # not bytes) refuses the submission as MALFORMED naming the adapter (docs/adapters.md)
    ctx.body = await from_canonical_off_loop(adapter_for(ctx.partner), canonical)
    # The partner refuses a larger message unread (PROTOCOL.md section 2); queued, it would
    # only die at its first attempt.
    if len(ctx.body) > ctx.partner.max_body_bytes:
        raise TooLarge(
            f"the signed message to {ctx.partner.id} would be {len(ctx.body)} bytes, over the"
            f" {ctx.partner.max_body_bytes} bytes {ctx.partner.id} takes (max_body_bytes in its"
            " partner.toml)"
        )


async def sign_message(ctx: SubmitContext) -> None:
    assert ctx.partner is not None
    assert ctx.body is not None
    key = current_signing_key(ctx.services.signing_keys, ctx.now, ctx.partner.sign_with)
    ctx.signature = sign_detached(ctx.body, key, typ=ctx.partner.typ)
    ctx.kid = key.kid


async def persist(ctx: SubmitContext) -> None:
    header, body, signature = ctx.header, ctx.body, ctx.signature
    assert header is not None
    assert body is not None
    assert signature is not None
    assert ctx.kid is not None
    assert ctx.transport is not None
    digest = body_digest(body)
    record = OutboundRecord(
        message_id=header.message_id,
        recipient=header.recipient,
        message_type=header.message_type,
        schema_version=header.schema_version,
        correlation_id=header.correlation_id,
        in_reply_to=header.in_reply_to,
        priority=header.priority,
        body=body,
        body_digest=digest,
        signature=signature,
        kid=ctx.kid,
        transport=ctx.transport,
        created_at=ctx.now,
        expires_at=header.expires_at,
        next_attempt_at=ctx.now,
        updated_at=ctx.now,
        submitted_by=ctx.submission.actor,
        idempotency_key=ctx.submission.idempotency_key,
        request_digest=ctx.digest,
    )
    event = AuditEvent(
        event=ctx.submission.audit_event,
        at=ctx.now,
        message_id=header.message_id,
        sender=header.sender,
        recipient=header.recipient,
        message_type=header.message_type,
        correlation_id=header.correlation_id,
        body_digest=digest,
        outcome="queued",
        actor=ctx.submission.actor,
        transport=ctx.transport,
    )
    # With an Idempotency-Key, a concurrent twin of this request may have been stored first:
    # the store then returns that row instead.
    ctx.record = await ctx.services.store.enqueue_outbound(record, [event])


STAGES: tuple[Stage, ...] = (
    resolve_partner,
    authorize_type,
    validate_payload,
    check_respond_by,
    check_legal_basis,
    pair_answer,
    build_envelope,
    sign_message,
    persist,
)


async def submit(services: SubmissionServices, submission: Submission) -> OutboundRecord:
    """``submit_request`` for callers that need only the stored row."""
    return (await submit_request(services, submission)).record


async def submit_request(services: SubmissionServices, submission: Submission) -> Submitted:
    """Run ``STAGES``; a refusal is audited (with the actor and exact reason) and re-raised.

    With an Idempotency-Key its submitter already used, the message that key created is
    returned (``replayed``) when the request is the same, and nothing is stored or audited
    again; a different request under that key is refused (IdempotencyKeyReused).
    """
    ctx = SubmitContext(submission=submission, services=services, now=services.clock.now())
    try:
        if submission.idempotency_key is not None:
            check_idempotency_key(submission.idempotency_key)
            ctx.digest = request_digest(submission)
            earlier = await services.store.find_outbound_by_key(
                submission.actor, submission.idempotency_key
            )
            if earlier is not None:
                return _replayed(ctx, earlier)
        for stage in STAGES:
            await stage(ctx)
    except GatewayError as exc:
        await record_refusal(
            services,
            exc,
            actor=submission.actor,
            recipient=submission.recipient,
            message_type=submission.message_type,
            at=ctx.now,
        )
        raise
    assert ctx.record is not None
    assert ctx.header is not None
    if ctx.record.message_id != ctx.header.message_id:
        return _replayed(ctx, ctx.record)
    return Submitted(record=ctx.record)


class Named(TypedDict, total=False):
    recipient: object
    message_type: object


def named_in(document: object, *, recipient_member: str = "recipient") -> Named:
    """The recipient and message type a request names, as ``record_refusal`` takes them,
    from a request refused before it was read into a ``Submission``."""
    if not isinstance(document, dict):
        return {}
    return {
        "recipient": document.get(recipient_member),
        "message_type": document.get("message_type"),
    }


async def record_refusal(
    services: SubmissionServices,
    exc: GatewayError,
    *,
    actor: str,
    recipient: object = None,
    message_type: object = None,
    at: datetime | None = None,
) -> None:
    """Audit a refused submission (``submit_rejected``, with the actor and exact reason),
    wherever it was refused: by ``submit_request``'s stages, or before, its request unread
    (``recipient`` and ``message_type`` as the request gave them, if it did). An outage
    refuses nothing: the request is to be tried again."""
    if isinstance(exc, Unavailable):
        return
    await services.store.append_audit(
        [
            AuditEvent(
                event=EventKind.SUBMIT_REJECTED,
                at=at or services.clock.now(),
                sender=services.config.party,
                recipient=recipient
                if isinstance(recipient, str) and is_party_id(recipient)
                else None,
                message_type=message_type[:100]
                if isinstance(message_type, str) and message_type
                else None,
                outcome=exc.code.value,
                reason=exc.reason,
                actor=actor,
            )
        ]
    )


def _replayed(ctx: SubmitContext, earlier: OutboundRecord) -> Submitted:
    """The answer to a retry: the earlier message, if the request is the same."""
    record = same_request(earlier, ctx.digest)
    log.info(
        "submission_replayed",
        actor=ctx.submission.actor,
        idempotency_key=ctx.submission.idempotency_key,
        message_id=record.message_id,
    )
    return Submitted(record=record, replayed=True)
