"""What other AMQP clients put on the wire, against the real broker (PROTOCOL sections 4, 5).

- properties pamqp used not to decode (a ``message_id`` that is not UTF-8, a timestamp in
  microseconds, a header name that is not UTF-8): RabbitMQ forwards them, and one such message
  used to close the gateway's whole connection on every delivery until the broker dead-lettered
  it and the messages in flight beside it, unaudited;
- the signature as a byte array (pika with bytes, Java ``byte[]``, Go ``[]byte``);
- ``content_encoding``, refused as over HTTPS;
- a burst or backlog over the partner's rate: paced, not refused (the queue is the buffer);
- partner receipts that settle nothing: audited.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import structlog
from amqp_env import AMQP_PARTNER, GATEWAY, config_without_broker
from amqp_peer import IN_EXCHANGE, AmqpEnv, Peer, amqp_gateway, queue_depth
from pamqp import commands
from rabbit import HOST, PASSWORD, PORT, USER, RabbitVhost, rabbitmqctl
from raw_amqp import RawPublisher
from serve_proc import signed_messages

from gateway.config import AmqpConfig
from gateway.envelope import body_digest
from gateway.errors import NackCode, Unavailable
from gateway.outbound.dispatcher import Dispatcher
from gateway.receipts import ReceiptSigner
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter
from gateway.transports.amqp import AmqpBroker, partner_in_queue
from gateway.transports.amqp_partner import RETRY_AFTER_HEADER, PartnerInbox

pytestmark = pytest.mark.rabbitmq

IN_QUEUE = partner_in_queue(AMQP_PARTNER)


def gateway_connections(vhost: RabbitVhost) -> set[str]:
    """The broker's ids of the gateway's connections on ``vhost`` (a reconnect changes them)."""
    out = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
    return {
        line.split("\t", 1)[0]
        for line in out.splitlines()
        if f"\t{vhost.name}\t" in line and '{"connection_name","c2c-gateway"}' in line
    }


async def audit(env: AmqpEnv, **where: Any) -> list[dict[str, Any]]:
    rows = await env.gateway.store.audit_entries(AuditFilter(**where))
    return [json.loads(row.entry) for row in rows]


def _poison(mode: str, message_id: str) -> tuple[commands.Basic.Properties, Any]:
    """Properties and the edit of their encoded bytes that makes them what ``mode`` says."""
    placeholder = "XX" + message_id[2:]
    if mode == "message_id":
        properties = commands.Basic.Properties(message_id=placeholder)
        return properties, lambda raw: raw.replace(
            placeholder.encode(), b"\xff\xfe" + message_id[2:].encode()
        )
    if mode == "timestamp_us":
        sent = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
        properties = commands.Basic.Properties(message_id=message_id, timestamp=sent)
        seconds = struct.pack(">Q", int(sent.timestamp()))
        micros = struct.pack(">Q", int(time.time() * 1e6))
        return properties, lambda raw: raw.replace(seconds, micros)
    properties = commands.Basic.Properties(message_id=message_id, headers={"YYY": "x"})
    return properties, lambda raw: raw.replace(b"\x03YYYS", b"\x03\xe9t\xe9S")


@pytest.mark.parametrize("mode", ["message_id", "timestamp_us", "header_name"])
async def test_properties_no_library_decodes_leave_the_connection_and_the_queue_alone(
    tmp_path: Path, rabbit_vhost: RabbitVhost, mode: str
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost, delivery_limit=3) as env:
        before = gateway_connections(rabbit_vhost)
        assert before
        poison_id, poison = env.message()
        properties, patch = _poison(mode, poison_id)
        signature = env.sign(poison)
        properties.headers = {**(properties.headers or {}), "c2c-signature": signature}
        properties.content_type = "application/json"
        properties.delivery_mode = 2
        raw = await RawPublisher.open(
            host=HOST, port=PORT, vhost=rabbit_vhost.name, user=USER, password=PASSWORD
        )
        try:
            await raw.publish(IN_EXCHANGE, poison, properties, patch=patch)
        finally:
            await raw.close()
        good = [env.message() for _ in range(5)]
        for message_id, body in good:
            await env.peer.send(body, signature=env.sign(body), message_id=message_id)

        answers = {}
        for _ in range(6):
            out = await env.peer.next_out()
            receipt = orjson.loads(out.body)["payload"]
            answers[receipt["ref_message_id"]] = receipt["status"]
        assert answers == {poison_id: "ACK", **{m: "ACK" for m, _ in good}}
        # answered once each: the poison message was not redelivered
        with pytest.raises(TimeoutError):
            await env.peer.next_out(timeout_s=1.0)
        assert gateway_connections(rabbit_vhost) == before
        assert await queue_depth(rabbit_vhost, IN_QUEUE) == 0
        assert await queue_depth(rabbit_vhost, f"{IN_QUEUE}.dead") == 0
        accepted = await audit(env, event="accepted", message_id=poison_id)
        assert [entry["transport"] for entry in accepted] == ["amqp"]


async def test_signature_sent_as_a_byte_array_is_verified(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        message_id, body = env.message()
        # AMQP field type 'x', as pika sends bytes, Java byte[] and Go []byte
        signature = bytearray(env.sign(body).encode("ascii"))
        await env.peer.send(body, signature=signature, message_id=message_id)
        receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
        assert (receipt.status, receipt.code) == ("ACK", None)


async def test_a_signature_header_of_another_type_is_refused_saying_so(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        message_id, body = env.message()
        # a client library's wrong type
        await env.peer.send(body, signature=42, message_id=message_id)
        receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
        assert (receipt.status, receipt.code) == ("NACK", NackCode.SIGNATURE_INVALID)
        assert receipt.detail == (
            "header c2c-signature holds a value of type int: send the detached JWS as a long"
            " string or a byte array"
        )


async def test_a_content_encoding_is_refused_as_over_https(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        channel = await env.peer.connection.channel()
        exchange = await channel.get_exchange(IN_EXCHANGE, ensure=False)
        gzipped_id, plain = env.message()
        zipped = gzip.compress(plain)
        labelled_id, labelled = env.message()
        for message_id, body in ((gzipped_id, zipped), (labelled_id, labelled)):
            await exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=message_id,
                    content_type="application/json",
                    content_encoding="gzip",
                    headers={"c2c-signature": env.sign(body)},
                ),
                routing_key="",
            )
        for message_id, body in ((gzipped_id, zipped), (labelled_id, labelled)):
            receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
            assert (receipt.status, receipt.code) == ("NACK", NackCode.MALFORMED)
            assert receipt.detail == "Content-Encoding is not accepted"
            assert await env.gateway.store.get_inbound(AMQP_PARTNER, message_id) is None


async def test_a_burst_over_the_rate_is_paced_not_refused(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost, rate_per_second=10.0, burst=5) as env:
        sent = [env.message() for _ in range(30)]
        started = time.monotonic()
        for message_id, body in sent:
            await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        statuses = {}
        for _ in sent:
            receipt = orjson.loads((await env.peer.next_out()).body)["payload"]
            statuses[receipt["ref_message_id"]] = (receipt["status"], receipt.get("code"))
        elapsed = time.monotonic() - started
        assert statuses == {message_id: ("ACK", None) for message_id, _ in sent}
        # 5 at once, then 10 a second: the partner's rate, not the drain speed
        assert elapsed >= 2.0
        assert await audit(env, event="rejected", outcome="RATE_LIMITED") == []


async def test_traffic_from_elsewhere_holds_a_delivery_until_the_rate_allows_it(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost, rate_per_second=2.0, burst=2) as env:
        # the partner's HTTPS messages (or another replica's) took its tokens
        for _ in range(2):
            assert await env.gateway.limiters.retry_after(AMQP_PARTNER) is None
        message_id, body = env.message()
        started = time.monotonic()
        await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        out = await env.peer.next_out()
        assert env.receipt(out, message_id=message_id, body=body).status == "ACK"
        assert time.monotonic() - started >= 0.4  # it waited for the next token (2 a second)
        assert RETRY_AFTER_HEADER not in out.headers
        # it waited in the queue, unrefused: its only entry is its acceptance
        entries = await audit(env, message_id=message_id)
        assert [(e["event"], e["outcome"]) for e in entries] == [("accepted", "ACK")]
        # and its token came out of the shared bucket: none is left for the next message
        assert await env.gateway.limiters.retry_after(AMQP_PARTNER) is not None


async def test_a_limiter_that_cannot_answer_leaves_the_delivery_to_the_pipeline(
    tmp_path: Path, rabbit_vhost: RabbitVhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL the partner's bucket is in the store: a store that cannot answer while a
    # delivery waits for its turn is an outage like any other (the pipeline's own check meets
    # it and holds the delivery), not a bug that rejects it towards the dead-letter queue.
    async with amqp_gateway(tmp_path, rabbit_vhost, rate_per_second=10.0, burst=5) as env:
        limiters = env.gateway.limiters
        wait_s = limiters.wait_s
        failures = [Unavailable("postgresql: c2c_take_tokens: no answer", outage=True)]

        async def flaky(partner: str) -> float:
            if failures:
                raise failures.pop()
            return await wait_s(partner)

        monkeypatch.setattr(limiters, "wait_s", flaky)
        message_id, body = env.message()
        with structlog.testing.capture_logs() as logs:
            await env.peer.send(body, signature=env.sign(body), message_id=message_id)
            receipt = env.receipt(await env.peer.next_out(), message_id=message_id, body=body)
        assert (receipt.status, receipt.code) == ("ACK", None)
        assert failures == []
        # taken in on its first delivery: not given back to the queue as a handler's failure
        assert [e for e in logs if e["event"] == "amqp_handler_failed"] == []
        assert await audit(env, event="poison") == []


async def test_held_past_the_rate_hold_it_is_refused_with_a_retry_after(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    gateway = Gateway(config_without_broker(tmp_path, rate_per_second=0.01, burst=2))
    await gateway.start()
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url(), delivery_limit=3))
    await broker.connect()
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        await broker.declare_topology([AMQP_PARTNER])
        inbox = PartnerInbox(
            broker=broker,
            pipeline=gateway.pipeline,
            partners=gateway.config.partners.values(),
            rate_hold_s=1.5,
        )
        await inbox.start()
        peer = Peer(connection)
        await peer.open()
        messages = signed_messages(
            tmp_path / "certs",
            sender=AMQP_PARTNER,
            recipient=GATEWAY,
            count=3,
            message_type="shipment.advance_data",
        )
        answers = []
        for message_id, body, signature in messages:
            await peer.send(body, signature=signature, message_id=message_id)
            answers.append((message_id, await peer.next_out()))
        codes = [orjson.loads(out.body)["payload"].get("code") for _, out in answers]
        assert codes == [None, None, "RATE_LIMITED"]
        refused = answers[2][1]
        retry_after = refused.headers[RETRY_AFTER_HEADER]
        assert isinstance(retry_after, str)
        assert int(retry_after) >= 1
        assert await gateway.store.get_inbound(AMQP_PARTNER, answers[2][0]) is None
    finally:
        await connection.close()
        await broker.close()
        await gateway.stop()


async def test_partner_receipts_that_settle_nothing_are_audited_and_not_answered(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with amqp_gateway(tmp_path, rabbit_vhost) as env:
        gateway = env.gateway
        assert gateway.amqp is not None
        dispatcher = Dispatcher(
            store=gateway.store,
            config=gateway.config,
            transports={"amqp": gateway.amqp.outbound_transport},
            partner_keys=gateway.keyring,
            signing_keys=gateway.signing_keys,
            clock=gateway.clock,
            metrics=gateway.metrics,
        )
        gateway.set_receipt_handler(dispatcher.apply_partner_receipt)
        ours = await _queued_outbound(env)
        signer = ReceiptSigner(
            party=AMQP_PARTNER, keys=[env.keys[AMQP_PARTNER]], clock=gateway.clock
        )
        unknown, wrong_digest = (
            signer.sign(
                recipient=GATEWAY,
                ref_message_id=ref,
                ref_digest=body_digest(b"not what we sent"),
                received_at=dt.datetime.now(dt.UTC),
                status="ACK",
            )
            for ref in (str(uuid.uuid4()), ours)
        )
        for signed in (unknown, wrong_digest):
            await env.peer.send(signed.body, signature=signed.signature, message_type="receipt")
        # Neither is answered: the next message's ACK is the first thing on .out.
        message_id, body = env.message()
        await env.peer.send(body, signature=env.sign(body), message_id=message_id)
        first = await env.peer.next_out()
        assert env.receipt(first, message_id=message_id, body=body).status == "ACK"

        refused = await audit(env, event="rejected")
        by_id = {entry["message_id"]: entry for entry in refused}
        unknown_id = orjson.loads(unknown.body)["header"]["message_id"]
        wrong_id = orjson.loads(wrong_digest.body)["header"]["message_id"]
        assert by_id[unknown_id]["outcome"] == "NOT_AUTHORIZED"
        assert "no message of ours to MX-ANAM" in by_id[unknown_id]["reason"]
        assert by_id[wrong_id]["outcome"] == "MALFORMED"
        assert "ref_digest" in by_id[wrong_id]["reason"]
        assert by_id[wrong_id]["message_type"] == "receipt"
        assert by_id[wrong_id]["body_digest"] == body_digest(wrong_digest.body)
        assert by_id[wrong_id]["transport"] == "amqp"
        record = await gateway.store.get_outbound(ours)
        assert record is not None
        assert record.receipt_body is None


async def _queued_outbound(env: AmqpEnv) -> str:
    """A message of ours to MX-ANAM, submitted on ``c2c.submit``; its message id."""
    channel = await env.peer.connection.channel()
    replies = await channel.declare_queue(exclusive=True)
    submit = await channel.get_exchange("c2c.submit", ensure=False)
    example = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
    document = {"recipient": AMQP_PARTNER, "message_type": "shipment.advance_data"}
    await submit.publish(
        aio_pika.Message(
            json.dumps({**document, "payload": example}).encode(),
            app_id="cbp-targeting",
            reply_to=replies.name,
            content_type="application/json",
        ),
        routing_key="",
    )
    async with asyncio.timeout(15):
        async with replies.iterator() as answers:
            async for answer in answers:
                await answer.ack()
                message_id = json.loads(answer.body)["message_id"]
                assert isinstance(message_id, str)
                return message_id
    raise AssertionError("no answer to the submission")
