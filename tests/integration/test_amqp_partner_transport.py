"""Partner-facing AMQP against the real broker (PROTOCOL sections 4, 5, 7).

A foreign peer written with plain aio-pika publishes signed messages to ``.in`` and gets
signed receipts on ``.out``; accepted messages reach a ``c2c.inbound`` consumer with their
message_id; every NACK case of the HTTPS tests holds over AMQP with the same code, and the
refused delivery is acked once (never requeued: RELIABILITY-SECURITY T52).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from amqp_env import AMQP_PARTNER, GATEWAY, HTTPS_PARTNER, config_without_broker
from amqp_peer import (
    IN_EXCHANGE,
    OUT_QUEUE,
    AmqpEnv,
    amqp_gateway,
    broker_beside,
    preload,
    queue_depth,
)
from rabbit import HOST, PORT, RabbitVhost, rabbitmqctl
from serve_proc import signed_messages

from gateway.cli.amqp import partner_permissions
from gateway.config import AmqpConfig
from gateway.envelope import body_digest, new_message_id
from gateway.errors import NackCode
from gateway.inbound.context import ReceivedReceipt
from gateway.receipts import ReceiptSigner
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter
from gateway.transports.amqp import AmqpBroker
from gateway.transports.amqp_partner import PartnerInbox

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def partner_user(rabbit_vhost: RabbitVhost) -> Iterator[tuple[str, str]]:
    """A real least-privilege broker user for MX-ANAM on the test vhost."""
    user, password = f"mx-anam-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    rabbitmqctl("add_user", user, stdin=password + "\n")
    perms = partner_permissions(AMQP_PARTNER)
    rabbitmqctl(
        "set_permissions", "-p", rabbit_vhost.name, user, perms.configure, perms.write, perms.read
    )
    try:
        yield user, password
    finally:
        with contextlib.suppress(RuntimeError):
            rabbitmqctl("delete_user", user)


async def rejections(env: AmqpEnv, code: NackCode) -> list[dict[str, Any]]:
    rows = await env.gateway.store.audit_entries(AuditFilter(event="rejected", outcome=code.value))
    return [json.loads(row.entry) for row in rows]


async def test_foreign_peer_gets_signed_ack_and_message_reaches_cbp_consumer(
    tmp_path: Path, rabbit_vhost: RabbitVhost, partner_user: tuple[str, str]
) -> None:
    user, password = partner_user
    async with amqp_gateway(tmp_path, rabbit_vhost, amqp_user=user) as env:
        partner = await aio_pika.connect(
            f"amqp://{user}:{password}@{HOST}:{PORT}/{rabbit_vhost.name}"
        )
        try:
            channel = await partner.channel()
            exchange = await channel.get_exchange(IN_EXCHANGE, ensure=False)
            message_id, body = env.message()
            signature = env.sign(body)
            for _ in range(2):  # the second is an exact re-send
                await exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=message_id,
                        type="shipment.advance_data",
                        app_id=AMQP_PARTNER,
                        user_id=user,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers={"c2c-signature": signature},
                    ),
                    routing_key="",
                )
        finally:
            await partner.close()
        # The fixture's peer consumes MX-ANAM's .out queue.
        receipts = [await env.peer.next_out(), await env.peer.next_out()]
        first = env.receipt(receipts[0], message_id=message_id, body=body)
        assert first.status == "ACK"
        assert first.envelope.header.recipient == AMQP_PARTNER
        assert first.envelope.header.in_reply_to == message_id
        # The re-send is answered with the original receipt, byte for byte.
        assert receipts[1].body == receipts[0].body
        assert receipts[1].headers["c2c-signature"] == receipts[0].headers["c2c-signature"]

        stored = await env.gateway.store.get_inbound(AMQP_PARTNER, message_id)
        assert stored is not None
        assert stored.body == body
        assert stored.transport == "amqp"
        assert stored.receipt_body == receipts[0].body

        await env.sink.wait_for(1)
        routed = env.sink.messages[0]
        assert routed.routing_key == f"{AMQP_PARTNER}.shipment.advance_data"
        assert routed.message_id == message_id
        assert routed.app_id == AMQP_PARTNER
        assert routed.type == "shipment.advance_data"
        assert routed.body == body
        assert routed.headers["c2c-signature"] == signature
        assert routed.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        # The relay marks the row after the confirm, which may come after the sink's delivery;
        # the store offers no event for it, so poll (bounded).
        for _ in range(200):
            if not await env.gateway.store.pending_relay(10):
                break
            await asyncio.sleep(0.05)
        assert await env.gateway.store.pending_relay(10) == []
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in") == 0


async def test_every_nack_case_holds_over_amqp(tmp_path: Path, rabbit_vhost: RabbitVhost) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        accepted_id, accepted = env.message()
        await env.peer.send(accepted, signature=env.sign(accepted), message_id=accepted_id)
        assert (
            env.receipt(await env.peer.next_out(), message_id=accepted_id, body=accepted).status
            == "ACK"
        )

        tampered_id, original = env.message()
        tampered = original.replace(b'"US-CBP"', b'"US-CBP" ', 1)
        schema_payload = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
        schema_payload.pop(next(iter(schema_payload)))
        extra_id, extra_source = env.message()
        extra = json.dumps({**json.loads(extra_source), "extra": 1}).encode()
        _, conflict = env.message(message_id=accepted_id)
        assert conflict != accepted

        cases: list[tuple[str, NackCode, str, bytes, str | None, dict[str, Any], str]] = []

        def case(
            name: str,
            code: NackCode,
            message: tuple[str, bytes],
            *,
            signature: str | bool | None = True,
            reason: str,
            **send: Any,
        ) -> None:
            message_id, body = message
            sig = env.sign(body) if signature is True else signature or None
            cases.append((name, code, message_id, body, sig, send, reason))

        case(
            "tampered body",
            NackCode.SIGNATURE_INVALID,
            (tampered_id, tampered),
            signature=env.sign(original),
            reason="signature",
        )
        case(
            "no signature",
            NackCode.SIGNATURE_INVALID,
            env.message(),
            signature=False,
            reason="no detached JWS",
        )
        other = env.message()
        case(
            "another party's key",
            NackCode.UNKNOWN_KEY,
            other,
            signature=env.sign(other[1], HTTPS_PARTNER),
            reason=env.keys[HTTPS_PARTNER].kid,
        )
        case(
            "header.sender is another partner",
            NackCode.SENDER_MISMATCH,
            env.message(sender=HTTPS_PARTNER),
            reason="header.sender CA-CBSA differs",
        )
        case(
            "user_id is not the broker user",
            NackCode.SENDER_MISMATCH,
            env.message(),
            user_id="guest",
            reason="AMQP user_id 'guest' is not MX-ANAM's broker user",
        )
        case(
            "wrong recipient",
            NackCode.SENDER_MISMATCH,
            env.message(recipient="GB-HMRC"),
            reason="recipient GB-HMRC is not this gateway",
        )
        case(
            "type not allowed",
            NackCode.NOT_AUTHORIZED,
            env.message(message_type="enforcement.seizure_report"),
            reason="may not send enforcement.seizure_report",
        )
        case("schema", NackCode.SCHEMA_INVALID, env.message(payload=schema_payload), reason="")
        case(
            "unknown version",
            NackCode.UNSUPPORTED_TYPE,
            env.message(schema_version="9.9"),
            reason="9.9",
        )
        case(
            "unknown member", NackCode.MALFORMED, (extra_id, extra), reason="unknown member 'extra'"
        )
        case(
            "content type",
            NackCode.MALFORMED,
            env.message(),
            content_type="text/plain",
            reason="Content-Type 'text/plain'",
        )
        case(
            "stale",
            NackCode.STALE,
            env.message(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)),
            reason="beyond the replay window",
        )
        case(
            "same id, other bytes",
            NackCode.DUPLICATE_CONFLICT,
            (accepted_id, conflict),
            reason="with digest",
        )

        for name, code, message_id, body, signature, send, reason in cases:
            await env.peer.send(body, signature=signature, message_id=message_id, **send)
            out = await env.peer.next_out()
            receipt = env.receipt(out, message_id=message_id, body=body)
            assert (receipt.status, receipt.code) == ("NACK", code), name
            entries = [
                e for e in await rejections(env, code) if e.get("body_digest") == body_digest(body)
            ]
            assert len(entries) == 1, (name, entries)
            assert reason in entries[0]["reason"], (name, entries[0]["reason"])
            assert entries[0]["transport"] == "amqp"
            if code is not NackCode.DUPLICATE_CONFLICT:
                assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is None, name

        unreadable = (
            ("not JSON", b'{"header": {"message_id": 1,', NackCode.MALFORMED),
            ("over the size limit", b"x" * (1_048_576 + 1), NackCode.TOO_LARGE),
        )
        # A body that names no message id, or may not be read, still gets a signed NACK
        # receipt: it refers to the id the delivery's message_id property carries (PROTOCOL
        # section 5 sets it to header.message_id), with the digest of the bytes received.
        for name, body, code in unreadable:
            property_id = new_message_id()
            await env.peer.send(body, signature=env.sign(body), message_id=property_id)
            out = await env.peer.next_out()
            receipt = env.receipt(out, message_id=property_id, body=body)
            assert (receipt.status, receipt.code) == ("NACK", code), name
            entries = [e for e in await rejections(env, code) if e.get("message_id") == property_id]
            assert len(entries) == 1, (name, entries)
            assert entries[0]["body_digest"] == body_digest(body)

        # Only when the property is no message id either is the answer the (unsigned)
        # problem document, as over HTTPS.
        for name, body, code in unreadable:
            await env.peer.send(body, signature=env.sign(body), message_id="not-an-id")
            out = await env.peer.next_out()
            assert out.type == "problem", name
            assert out.content_type == "application/problem+json"
            assert out.app_id == GATEWAY
            assert out.correlation_id == "not-an-id"
            assert json.loads(out.body)["code"] == code.value, name
            assert len(await rejections(env, code)) >= 1

        # Every refusal was settled once: nothing requeued, nothing dead-lettered, one answer
        # per message.
        queue = f"c2c.partner.{AMQP_PARTNER}.in"
        assert await queue_depth(rabbit_vhost, queue) == 0
        assert await queue_depth(rabbit_vhost, f"{queue}.dead") == 0
        assert env.peer.out.empty()
        await env.sink.wait_for(1)
        assert {m.message_id for m in env.sink.messages} == {accepted_id}


async def test_store_outage_holds_the_delivery_and_acks_after_recovery(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        message_id, body = env.message()
        await env.gateway.store.close()
        try:
            await env.peer.send(body, signature=env.sign(body), message_id=message_id)
            # No answer while the store is down: neither an ACK nor a NACK is published.
            with pytest.raises(TimeoutError):
                await env.peer.next_out(timeout_s=1.5)
        finally:
            await env.gateway.store.open()
        receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
        assert receipt.status == "ACK"
        assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is not None
        await env.sink.wait_for(1)
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in.dead") == 0


async def test_partner_receipt_goes_to_the_receipt_hook_and_is_not_answered(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        handed: asyncio.Queue[ReceivedReceipt] = asyncio.Queue()

        async def on_receipt(receipt: ReceivedReceipt) -> None:
            await handed.put(receipt)

        env.gateway.set_receipt_handler(on_receipt)
        partner_signer = ReceiptSigner(
            party=AMQP_PARTNER, keys=[env.keys[AMQP_PARTNER]], clock=env.gateway.clock
        )
        ours = str(uuid.uuid4())
        signed = partner_signer.sign(
            recipient=GATEWAY,
            ref_message_id=ours,
            ref_digest=body_digest(b"our message"),
            received_at=dt.datetime.now(dt.UTC),
            status="ACK",
        )
        await env.peer.send(signed.body, signature=signed.signature, message_type="receipt")
        async with asyncio.timeout(15):
            got = await handed.get()
        assert got.envelope.header.in_reply_to == ours
        assert got.transport == "amqp"
        assert got.peer == AMQP_PARTNER

        # The next message's ACK is the first thing on .out: the receipt was not answered.
        message_id, body = env.message()
        await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        first = await env.peer.next_out()
        assert env.receipt(first, message_id=message_id, body=body).status == "ACK"


@asynccontextmanager
async def _inbox_in_an_outage(
    root: Path, vhost: RabbitVhost, *, count: int, delivery_limit: int, outage_hold_s: float
) -> AsyncIterator[tuple[Gateway, AmqpBroker, list[tuple[str, bytes, str]]]]:
    """A partner inbox of its own (``outage_hold_s``, ``delivery_limit``) consuming while the
    gateway's store is closed, with ``count`` signed messages waiting in ``.in``; the store is
    open again when the block ends."""
    async with broker_beside(root, vhost, delivery_limit=delivery_limit) as (gateway, broker):
        inbox = PartnerInbox(
            broker=broker,
            pipeline=gateway.pipeline,
            partners=gateway.config.partners.values(),
            outage_hold_s=outage_hold_s,
        )
        messages = signed_messages(
            root / "certs",
            sender=AMQP_PARTNER,
            recipient=GATEWAY,
            count=count,
            message_type="shipment.advance_data",
        )
        await gateway.store.close()
        await inbox.start()
        await preload(vhost, messages, message_type="shipment.advance_data")
        yield gateway, broker, messages


async def _expect_acks(vhost: RabbitVhost, message_ids: list[str]) -> None:
    """Each of ``message_ids`` is answered with an ACK receipt on the partner's .out queue
    within 15 s."""
    connection = await aio_pika.connect(vhost.url())
    try:
        channel = await connection.channel()
        out = await channel.get_queue(OUT_QUEUE, ensure=False)
        answered: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while len(answered) < len(message_ids):
                got = await out.get(fail=False, no_ack=True)
                if got is None:
                    await asyncio.sleep(0.05)
                    continue
                answered.append(json.loads(got.body)["payload"])
    finally:
        await connection.close()
    assert sorted((a["status"], a["ref_message_id"]) for a in answered) == sorted(
        ("ACK", message_id) for message_id in message_ids
    )


async def test_a_long_store_outage_holds_deliveries_without_dead_lettering_them(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """RabbitMQ before 4.3 counts ``basic.nack(requeue)`` towards the delivery limit. An
    outage longer than (limit + 1) hold periods used to dead-letter every held delivery, with
    no audit entry. A delivery near the limit is now held until the store answers."""
    dead = f"c2c.partner.{AMQP_PARTNER}.in.dead"
    async with _inbox_in_an_outage(
        tmp_path, rabbit_vhost, count=3, delivery_limit=2, outage_hold_s=0.3
    ) as (gateway, _, messages):
        # ten hold periods and more: the old code had dead-lettered all three by now
        await asyncio.sleep(4)
        assert await queue_depth(rabbit_vhost, dead) == 0
        assert await queue_depth(rabbit_vhost, OUT_QUEUE) == 0

        await gateway.store.open()
        await _expect_acks(rabbit_vhost, [message_id for message_id, _, _ in messages])
        for message_id, body, _ in messages:
            stored = await gateway.store.get_inbound(AMQP_PARTNER, message_id)
            assert stored is not None
            assert stored.body == body
        assert await queue_depth(rabbit_vhost, dead) == 0
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in") == 0
        assert await gateway.store.audit_entries(AuditFilter(event="poison")) == []


async def test_stopping_ends_a_hold_that_waits_for_the_store(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A delivery held until the store answers does not keep a stopping gateway waiting: it
    goes back to the queue, whole, for the next consumer."""
    # limit 1: even the first delivery is held until the store answers
    async with _inbox_in_an_outage(
        tmp_path, rabbit_vhost, count=1, delivery_limit=1, outage_hold_s=30.0
    ) as (_, broker, _):
        await asyncio.sleep(1.0)  # delivered and held
        # the consumer is cancelled and the hold ends at its next try (within 5 s), well
        # before stop_consuming's own 30 s bound runs out
        async with asyncio.timeout(20):
            await broker.stop_consuming(timeout_s=30)
    assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in") == 1
    assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in.dead") == 0


