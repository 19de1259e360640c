"""``InboundPipeline.handle``: run the stages, and turn every refusal into its answer.

An accepted message gets the ACK receipt signed before and stored with its commit. A refused
one is audited exactly once with its exact reason and answered with a signed NACK receipt when
it can be tied to a sender and a message id, else with an RFC 9457 problem document. The
partner sees only the code and a minimal detail. ``handle`` never raises.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import structlog

from gateway.adapters.registry import CANONICAL
from gateway.audit.events import AuditEvent, EventKind
from gateway.envelope import body_digest, parse_json_strict
from gateway.errors import GatewayError, NackCode, TooLarge, Unavailable
from gateway.inbound.context import (
    InboundContext,
    InboundEnv,
    InboundRequest,
    InboundResult,
    Transport,
)
from gateway.inbound.stages import STAGES, Stage, sign_receipt
from gateway.receipts import RECEIPT_TYPE

log = structlog.get_logger(__name__)


def problem_document(exc: GatewayError) -> dict[str, Any]:
    """RFC 9457 problem details for a refusal that no receipt can be tied to."""
    return {
        "type": "about:blank",
        "title": HTTPStatus(exc.http_status).phrase,
        "status": exc.http_status,
        "detail": exc.detail,
        "code": exc.code.value,
    }


def _canonical_uuid(value: object) -> str | None:
    """A UUID in its 8-4-4-4-12 form, either case (RFC 9562), as lowercase; else None."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        parsed = str(uuid.UUID(value))
    except ValueError:
        return None
    return parsed if parsed == value.lower() else None


