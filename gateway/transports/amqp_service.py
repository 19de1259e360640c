"""The gateway's RabbitMQ side as one runtime service: connect, declare, consume, stop.

Started by the runtime after the store is open: it connects, declares the topology (every
AMQP-enabled partner's queues, ``c2c.inbound``, ``c2c.submit``, the dead-letter exchange),
then consumes the partners' ``.in`` queues and ``c2c.submit``. Stopping cancels the
consumers, lets the deliveries in hand finish (bounded), then closes the connection.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.inbound.pipeline import InboundPipeline
from gateway.outbound.submission import SubmissionServices
from gateway.transports.amqp import AmqpBroker
from gateway.transports.amqp_outbound import AmqpOutboundTransport
from gateway.transports.amqp_partner import PartnerInbox
from gateway.transports.amqp_submit import SubmitConsumer


class AmqpService:
    def __init__(
        self,
        *,
        broker: AmqpBroker,
        pipeline: InboundPipeline,
        submission: SubmissionServices,
        on_submitted: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.inbox = PartnerInbox(
            broker=broker, pipeline=pipeline, partners=pipeline.env.config.partners.values()
        )
        self.submit = SubmitConsumer(broker=broker, services=submission, on_submitted=on_submitted)
        #: for the dispatcher: ``transports["amqp"]``
        self.outbound_transport = AmqpOutboundTransport(broker)

    async def start(self) -> None:
        await self.broker.connect()
        try:
            await self.broker.declare_topology(self.inbox.partner_ids)
            await self.inbox.start()
            await self.submit.start()
        except BaseException:
            await self.broker.close()
            raise

    async def stop(self) -> None:
        await self.broker.stop_consuming()
        await self.broker.close()
