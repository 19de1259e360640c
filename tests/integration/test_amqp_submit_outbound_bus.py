"""Internal systems over RabbitMQ: ``c2c.submit`` submissions (answered on reply_to or
dead-lettered with the reason), outbound messages published to a partner's ``.out`` queue with a
confirm, and a ``c2c.inbound`` publish that nothing is bound to is an error, never a silent drop
(RELIABILITY-SECURITY T65)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from amqp_env import AMQP_PARTNER, GATEWAY, HTTPS_PARTNER
from amqp_peer import AmqpEnv, amqp_gateway, broker_beside, queue_depth
from inbound_records import sample_record
from rabbit import RabbitVhost, rabbitmqctl

from gateway.audit.events import EventKind
from gateway.config import AmqpConfig
from gateway.crypto.jws import sign_detached
from gateway.envelope import new_message_id
from gateway.errors import Unavailable
from gateway.outbound.transport import Delivery, Handed, TransportError
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter
from gateway.transports.amqp import AmqpBroker
from gateway.transports.amqp_bus import RabbitBus
from gateway.transports.amqp_submit import SubmitConsumer

pytestmark = pytest.mark.rabbitmq


async def answers(
    channel: aio_pika.abc.AbstractChannel,
) -> tuple[aio_pika.abc.AbstractQueue, asyncio.Queue[AbstractIncomingMessage]]:
    """An exclusive reply queue and what arrives on it."""
    replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    queue = await channel.declare_queue(exclusive=True)
    await queue.consume(replies.put, no_ack=True)
    return queue, replies


@dataclass
class Submitter:
    """Publishes to ``c2c.submit`` as ``cbp-targeting`` and waits for the answer on its own
    reply queue."""

    exchange: aio_pika.abc.AbstractExchange
    reply_queue: aio_pika.abc.AbstractQueue
    replies: asyncio.Queue[AbstractIncomingMessage]

    async def ask(self, body: bytes, message_id: str | None = None) -> AbstractIncomingMessage:
        await self.exchange.publish(
            aio_pika.Message(
                body,
                app_id="cbp-targeting",
                message_id=message_id,
                reply_to=self.reply_queue.name,
                content_type="application/json",
            ),
            routing_key="",
        )
        async with asyncio.timeout(15):
            return await self.replies.get()


async def submitter(env: AmqpEnv) -> Submitter:
    channel = await env.peer.connection.channel()
    reply_queue, replies = await answers(channel)
    exchange = await channel.get_exchange("c2c.submit", ensure=False)
    return Submitter(exchange, reply_queue, replies)


async def test_submissions_are_stored_or_answered_with_the_reason(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        channel = await env.peer.connection.channel()
        reply_queue, replies = await answers(channel)
        dead: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        dead_queue = await channel.get_queue("c2c.submit.dead", ensure=False)
        await dead_queue.consume(dead.put, no_ack=True)
        submit = await channel.get_exchange("c2c.submit", ensure=False)
        example = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]

        async def publish(document: dict[str, object], *, reply: bool, cid: str) -> None:
            await submit.publish(
                aio_pika.Message(
                    json.dumps(document).encode(),
                    app_id="cbp-targeting",
                    correlation_id=cid,
                    reply_to=reply_queue.name if reply else None,
                    content_type="application/json",
                ),
                routing_key="",
            )

        good = {"recipient": AMQP_PARTNER, "message_type": "shipment.advance_data"}
        await publish({**good, "payload": example}, reply=True, cid="c-good")
        async with asyncio.timeout(15):
            accepted = await replies.get()
        assert accepted.type == "submission.accepted"
        assert accepted.correlation_id == "c-good"
        answer = json.loads(accepted.body)
        assert answer["status"] == "queued"
        record = await env.gateway.store.get_outbound(answer["message_id"])
        assert record is not None
        assert record.recipient == AMQP_PARTNER
        assert record.transport == "amqp"
        assert record.submitted_by == "amqp:cbp-targeting"

        await publish({**good, "recipient": "GB-HMRC", "payload": example}, reply=True, cid="c-bad")
        async with asyncio.timeout(15):
            refused = await replies.get()
        assert refused.type == "problem"
        assert refused.correlation_id == "c-bad"
        problem = json.loads(refused.body)
        assert problem["code"] == "NOT_AUTHORIZED"
        assert problem["reason"] == "recipient GB-HMRC is not a configured partner"

        bad_body = {**good, "payload": example, "colour": "blue"}
        await publish(bad_body, reply=False, cid="c-dead")
        async with asyncio.timeout(15):
            lettered = await dead.get()
        assert json.loads(lettered.body) == bad_body
        assert lettered.correlation_id == "c-dead"
        reason = lettered.headers["c2c-reason"]
        assert isinstance(reason, str)
        assert reason.startswith("MALFORMED: unknown member(s): colour")

        await submit.publish(
            aio_pika.Message(b"{not json", app_id="cbp-targeting", reply_to=reply_queue.name),
            routing_key="",
        )
        async with asyncio.timeout(15):
            unread = await replies.get()
        assert json.loads(unread.body)["code"] == "MALFORMED"

        # every refusal is audited, those refused before the submission was read too
        rows = await env.gateway.store.audit_entries(
            AuditFilter(event=EventKind.SUBMIT_REJECTED.value), limit=10
        )
        refused_entries = [json.loads(row.entry) for row in rows]
        assert [
            (e["actor"], e["outcome"], e.get("recipient"), e.get("message_type"))
            for e in refused_entries
        ] == [
            ("amqp:cbp-targeting", "NOT_AUTHORIZED", "GB-HMRC", "shipment.advance_data"),
            ("amqp:cbp-targeting", "MALFORMED", AMQP_PARTNER, "shipment.advance_data"),
            ("amqp:cbp-targeting", "MALFORMED", None, None),
        ]
        assert refused_entries[1]["reason"].startswith("unknown member(s): colour")


async def test_a_resent_submission_with_its_message_id_makes_one_message(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    # A redelivery (the gateway stopped between storing and acking) or a publisher's resend
    # carries the same message_id: the outbox gets one row, and both answers name it.
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        submit = await submitter(env)
        example = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.advance_data",
            "payload": example,
        }

        async def publish(document: dict[str, object], message_id: str) -> dict[str, str]:
            reply = await submit.ask(json.dumps(document).encode(), message_id)
            answer: dict[str, str] = json.loads(reply.body)
            return answer

        first = await publish(document, "sub-1")
        again = await publish(document, "sub-1")
        assert again["message_id"] == first["message_id"]
        other = await publish(document, "sub-2")
        assert other["message_id"] != first["message_id"]
        assert sum((await env.gateway.store.outbox_depth()).values()) == 2

        changed = await publish({**document, "priority": "urgent"}, "sub-1")
        assert changed["code"] == "DUPLICATE_CONFLICT"
        assert first["message_id"] in changed["reason"]
        assert sum((await env.gateway.store.outbox_depth()).values()) == 2
        record = await env.gateway.store.get_outbound(first["message_id"])
        assert record is not None
        assert record.idempotency_key == "sub-1"


async def test_a_replayed_submission_is_marked_and_a_conflict_names_the_message_id(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    # As the internal API's Idempotent-Replayed: true, the answer to a resend says it is one;
    # a different submission under the same message_id is refused naming the message_id (an
    # AMQP submitter sends no Idempotency-Key header).
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        submit = await submitter(env)
        example = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.advance_data",
            "payload": example,
        }

        async def publish(document: dict[str, object]) -> AbstractIncomingMessage:
            return await submit.ask(json.dumps(document).encode(), "sub-7")

        first = await publish(document)
        assert first.type == "submission.accepted"
        assert "c2c-idempotent-replayed" not in (first.headers or {})
        again = await publish(document)
        assert again.type == "submission.accepted"
        assert again.headers["c2c-idempotent-replayed"] == "true"
        assert json.loads(again.body) == json.loads(first.body)
        assert sum((await env.gateway.store.outbox_depth()).values()) == 1

        changed = await publish({**document, "priority": "urgent"})
        assert changed.type == "problem"
        assert "c2c-idempotent-replayed" not in (changed.headers or {})
        problem = json.loads(changed.body)
        assert problem["code"] == "DUPLICATE_CONFLICT"
        assert problem["detail"] == (
            "message_id 'sub-7' was already used for a different submission"
        )
        assert json.loads(first.body)["message_id"] in problem["reason"]


async def test_a_malformed_submission_is_answered_with_what_is_wrong_with_it(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    # A submission is not an envelope: the problem's detail says what is wrong with it.
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        submit = await submitter(env)
        example = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
        good = {"recipient": AMQP_PARTNER, "message_type": "shipment.advance_data"}

        async def refusal(body: bytes, message_id: str | None = None) -> dict[str, str]:
            reply = await submit.ask(body, message_id)
            assert reply.type == "problem"
            problem: dict[str, str] = json.loads(reply.body)
            assert problem["code"] == "MALFORMED"
            assert problem["status"] == 400
            assert "envelope" not in problem["detail"]
            return problem

        not_json = await refusal(b"{recipient")
        assert not_json["detail"] == not_json["reason"]
        assert "JSON" in not_json["detail"]
        assert (await refusal(b"[1, 2]"))["detail"] == "the submission must be a JSON object"
        assert (await refusal(b"\xef\xbb\xbf{}"))["detail"] == (
            "body starts with a UTF-8 byte-order mark"
        )
        unknown = await refusal(json.dumps({**good, "payload": example, "colour": "blue"}).encode())
        assert unknown["detail"].startswith("unknown member(s): colour")
        missing = await refusal(json.dumps({"message_type": "shipment.advance_data"}).encode())
        assert missing["detail"] == "recipient is required"
        bad_id = await refusal(json.dumps({**good, "payload": example}).encode(), 'sub"1')
        assert bad_id["detail"].startswith("the idempotency key must be 1 to 255 printable ASCII")
        assert sum((await env.gateway.store.outbox_depth()).values()) == 0


@asynccontextmanager
async def _submit_in_an_outage(
    root: Path, vhost: RabbitVhost, *, delivery_limit: int, outage_pause_s: float
) -> AsyncIterator[tuple[Gateway, AmqpBroker]]:
    """A submit consumer of its own (``outage_pause_s``, ``delivery_limit``) consuming
    ``c2c.submit`` while the gateway's store is closed; the store is open again when the block
    ends."""
    async with broker_beside(root, vhost, delivery_limit=delivery_limit) as (gateway, broker):
        consumer = SubmitConsumer(
            broker=broker,
            services=gateway.submission_services(),
            outage_pause_s=outage_pause_s,
        )
        await gateway.store.close()
        await consumer.start()
        yield gateway, broker


async def test_a_long_store_outage_holds_submissions_without_dead_lettering_them(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """RabbitMQ before 4.3 counts ``basic.nack(requeue)`` towards the delivery limit. A store
    outage longer than (limit + 1) pauses used to dead-letter every queued submission to
    ``c2c.submit.dead``, unanswered and unaudited. A submission near the limit is now held
    until the store answers, then stored and answered."""
    async with _submit_in_an_outage(
        tmp_path, rabbit_vhost, delivery_limit=2, outage_pause_s=0.3
    ) as (gateway, broker):
        example = gateway.registry.examples("shipment.advance_data", "1.0")[0]
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.advance_data",
            "payload": example,
        }
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel(publisher_confirms=True)
            reply_queue, replies = await answers(channel)
            submit = await channel.get_exchange("c2c.submit", ensure=False)
            # two submitters wait for an answer, the third only publishes
            keys = {"sub-a": True, "sub-b": True, "sub-c": False}
            for key, answer_to in keys.items():
                await submit.publish(
                    aio_pika.Message(
                        json.dumps(document).encode(),
                        app_id="cbp-targeting",
                        message_id=key,
                        correlation_id=key,
                        reply_to=reply_queue.name if answer_to else None,
                        content_type="application/json",
                    ),
                    routing_key="",
                )
            # ten pauses and more: the old code had dead-lettered all three by now
            await asyncio.sleep(4)
            assert await queue_depth(rabbit_vhost, "c2c.submit.dead") == 0
            assert replies.empty()

            await gateway.store.open()
            answered: dict[str | None, AbstractIncomingMessage] = {}
            async with asyncio.timeout(15):
                while len(answered) < 2:
                    got = await replies.get()
                    answered[got.correlation_id] = got
        finally:
            await connection.close()
        assert set(answered) == {"sub-a", "sub-b"}
        for key in keys:
            record = await gateway.store.find_outbound_by_key("amqp:cbp-targeting", key)
            assert record is not None, key
            assert record.recipient == AMQP_PARTNER
            if keys[key]:
                reply = answered[key]
                assert reply.type == "submission.accepted"
                assert json.loads(reply.body) == {
                    "message_id": record.message_id,
                    "status": "queued",
                }
        assert sum((await gateway.store.outbox_depth()).values()) == 3
        # each acked once stored: none comes back when the consumer goes
        await broker.close()
        assert await queue_depth(rabbit_vhost, "c2c.submit.dead") == 0
        assert await queue_depth(rabbit_vhost, "c2c.submit") == 0


async def test_stopping_ends_a_hold_of_a_submission_that_waits_for_the_store(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A submission held until the store answers does not keep a stopping gateway waiting:
    it goes back to ``c2c.submit``, whole, for the next consumer."""
    # limit 1: even the first delivery is held until the store answers
    async with _submit_in_an_outage(
        tmp_path, rabbit_vhost, delivery_limit=1, outage_pause_s=30.0
    ) as (gateway, broker):
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.advance_data",
            "payload": gateway.registry.examples("shipment.advance_data", "1.0")[0],
        }
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel(publisher_confirms=True)
            submit = await channel.get_exchange("c2c.submit", ensure=False)
            await submit.publish(
                aio_pika.Message(
                    json.dumps(document).encode(), app_id="cbp-targeting", message_id="sub-held"
                ),
                routing_key="",
            )
        finally:
            await connection.close()
        await asyncio.sleep(1.0)  # delivered and held
        # the hold ends at its next try (within 5 s), well before stop_consuming's own 30 s
        async with asyncio.timeout(20):
            await broker.stop_consuming(timeout_s=30)
    assert await queue_depth(rabbit_vhost, "c2c.submit") == 1
    assert await queue_depth(rabbit_vhost, "c2c.submit.dead") == 0


