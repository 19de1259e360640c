"""The inbound stages, in the order they run (``STAGES``).

Each stage reads the context, adds what it learned, or raises a ``GatewayError`` carrying the
PROTOCOL.md section 4 code with the exact reason. A stage that completes the exchange early (an
exact re-send, a partner's receipt) sets ``ctx.result`` and the remaining stages are skipped.
Nothing here knows HTTP or AMQP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial

import structlog

from gateway.adapters.registry import is_canonical, to_canonical_off_loop
from gateway.answers import check_echo
from gateway.audit.events import AuditEvent, EventKind
from gateway.crashpoints import crash_point
from gateway.crypto.jws import verify_detached
from gateway.documents import document_ref, message_function
from gateway.envelope import check_freshness, parse_envelope
from gateway.errors import (
    DuplicateConflict,
    GatewayError,
    Malformed,
    NackCode,
    NotAuthorized,
    RateLimited,
    SenderMismatch,
    SignatureInvalid,
    Stale,
    TooLarge,
    Unavailable,
    UnknownKey,
)
from gateway.inbound.context import InboundContext, InboundEnv, InboundResult, ReceivedReceipt
from gateway.receipts import RECEIPT_TYPE, SignedReceipt, Status
from gateway.schemas.registry import ANSWERS
from gateway.store.base import InboundRecord

Stage = Callable[[InboundContext], Awaitable[None]]

log = structlog.get_logger(__name__)

_IDENTITY_ENCODINGS = frozenset({"", "identity"})


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def check_limits(ctx: InboundContext) -> None:
    """Who is it, may they send now, and is the body acceptable to look at at all."""
    request = ctx.request
    partners = ctx.env.config.partners
    if request.peer is None or request.peer not in partners:
        raise SenderMismatch(f"transport identity {request.peer!r} is not a configured partner")
    partner = partners[request.peer]
    ctx.partner = partner
    ctx.adapter = ctx.env.adapters[partner.id]
    retry_after = None if request.rate_taken else await ctx.env.limiters.retry_after(partner.id)
    if retry_after is not None:
        raise RateLimited(
            f"{partner.id} is over its rate of {partner.rate.per_second:g}/s"
            f" (burst {partner.rate.burst})",
            retry_after_s=retry_after,
        )
    if len(request.body) > partner.max_body_bytes:
        raise TooLarge(
            f"body is {len(request.body)} bytes, over {partner.id}'s limit of"
            f" {partner.max_body_bytes}"
        )
    encoding = (request.content_encoding or "").strip().lower()
    if encoding not in _IDENTITY_ENCODINGS:
        raise Malformed(
            f"Content-Encoding {encoding[:32]!r} refused: bodies are signed and sent as they are",
            detail="Content-Encoding is not accepted",
        )
    if request.content_type is None:
        # AMQP publishers may leave content_type unset; an HTTP request must say what it sends.
        if request.transport == "https":
            raise Malformed("no Content-Type", detail="Content-Type is required")
    elif _media_type(request.content_type) not in ctx.adapter.content_types:
        expected = ", ".join(sorted(ctx.adapter.content_types))
        raise Malformed(
            f"Content-Type {request.content_type[:64]!r} is not {partner.id}'s ({expected})",
            detail=f"Content-Type must be {expected}",
        )
    crash_point("S2")


async def verify_signature(ctx: InboundContext) -> None:
    """The detached JWS over the exact bytes received, with one of the peer's keys."""
    assert ctx.partner is not None
    signature = ctx.request.signature
    if not signature:
        problem = ctx.request.signature_problem
        if problem is not None:
            raise SignatureInvalid(problem, detail=problem)
        raise SignatureInvalid("no detached JWS sent with the message")
    ctx.key = verify_detached(
        signature,
        ctx.request.body,
        keyring=ctx.env.keyring,
        party=ctx.partner.id,
        at=None,
        accepted_typs=(ctx.partner.typ,),
        any_party=True,
    )
    crash_point("S3")


async def adapt(ctx: InboundContext) -> None:
    """Native format -> canonical envelope bytes (pass-through for canonical partners).

    A native adapter runs in a worker thread: a slow one holds its own message only, not
    every partner, the API and the probes. Its failure is ``MALFORMED`` naming the adapter."""
    assert ctx.adapter is not None
    ctx.canonical = await to_canonical_off_loop(ctx.adapter, ctx.request.body)