async def test_a_receipt_the_broker_will_not_take_holds_the_delivery_without_dead_lettering_it(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A receipt that cannot be published puts its delivery back, and RabbitMQ before 4.3
    counts each return: with the partner's ``.out`` queue gone (an operator deleted it), every
    accepted message used to reach ``.in.dead`` within milliseconds, unaudited and unanswered.
    A delivery near the limit is now held and its receipt published again until the broker
    takes it."""
    dead = f"c2c.partner.{AMQP_PARTNER}.in.dead"
    gateway = Gateway(config_without_broker(tmp_path))
    await gateway.start()
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), delivery_limit=2))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        inbox = PartnerInbox(
            broker=broker, pipeline=gateway.pipeline, partners=gateway.config.partners.values()
        )
        messages = signed_messages(
            tmp_path / "certs",
            sender=AMQP_PARTNER,
            recipient=GATEWAY,
            count=2,
            message_type="shipment.advance_data",
        )
        connection = await aio_pika.connect(rabbit_vhost.url())
        try:
            channel = await connection.channel()
            await channel.queue_delete(OUT_QUEUE)
        finally:
            await connection.close()
        await inbox.start()
        await preload(rabbit_vhost, messages, message_type="shipment.advance_data")
        await asyncio.sleep(3)
        assert await queue_depth(rabbit_vhost, dead) == 0
        for message_id, body, _ in messages:
            stored = await gateway.store.get_inbound(AMQP_PARTNER, message_id)
            assert stored is not None
            assert stored.body == body

        await broker.declare_topology([AMQP_PARTNER])  # as `amqp setup` puts it back
        await _expect_acks(rabbit_vhost, [message_id for message_id, _, _ in messages])
        # each acked once its receipt was confirmed: none comes back when the consumer goes
        await broker.close()
        assert await queue_depth(rabbit_vhost, f"c2c.partner.{AMQP_PARTNER}.in") == 0
        assert await queue_depth(rabbit_vhost, dead) == 0
    finally:
        await broker.close()
        await gateway.stop()
