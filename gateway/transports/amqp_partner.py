"""Partner-facing AMQP: consume ``c2c.partner.<id>.in`` through the inbound pipeline.

The same pipeline as HTTPS decides everything; this module only maps its result onto the
broker (PROTOCOL section 5):

- accepted, exact re-send, or refused with a signed NACK: the receipt is published to the
  partner's ``.out`` queue with a confirm, and only then is the delivery acked (a stored message
  whose receipt could not be published is returned to the queue; its redelivery is an exact
  re-send answered with the original receipt). Deterministic refusals are never requeued. A
  delivery whose count leaves no more than one return before the delivery limit is held
  instead, its receipt published again until the broker takes it (``OutageHold``): the broker
  refusing receipts (the ``.out`` queue deleted, full, or without its quorum) would otherwise
  dead-letter every delivery, unaudited, after ``delivery_limit + 1`` returns.
- a partner's own receipt is handed to the dispatcher by the pipeline and not answered.
- over the partner's rate: the queue is the buffer. Each delivery waits for a token of the
  partner's rate limiter (the one its HTTPS traffic and, on PostgreSQL, other replicas share)
  before the pipeline, so a backlog is taken in at that rate, not refused for the speed it
  drains at. Only a delivery that waited ``RATE_HOLD_S`` in vain is left to the pipeline's own
  check, and answered ``RATE_LIMITED`` (with ``c2c-retry-after``).
- ``UNAVAILABLE`` from an outage (the store unreachable, or failing every write alike: a full
  disk, an I/O error; ``Unavailable.outage``): the delivery is held and retried in process for
  a while, then returned with ``basic.nack(requeue=True)`` so that another replica may take it.
  RabbitMQ before 4.3 counts a ``basic.nack`` towards the delivery limit like a reject, so a
  long outage would dead-letter every held delivery, unaudited: a delivery whose count leaves
  no more than one return before the limit is held until the store answers instead (the one
  return is kept for a crash or a shutdown, which returns it too; ``OutageHold``, the rule
  the ``c2c.submit`` consumer follows too). RabbitMQ 4.3 and later count only rejects, so
  there the count stays low and deliveries keep going back.
- any other ``UNAVAILABLE`` with the store reachable, or an exception, is a processing failure: the
  delivery is returned with ``basic.reject(requeue=True)``, which the quorum queue counts; the
  last allowed attempt is audited as ``poison`` before the broker dead-letters it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import orjson
import structlog

from gateway.adapters.registry import (
    Adapter,
    content_type_of,
    is_canonical,
    to_canonical_off_loop,
)
from gateway.audit.events import AuditEvent, EventKind
from gateway.config import PartnerConfig
from gateway.envelope import body_digest, new_message_id
from gateway.errors import Malformed, NackCode, Unavailable
from gateway.inbound.context import InboundRequest, InboundResult
from gateway.inbound.pipeline import InboundPipeline
from gateway.receipts import RECEIPT_TYPE
from gateway.transports.amqp import (
    SIGNATURE_HEADER,
    AmqpBroker,
    Delivery,
    OutageHold,
    OutgoingMessage,
    Settlement,
    held_through_outages,
    partner_in_queue,
    partner_out_queue,
)

log = structlog.get_logger(__name__)

PROBLEM_TYPE = "problem"
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: the media type of our receipts to a canonical partner
RECEIPT_CONTENT_TYPE = "application/json"
#: publisher channel for everything the gateway sends to partners' ``.out`` queues
OUT_CONCERN = "partner-out"
#: seconds a RATE_LIMITED NACK waits before it may be retried (PROTOCOL section 4's Retry-After)
RETRY_AFTER_HEADER = "c2c-retry-after"
#: how long a delivery over its partner's rate is held for a token before it is refused
#: RATE_LIMITED: well within RabbitMQ's ``consumer_timeout`` (30 minutes by default), past
#: which the broker closes the channel and returns every delivery on it, counted
RATE_HOLD_S = 600.0
#: the longest single sleep while waiting (the consumers' stop is noticed within it)
_WAIT_STEP_S = 1.0
#: the shortest: a bucket shared through PostgreSQL is asked at most this often per waiting
#: partner, however high its rate (one token is 1/rate away)
_MIN_WAIT_S = 0.05


class PartnerInbox:
    """Consumes the ``.in`` queue of every AMQP-enabled partner."""

    def __init__(
        self,
        *,
        broker: AmqpBroker,
        pipeline: InboundPipeline,
        partners: Iterable[PartnerConfig],
        outage_hold_s: float = 30.0,
        rate_hold_s: float = RATE_HOLD_S,
    ) -> None:
        self._broker = broker
        self._pipeline = pipeline
        self._partners = tuple(p for p in partners if p.amqp.enabled)
        self._out_queues = {p.id: partner_out_queue(p.id) for p in self._partners}
        self._outage_hold_s = outage_hold_s
        self._rate_hold_s = rate_hold_s
        env = pipeline.env
        # Our receipts to a native-format partner are in its format (docs/adapters.md): read
        # back through its adapter for their AMQP properties, published with its media type.
        self._native: dict[str, tuple[Adapter, str]] = {
            p.id: (adapter, content_type_of(adapter))
            for p in self._partners
            if (adapter := env.adapters.get(p.id)) is not None and not is_canonical(adapter)
        }
        self._party = env.config.party
        self._store = env.store
        self._clock = env.clock
        self._limiters = env.limiters
        # one delivery of a partner waits for its token at a time, in the order they came
        self._pacing = {p.id: asyncio.Lock() for p in self._partners}

    @property
    def partner_ids(self) -> list[str]:
        return [p.id for p in self._partners]

    async def start(self) -> None:
        """Start consuming (one channel per partner, so one partner's backlog cannot starve
        another's); raises ``Unavailable`` when the broker refuses."""
        for partner in self._partners:

            async def handler(delivery: Delivery, partner: PartnerConfig = partner) -> Settlement:
                return await self.on_delivery(partner, delivery)

            inbox = partner_in_queue(partner.id)
            # the partner writes to the fanout exchange of the queue's name (declare_topology)
            await self._broker.consume(
                inbox, handler, concern=f"partner-in:{partner.id}", exchange=inbox
            )

    async def on_delivery(self, partner: PartnerConfig, delivery: Delivery) -> Settlement:
        signature = delivery.header_str(SIGNATURE_HEADER)
        problem = None
        if signature is None and (kind := delivery.header_type(SIGNATURE_HEADER)) is not None:
            # refused SIGNATURE_INVALID all the same, but the partner is told what was wrong
            problem = (
                f"header {SIGNATURE_HEADER} holds a value of type {kind}: send the detached JWS"
                " as a long string or a byte array"
            )
            log.warning(
                "amqp_signature_header_unusable",
                partner=partner.id,
                message_id=_safe_id(delivery.message_id),
                header=SIGNATURE_HEADER,
                header_type=kind,
            )
        request = InboundRequest(
            body=delivery.body,
            signature=signature,
            transport="amqp",
            peer=partner.id,
            broker_user=delivery.user_id,
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            transport_message_id=delivery.message_id,
            # an UNAVAILABLE delivery is requeued or rejected, never answered
            unavailable_answered=False,
            signature_problem=problem,
        )
        paced = await self._pace(partner)
        if paced is None:
            return Settlement.REQUEUE  # stopping: the delivery goes back
        # Paced: its token is taken. Not paced (held RATE_HOLD_S in vain): the pipeline's own
        # check answers it RATE_LIMITED, with the retry-after.
        request = replace(request, rate_taken=paced)
        try:
            result = await self._handle_through_outages(
                request, self._hold(partner, delivery, self._outage_hold_s)
            )
        except _Outage:
            return Settlement.REQUEUE
        except Exception as exc:
            await self._failed(partner, delivery, f"processing raised {type(exc).__name__}")
            return Settlement.REJECT
        if result.code is NackCode.UNAVAILABLE:
            await self._failed(partner, delivery, "processing failed while the store was reachable")
            return Settlement.REJECT
        try:
            answer = await self._answer(partner, delivery, result)
        except Malformed as exc:
            # its adapter cannot read the receipt it wrote: a bug in the adapter, counted as a
            # failure (an accepted message's redelivery meets the same receipt again)
            await self._failed(partner, delivery, f"our receipt cannot be read back: {exc.reason}")
            return Settlement.REJECT
        if answer is not None and not await self._publish_answer(partner, delivery, answer):
            return Settlement.REQUEUE
        return Settlement.ACK

    async def _pace(self, partner: PartnerConfig) -> bool | None:
        """Wait for one of the partner's tokens, one delivery of the partner at a time: True
        once taken; False after ``rate_hold_s`` (counted from the delivery's arrival, its wait
        for its turn included: RabbitMQ's ``consumer_timeout`` counts so too) without one, or
        when the limiter's store cannot answer (the pipeline's own check then meets that
        outage and holds the delivery as for any other); None when the consumers stop."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._rate_hold_s
        async with self._pacing[partner.id]:
            while True:
                try:
                    wait_s = await self._limiters.wait_s(partner.id)
                except Unavailable:
                    return False
                if wait_s <= 0:
                    return True
                if not self._broker.consuming:
                    return None
                remaining = until - loop.time()
                if remaining <= 0:
                    return False
                await asyncio.sleep(min(max(wait_s, _MIN_WAIT_S), remaining, _WAIT_STEP_S))

    def _hold(self, partner: PartnerConfig, delivery: Delivery, hold_s: float) -> OutageHold:
        """How this delivery is held through an outage: ``hold_s``, or until a try succeeds
        when a return now would leave no margin before the delivery limit."""
        hold = OutageHold(self._broker, delivery, hold_s=hold_s, monotonic=self._clock.monotonic)
        if hold.hold_s is None:
            log.debug(
                "amqp_outage_hold_until_recovery",
                partner=partner.id,
                message_id=_safe_id(delivery.message_id),
                delivery_count=delivery.delivery_count,
            )
        return hold

    async def _handle_through_outages(
        self, request: InboundRequest, hold: OutageHold
    ) -> InboundResult:
        """Run the pipeline; while the store is down, hold the delivery and try again, as
        ``hold`` says (raises ``_Outage`` when the delivery is to go back)."""
        while True:
            result = await self._pipeline.handle(request)
            if result.code is not NackCode.UNAVAILABLE:
                return result
            # not an outage, and the store answered: the refusal's audit entry was written
            # (else it is asked, in case the cause was the store after all)
            if not result.outage and (result.audited or await self._store_reachable()):
                return result
            if not await hold.pause():
                raise _Outage  # held long enough, or stopping: the delivery goes back

    async def _publish_answer(
        self, partner: PartnerConfig, delivery: Delivery, answer: OutgoingMessage
    ) -> bool:
        """Publish ``answer`` to the partner's ``.out`` queue with a confirm; False when the
        broker would not take it and the delivery is to go back (its redelivery is answered
        the same: an exact re-send gets the original receipt). A delivery without a return
        to spare is held, the answer published again, until the broker takes it or the
        consumers stop (``OutageHold``)."""
        routing_key = self._out_queues.get(partner.id) or partner_out_queue(partner.id)
        held: OutageHold | None = None

        def hold(exc: Unavailable) -> OutageHold:
            nonlocal held
            # with a return to spare it goes back at once, as it always did: publish has
            # retried for its whole deadline already, or the broker refused it
            held = self._hold(partner, delivery, 0.0)
            log.warning(
                "amqp_receipt_not_published",
                partner=partner.id,
                message_id=answer.message_id,
                reason=exc.reason,
                held=held.hold_s is None,
            )
            return held

        published = await held_through_outages(
            lambda: self._broker.publish(answer, routing_key=routing_key, concern=OUT_CONCERN),
            hold,
        )
        if published is not None and held is not None and held.hold_s is None:
            log.info(
                "amqp_receipt_published_after_hold",
                partner=partner.id,
                message_id=answer.message_id,
            )
        return published is not None

    async def _store_reachable(self) -> bool:
        try:
            await self._store.ping()
        except Unavailable:
            return False
        return True

    async def _failed(self, partner: PartnerConfig, delivery: Delivery, reason: str) -> None:
        """A counted failure; on the last attempt the delivery is about to be dead-lettered."""
        limit = self._broker.config.delivery_limit
        attempt = delivery.delivery_count + 1
        log.error(
            "amqp_processing_failed",
            partner=partner.id,
            message_id=_safe_id(delivery.message_id),
            attempt=attempt,
            delivery_limit=limit,
            reason=reason,
        )
        metrics = self._pipeline.env.metrics
        label = metrics.partner_label(partner.id)
        metrics.amqp_processing_failures.labels(partner=label).inc()
        if delivery.delivery_count < limit:
            return
        metrics.amqp_dead_lettered.labels(partner=label).inc()
        event = AuditEvent(
            event=EventKind.POISON,
            at=self._clock.now(),
            message_id=_safe_id(delivery.message_id),
            sender=partner.id,
            body_digest=body_digest(delivery.body),
            outcome="dead-lettered",
            reason=(
                f"{reason}; attempt {attempt} of {limit + 1} failed, dead-lettered from "
                f"{delivery.queue} to {delivery.queue}.dead"
            ),
            transport="amqp",
        )
        try:
            await self._store.append_audit([event])
        except Unavailable as exc:
            log.error(
                "amqp_poison_not_audited",
                partner=partner.id,
                message_id=event.message_id,
                reason=event.reason,
                audit_error=exc.reason,
            )

    async def _answer(
        self, partner: PartnerConfig, delivery: Delivery, result: InboundResult
    ) -> OutgoingMessage | None:
        """What ``partner`` is answered on its ``.out`` queue, if anything; raises
        ``Malformed`` when its adapter cannot read back our receipt."""
        if result.receipt_body is not None and result.receipt_signature is not None:
            # Our receipt always answers the peer, in its format.
            native = self._native.get(partner.id)
            if native is None:
                header = _header_of(result.receipt_body)
                content_type = RECEIPT_CONTENT_TYPE
            else:
                adapter, content_type = native
                canonical = await to_canonical_off_loop(adapter, result.receipt_body)
                header = _header_of(canonical)
            return OutgoingMessage(
                body=result.receipt_body,
                message_id=str(header["message_id"]),
                message_type=RECEIPT_TYPE,
                app_id=self._party,
                content_type=content_type,
                signature=result.receipt_signature,
                correlation_id=_opt_str(header.get("correlation_id")),
                headers=_retry_after(result),
            )
        if result.problem is None or delivery.message_type == RECEIPT_TYPE:
            # A handed-over receipt, or a refused one: receipts are never answered (no loops).
            return None
        # Neither the body nor the delivery's message_id property named a message id, so no
        # receipt can be signed: the partner gets the RFC 9457 problem document.
        return OutgoingMessage(
            body=orjson.dumps(result.problem),
            message_id=new_message_id(),
            message_type=PROBLEM_TYPE,
            app_id=self._party,
            content_type=PROBLEM_CONTENT_TYPE,
            correlation_id=_safe_id(delivery.message_id),
            headers=_retry_after(result),
        )


class _Outage(Exception):
    """The store stayed unreachable for the whole hold time, or the consumers stopped."""


def _header_of(canonical: bytes) -> dict[str, Any]:
    # Our own signed receipt (canonical, or read back from a partner's format): its shape is
    # ours, not a partner's.
    header = orjson.loads(canonical)["header"]
    assert isinstance(header, dict)
    return header


def _retry_after(result: InboundResult) -> dict[str, str]:
    if result.retry_after_s is None:
        return {}
    return {RETRY_AFTER_HEADER: str(result.retry_after_s)}


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _safe_id(value: str | None) -> str | None:
    """A partner-set AMQP property, kept only when it looks like an id (it reaches logs)."""
    if value is None or len(value) > 64 or not value.isascii() or not value.isprintable():
        return None
    return value