async def parse_and_check_freshness(ctx: InboundContext) -> None:
    """Strict envelope parse; the signer is the peer, its key valid at created_at; replay
    window and expiry."""
    assert ctx.partner is not None
    assert ctx.key is not None
    assert ctx.canonical is not None
    env = ctx.env
    ctx.envelope = parse_envelope(
        ctx.canonical, max_bytes=ctx.partner.max_body_bytes, is_known_type=env.registry.is_known
    )
    header = ctx.envelope.header
    check_signer(ctx)
    ctx.key = env.keyring.valid_entry(ctx.key, header.created_at)
    if header.message_type == RECEIPT_TYPE:
        # A receipt is bound to one message of ours by its id and digest and only settles it
        # (hand_over_receipts); replaying it changes nothing. A partner answers every re-send
        # with the original receipt (PROTOCOL.md section 4), which may be hours old when our
        # consumer catches up over AMQP: refused as stale, the message it acknowledges would
        # end dead. The HTTPS client checks the receipts it gets back no differently.
        crash_point("S5")
        return
    try:
        check_freshness(
            header,
            now=env.clock.now(),
            replay_window_s=env.config.limits.replay_window_s,
            max_skew_s=env.config.limits.max_skew_s,
        )
    except Stale:
        # An exact re-send of an accepted message is answered with its original receipt
        # however late it comes (PROTOCOL.md section 4): a sender whose answer was lost, or
        # an AMQP delivery redelivered after a crash, must not get a NACK for a message that
        # was stored. The replay window guards against new messages only.
        original = await _accepted_original(ctx)
        if original is None:
            raise
        await _answer_duplicate(ctx, original)
        return
    crash_point("S5")


async def _accepted_original(ctx: InboundContext) -> InboundRecord | None:
    """The stored message that this one repeats byte for byte, if any: only one sent by
    the authenticated peer as itself (``check_identities``)."""
    assert ctx.envelope is not None
    header = ctx.envelope.header
    try:
        check_identities(ctx)
    except SenderMismatch:
        return None
    original = await ctx.env.store.get_inbound(header.sender, header.message_id)
    if original is None or original.body_digest != ctx.digest:
        return None
    return original


def check_signer(ctx: InboundContext) -> None:
    """A message signed with another party's key, whatever its age: that party's genuine
    message replayed by this peer is ``SENDER_MISMATCH`` (the peer is not ``header.sender``);
    one that names the peer as its sender is signed with a key not configured for it."""
    assert ctx.partner is not None
    assert ctx.key is not None
    assert ctx.envelope is not None
    key, partner, sender = ctx.key, ctx.partner, ctx.envelope.header.sender
    if key.party == partner.id:
        return
    if sender != partner.id:
        raise SenderMismatch(
            f"a message of {sender}, signed with {key.party}'s key {key.kid}, sent with the"
            f" {ctx.request.transport} identity {partner.id}"
        )
    raise UnknownKey(f"kid {key.kid} belongs to {key.party}, not to the sender {partner.id}")


async def validate_schema(ctx: InboundContext) -> None:
    assert ctx.envelope is not None
    header = ctx.envelope.header
    registry = ctx.env.registry
    registry.validate(header.message_type, header.schema_version, ctx.envelope.payload)
    if header.in_reply_to is None and registry.requires_in_reply_to(
        header.message_type, header.schema_version
    ):
        # PROTOCOL section 6: an answer names what it answers; unnamed, nobody can pair it.
        missing = f"{header.message_type} answers another message: in_reply_to is required"
        raise Malformed(missing, detail=missing)
    crash_point("S4")


def check_identities(ctx: InboundContext) -> None:
    """The signed sender is the authenticated peer (and its broker user), and we are the
    recipient; ``SenderMismatch`` otherwise."""
    assert ctx.partner is not None
    assert ctx.envelope is not None
    header = ctx.envelope.header
    partner = ctx.partner
    if header.sender != partner.id:
        raise SenderMismatch(
            f"header.sender {header.sender} differs from the {ctx.request.transport} identity"
            f" {partner.id}"
        )
    broker_user = ctx.request.broker_user
    if broker_user is not None and broker_user != partner.amqp.broker_user:
        raise SenderMismatch(
            f"AMQP user_id {broker_user[:64]!r} is not {partner.id}'s broker user"
            f" {partner.amqp.broker_user!r}"
        )
    our_party = ctx.env.config.party
    if header.recipient != our_party:
        raise SenderMismatch(
            f"header.recipient {header.recipient} is not this gateway ({our_party})",
            detail="recipient is not this gateway",
        )


