"""A consumed queue deleted on the broker while the gateway runs (an operator's
``rabbitmqctl delete_queue``, a policy): the broker cancels the consumer, aio-pika declares
the queue again and consumes it, and the binding from the exchange its publishers write to
comes back with it. Before, the queue came back unbound: consumed, reported ready, and every
message published to the exchange was dropped (a fanout exchange with no queue takes a
message and routes it nowhere)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from amqp_env import AMQP_PARTNER
from amqp_peer import amqp_gateway
from rabbit import RabbitVhost, rabbitmqctl
from test_amqp_submit_outbound_bus import submitter

pytestmark = pytest.mark.rabbitmq


async def _consumed_again(vhost: RabbitVhost, queue: str) -> None:
    """Wait until ``queue`` exists again with one consumer (the gateway's)."""
    async with asyncio.timeout(30):
        while True:
            listed = await asyncio.to_thread(
                rabbitmqctl, "list_queues", "-p", vhost.name, "name", "consumers"
            )
            if f"{queue}\t1" in listed.splitlines():
                return
            await asyncio.sleep(0.2)


async def _delete(vhost: RabbitVhost, queue: str) -> None:
    await asyncio.to_thread(rabbitmqctl, "delete_queue", "-p", vhost.name, queue)


async def test_a_deleted_partner_inbox_is_bound_again_and_takes_messages(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    inbox = f"c2c.partner.{AMQP_PARTNER}.in"
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        await _delete(rabbit_vhost, inbox)
        await _consumed_again(rabbit_vhost, inbox)
        message_id, body = env.message()
        await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        out = await env.peer.next_out(timeout_s=15)
        payload = json.loads(out.body)["payload"]
        assert (payload["status"], payload["ref_message_id"]) == ("ACK", message_id)
        assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is not None


async def test_a_deleted_submit_queue_is_bound_again_and_takes_submissions(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        submit = await submitter(env)
        await _delete(rabbit_vhost, "c2c.submit")
        await _consumed_again(rabbit_vhost, "c2c.submit")
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.advance_data",
            "payload": env.gateway.registry.examples("shipment.advance_data", "1.0")[0],
        }
        reply = await submit.ask(json.dumps(document).encode(), "after-delete-1")
        answer = json.loads(reply.body)
        assert "code" not in answer, answer
        assert await env.gateway.store.get_outbound(answer["message_id"]) is not None
