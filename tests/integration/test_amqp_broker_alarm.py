"""RELIABILITY-SECURITY T67: a broker resource alarm (memory high watermark) in the middle of
a run, on a RabbitMQ node of the test's own.

While the alarm holds, the broker blocks every connection that publishes: it reads nothing more
from them. The gateway's receipts to ``.out`` and its routing to ``c2c.inbound`` time out and
are retried, the partner's own publishes wait, and the deliveries in flight stay unacknowledged
(the gateway's settlements wait on the blocked connection too, so none is counted toward the
delivery limit while the alarm lasts). After the alarm clears, every message is answered ACK,
stored once and routed; nothing is left in the partner's queue or dead-lettered."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from amqp_env import AMQP_PARTNER
from amqp_peer import amqp_gateway, queue_depth
from own_broker import OwnBroker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

TOTAL = 2000
#: receipts seen when the alarm is raised
ALARM_AT = 100
#: longer than (delivery limit + 1) x publish timeout: were each failed receipt publish
#: settled at once as a requeue, the deliveries in flight would reach the limit
ALARM_S = 12.0


async def test_a_memory_alarm_dead_letters_nothing(tmp_path: Path, own_broker: OwnBroker) -> None:
    # publish_timeout_s 1 s and the default delivery_limit 5
    async with amqp_gateway(
        tmp_path / "gw", own_broker, robust=True, publish_timeout_s=1.0, delivery_limit=5
    ) as env:
        assert env.gateway.config.amqp is not None
        assert env.gateway.config.amqp.delivery_limit == 5
        messages = [env.message() for _ in range(TOTAL)]
        sent = {mid for mid, _ in messages}

        async def publish_all() -> None:
            # blocked by the broker too while the alarm holds; goes on after it clears
            for message_id, body in messages:
                await env.peer.send(body, signature=env.sign(body), message_id=message_id)

        async def alarm() -> int:
            done = await asyncio.to_thread(
                own_broker.ctl, "set_vm_memory_high_watermark", "absolute", "1"
            )
            assert done.returncode == 0, done.stderr
            await asyncio.sleep(ALARM_S)
            dead = await queue_depth(own_broker, f"c2c.partner.{AMQP_PARTNER}.in.dead")
            done = await asyncio.to_thread(own_broker.ctl, "set_vm_memory_high_watermark", "0.4")
            assert done.returncode == 0, done.stderr
            return dead

        publisher = asyncio.create_task(publish_all())
        alarm_task: asyncio.Task[int] | None = None
        acked: Counter[str] = Counter()
        acked_at_alarm = 0
        async with asyncio.timeout(150):
            while len(acked) < TOTAL:
                out = await env.peer.next_out(timeout_s=60)
                payload = json.loads(out.body)["payload"]
                assert payload["status"] == "ACK", payload
                acked[payload["ref_message_id"]] += 1
                if alarm_task is None and len(acked) >= ALARM_AT:
                    acked_at_alarm = len(acked)
                    alarm_task = asyncio.create_task(alarm())
            await publisher
            assert alarm_task is not None
            dead_during_alarm = await alarm_task
            await env.sink.wait_for(TOTAL, timeout_s=60)

        # the alarm fell in the middle of the run, and blocked the gateway's publishing
        assert ALARM_AT <= acked_at_alarm < TOTAL
        assert env.gateway.metrics.registry.get_sample_value("c2c_relay_failures_total")
        assert dead_during_alarm == 0
        assert set(acked) == sent
        assert {m.message_id for m in env.sink.messages} == sent
        assert await queue_depth(own_broker, f"c2c.partner.{AMQP_PARTNER}.in") == 0
        assert await queue_depth(own_broker, f"c2c.partner.{AMQP_PARTNER}.in.dead") == 0