async def authorize(ctx: InboundContext) -> None:
    """The signed sender is the authenticated peer, we are the recipient, the type is allowed."""
    check_identities(ctx)
    assert ctx.partner is not None
    assert ctx.envelope is not None
    header = ctx.envelope.header
    partner = ctx.partner
    if header.message_type == RECEIPT_TYPE:
        # Every partner may answer our messages with receipts; nothing else to authorize.
        return
    if header.message_type not in partner.inbound_types:
        raise NotAuthorized(f"{partner.id} may not send {header.message_type}")
    if partner.legal_basis is not None and header.legal_basis != partner.legal_basis:
        raise NotAuthorized(
            f"legal_basis {header.legal_basis!r} is not {partner.id}'s agreement"
            f" {partner.legal_basis!r}",
            detail="legal_basis missing or not the agreement configured for this partner",
        )


async def pair_answer(ctx: InboundContext) -> None:
    """An answer to one of our requests to this partner answers that kind of request and
    echoes its reference (CUSTOMS-DOMAIN 10.11); a mismatch is refused, so the partner learns
    at once that its answer would pair with nothing.

    An ``in_reply_to`` that names none of our messages to this partner is let through: the
    request may have been purged by retention or sent by another system, and telling one
    partner which ids we used with another is not ours to do.
    """
    assert ctx.envelope is not None
    header = ctx.envelope.header
    pairing = ANSWERS.get(header.message_type)
    if pairing is None or header.in_reply_to is None:
        return
    asked = await ctx.env.store.get_outbound(header.in_reply_to)
    if asked is None or asked.recipient != header.sender:
        return
    request_types, member = pairing
    if asked.message_type not in request_types:
        answered = " or ".join(sorted(request_types))
        wrong = (
            f"in_reply_to names our {asked.message_type}; {header.message_type} answers {answered}"
        )
        raise Malformed(wrong, detail=wrong)
    if asked.body is None:
        return  # purged by retention: nothing left to compare with
    assert ctx.adapter is not None  # the partner's: the request went to this very partner
    await check_echo(
        ctx.adapter, asked.body, ctx.envelope.payload, member, request_id=asked.message_id
    )


async def check_with_service(ctx: InboundContext) -> None:
    """The check an attached service makes on its own message types (witnessing's on
    checkpoints and cosignatures): what it would refuse after the commit is NACKed now, with
    the code and detail it gives. An exact re-send of an accepted message still gets its
    original receipt, whatever changed since (a partner key, a purge)."""
    assert ctx.envelope is not None
    header = ctx.envelope.header
    check = ctx.env.checks.get(header.message_type)
    if check is None:
        return
    try:
        await check(header.sender, ctx.envelope)
    except GatewayError:
        original = await _accepted_original(ctx)
        if original is None:
            raise
        await _answer_duplicate(ctx, original)


async def hand_over_receipts(ctx: InboundContext) -> None:
    """A partner's receipt updates our outbound state; it is never receipted back (no loops)."""
    assert ctx.envelope is not None
    assert ctx.key is not None
    assert ctx.partner is not None
    if ctx.envelope.header.message_type != RECEIPT_TYPE:
        return
    if ctx.env.on_receipt is not None:
        signature = ctx.request.signature
        assert signature is not None
        await ctx.env.on_receipt(
            ReceivedReceipt(
                envelope=ctx.envelope,
                body=ctx.request.body,
                signature=signature,
                kid=ctx.key.kid,
                peer=ctx.partner.id,
                transport=ctx.request.transport,
                received_at=ctx.received_at,
            )
        )
    ctx.result = InboundResult(
        http_status=202,
        code=None,
        receipt_body=None,
        receipt_signature=None,
        problem=None,
        retry_after_s=None,
        record=None,
    )


def _duplicate_result(ctx: InboundContext, original: InboundRecord) -> InboundResult:
    if original.body_digest != ctx.digest:
        raise DuplicateConflict(
            f"message_id {original.message_id} of {original.sender} was stored"
            f" {original.received_at.isoformat()} with digest {original.body_digest},"
            f" this body has {ctx.digest}"
        )
    return InboundResult(
        http_status=200,
        code=None,
        receipt_body=original.receipt_body,
        receipt_signature=original.receipt_signature,
        problem=None,
        retry_after_s=None,
        record=original,
    )


def _event(ctx: InboundContext, kind: EventKind, outcome: str) -> AuditEvent:
    assert ctx.envelope is not None
    header = ctx.envelope.header
    return AuditEvent(
        event=kind,
        at=ctx.received_at,
        message_id=header.message_id,
        sender=header.sender,
        recipient=header.recipient,
        message_type=header.message_type,
        correlation_id=header.correlation_id,
        body_digest=ctx.digest,
        outcome=outcome,
        transport=ctx.request.transport,
    )


