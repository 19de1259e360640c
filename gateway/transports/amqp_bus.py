"""The RabbitMQ internal bus: accepted inbound messages to the ``c2c.inbound`` topic exchange.

Called by the inbox relay only after the store commit; ``publish_inbound`` returns only after
the broker's confirm (``mandatory``: with no queue bound, nothing is confirmed and the record
stays pending; but a partner's witnessing message, which this gateway answers itself, is
confirmed whether or not a CBP system binds its key); ``publish_inbound_many`` publishes a
batch with the confirms in flight together, and a record that is not confirmed leaves the
others of the batch taken. Routing key ``<sender>.<message_type>``; the properties are those of
PROTOCOL section 5, so a consumer deduplicates by ``(app_id, message_id)`` and can re-verify
the partner's signature from the ``c2c-signature`` header over the exact body.

In-process subscribers are called after the confirm, for the records this process relays;
systems elsewhere (and other replicas) consume ``c2c.inbound`` itself.

The outcomes of our outbound messages go to the ``c2c.outcomes`` topic exchange, routing key
``<recipient>.<message_type>.<state>``, ``message_id`` the outcome's stable id
(``<message_id>/<state>/<n>``), published by the outcome relay the same way (docs/integration.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import orjson

from gateway.clock import format_rfc3339
from gateway.crashpoints import crash_point
from gateway.errors import Unavailable
from gateway.model import WITNESSING_TYPES
from gateway.store.base import InboundRecord
from gateway.store.outcomes import OutcomeRecord
from gateway.transports.amqp import (
    INBOUND_EXCHANGE,
    OUTCOMES_EXCHANGE,
    AmqpBroker,
    OutgoingMessage,
)
from gateway.transports.bus import (
    InboundHandler,
    notify_in_order,
    notify_subscribers,
    taken_outcomes,
)

BUS_CONCERN = "bus"
#: the AMQP ``type`` of an outcome event
OUTCOME_TYPE = "c2c.outcome"


def routing_key(record: InboundRecord) -> str:
    return f"{record.sender}.{record.message_type}"


def bus_message(record: InboundRecord, content_type: str = "application/json") -> OutgoingMessage:
    if record.body is None:
        raise Unavailable(f"{record.sender}/{record.message_id}: body purged before it was relayed")
    headers = {
        "c2c-recipient": record.recipient,
        "c2c-schema-version": record.schema_version,
        "c2c-body-digest": record.body_digest,
        "c2c-kid": record.kid,
        "c2c-transport": record.transport,
        "c2c-received-at": format_rfc3339(record.received_at),
    }
    if record.in_reply_to is not None:
        headers["c2c-in-reply-to"] = record.in_reply_to
    version = record.document_version
    if version is not None and record.document_ref is not None:
        # highest version wins (gateway/documents.py): compare versions as strings
        headers["c2c-document-ref"] = record.document_ref
        headers["c2c-document-version"] = version
        if record.message_function is not None:
            headers["c2c-message-function"] = record.message_function
    return OutgoingMessage(
        body=record.body,
        message_id=record.message_id,
        message_type=record.message_type,
        app_id=record.sender,
        signature=record.signature,
        correlation_id=record.correlation_id,
        content_type=content_type,
        headers=headers,
    )


def outcome_routing_key(outcome: OutcomeRecord) -> str:
    return f"{outcome.recipient}.{outcome.message_type}.{outcome.state.value}"


def outcome_message(outcome: OutcomeRecord, party: str) -> OutgoingMessage:
    """The ``c2c.outcomes`` message of ``outcome``: its body as stored, its stable id."""
    body = orjson.loads(outcome.body)
    headers = {
        "c2c-message-id": outcome.message_id,
        "c2c-recipient": outcome.recipient,
        "c2c-state": outcome.state.value,
        "c2c-outcome-at": format_rfc3339(outcome.at),
    }
    if body.get("in_reply_to") is not None:
        headers["c2c-in-reply-to"] = body["in_reply_to"]
    return OutgoingMessage(
        body=outcome.body,
        message_id=outcome.outcome_id,
        message_type=OUTCOME_TYPE,
        app_id=party,
        correlation_id=body.get("correlation_id"),
        content_type="application/json",
        headers=headers,
    )


class RabbitBus:
    def __init__(
        self,
        broker: AmqpBroker,
        media_type: Callable[[str], str] = lambda sender: "application/json",
        *,
        party: str,
        outcomes: bool = True,
    ) -> None:
        self._broker = broker
        #: our party id: the ``app_id`` of the outcomes we publish
        self._party = party
        #: ``[amqp] outcomes``: publish outcomes to ``c2c.outcomes``, or take and drop them
        self._outcomes = outcomes
        #: the ``content_type`` of a sender's bytes: JSON, or its adapter's native format
        self._media_type = media_type
        self._handlers: list[InboundHandler] = []
        self._closed = False

    def subscribe(self, handler: InboundHandler) -> None:
        self._handlers.append(handler)

    async def publish_inbound(self, record: InboundRecord) -> None:
        if self._closed:
            raise Unavailable("RabbitMQ bus is closed")
        await self._publish(record)
        await notify_subscribers(self._handlers, record)

    async def publish_inbound_many(self, records: Sequence[InboundRecord]) -> list[InboundRecord]:
        if self._closed:
            raise Unavailable("RabbitMQ bus is closed")
        failures: list[BaseException | None] = list(
            await asyncio.gather(
                *(self._publish(record) for record in records), return_exceptions=True
            )
        )
        # every confirmed record is routed already, whichever failed beside it: all of them
        # count, and in-process subscribers see them in order
        return await notify_in_order(self._handlers, records, failures)

    async def _publish(self, record: InboundRecord) -> None:
        await self._broker.publish(
            bus_message(record, self._media_type(record.sender)),
            exchange=INBOUND_EXCHANGE,
            routing_key=routing_key(record),
            concern=BUS_CONCERN,
            # a partner's witnessing message is this gateway's own business (its in-process
            # subscriber answers it), published for the CBP systems that bind its key: with
            # none bound it is not kept waiting, nor its partner's cosignature with it
            mandatory=record.message_type not in WITNESSING_TYPES,
        )
        crash_point("S8-before-confirm")

    async def publish_outcomes(self, outcomes: Sequence[OutcomeRecord]) -> list[OutcomeRecord]:
        if self._closed:
            raise Unavailable("RabbitMQ bus is closed")
        if not self._outcomes:
            # not asked for: dropped, as the in-process bus drops them, so that none waits in
            # the store (nor floods the exchange once they are asked for)
            return list(outcomes)
        failures: list[BaseException | None] = list(
            await asyncio.gather(
                *(self._publish_outcome(outcome) for outcome in outcomes), return_exceptions=True
            )
        )
        return taken_outcomes(outcomes, failures)

    async def _publish_outcome(self, outcome: OutcomeRecord) -> None:
        # mandatory, as c2c.inbound: an outcome no bound queue takes is returned and waits in
        # the store, tried again once per lease, until a queue is bound for its key
        await self._broker.publish(
            outcome_message(outcome, self._party),
            exchange=OUTCOMES_EXCHANGE,
            routing_key=outcome_routing_key(outcome),
            concern=BUS_CONCERN,
            mandatory=True,
        )

    async def close(self) -> None:
        # The broker connection is the runtime's; it closes it after the relay stopped.
        self._closed = True
