"""RabbitMQ connection, topology and confirmed publishing: the one seam to aio-pika.

One robust connection, a channel per concern (topology, each consumer, each publisher), so a
channel error in one concern does not take the others down. Every publish waits for the
broker's confirm, is ``mandatory`` (an unroutable message is an error, never silently dropped)
and is bounded by a deadline: RobustConnection can leave a publish waiting during a reconnect,
so each attempt runs under a timeout and is retried until the deadline, then raises
``Unavailable``. Consumers get a plain ``Delivery`` and answer with a ``Settlement``; settling a
delivery whose channel died with a reconnect is skipped (its tag is meaningless on the new
channel, and the broker redelivers it anyway).

Every consumed queue is a durable quorum queue with an explicit ``x-delivery-limit`` and the
dead-letter exchange ``c2c.dlx`` (at-least-once dead-lettering to ``<queue>.dead``): nothing
relies on the broker's defaults, which differ between RabbitMQ 3.x and 4.x.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError

from gateway.config import AmqpConfig
from gateway.errors import Unavailable
from gateway.model import is_party_id

log = structlog.get_logger(__name__)

INBOUND_EXCHANGE = "c2c.inbound"
SUBMIT_EXCHANGE = "c2c.submit"
SUBMIT_QUEUE = "c2c.submit"
DEAD_LETTER_EXCHANGE = "c2c.dlx"
SIGNATURE_HEADER = "c2c-signature"
#: why the gateway dead-lettered a message itself (a bad submission without reply_to)
REASON_HEADER = "c2c-reason"
#: the name other tools find the gateway's connections by (``rabbitmqctl list_connections``)
CONNECTION_NAME = "c2c-gateway"

#: failures of one publish attempt that a reconnect can cure
_TRANSIENT = (aiormq.exceptions.AMQPError, ChannelInvalidStateError, ConnectionError, OSError)


def partner_in_queue(partner_id: str) -> str:
    """The queue (and fanout exchange) a partner publishes its messages to."""
    return f"c2c.partner.{_checked(partner_id)}.in"


def partner_out_queue(partner_id: str) -> str:
    """The queue the gateway publishes receipts and messages for a partner to."""
    return f"c2c.partner.{_checked(partner_id)}.out"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def _checked(partner_id: str) -> str:
    # A party id is never used to build a queue name unchecked (PROTOCOL section 1).
    if not is_party_id(partner_id):
        raise ValueError(f"not a party id: {partner_id!r}")
    return partner_id


def quorum_queue_arguments(queue: str, *, delivery_limit: int) -> dict[str, Any]:
    """Arguments of every consumed queue; identical on each declaration, so redeclaring works."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": queue,
        # at-least-once dead-lettering needs reject-publish overflow; without it a poison
        # message could be dropped on its way to the dead-letter queue.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


