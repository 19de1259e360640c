"""Outbound messages to an AMQP partner: published to ``c2c.partner.<id>.out`` with a confirm.

The broker's confirm only means RabbitMQ holds the message (``Handed``); the partner's signed
receipt comes back later on ``c2c.partner.<id>.in`` and reaches the dispatcher through the
inbound pipeline.
"""

from __future__ import annotations

from gateway.errors import Unavailable
from gateway.outbound.transport import Delivery, Handed, PartnerReply, TransportError
from gateway.transports.amqp import AmqpBroker, OutgoingMessage, partner_out_queue
from gateway.transports.amqp_partner import OUT_CONCERN


class AmqpOutboundTransport:
    name = "amqp"

    def __init__(self, broker: AmqpBroker) -> None:
        self._broker = broker

    async def send(self, delivery: Delivery) -> PartnerReply | Handed:
        partner = delivery.partner
        if not partner.amqp.enabled:
            raise TransportError(
                f"{partner.id} has no AMQP transport configured", may_have_arrived=False
            )
        message = OutgoingMessage(
            body=delivery.body,
            message_id=delivery.message_id,
            message_type=delivery.message_type,
            app_id=delivery.sender,
            content_type=delivery.content_type,
            signature=delivery.signature,
        )
        try:
            await self._broker.publish(
                message, routing_key=partner_out_queue(partner.id), concern=OUT_CONCERN
            )
        except Unavailable as exc:
            # A confirm that never came may still mean the broker has it: the partner
            # deduplicates the re-send by message_id.
            raise TransportError(exc.reason, may_have_arrived=True) from exc
        return Handed()

    async def aclose(self) -> None:
        # The broker connection is shared and closed by the runtime.
        return None
