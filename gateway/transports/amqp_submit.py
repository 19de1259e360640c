"""Internal systems submit outbound messages by publishing to the ``c2c.submit`` exchange.

The body is the same JSON object as ``POST /api/v1/messages`` and goes through the same
submission stages (resolve partner, authorize type, validate, sign, store with its audit
event). The submitter is ``amqp:<user_id>`` (broker-validated) or else ``amqp:<app_id>``.
The AMQP ``message_id`` property is the submission's idempotency key: a redelivery (the
gateway stopped between storing and acking) or a publisher's resend with the same
``message_id`` and body gets the message the first one created, never a second one. (aiormq,
under aio-pika, gives every message a random ``message_id`` when the application sets none:
broker redeliveries are covered, a resend by the application needs its own id.)

Answers: with ``reply_to`` set, the outcome is published there (``submission.accepted`` with
the message id, or an RFC 9457 ``problem`` naming the code, with what is wrong with the
submission in its ``detail`` and the exact reason in ``reason``). The answer to a resend
carries the header ``c2c-idempotent-replayed: "true"`` (the internal API's
``Idempotent-Replayed: true``); a different submission under a ``message_id`` already used is
refused (``DUPLICATE_CONFLICT``, the detail naming the ``message_id``). A refused submission
without ``reply_to`` is dead-lettered to ``c2c.submit.dead`` with the reason in the
``c2c-reason`` header. The delivery is acked only once the row is stored or the refusal was
published with a confirm.

While the store is down (``Unavailable``) the delivery is held and tried again for
``outage_pause_s``, then goes back to the queue with ``basic.nack(requeue=True)``. RabbitMQ
before 4.3 counts that towards the queue's delivery limit like a reject, so a store outage of a
few seconds would have the broker dead-letter every queued submission to ``c2c.submit.dead``,
unanswered and unaudited: a delivery whose count leaves no more than one return before the limit
is held until the store answers instead, or until the consumers stop (``OutageHold``, the rule
the partner inbox follows too). A submission refused before it could be read (not JSON, an
unknown member) is audited before it is answered, through an outage the same way. A dead
letter the broker will not take (``c2c.submit.dead`` gone) is published again while the
delivery is held, not returned: its redelivery would be refused and audited once more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog

from gateway.api.messages import submission_from
from gateway.envelope import new_message_id, parse_json_strict
from gateway.errors import GatewayError, IdempotencyKeyReused, Malformed, Unavailable
from gateway.inbound.pipeline import problem_document
from gateway.outbound.submission import (
    SubmissionServices,
    named_in,
    record_refusal,
    submit_request,
)
from gateway.transports.amqp import (
    DEAD_LETTER_EXCHANGE,
    REASON_HEADER,
    SUBMIT_EXCHANGE,
    SUBMIT_QUEUE,
    AmqpBroker,
    Delivery,
    OutageHold,
    OutgoingMessage,
    Settlement,
    held_through_outages,
)

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

ACCEPTED_TYPE = "submission.accepted"
PROBLEM_TYPE = "problem"
REPLY_CONCERN = "submit-reply"
#: on the answer to a resend (same ``message_id`` and submission, same submitter): nothing new
#: was stored, the message named is the one the first created
REPLAYED_HEADER = "c2c-idempotent-replayed"


class SubmitConsumer:
    def __init__(
        self,
        *,
        broker: AmqpBroker,
        services: SubmissionServices,
        on_submitted: Callable[[], None] | None = None,
        #: how long a store outage holds a delivery (tried again meanwhile) before it goes back
        #: to the queue, while its count leaves a return to spare
        outage_pause_s: float = 1.0,
    ) -> None:
        self._broker = broker
        self._services = services
        self._on_submitted = on_submitted
        self._outage_pause_s = outage_pause_s
        self._party = services.config.party

    async def start(self) -> None:
        await self._broker.consume(
            SUBMIT_QUEUE, self.on_delivery, concern="submit", exchange=SUBMIT_EXCHANGE
        )

    async def on_delivery(self, delivery: Delivery) -> Settlement:
        actor = _actor(delivery)
        document: object = None
        try:
            document = parse_json_strict(
                delivery.body, max_bytes=self._services.config.largest_body_bytes
            )
            if not isinstance(document, dict):
                raise Malformed("the submission must be a JSON object")
            submission = submission_from(
                document, actor=actor, idempotency_key=delivery.message_id or None
            )
        except GatewayError as exc:
            # refused before submit_request, which audits its own refusals: audited here,
            # through a store outage as a submission is stored
            refused = exc
            named = named_in(document)

            async def audit() -> None:
                await record_refusal(self._services, refused, actor=actor, **named)

            if await self._through_outages(delivery, actor, "amqp_submit_unavailable", audit):
                return await self._refuse(delivery, actor, exc)
            return Settlement.REQUEUE
        try:
            stored = await self._through_outages(
                delivery,
                actor,
                "amqp_submit_unavailable",
                lambda: submit_request(self._services, submission),
            )
        except GatewayError as exc:
            return await self._refuse(delivery, actor, exc)
        if stored is None:
            return Settlement.REQUEUE
        (submitted,) = stored
        record = submitted.record
        if self._on_submitted is not None:
            self._on_submitted()
        log.info(
            "amqp_submitted",
            actor=actor,
            message_id=record.message_id,
            replayed=submitted.replayed,
        )
        if delivery.reply_to:
            reply = self._reply(
                delivery,
                ACCEPTED_TYPE,
                {"message_id": record.message_id, "status": record.state.value},
                headers={REPLAYED_HEADER: "true"} if submitted.replayed else {},
            )
            try:
                await self._broker.publish(
                    reply, routing_key=delivery.reply_to, concern=REPLY_CONCERN
                )
            except Unavailable as exc:
                # The message is stored and will be sent; only the courtesy reply is lost.
                log.warning("amqp_submit_reply_lost", actor=actor, reason=exc.reason)
        return Settlement.ACK

    async def _through_outages(
        self,
        delivery: Delivery,
        actor: str,
        event: str,
        attempt: Callable[[], Awaitable[_T]],
        *,
        until_done: bool = False,
    ) -> tuple[_T] | None:
        """``held_through_outages`` for this delivery (``until_done``: held until ``attempt``
        succeeds, whatever the delivery's count), the first failure logged as ``event``."""

        def hold(exc: Unavailable) -> OutageHold:
            held = OutageHold(
                self._broker,
                delivery,
                hold_s=None if until_done else self._outage_pause_s,
                monotonic=self._services.clock.monotonic,
            )
            log.warning(
                event,
                actor=actor,
                reason=exc.reason,
                delivery_count=delivery.delivery_count,
                held_until_stored=held.hold_s is None,
            )
            return held

        return await held_through_outages(attempt, hold)

    async def _refuse(self, delivery: Delivery, actor: str, exc: GatewayError) -> Settlement:
        log.info("amqp_submit_refused", actor=actor, code=exc.code.value, reason=exc.reason)
        if delivery.reply_to:
            document = {
                **problem_document(exc),
                "detail": _detail(exc, delivery),
                "reason": exc.reason,
            }
            reply = self._reply(
                delivery, PROBLEM_TYPE, document, content_type="application/problem+json"
            )
            try:
                await self._broker.publish(
                    reply, routing_key=delivery.reply_to, concern=REPLY_CONCERN
                )
                return Settlement.ACK
            except Unavailable as reply_exc:
                log.warning("amqp_submit_reply_failed", actor=actor, reason=reply_exc.reason)
        dead = OutgoingMessage(
            body=delivery.body,
            message_id=delivery.message_id or new_message_id(),
            message_type=delivery.message_type or "submission",
            app_id=delivery.app_id or "",
            content_type=delivery.content_type or "application/json",
            correlation_id=delivery.correlation_id,
            headers={REASON_HEADER: f"{exc.code.value}: {exc.reason}"},
        )

        async def dead_letter() -> None:
            await self._broker.publish(
                dead,
                exchange=DEAD_LETTER_EXCHANGE,
                routing_key=SUBMIT_QUEUE,
                concern=REPLY_CONCERN,
            )

        # held and published again until the broker takes it (or the consumers stop), not
        # returned: a redelivery would be refused, and audited, once more
        if await self._through_outages(
            delivery, actor, "amqp_submit_dead_letter_failed", dead_letter, until_done=True
        ):
            return Settlement.ACK
        return Settlement.REQUEUE

    def _reply(
        self,
        delivery: Delivery,
        message_type: str,
        document: dict[str, Any],
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> OutgoingMessage:
        return OutgoingMessage(
            body=orjson.dumps(document),
            message_id=new_message_id(),
            message_type=message_type,
            app_id=self._party,
            content_type=content_type,
            correlation_id=delivery.correlation_id or delivery.message_id,
            headers=headers or {},
        )


def _detail(exc: GatewayError, delivery: Delivery) -> str:
    """The problem's ``detail`` for a submitter over AMQP. The refusals' usual details are
    worded for a partner's envelope or the internal API's ``Idempotency-Key``; a malformed
    submission is told exactly what is wrong with it."""
    if isinstance(exc, IdempotencyKeyReused):
        return f"message_id {delivery.message_id!r} was already used for a different submission"
    if isinstance(exc, Malformed):
        return exc.reason
    return exc.detail


def _actor(delivery: Delivery) -> str:
    who = delivery.user_id or delivery.app_id or "anonymous"
    return f"amqp:{who[:64]}"
