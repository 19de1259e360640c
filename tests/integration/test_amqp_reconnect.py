"""The broker closes the gateway's connection in the middle of a 2,000-message run
(``rabbitmqctl close_connection``, RELIABILITY-SECURITY T66 / A1): the gateway reconnects,
redeclares and resumes. Nothing is lost: every message is ACKed and reaches the ``c2c.inbound``
consumer; the only duplicates are redeliveries carrying the same message_id."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path

import pytest
import rabbit
from amqp_env import AMQP_PARTNER
from amqp_peer import amqp_gateway, queue_depth
from rabbit import RabbitVhost
from tcp_proxy import TcpProxy

from gateway.config import AmqpConfig
from gateway.errors import Unavailable
from gateway.transports.amqp import CONNECTION_NAME, AmqpBroker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

TOTAL = 2000
#: receipts seen when the broker drops the gateway's connection
CUTS = (300, 1100)


async def test_connection_closed_by_the_broker_mid_run_loses_nothing(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost, publish_timeout_s=10.0) as env:
        messages = [env.message() for _ in range(TOTAL)]
        signed = [(mid, body, env.sign(body)) for mid, body in messages]
        sent = {mid for mid, _ in messages}

        async def publish_all() -> None:
            for message_id, body, signature in signed:
                await env.peer.send(body, signature=signature, message_id=message_id)

        publisher = asyncio.create_task(publish_all())
        acked: Counter[str] = Counter()
        closed = 0
        async with asyncio.timeout(100):
            while len(acked) < TOTAL:
                out = await env.peer.next_out(timeout_s=60)
                payload = json.loads(out.body)["payload"]
                assert payload["status"] == "ACK", payload
                acked[payload["ref_message_id"]] += 1
                if closed < len(CUTS) and len(acked) >= CUTS[closed]:
                    cut = await asyncio.to_thread(
                        rabbit_vhost.close_connections, CONNECTION_NAME, "test cut"
                    )
                    assert cut == 1
                    closed += 1
            await publisher
            await env.sink.wait_for(TOTAL, timeout_s=60)

        assert closed == len(CUTS)
        assert set(acked) == sent
        routed = Counter(m.message_id for m in env.sink.messages)
        # None lost, nothing unexpected; duplicates only as repeats of the same message_id.
        assert set(routed) == sent
        for message in env.sink.messages:
            assert message.routing_key == f"{AMQP_PARTNER}.shipment.advance_data"
            assert message.app_id == AMQP_PARTNER
        duplicates = sum(routed.values()) - TOTAL
        resent_receipts = sum(acked.values()) - TOTAL
        print(f"bus duplicates={duplicates} receipt re-sends={resent_receipts}")
        for message_id in list(sent)[:50]:
            assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is not None
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in") == 0
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in.dead") == 0


async def _ping_until_it_fails(broker: AmqpBroker, within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while True:
            await broker.ping()
            await asyncio.sleep(0.05)


async def test_while_reconnecting_the_broker_is_unavailable_not_broken(
    rabbit_vhost: RabbitVhost,
) -> None:
    """The path to the broker is cut (every connection dropped, new ones refused) and comes
    back: meanwhile ``ping`` (``/readyz``) and a new channel say ``Unavailable``, which the
    relay and the dispatcher wait out (aio-pika's own RuntimeError, "Connection was not
    opened", escaped here before and ended the relay's task until the next restart); once
    the connection is back, both work again by themselves."""
    proxy = TcpProxy(rabbit.PORT, rabbit.HOST)
    await proxy.start()
    url = f"amqp://{rabbit.USER}:{rabbit.PASSWORD}@127.0.0.1:{proxy.port}/{rabbit_vhost.name}"
    broker = AmqpBroker(AmqpConfig(url=url))
    await broker.connect()
    try:
        await broker.ping()
        await broker.channel("before")
        await proxy.cut()
        # found lost by the connection, or by the ping's own round trip
        with pytest.raises(Unavailable, match=r"reconnecting|round trip failed"):
            await _ping_until_it_fails(broker, within_s=10)
        with pytest.raises(Unavailable, match="cannot open a channel"):
            await broker.channel("during")
        await proxy.start()
        async with asyncio.timeout(15):
            while True:
                with contextlib.suppress(Unavailable):
                    await broker.ping()
                    break
                await asyncio.sleep(0.1)
        channel = await broker.channel("after")
        assert not channel.is_closed
    finally:
        await broker.close()
        await proxy.cut()
