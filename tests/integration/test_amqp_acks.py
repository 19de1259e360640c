"""Coalesced acks on a real broker: a ``basic.ack(multiple=True)`` never covers a delivery that is
still being handled or that was refused, and the consumer's channel is never closed by an ack of
an unknown delivery tag (RabbitMQ's PRECONDITION_FAILED)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import aio_pika
import aiormq
import pytest
from rabbit import RabbitVhost, rabbitmqctl

from gateway.config import AmqpConfig
from gateway.transports.amqp import AmqpBroker, Delivery, DeliveryHandler, Settlement

pytestmark = pytest.mark.rabbitmq

QUEUE = "test.acks"
CONCERN = "test-acks"


async def _publish(url: str, message_ids: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for message_id in message_ids:
            await channel.default_exchange.publish(
                aio_pika.Message(message_id.encode(), message_id=message_id), routing_key=QUEUE
            )
    finally:
        await connection.close()


async def _queue_counts(vhost: RabbitVhost) -> tuple[int, int]:
    """``(messages_ready, messages_unacknowledged)`` of the test queue, as the broker counts."""
    out = await asyncio.to_thread(
        rabbitmqctl,
        "list_queues",
        "-p",
        vhost.name,
        "name",
        "messages_ready",
        "messages_unacknowledged",
    )
    for line in out.splitlines():
        name, ready, unacked = [*line.split("\t"), "", ""][:3]
        if name == QUEUE:
            return int(ready), int(unacked)
    raise AssertionError(f"{QUEUE} not listed: {out!r}")


async def _eventually_counts(vhost: RabbitVhost, expected: tuple[int, int]) -> None:
    counts = await _queue_counts(vhost)
    async with asyncio.timeout(30):
        while counts != expected:
            await asyncio.sleep(0.2)
            counts = await _queue_counts(vhost)


async def _consuming(vhost: RabbitVhost, handler: DeliveryHandler, *, prefetch: int) -> AmqpBroker:
    broker = AmqpBroker(AmqpConfig(url=vhost.url(), prefetch=prefetch, delivery_limit=5))
    await broker.connect()
    await broker.declare_topology([])
    await broker.consume(QUEUE, handler, concern=CONCERN, exchange=None)
    return broker


class Progress:
    """Wakes a waiter whenever a handler has recorded something."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()

    async def tell(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], *, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)


async def _underlay(broker: AmqpBroker) -> aiormq.abc.AbstractChannel:
    channel = await broker.channel(CONCERN)
    return await channel.get_underlay_channel()


async def test_an_ack_never_covers_a_delivery_in_hand_or_refused(rabbit_vhost: RabbitVhost) -> None:
    ids = [f"m{i:02d}" for i in range(40)]
    held, rejected, nacked = "m00", "m07", "m21"
    release = asyncio.Event()
    seen: Counter[str] = Counter()
    acked: set[str] = set()
    rng = random.Random(8)
    progress = Progress()

    async def handler(delivery: Delivery) -> Settlement:
        message_id = delivery.message_id
        assert message_id is not None
        seen[message_id] += 1
        first = seen[message_id] == 1
        if message_id == held and first:
            await release.wait()
            return Settlement.REQUEUE
        # out of order: later deliveries often finish before earlier ones
        await asyncio.sleep(rng.random() * 0.02)
        if message_id == rejected and first:
            return Settlement.REJECT
        if message_id == nacked and first:
            return Settlement.REQUEUE
        acked.add(message_id)
        await progress.tell()
        return Settlement.ACK

    broker = await _consuming(rabbit_vhost, handler, prefetch=len(ids))
    try:
        channel_before = await _underlay(broker)
        await _publish(rabbit_vhost.url(), ids)
        await progress.until(lambda: acked == set(ids) - {held})
        # every ack but the held delivery's reached the broker; the held one is still unacked
        await _eventually_counts(rabbit_vhost, (0, 1))

        release.set()
        await progress.until(lambda: held in acked)
        await _eventually_counts(rabbit_vhost, (0, 0))

        # the refused deliveries came back (an ack over them would have made their own
        # settlement an unknown tag and closed the channel), everything else came once
        assert seen == Counter({**dict.fromkeys(ids, 1), held: 2, rejected: 2, nacked: 2})
        assert await _underlay(broker) is channel_before
        assert not channel_before.is_closed
    finally:
        await broker.stop_consuming()
        await broker.close()


async def test_deliveries_finishing_out_of_order_are_acked_once_each(
    rabbit_vhost: RabbitVhost,
) -> None:
    ids = [f"n{i:04d}" for i in range(600)]
    seen: Counter[str] = Counter()
    rng = random.Random(6)
    progress = Progress()

    async def handler(delivery: Delivery) -> Settlement:
        assert delivery.message_id is not None
        await asyncio.sleep(rng.random() * 0.005)
        seen[delivery.message_id] += 1
        await progress.tell()
        return Settlement.ACK

    broker = await _consuming(rabbit_vhost, handler, prefetch=50)
    try:
        channel_before = await _underlay(broker)
        await _publish(rabbit_vhost.url(), ids)
        await progress.until(lambda: len(seen) == len(ids), timeout_s=60)
        await _eventually_counts(rabbit_vhost, (0, 0))
        assert seen == Counter(dict.fromkeys(ids, 1))
        assert await _underlay(broker) is channel_before
    finally:
        await broker.stop_consuming()
        await broker.close()
