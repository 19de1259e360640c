"""``RabbitBus.publish_inbound_many``: a batch published with its confirms in flight together;
it returns the records confirmed, in order, a record that cannot be published is left out while
the records behind it are taken all the same, and a batch nothing is bound for is refused like a
single publish (RELIABILITY-SECURITY T65)."""

from __future__ import annotations

import dataclasses

import pytest
from amqp_env import AMQP_PARTNER, GATEWAY
from inbound_records import sample_record
from rabbit import RabbitVhost

from gateway.config import AmqpConfig
from gateway.errors import Unavailable
from gateway.store.base import InboundRecord
from gateway.transports.amqp import AmqpBroker
from gateway.transports.amqp_bus import RabbitBus

pytestmark = pytest.mark.rabbitmq


def _record(index: int) -> InboundRecord:
    return sample_record(index, sender=AMQP_PARTNER, recipient=GATEWAY)


async def test_a_batch_is_confirmed_in_order_whatever_fails_beside_it(
    rabbit_vhost: RabbitVhost,
) -> None:
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), publish_timeout_s=3.0))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        bus = RabbitBus(broker, party=GATEWAY)
        relayed: list[str] = []

        async def subscriber(record: InboundRecord) -> None:
            relayed.append(record.message_id)

        bus.subscribe(subscriber)
        records = [_record(i) for i in range(30)]
        with pytest.raises(Unavailable, match="unroutable"):
            await bus.publish_inbound_many(records)
        assert relayed == []

        channel = await broker.channel("test-sink")
        sink = await channel.declare_queue("test.sink", durable=True)
        await sink.bind("c2c.inbound", routing_key=f"{AMQP_PARTNER}.#")
        assert await bus.publish_inbound_many(records) == records
        assert relayed == [r.message_id for r in records]
        received = []
        while (message := await sink.get(fail=False, no_ack=True)) is not None:
            received.append(message.message_id)
        assert sorted(received) == sorted(r.message_id for r in records)

        # a record whose body was purged cannot be published: it is left out, and the record
        # behind it, routed and confirmed, is taken all the same
        relayed.clear()
        batch = [_record(i) for i in range(6)]
        batch[4] = dataclasses.replace(batch[4], body=None)
        taken = [*batch[:4], batch[5]]
        assert await bus.publish_inbound_many(batch) == taken
        assert relayed == [r.message_id for r in taken]
        with pytest.raises(Unavailable, match="purged"):
            await bus.publish_inbound_many(batch[4:5])
    finally:
        await broker.close()


async def test_a_witnessing_message_is_taken_with_no_queue_bound_for_it(
    rabbit_vhost: RabbitVhost,
) -> None:
    """The gateway answers a partner's audit.checkpoint itself (its in-process subscriber):
    a CBP system that binds only the business types must not hold up witnessing. A business
    message with no queue bound still waits, refused as unroutable."""
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), publish_timeout_s=3.0))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        channel = await broker.channel("test-sink")
        sink = await channel.declare_queue("test.sink", durable=True)
        await sink.bind("c2c.inbound", routing_key=f"{AMQP_PARTNER}.shipment.#")
        bus = RabbitBus(broker, party=GATEWAY)
        relayed: list[str] = []

        async def subscriber(record: InboundRecord) -> None:
            relayed.append(record.message_type)

        bus.subscribe(subscriber)
        witnessing = [
            dataclasses.replace(_record(i), message_type=kind)
            for i, kind in enumerate(("audit.checkpoint", "audit.cosignature"))
        ]
        assert await bus.publish_inbound_many(witnessing) == witnessing
        await bus.publish_inbound(dataclasses.replace(_record(2), message_type="audit.checkpoint"))
        assert relayed == ["audit.checkpoint", "audit.cosignature", "audit.checkpoint"]
        alert = dataclasses.replace(_record(3), message_type="enforcement.risk_alert")
        with pytest.raises(Unavailable, match="unroutable"):
            await bus.publish_inbound(alert)
        assert await sink.get(fail=False, no_ack=True) is None

        # a system that binds the witnessing key gets them, as before
        await sink.bind("c2c.inbound", routing_key=f"{AMQP_PARTNER}.audit.#")
        await bus.publish_inbound(witnessing[0])
        message = await sink.get(fail=False, no_ack=True)
        assert message is not None
        assert message.type == "audit.checkpoint"
    finally:
        await broker.close()
