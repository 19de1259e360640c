"""The outcomes of our messages on RabbitMQ: ``c2c.outcomes``.

US-CBP sends to MX-ANAM (a ``PartnerStub`` over HTTPS) with ``[amqp] url`` set; a CBP system's
queue bound to ``c2c.outcomes`` gets one event per final state (acknowledged, rejected, dead,
and an operator's close), routed ``<recipient>.<message_type>.<state>``, with the message's
state in the body and a stable ``message_id`` to deduplicate by. An outcome no queue takes is
held in the store and delivered once a queue is bound, not dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from outbound_env import (
    RETRYING_OUTBOX,
    Running,
    free_port,
    gateway_config,
    row_until,
    start_gateway,
    submit_to,
)
from partner_stub import PartnerStub
from rabbit import RabbitVhost

from gateway.config import AmqpConfig, RelayConfig
from gateway.store.base import OutboundState

pytestmark = pytest.mark.rabbitmq

MX = "MX-ANAM"
TYPE = "shipment.status"
#: a short relay lease: an outcome the broker returned is tried again after it
LEASE_S = 0.5


@asynccontextmanager
async def sending(
    tmp_path: Path, vhost: RabbitVhost, behaviours: list[str], *, outcomes: bool = True
) -> AsyncIterator[tuple[PartnerStub, Running]]:
    """US-CBP on ``vhost`` sending to a stub of MX-ANAM that answers with ``behaviours``,
    with ``[amqp] outcomes`` as given."""
    port = free_port()
    config = gateway_config(
        tmp_path, "US-CBP", peers={MX: f"https://127.0.0.1:{port}"}, outbox=RETRYING_OUTBOX
    )
    config = dataclasses.replace(
        config,
        amqp=dataclasses.replace(config.amqp, url=vhost.url(), outcomes=outcomes),
        relay=RelayConfig(lease_s=LEASE_S),
    )
    stub = PartnerStub(pki=tmp_path / "pki", behaviours=behaviours)
    await stub.start(port)
    try:
        running = await start_gateway(config)
        try:
            yield stub, running
        finally:
            await running.gateway.stop()
    finally:
        await stub.stop()


async def outcomes_queue(
    channel: aio_pika.abc.AbstractChannel, binding: str = "#"
) -> tuple[aio_pika.abc.AbstractQueue, asyncio.Queue[AbstractIncomingMessage]]:
    """A CBP system's durable queue bound to ``c2c.outcomes`` (declared as the gateway does)."""
    exchange = await channel.declare_exchange(
        "c2c.outcomes", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        "cbp.outcomes", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, routing_key=binding)
    got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(got.put, no_ack=True)
    return queue, got


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(15):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


async def next_outcome(got: asyncio.Queue[AbstractIncomingMessage]) -> AbstractIncomingMessage:
    async with asyncio.timeout(15):
        return await got.get()


async def test_each_final_state_is_published_once_on_c2c_outcomes(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        channel = await connection.channel()
        _queue, got = await outcomes_queue(channel)
        async with sending(tmp_path, rabbit_vhost, ["ack", "nack", "400"]) as (_stub, us):
            store = us.gateway.store
            expected = [
                (OutboundState.ACKNOWLEDGED, {"status": "ACK", "code": None}),
                (OutboundState.REJECTED, {"status": "NACK", "code": "SCHEMA_INVALID"}),
                (OutboundState.DEAD, None),
            ]
            ids = []
            for state, receipt in expected:
                record = await submit_to(us, MX)
                ids.append(record.message_id)
                final = await row_until(
                    store, record.message_id, lambda r, state=state: r.state is state
                )
                message = await next_outcome(got)
                assert message.routing_key == f"{MX}.{TYPE}.{state.value}"
                assert message.message_id == f"{record.message_id}/{state.value}/1"
                assert message.type == "c2c.outcome"
                assert message.app_id == "US-CBP"
                assert message.content_type == "application/json"
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                assert message.headers == {
                    "c2c-message-id": record.message_id,
                    "c2c-recipient": MX,
                    "c2c-state": state.value,
                    "c2c-outcome-at": final.updated_at.isoformat(timespec="milliseconds").replace(
                        "+00:00", "Z"
                    ),
                }
                body = json.loads(message.body)
                assert body["outcome_id"] == message.message_id
                assert {k: body[k] for k in ("message_id", "recipient", "message_type")} == {
                    "message_id": record.message_id,
                    "recipient": MX,
                    "message_type": TYPE,
                }
                assert (body["state"], body["attempts"], body["last_error"]) == (
                    state.value,
                    final.attempts,
                    final.last_error,
                )
                assert (body["submitted_by"], body["idempotency_key"]) == ("test", None)
                assert (body["correlation_id"], body["in_reply_to"]) == (None, None)
                assert body["receipt"] == receipt
            # an operator closes the dead message: that is an outcome too, its second
            dead_id = ids[-1]
            await store.close_outbound(dead_id, now=us.gateway.clock.now(), events=[])
            closed = await next_outcome(got)
            assert closed.routing_key == f"{MX}.{TYPE}.closed"
            assert closed.message_id == f"{dead_id}/closed/2"
            # exactly once each: nothing more comes, and nothing is left to publish
            await asyncio.sleep(3 * LEASE_S)
            assert got.empty()
            assert await store.claim_outcomes("test", us.gateway.clock.now(), 100, 1) == []
            published = us.gateway.metrics.registry.get_sample_value("c2c_outcomes_published_total")
            assert published == 4
    finally:
        await connection.close()


async def test_an_outcome_no_queue_takes_is_held_until_one_is_bound(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        channel = await connection.channel()
        async with sending(tmp_path, rabbit_vhost, ["ack"]) as (_stub, us):
            record = await submit_to(us, MX)
            await row_until(
                us.gateway.store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
            )
            metrics = us.gateway.metrics.registry

            await until(lambda: bool(metrics.get_sample_value("c2c_outcome_failures_total")))
            # returned as unroutable: still to publish, not counted published
            assert not metrics.get_sample_value("c2c_outcomes_published_total")
            _queue, got = await outcomes_queue(channel, f"{MX}.#")
            message = await next_outcome(got)
            assert message.message_id == f"{record.message_id}/acknowledged/1"
            assert message.routing_key == f"{MX}.{TYPE}.acknowledged"
    finally:
        await connection.close()


async def test_outcomes_are_published_only_when_asked_for(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """``[amqp] outcomes`` is off by default: a deployment that binds nothing to c2c.outcomes
    keeps no outcome waiting in its store; a queue bound anyway gets nothing."""
    assert AmqpConfig().outcomes is False
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        channel = await connection.channel()
        _queue, got = await outcomes_queue(channel)
        async with sending(tmp_path, rabbit_vhost, ["ack"], outcomes=False) as (_stub, us):
            record = await submit_to(us, MX)
            store = us.gateway.store
            await row_until(
                store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
            )
            await until(
                lambda: bool(
                    us.gateway.metrics.registry.get_sample_value("c2c_outcomes_published_total")
                )
            )
            assert await store.claim_outcomes("test", us.gateway.clock.now(), 100, 1) == []
        await asyncio.sleep(0.5)
        assert got.empty()
    finally:
        await connection.close()