async def _answer_duplicate(ctx: InboundContext, original: InboundRecord) -> None:
    """An exact re-send gets the original receipt; same id with other bytes is a conflict."""
    ctx.result = _duplicate_result(ctx, original)
    await ctx.env.store.append_audit([_event(ctx, EventKind.DUPLICATE, "ACK")])


async def sign_receipt(
    env: InboundEnv,
    *,
    recipient: str,
    ref_message_id: str,
    ref_digest: str,
    received_at: datetime,
    status: Status,
    code: NackCode | None = None,
    detail: str | None = None,
    correlation_id: str | None = None,
) -> SignedReceipt:
    """Our receipt to ``recipient``, in its format: a native-format partner's is mapped by its
    adapter (in a worker thread) and signed with its ``typ`` over the native bytes
    (docs/adapters.md), and with our key of its ``sign_with`` algorithm. Raises
    ``RuntimeError`` (no valid signing key) or ``Malformed`` (the adapter failed)."""
    partner = env.config.partners.get(recipient)
    sign = partial(
        env.signer.sign,
        recipient=recipient,
        ref_message_id=ref_message_id,
        ref_digest=ref_digest,
        received_at=received_at,
        status=status,
        code=code,
        detail=detail,
        correlation_id=correlation_id,
        alg=None if partner is None else partner.sign_with,
    )
    adapter = env.adapters.get(recipient)
    if adapter is None or partner is None or is_canonical(adapter):
        return sign()
    return await asyncio.to_thread(sign, typ=partner.typ, adapter=adapter)


async def persist(ctx: InboundContext) -> None:
    """Sign the ACK, then commit row + receipt + audit event in one transaction.

    The receipt exists before the commit so that it is stored with the row (an exact re-send
    gets these very bytes back), and it is released only after the commit. Deduplication is
    the insert itself: the database constraint on ``(sender, message_id)`` answers a re-send
    (the original receipt) or a conflict, with no read before the write.
    """
    assert ctx.envelope is not None
    assert ctx.key is not None
    assert ctx.request.signature
    assert ctx.digest is not None
    header = ctx.envelope.header
    env = ctx.env
    try:
        receipt = await sign_receipt(
            env,
            recipient=header.sender,
            ref_message_id=header.message_id,
            ref_digest=ctx.digest,
            received_at=ctx.received_at,
            status="ACK",
            correlation_id=header.correlation_id,
        )
    except Malformed as exc:
        # our own adapter cannot write the ACK: nothing is stored as accepted unanswered
        unmapped = f"the ACK cannot be mapped to {header.sender}'s format: {exc.reason}"
        raise Unavailable(unmapped) from None
    except RuntimeError as exc:
        # No ACK can be signed, so nothing may be stored as accepted (T73: fail closed). An
        # exact re-send still gets the receipt signed when the original was accepted.
        original = await env.store.get_inbound(header.sender, header.message_id)
        if original is not None:
            await _answer_duplicate(ctx, original)
            return
        raise Unavailable(f"receipt signing key unavailable: {exc}", outage=True) from None
    record = InboundRecord(
        sender=header.sender,
        message_id=header.message_id,
        recipient=header.recipient,
        message_type=header.message_type,
        schema_version=header.schema_version,
        correlation_id=header.correlation_id,
        in_reply_to=header.in_reply_to,
        body=ctx.request.body,
        body_digest=ctx.digest,
        signature=ctx.request.signature,
        kid=ctx.key.kid,
        transport=ctx.request.transport,
        received_at=ctx.received_at,
        receipt_body=receipt.body,
        receipt_signature=receipt.signature,
        document_ref=document_ref(header.message_type, ctx.envelope.payload),
        created_at=header.created_at,
        message_function=message_function(ctx.envelope.payload),
    )
    relay = env.relay
    lease = None if relay is None else relay.lease(record)
    outcome = await env.store.store_inbound(
        record, [_event(ctx, EventKind.ACCEPTED, "ACK")], relay_lease=lease
    )
    if outcome.status == "stored":
        crash_point("S6-after-commit", message_id=header.message_id)
        ctx.result = InboundResult(
            http_status=202,
            code=None,
            receipt_body=outcome.record.receipt_body,
            receipt_signature=outcome.record.receipt_signature,
            problem=None,
            retry_after_s=None,
            record=outcome.record,
        )
        if relay is not None and lease is not None:
            relay.stored(outcome.record)
        return
    await _answer_duplicate(ctx, outcome.record)


#: The inbound pipeline (DESIGN.md "Data flow"), in order.
STAGES: tuple[Stage, ...] = (
    check_limits,
    verify_signature,
    adapt,
    parse_and_check_freshness,
    validate_schema,
    authorize,
    pair_answer,
    check_with_service,
    hand_over_receipts,
    persist,
)
