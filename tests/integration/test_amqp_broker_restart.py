"""RELIABILITY-SECURITY T66 with a real restart: the whole RabbitMQ node is halted and started
again in the middle of a run (a node of the test's own; the shared broker is never touched).

The partner republishes what the broker did not confirm, as PROTOCOL section 5 asks of it.
Every message ends ACKed, stored once and routed to the CBP system's queue, which survives the
restart; the only duplicates are repeats of the same message_id; nothing is left in the
partner's queue or dead-lettered."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiormq
import pytest
from amqp_env import AMQP_PARTNER
from amqp_peer import AmqpEnv, amqp_gateway, queue_depth
from own_broker import OwnBroker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

TOTAL = 600
#: messages confirmed when the node is halted
RESTART_AT = 150
#: the partner's pace, so that the run lasts longer than the node takes to halt (seconds)
PACE_S = 0.01


async def send_until_confirmed(env: AmqpEnv, message_id: str, body: bytes, sig: str) -> int:
    """Publish until the broker confirms; the number of tries."""
    for attempt in range(1, 200):
        try:
            async with asyncio.timeout(5):
                await env.peer.send(body, signature=sig, message_id=message_id)
            return attempt
        except (TimeoutError, ConnectionError, aiormq.exceptions.AMQPError, RuntimeError):
            await asyncio.sleep(0.25)
    raise AssertionError(f"{message_id} was never confirmed")


async def test_a_broker_restart_mid_run_loses_nothing(
    tmp_path: Path, own_broker: OwnBroker
) -> None:
    async with amqp_gateway(tmp_path / "gw", own_broker, robust=True) as env:
        messages = [env.message() for _ in range(TOTAL)]
        sent = {mid for mid, _ in messages}
        tries: list[int] = []
        restart_due = asyncio.Event()

        async def publish_all() -> None:
            for message_id, body in messages:
                tries.append(await send_until_confirmed(env, message_id, body, env.sign(body)))
                if len(tries) == RESTART_AT:
                    restart_due.set()
                await asyncio.sleep(PACE_S)

        async def restart_mid_run() -> int:
            await restart_due.wait()
            # the partner goes on publishing into the outage
            await asyncio.to_thread(own_broker.stop)
            published_when_down = len(tries)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_broker.start)
            return published_when_down

        publisher = asyncio.create_task(publish_all())
        restarter = asyncio.create_task(restart_mid_run())
        acked: Counter[str] = Counter()
        async with asyncio.timeout(180):
            while len(acked) < TOTAL:
                try:
                    out = await env.peer.next_out(timeout_s=60)
                except TimeoutError:
                    pytest.fail(f"no receipt for 60 s; {len(acked)} of {TOTAL} acknowledged")
                payload = json.loads(out.body)["payload"]
                assert payload["status"] == "ACK", payload
                acked[payload["ref_message_id"]] += 1
            await publisher
            published_when_down = await restarter
            await env.sink.wait_for(TOTAL, timeout_s=90)

        # the node went down in the middle of the run, not after it
        assert RESTART_AT <= published_when_down < TOTAL
        assert set(acked) == sent
        routed = Counter(m.message_id for m in env.sink.messages)
        assert set(routed) == sent
        print(
            f"republished={sum(tries) - TOTAL} bus duplicates={sum(routed.values()) - TOTAL}"
            f" receipt re-sends={sum(acked.values()) - TOTAL}"
        )
        for message_id in sent:
            assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is not None
        assert await queue_depth(own_broker, f"c2c.partner.{AMQP_PARTNER}.in") == 0
        assert await queue_depth(own_broker, f"c2c.partner.{AMQP_PARTNER}.in.dead") == 0
