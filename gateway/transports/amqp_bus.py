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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from gateway.clock import format_rfc3339
from gateway.crashpoints import crash_point
from gateway.errors import Unavailable
from gateway.model import WITNESSING_TYPES
from gateway.store.base import InboundRecord
from gateway.transports.amqp import INBOUND_EXCHANGE, AmqpBroker, OutgoingMessage
from gateway.transports.bus import InboundHandler, notify_in_order, notify_subscribers

BUS_CONCERN = "bus"


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


class RabbitBus:
    def __init__(
        self,
        broker: AmqpBroker,
        media_type: Callable[[str], str] = lambda sender: "application/json",
    ) -> None:
        self._broker = broker
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

    async def close(self) -> None:
        # The broker connection is the runtime's; it closes it after the relay stopped.
        self._closed = True