@dataclass(frozen=True, kw_only=True)
class OutgoingMessage:
    """One message to publish, with the PROTOCOL section 5 properties."""

    body: bytes
    message_id: str
    message_type: str
    #: the sender party id
    app_id: str
    content_type: str = "application/json"
    signature: str | None = None
    correlation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_aio_pika(self) -> aio_pika.Message:
        headers: dict[str, Any] = dict(self.headers)
        if self.signature is not None:
            headers[SIGNATURE_HEADER] = self.signature
        return aio_pika.Message(
            self.body,
            message_id=self.message_id,
            type=self.message_type,
            app_id=self.app_id,
            content_type=self.content_type,
            correlation_id=self.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """A consumed message, free of aio-pika types."""

    queue: str
    body: bytes
    message_id: str | None
    message_type: str | None
    app_id: str | None
    #: the broker-validated ``user_id`` property, where the publisher set it
    user_id: str | None
    content_type: str | None
    correlation_id: str | None
    reply_to: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    #: failed deliveries so far, as the quorum queue counts them (``x-delivery-count``)
    delivery_count: int

    def header_str(self, name: str) -> str | None:
        value = self.headers.get(name)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value if isinstance(value, str) else None


class Settlement(StrEnum):
    #: done: stored, or definitively answered
    ACK = "ack"
    #: the gateway cannot take it now (store down): ``basic.nack(requeue=True)``
    REQUEUE = "requeue"
    #: processing failed: ``basic.reject(requeue=True)``, counted toward the delivery limit
    REJECT = "reject"


DeliveryHandler = Callable[[Delivery], Awaitable[Settlement]]


class AmqpBroker:
    """The gateway's connection to RabbitMQ."""

    def __init__(self, config: AmqpConfig, *, connection_name: str = CONNECTION_NAME) -> None:
        if config.url is None:
            raise ValueError("AmqpBroker needs an AMQP URL")
        self._config = config
        self._url = config.url
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channels: dict[str, AbstractRobustChannel] = {}
        self._exchanges: dict[tuple[str, str], AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def config(self) -> AmqpConfig:
        return self._config

    async def connect(self, *, timeout_s: float = 10.0) -> None:
        """Open the robust connection; raises ``Unavailable`` when the broker cannot be reached."""
        if self._connection is not None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                self._connection = await aio_pika.connect_robust(
                    self._url,
                    client_properties={"connection_name": self._connection_name},
                    reconnect_interval=1.0,
                )
        except (*_TRANSIENT, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to RabbitMQ: {_describe(exc)}") from exc
        log.info("amqp_connected", connection_name=self._connection_name)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channels.clear()
        self._exchanges.clear()
        if connection is not None:
            with contextlib.suppress(*_TRANSIENT, TimeoutError):
                await connection.close()

    async def ping(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise Unavailable("RabbitMQ connection is not open")

    async def channel(self, concern: str, *, prefetch: int | None = None) -> AbstractRobustChannel:
        """The channel of one concern, opened once; publisher channels use confirms."""
        async with self._lock:
            channel = self._channels.get(concern)
            if channel is not None:
                return channel
            if self._connection is None:
                raise Unavailable("RabbitMQ connection is not open")
            try:
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                if prefetch is not None:
                    await channel.set_qos(prefetch_count=prefetch)
            except _TRANSIENT as exc:
                raise Unavailable(f"cannot open a channel: {_describe(exc)}") from exc
            # aio-pika types channel() as the plain channel; on a robust connection it is robust.
            assert isinstance(channel, aio_pika.RobustChannel)
            self._channels[concern] = channel
            return channel

    async def declare_topology(self, partner_ids: Iterable[str]) -> None:
        """Declare the exchanges and queues (idempotent; restored on every reconnect)."""
        try:
            channel = await self.channel("topology")
            dlx = await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            await channel.declare_exchange(
                INBOUND_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            submit = await channel.declare_exchange(
                SUBMIT_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            submit_queue = await self._declare_queue(channel, SUBMIT_QUEUE, dlx)
            await submit_queue.bind(submit)
            for partner_id in partner_ids:
                inbox = partner_in_queue(partner_id)
                # A partner user may write only to its own exchange (RabbitMQ checks write
                # permission on the exchange, so the shared default exchange would let it
                # reach any queue).
                inbox_exchange = await channel.declare_exchange(
                    inbox, aio_pika.ExchangeType.FANOUT, durable=True
                )
                in_queue = await self._declare_queue(channel, inbox, dlx)
                await in_queue.bind(inbox_exchange)
                await self._declare_queue(channel, partner_out_queue(partner_id), dlx)
        except _TRANSIENT as exc:
            raise Unavailable(f"cannot declare the RabbitMQ topology: {_describe(exc)}") from exc

    async def _declare_queue(
        self, channel: AbstractRobustChannel, name: str, dlx: AbstractExchange
    ) -> aio_pika.abc.AbstractQueue:
        dead = await channel.declare_queue(
            dead_letter_queue(name), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, routing_key=name)
        return await channel.declare_queue(
            name,
            durable=True,
            arguments=quorum_queue_arguments(name, delivery_limit=self._config.delivery_limit),
        )

    async def publish(
        self,
        message: OutgoingMessage,
        *,
        exchange: str = "",
        routing_key: str,
        concern: str = "publish",
    ) -> None:
        """Publish and wait for the broker's confirm; raises ``Unavailable`` past the deadline.

        A publish whose confirm was lost is sent again: receivers deduplicate by message_id.
        """
        loop = asyncio.get_running_loop()
        timeout_s = self._config.publish_timeout_s
        deadline = loop.time() + timeout_s
        attempt = 0
        last = "no attempt"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"publish of {message.message_id} to {exchange or '(default)'}/{routing_key} "
                    f"not confirmed within {timeout_s}s: {last}"
                )
            try:
                async with asyncio.timeout(remaining):
                    target = await self._exchange(concern, exchange)
                    await target.publish(
                        message.to_aio_pika(), routing_key, mandatory=True, timeout=remaining
                    )
                return
            except aiormq.exceptions.PublishError as exc:
                # Returned as unroutable: no queue is bound. Retrying cannot help until an
                # operator (or a consumer) binds one; the caller keeps the record pending.
                raise Unavailable(
                    f"RabbitMQ returned {message.message_id} as unroutable "
                    f"({exchange or '(default)'}/{routing_key}): no queue bound"
                ) from exc
            except (*_TRANSIENT, TimeoutError) as exc:
                last = _describe(exc)
            attempt += 1
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0, max(deadline - loop.time(), 0)))

    async def _exchange(self, concern: str, name: str) -> AbstractExchange:
        key = (concern, name)
        cached = self._exchanges.get(key)
        if cached is not None:
            return cached
        channel = await self.channel(concern)
        exchange = (
            channel.default_exchange
            if name == ""
            else await channel.get_exchange(name, ensure=False)
        )
        self._exchanges[key] = exchange
        return exchange

    async def consume(
        self, queue: str, handler: DeliveryHandler, *, concern: str, prefetch: int | None = None
    ) -> None:
        """Consume ``queue`` (declared with the standard arguments) until the broker closes.

        The consumer is restored with the channel after a reconnect.
        """
        try:
            channel = await self.channel(
                concern, prefetch=prefetch if prefetch is not None else self._config.prefetch
            )
            declared = await channel.declare_queue(
                queue,
                durable=True,
                arguments=quorum_queue_arguments(queue, delivery_limit=self._config.delivery_limit),
            )

            async def on_message(message: AbstractIncomingMessage) -> None:
                await self._handle(queue, message, handler)

            tag = await declared.consume(on_message, no_ack=False)
        except _TRANSIENT as exc:
            raise Unavailable(f"cannot consume {queue}: {_describe(exc)}") from exc
        self._consumers.append((declared, tag))

    async def stop_consuming(self, *, timeout_s: float = 10.0) -> None:
        """Cancel every consumer, then wait (bounded) for the deliveries being handled.

        Whatever is still unacked when the connection closes goes back to its queue.
        """
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            with contextlib.suppress(*_TRANSIENT, TimeoutError):
                await queue.cancel(tag, timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _handle(
        self, queue: str, message: AbstractIncomingMessage, handler: DeliveryHandler
    ) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._settle(queue, message, handler)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _settle(
        self, queue: str, message: AbstractIncomingMessage, handler: DeliveryHandler
    ) -> None:
        delivery = _delivery(queue, message)
        try:
            settlement = await handler(delivery)
        except Exception as exc:
            # A handler bug: give the message back, counted, so a poison message ends in the
            # dead-letter queue instead of looping.
            log.error(
                "amqp_handler_failed",
                queue=queue,
                message_id=delivery.message_id,
                error=type(exc).__name__,
            )
            settlement = Settlement.REJECT
        try:
            if settlement is Settlement.ACK:
                await message.ack()
            elif settlement is Settlement.REQUEUE:
                await message.nack(requeue=True)
            else:
                await message.reject(requeue=True)
        except _TRANSIENT as exc:
            # The channel this delivery came on is gone (reconnect): its tag cannot be settled
            # on the new channel, and the broker has already returned the message to the queue.
            log.warning(
                "amqp_settle_skipped",
                queue=queue,
                message_id=delivery.message_id,
                settlement=settlement.value,
                error=_describe(exc),
            )


def _delivery(queue: str, message: AbstractIncomingMessage) -> Delivery:
    headers: Mapping[str, Any] = message.headers or {}
    count = headers.get("x-delivery-count")
    return Delivery(
        queue=queue,
        body=message.body,
        message_id=message.message_id,
        message_type=message.type,
        app_id=message.app_id,
        user_id=message.user_id,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        headers=headers,
        redelivered=bool(message.redelivered),
        delivery_count=count if isinstance(count, int) and not isinstance(count, bool) else 0,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