async def test_outbound_message_goes_to_the_partners_out_queue(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        assert env.gateway.amqp is not None
        transport = env.gateway.amqp.outbound_transport
        body = b'{"header": {}, "payload": {}}'
        signature = sign_detached(body, env.gateway.signing_keys[0])
        message_id = new_message_id()
        partners = env.gateway.config.partners
        result = await transport.send(
            Delivery(
                partner=partners[AMQP_PARTNER],
                sender=GATEWAY,
                message_id=message_id,
                message_type="shipment.status",
                body=body,
                signature=signature,
            )
        )
        assert isinstance(result, Handed)
        out = await env.peer.next_out()
        assert out.body == body
        assert out.message_id == message_id
        assert out.type == "shipment.status"
        assert out.app_id == GATEWAY
        assert out.headers["c2c-signature"] == signature
        assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

        with pytest.raises(TransportError) as refused:
            await transport.send(
                Delivery(
                    partner=partners[HTTPS_PARTNER],
                    sender=GATEWAY,
                    message_id=new_message_id(),
                    message_type="shipment.status",
                    body=body,
                    signature=signature,
                )
            )
        assert refused.value.may_have_arrived is False
        assert "CA-CBSA has no AMQP transport" in refused.value.reason


async def test_inbound_publish_with_no_queue_bound_is_not_confirmed(
    rabbit_vhost: RabbitVhost,
) -> None:
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), publish_timeout_s=3.0))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        bus = RabbitBus(broker, party=GATEWAY)
        record = sample_record(sender=AMQP_PARTNER, recipient=GATEWAY)
        with pytest.raises(Unavailable, match="unroutable"):
            await bus.publish_inbound(record)

        channel = await broker.channel("test-sink")
        sink = await channel.declare_queue("test.sink", durable=True)
        await sink.bind("c2c.inbound", routing_key=f"{AMQP_PARTNER}.#")
        await bus.publish_inbound(record)
        message = await sink.get(fail=False)
        assert message is not None
        assert message.message_id == record.message_id
        assert message.routing_key == f"{AMQP_PARTNER}.shipment.status"
        assert message.headers["c2c-body-digest"] == record.body_digest
        assert "c2c-document-ref" not in message.headers  # a type without versions

        # a version of a document carries what highest-version-wins needs (T47)
        created = dt.datetime(2026, 11, 23, 7, 0, 0, 250_000, tzinfo=dt.UTC)
        amendment = dataclasses.replace(
            sample_record(1, sender=AMQP_PARTNER, recipient=GATEWAY),
            message_type="shipment.advance_data",
            document_ref="HAWB-7",
            created_at=created,
            message_function="4",
            seq=42,
        )
        await bus.publish_inbound(amendment)
        message = await sink.get(fail=False)
        assert message is not None
        assert message.headers["c2c-document-ref"] == "HAWB-7"
        assert message.headers["c2c-document-version"] == (
            "2026-11-23T07:00:00.250000Z/00000000000000000042"
        )
        assert message.headers["c2c-message-function"] == "4"
    finally:
        await broker.close()