class InboundPipeline:
    def __init__(self, env: InboundEnv, stages: Sequence[Stage] = STAGES) -> None:
        self._env = env
        self._stages = tuple(stages)
        #: per partner: its rate-limited requests are answered one at a time (see handle)
        self._over_rate: dict[str, asyncio.Lock] = {}

    @property
    def env(self) -> InboundEnv:
        return self._env

    async def handle(self, request: InboundRequest) -> InboundResult:
        env = self._env
        started = time.perf_counter()
        ctx = InboundContext(
            request=request,
            env=env,
            received_at=env.clock.now(),
            digest=body_digest(request.body),
        )
        env.metrics.inbound_received.labels(
            env.metrics.partner_label(request.peer), request.transport
        ).inc()
        try:
            result = await self._run(ctx)
            outcome = "ack" if result.http_status == 202 else "duplicate"
        except GatewayError as exc:
            if exc.code is NackCode.RATE_LIMITED and ctx.partner is not None:
                result = await self._refuse_in_turn(ctx, ctx.partner.id, exc)
            else:
                result = await self._reject(ctx, exc)
            outcome = "nack"
        except Exception as exc:
            # A bug must neither acknowledge nor leak: the partner is told to retry later and
            # the operator gets the trace (never the body).
            log.exception("inbound_internal_error", peer=request.peer, error=type(exc).__name__)
            result = await self._reject(
                ctx, Unavailable(f"internal error in the inbound pipeline: {type(exc).__name__}")
            )
            outcome = "nack"
        env.metrics.inbound_latency.labels(request.transport, outcome).observe(
            time.perf_counter() - started
        )
        return result

    async def _refuse_in_turn(
        self, ctx: InboundContext, partner: str, exc: GatewayError
    ) -> InboundResult:
        """A partner over its rate gets its refusals one at a time, at most one per 1/rate
        seconds (0.1 s at the most): each still costs an audit entry and a signed NACK, and a
        flood of them on many connections would otherwise take every other partner's turn
        (T40). A flooder that waits for its answers is slowed to about its own rate; the
        wait is the flooder's alone."""
        lock = self._over_rate.setdefault(partner, asyncio.Lock())
        async with lock:
            result = await self._reject(ctx, exc)
            per_second = self._env.config.partners[partner].rate.per_second
            await asyncio.sleep(min(1.0 / per_second, 0.1))
        return result

    async def refuse_unread(
        self, *, peer: str | None, transport: Transport, error: GatewayError
    ) -> InboundResult:
        """Audit and answer a message the transport refused before it had all of its bytes
        (a body over the endpoint's limit): no digest, no message id, so a problem document."""
        env = self._env
        partner = env.config.partners.get(peer) if peer is not None else None
        ctx = InboundContext(
            request=InboundRequest(body=b"", signature=None, transport=transport, peer=peer),
            env=env,
            received_at=env.clock.now(),
            digest=None,
            partner=partner,
        )
        env.metrics.inbound_received.labels(env.metrics.partner_label(peer), transport).inc()
        return await self._reject(ctx, error)

    async def _run(self, ctx: InboundContext) -> InboundResult:
        for stage in self._stages:
            await stage(ctx)
            if ctx.result is not None:
                break
        if ctx.result is None:
            raise RuntimeError("the inbound stages finished without a result")
        env = ctx.env
        partner = env.metrics.partner_label(ctx.request.peer)
        if ctx.result.http_status == 202 and ctx.envelope is not None:
            env.metrics.inbound_accepted.labels(partner, ctx.envelope.header.message_type).inc()
        elif ctx.result.http_status == 200:
            env.metrics.inbound_duplicates.labels(partner).inc()
        return ctx.result

    def _tied_message_id(self, ctx: InboundContext, exc: GatewayError) -> str | None:
        """The message id a NACK can name: from the parsed envelope, else read best-effort
        from the body (never from a body over the size limit), else the one the transport
        carried beside it. None for a receipt: receipts are never answered."""
        if ctx.envelope is not None:
            return ctx.envelope.header.message_id
        if ctx.partner is None:
            return None
        header = None if isinstance(exc, TooLarge) else self._header_in_body(ctx)
        if header is not None:
            if header.get("message_type") == RECEIPT_TYPE:
                return None
            found = _canonical_uuid(header.get("message_id"))
            if found is not None:
                return found
        return _canonical_uuid(ctx.request.transport_message_id)

    @staticmethod
    def _header_in_body(ctx: InboundContext) -> dict[str, Any] | None:
        assert ctx.partner is not None
        body = ctx.canonical
        if body is None and ctx.adapter is not None and ctx.adapter.name == CANONICAL:
            body = ctx.request.body
        if body is None:
            return None
        try:
            document = parse_json_strict(body, max_bytes=ctx.partner.max_body_bytes)
        except GatewayError:
            return None
        header = document.get("header") if isinstance(document, dict) else None
        return header if isinstance(header, dict) else None

    async def _reject(self, ctx: InboundContext, exc: GatewayError) -> InboundResult:
        env = ctx.env
        request = ctx.request
        header = ctx.envelope.header if ctx.envelope is not None else None
        peer = ctx.partner.id if ctx.partner is not None else None
        message_id = self._tied_message_id(ctx, exc)
        event = AuditEvent(
            event=EventKind.REJECTED,
            at=ctx.received_at,
            message_id=message_id,
            sender=peer,
            recipient=header.recipient if header is not None else None,
            message_type=header.message_type if header is not None else None,
            correlation_id=header.correlation_id if header is not None else None,
            body_digest=ctx.digest,
            outcome=exc.code.value,
            reason=exc.reason,
            transport=request.transport,
        )
        audited = False
        audit_seq: int | None = None
        try:
            (audit_seq,) = await env.store.append_audit([event])
            audited = True
        except GatewayError as audit_exc:
            log.error(
                "inbound_rejection_not_audited",
                peer=peer,
                message_id=message_id,
                code=exc.code.value,
                reason=exc.reason,
                audit_error=audit_exc.reason,
            )
        env.metrics.inbound_rejected.labels(env.metrics.partner_label(peer), exc.code.value).inc()
        # body_digest and audit_seq tie the line to its audit entry, also when no message id
        # could be read (an unparseable body, a flood of one reason)
        log.info(
            "inbound_rejected",
            peer=peer,
            message_id=message_id,
            code=exc.code.value,
            reason=exc.reason,
            transport=request.transport,
            body_digest=ctx.digest,
            audit_seq=audit_seq,
        )
        is_receipt = header is not None and header.message_type == RECEIPT_TYPE
        outage = isinstance(exc, Unavailable) and exc.outage
        unsigned = InboundResult(
            http_status=exc.http_status,
            code=exc.code,
            receipt_body=None,
            receipt_signature=None,
            problem=problem_document(exc),
            retry_after_s=exc.retry_after_s,
            record=None,
            outage=outage,
            audited=audited,
        )
        if peer is None or message_id is None or is_receipt or ctx.digest is None:
            return unsigned
        if exc.code is NackCode.UNAVAILABLE and not request.unavailable_answered:
            return unsigned
        try:
            receipt = await sign_receipt(
                env,
                recipient=peer,
                ref_message_id=message_id,
                ref_digest=ctx.digest,
                received_at=ctx.received_at,
                status="NACK",
                code=exc.code,
                detail=exc.detail,
                correlation_id=header.correlation_id if header is not None else None,
            )
        except (RuntimeError, GatewayError) as sign_exc:
            # The refusal still reaches the partner, unsigned, rather than as a bare 500.
            log.error("nack_not_signed", peer=peer, message_id=message_id, error=str(sign_exc))
            return unsigned
        return InboundResult(
            http_status=exc.http_status,
            code=exc.code,
            receipt_body=receipt.body,
            receipt_signature=receipt.signature,
            problem=None,
            retry_after_s=exc.retry_after_s,
            record=None,
            outage=outage,
            audited=audited,
        )
