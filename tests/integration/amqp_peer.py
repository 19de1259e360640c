"""A foreign partner's side of PROTOCOL section 5, written with plain aio-pika, plus a
``c2c.inbound`` consumer standing in for a CBP system."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from amqp_env import AMQP_PARTNER, GATEWAY, config_without_broker, write_config
from own_broker import OwnBroker
from rabbit import RabbitVhost

from gateway.config import AmqpConfig, load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import KeyRing, SigningKey, load_signing_key
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.model import Header
from gateway.receipts import Receipt, verify_receipt
from gateway.runtime import Gateway
from gateway.transports.amqp import AmqpBroker

IN_EXCHANGE = f"c2c.partner.{AMQP_PARTNER}.in"
OUT_QUEUE = f"c2c.partner.{AMQP_PARTNER}.out"
SINK_QUEUE = "test.cbp-system"


class Peer:
    """Publishes signed messages to ``.in`` and collects what the gateway puts on ``.out``."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        self.out: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        self._channel = await self.connection.channel()
        # declared (passively), so a robust channel consumes it again after a reconnect
        queue = await self._channel.declare_queue(OUT_QUEUE, passive=True)
        await queue.consume(self._on_out)

    async def _on_out(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        await self.out.put(message)

    async def send(
        self,
        body: bytes,
        *,
        # the c2c-signature header: a string, or what another client library puts there
        signature: str | bytes | bytearray | int | None,
        message_id: str | None = None,
        message_type: str | None = "shipment.advance_data",
        user_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        assert self._channel is not None
        exchange = await self._channel.get_exchange(IN_EXCHANGE, ensure=False)
        headers = {"c2c-signature": signature} if signature is not None else {}
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                type=message_type,
                app_id=AMQP_PARTNER,
                user_id=user_id,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
            ),
            routing_key="",
        )

    async def next_out(self, timeout_s: float = 15.0) -> AbstractIncomingMessage:
        async with asyncio.timeout(timeout_s):
            return await self.out.get()


