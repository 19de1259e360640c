"""Poison messages over AMQP (RELIABILITY-SECURITY T53): a message whose processing fails every
time is tried delivery_limit + 1 times, then dead-lettered by the broker to
``c2c.partner.<id>.in.dead`` and audited with the reason; other messages are unaffected."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from amqp_env import AMQP_PARTNER, config_without_broker
from amqp_peer import IN_EXCHANGE, OUT_QUEUE
from rabbit import RabbitVhost

from gateway.config import AmqpConfig, load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import load_signing_key
from gateway.envelope import body_digest
from gateway.inbound.context import InboundContext
from gateway.inbound.pipeline import InboundPipeline
from gateway.inbound.stages import STAGES
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter
from gateway.transports.amqp import AmqpBroker, partner_in_queue
from gateway.transports.amqp_partner import PartnerInbox

pytestmark = pytest.mark.rabbitmq

LIMIT = 2


async def test_poison_message_is_dead_lettered_after_the_limit_and_audited(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    gateway = Gateway(config_without_broker(tmp_path))
    await gateway.start()
    attempts: list[bytes] = []
    poison = b'{"poison": true}'

    async def crash_on_poison(ctx: InboundContext) -> None:
        # Stands in for a bug that some input triggers every time.
        if ctx.request.body == poison:
            attempts.append(ctx.request.body)
            raise RuntimeError("bug triggered by this input")

    pipeline = InboundPipeline(gateway.pipeline.env, stages=(crash_on_poison, *STAGES))
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), delivery_limit=LIMIT))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        inbox = PartnerInbox(
            broker=broker, pipeline=pipeline, partners=gateway.config.partners.values()
        )
        await inbox.start()

        key = load_signing_key(
            tmp_path / "certs" / AMQP_PARTNER / "sign.key", party=AMQP_PARTNER, alg="EdDSA"
        )
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(IN_EXCHANGE, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    poison,
                    message_id="poison-1",
                    content_type="application/json",
                    headers={"c2c-signature": sign_detached(poison, key)},
                ),
                routing_key="",
            )
            dead_queue = await channel.get_queue(
                f"{partner_in_queue(AMQP_PARTNER)}.dead", ensure=False
            )
            dead_letters: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await dead_queue.consume(dead_letters.put, no_ack=True)
            async with asyncio.timeout(30):
                dead = await dead_letters.get()
            out_queue = await channel.get_queue(OUT_QUEUE, ensure=False)
            assert await out_queue.get(fail=False) is None
        finally:
            await connection.close()
    finally:
        await broker.close()
        await gateway.stop()

    assert dead.body == poison
    assert dead.message_id == "poison-1"
    deaths = dead.headers["x-death"]
    assert isinstance(deaths, list)
    assert deaths[0]["reason"] == "delivery_limit"
    assert deaths[0]["queue"] == partner_in_queue(AMQP_PARTNER)
    assert len(attempts) == LIMIT + 1
    # counted for the alerts: every failed attempt, and the dead-lettering
    registry = gateway.metrics.registry
    labels = {"partner": AMQP_PARTNER}
    assert registry.get_sample_value("c2c_amqp_processing_failures_total", labels) == LIMIT + 1
    assert registry.get_sample_value("c2c_amqp_dead_lettered_total", labels) == 1.0

    rows = await _audit(tmp_path)
    assert len(rows) == 1, rows
    entry = rows[0]
    assert entry["sender"] == AMQP_PARTNER
    assert entry["message_id"] == "poison-1"
    assert entry["body_digest"] == body_digest(poison)
    assert entry["outcome"] == "dead-lettered"
    assert entry["transport"] == "amqp"
    assert "processing failed while the store was reachable" in entry["reason"]
    assert f"attempt {LIMIT + 1} of {LIMIT + 1} failed" in entry["reason"]
    assert "c2c.partner.MX-ANAM.in.dead" in entry["reason"]


async def _audit(root: Path) -> list[dict[str, object]]:
    gateway = Gateway(load_config(root / "gateway.toml"))
    await gateway.store.open()
    try:
        rows = await gateway.store.audit_entries(AuditFilter(event="poison"))
        return [json.loads(row.entry) for row in rows]
    finally:
        await gateway.store.close()