async def test_an_unreadable_submission_in_a_store_outage_is_answered_once_the_store_is_back(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """Its refusal is audited before it is answered: held through the outage like a
    submission to store, not returned at once (which dead-lettered it within a second,
    unanswered and unaudited, after delivery_limit + 1 returns)."""
    async with _submit_in_an_outage(
        tmp_path, rabbit_vhost, delivery_limit=2, outage_pause_s=0.3
    ) as (gateway, _):
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel()
            reply_queue, replies = await answers(channel)
            submit = await channel.get_exchange("c2c.submit", ensure=False)
            await submit.publish(
                aio_pika.Message(b"{not json", app_id="cbp-targeting", reply_to=reply_queue.name),
                routing_key="",
            )
            await asyncio.sleep(3)  # ten hold periods
            assert await queue_depth(rabbit_vhost, "c2c.submit.dead") == 0
            assert replies.empty()
            await gateway.store.open()
            async with asyncio.timeout(15):
                refused = await replies.get()
            assert json.loads(refused.body)["code"] == "MALFORMED"
            rows = await gateway.store.audit_entries(
                AuditFilter(event=EventKind.SUBMIT_REJECTED.value), limit=10
            )
            assert [json.loads(row.entry)["outcome"] for row in rows] == ["MALFORMED"]
        finally:
            await connection.close()


@pytest.mark.parametrize("refused_by", ["reading", "submit_request"])
async def test_a_refusal_whose_dead_letter_cannot_be_published_is_audited_once(
    tmp_path: Path, rabbit_vhost: RabbitVhost, refused_by: str
) -> None:
    """With c2c.submit.dead gone, the dead letter is published again while the delivery is
    held, not returned to be refused and audited again on each redelivery."""
    body = (
        b"{not json"
        if refused_by == "reading"
        else json.dumps(
            {"recipient": "ZZ-NOPE", "message_type": "shipment.status", "payload": {}}
        ).encode()
    )
    async with _submit_in_an_outage(
        tmp_path, rabbit_vhost, delivery_limit=2, outage_pause_s=0.3
    ) as (gateway, broker):
        await gateway.store.open()
        rabbitmqctl("delete_queue", "-p", rabbit_vhost.name, "c2c.submit.dead")
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel()
            submit = await channel.get_exchange("c2c.submit", ensure=False)
            await submit.publish(
                aio_pika.Message(body, app_id="cbp-targeting", message_id="x1"), routing_key=""
            )
            await asyncio.sleep(3)
            rows = await gateway.store.audit_entries(
                AuditFilter(event=EventKind.SUBMIT_REJECTED.value), limit=50
            )
            assert len(rows) == 1, [json.loads(row.entry) for row in rows]
            await broker.declare_topology([AMQP_PARTNER])  # the dead-letter queue back
            dead = await channel.get_queue("c2c.submit.dead", ensure=False)
            letters: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await dead.consume(letters.put, no_ack=True)
            async with asyncio.timeout(15):
                lettered = await letters.get()
            assert lettered.body == body
            assert str(lettered.headers["c2c-reason"]).startswith(
                "MALFORMED: " if refused_by == "reading" else "NOT_AUTHORIZED: "
            )
        finally:
            await connection.close()


async def test_a_submission_is_read_up_to_the_largest_body_a_partner_takes(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """As on the internal API: MX-ANAM takes 2 MiB (manifests), so a submission to it is not
    refused at [limits]' 1 MiB before its own limit applies."""
    async with amqp_gateway(tmp_path, rabbit_vhost, partner_max_body_bytes=2 * 1024 * 1024) as env:
        config = env.gateway.config
        assert config.limits.max_body_bytes < 1_500_000 < config.largest_body_bytes
        submit = await submitter(env)
        document = {
            "recipient": AMQP_PARTNER,
            "message_type": "shipment.status",
            "payload": env.gateway.registry.examples("shipment.status", "1.0")[0],
        }
        compact = json.dumps(document).encode()
        padded = b"{" + b" " * 1_500_000 + compact[1:]  # the envelope built from it is small
        reply = await submit.ask(padded, "big-1")
        assert reply.type == "submission.accepted", reply.body