class Sink:
    """A CBP system consuming ``c2c.inbound``."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self.arrived = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self.arrived.set()
        await message.ack()

    async def wait_for(self, count: int, timeout_s: float = 15.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len({m.message_id for m in self.messages}) < count:
                self.arrived.clear()
                await self.arrived.wait()


@dataclass
class AmqpEnv:
    root: Path
    vhost: RabbitVhost | OwnBroker
    gateway: Gateway
    peer: Peer
    sink: Sink
    keys: dict[str, SigningKey]
    our_keys: KeyRing

    def message(
        self,
        *,
        sender: str = AMQP_PARTNER,
        recipient: str = GATEWAY,
        message_type: str = "shipment.advance_data",
        schema_version: str = "1.0",
        payload: dict[str, Any] | None = None,
        message_id: str | None = None,
        created_at: dt.datetime | None = None,
    ) -> tuple[str, bytes]:
        registry = self.gateway.registry
        if payload is None:
            payload = registry.examples(message_type, "1.0")[0]
        message_id = message_id or new_message_id()
        created_at = created_at or dt.datetime.now(dt.UTC)
        header = Header(
            message_id=message_id,
            message_type=message_type,
            schema_version=schema_version,
            sender=sender,
            recipient=recipient,
            created_at=created_at,
            expires_at=created_at + dt.timedelta(days=7),
            in_reply_to=new_message_id()
            if registry.requires_in_reply_to(message_type, "1.0")
            else None,
        )
        return message_id, encode_envelope(header, payload)

    def sign(self, body: bytes, party: str = AMQP_PARTNER) -> str:
        return sign_detached(body, self.keys[party])

    def receipt(self, out: AbstractIncomingMessage, *, message_id: str, body: bytes) -> Receipt:
        """Check the PROTOCOL section 5 properties and the signature of a receipt on ``.out``."""
        signature = out.headers["c2c-signature"]
        assert isinstance(signature, str)
        receipt = verify_receipt(
            out.body, signature, self.our_keys, GATEWAY, message_id, body_digest(body)
        )
        header = receipt.envelope.header
        assert out.type == "receipt"
        assert out.app_id == GATEWAY
        assert out.message_id == header.message_id
        assert out.content_type == "application/json"
        assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        return receipt


async def bind_sink(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """The CBP side's durable queue on ``c2c.inbound`` (every routing key), bound before the
    gateway routes anything; read by the test at the end."""
    inbound = await channel.declare_exchange(
        "c2c.inbound", aio_pika.ExchangeType.TOPIC, durable=True
    )
    sink = await channel.declare_queue(SINK_QUEUE, durable=True)
    await sink.bind(inbound, routing_key="#")
    return sink


async def preload(
    vhost: RabbitVhost | OwnBroker,
    messages: list[tuple[str, bytes, str]],
    *,
    message_type: str,
) -> None:
    """Publish signed ``(message_id, body, signature)`` messages to the partner's ``.in``
    exchange with confirms, before any gateway consumes them (a backlog)."""
    connection = await aio_pika.connect(vhost.url())
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(IN_EXCHANGE, ensure=False)
        for start in range(0, len(messages), 100):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=message_id,
                            type=message_type,
                            app_id=AMQP_PARTNER,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            headers={"c2c-signature": signature},
                        ),
                        routing_key="",
                    )
                    for message_id, body, signature in messages[start : start + 100]
                )
            )
    finally:
        await connection.close()


async def queue_depth(vhost: RabbitVhost | OwnBroker, queue: str) -> int:
    connection = await aio_pika.connect(vhost.url())
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert isinstance(count, int)
        return count
    finally:
        await connection.close()


@asynccontextmanager
async def amqp_gateway(
    root: Path, vhost: RabbitVhost | OwnBroker, *, robust: bool = False, **config: Any
) -> AsyncIterator[AmqpEnv]:
    """The gateway on ``vhost`` with a peer (guest, publishing for MX-ANAM) and a sink; with
    ``robust``, the peer's and the sink's connection reconnects like the gateway's."""
    path = write_config(root, amqp_url=vhost.url(), **config)
    gateway = Gateway(load_config(path))
    connect = aio_pika.connect_robust if robust else aio_pika.connect
    connection = await connect(vhost.url())
    try:
        # The CBP system binds its queue first: an unbound c2c.inbound confirms nothing.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        inbound = await channel.declare_exchange(
            "c2c.inbound", aio_pika.ExchangeType.TOPIC, durable=True
        )
        sink_queue = await channel.declare_queue(SINK_QUEUE, durable=True)
        await sink_queue.bind(inbound, routing_key="#")
        sink = Sink()
        await sink_queue.consume(sink.on_message)
        await gateway.start()
        peer = Peer(connection)
        await peer.open()
        keys = {
            pid: load_signing_key(root / "certs" / pid / "sign.key", party=pid, alg="EdDSA")
            for pid in ("MX-ANAM", "CA-CBSA")
        }
        our_keys = KeyRing(key.verification_key() for key in gateway.signing_keys)
        try:
            yield AmqpEnv(root, vhost, gateway, peer, sink, keys, our_keys)
        finally:
            await gateway.stop()
    finally:
        await connection.close()


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[AbstractIncomingMessage]:
    """Every message waiting on ``queue``, taken off it."""
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


async def ack_receipts(channel: aio_pika.abc.AbstractChannel) -> dict[str, set[tuple[bytes, str]]]:
    """The receipts waiting on the partner's ``.out`` queue, taken off it, per message they
    answer: each one's bytes and signature. Every one must be an ACK."""
    receipts: dict[str, set[tuple[bytes, str]]] = {}
    for message in await drain(await channel.declare_queue(OUT_QUEUE, passive=True)):
        receipt = orjson.loads(message.body)["payload"]
        assert receipt["status"] == "ACK", receipt
        signature = message.headers["c2c-signature"]
        assert isinstance(signature, str)
        receipts.setdefault(receipt["ref_message_id"], set()).add((message.body, signature))
    return receipts


@asynccontextmanager
async def broker_beside(
    root: Path, vhost: RabbitVhost, *, delivery_limit: int
) -> AsyncIterator[tuple[Gateway, AmqpBroker]]:
    """A started gateway without a broker of its own, and a broker (``delivery_limit``) on
    ``vhost`` with the topology declared, for a consumer under test to run on; when the block
    ends the broker is closed and the gateway's store opened again (a test may close it to
    make an outage) before the gateway stops."""
    gateway = Gateway(config_without_broker(root))
    await gateway.start()
    broker = AmqpBroker(AmqpConfig(url=vhost.url(), delivery_limit=delivery_limit))
    await broker.connect()
    try:
        await broker.declare_topology([AMQP_PARTNER])
        yield gateway, broker
    finally:
        await broker.close()
        await gateway.store.open()
        await gateway.stop()
