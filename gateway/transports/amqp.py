"""RabbitMQ connection, topology and confirmed publishing: the one seam to aio-pika.

One robust connection, a channel per concern (topology, each consumer, each publisher), so a
channel error in one concern does not take the others down. Every publish waits for the
broker's confirm, is ``mandatory`` (an unroutable message is an error, never silently dropped)
and is bounded by a deadline: RobustConnection can leave a publish waiting during a reconnect,
so each attempt runs under a timeout and is retried until the deadline, then raises
``Unavailable``. A refusal raises ``Refused`` at once: a message returned as unroutable, or
nacked when published through an exchange (a bound queue full with ``reject-publish``), where a
re-publish would copy it again into every other queue bound to its key. Consumers get a plain
``Delivery`` and answer with a ``Settlement``; settling a delivery whose channel died with a
reconnect is skipped (its tag is meaningless on the new channel, and the broker redelivers it
anyway). The acks of deliveries handled together go out as one ``basic.ack(multiple=True)``
where that covers only deliveries already answered ACK or already settled (``_ChannelAcks``);
NACKs and rejects go out one by one.

Every consumed queue is a durable quorum queue with an explicit ``x-delivery-limit`` and the
dead-letter exchange ``c2c.dlx`` (at-least-once dead-lettering to ``<queue>.dead``): nothing
relies on the broker's defaults, which differ between RabbitMQ 3.x and 4.x.

Message properties are decoded leniently (``decode_leniently``): RabbitMQ passes a short string
that is not UTF-8, a timestamp past year 9999 or a header name that is not UTF-8 on as it
was published, and pamqp's strict decoding of one such frame would close the whole connection,
every consumer and publisher on it, again on each redelivery, until the broker dead-lettered
that message and every other one unacked at the time, none of them seen by a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq import spec
from pamqp import decode as pamqp_decode

from gateway.config import AmqpConfig
from gateway.crashpoints import crash_point
from gateway.errors import Unavailable
from gateway.model import is_party_id
from gateway.urls import NOT_SHOWN, UrlInvalid, split_server_url, userinfo_past_netloc

log = structlog.get_logger(__name__)

INBOUND_EXCHANGE = "c2c.inbound"
#: the outcomes of our outbound messages (gateway/store/outcomes.py)
OUTCOMES_EXCHANGE = "c2c.outcomes"
SUBMIT_EXCHANGE = "c2c.submit"
SUBMIT_QUEUE = "c2c.submit"
DEAD_LETTER_EXCHANGE = "c2c.dlx"
SIGNATURE_HEADER = "c2c-signature"
#: why the gateway dead-lettered a message itself (a bad submission without reply_to)
REASON_HEADER = "c2c-reason"
#: the name other tools find the gateway's connections by (``rabbitmqctl list_connections``)
CONNECTION_NAME = "c2c-gateway"

#: failures of one publish attempt that a reconnect can cure
_T = TypeVar("_T")
_TRANSIENT = (aiormq.exceptions.AMQPError, ChannelInvalidStateError, ConnectionError, OSError)
#: ``delivery_mode`` of a message the broker writes to disk
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
#: how long ``AmqpBroker.ping`` (``/readyz``) waits for the broker's answer to its round trip
PROBE_TIMEOUT_S = 2.0
#: how long ``AmqpBroker.stop_consuming`` waits for the broker to answer its consumer cancels
CANCEL_TIMEOUT_S = 3.0
#: the first pause of a delivery held through an outage (``OutageHold``), doubled after each try
_HOLD_FIRST_PAUSE_S = 0.2
#: the longest such pause: the consumers' stop is noticed within it
_HOLD_MAX_PAUSE_S = 5.0


class Refused(Unavailable):
    """The broker answered no for this one message (returned it as unroutable, or nacked a
    publish through an exchange): sending it again at once cannot help, and through a topic
    exchange would copy it again into every queue that took it."""


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

    def _headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = dict(self.headers)
        if self.signature is not None:
            headers[SIGNATURE_HEADER] = self.signature
        return headers

    def properties(self) -> spec.Basic.Properties:
        """The AMQP properties as sent: those of ``to_aio_pika()``, built directly."""
        return spec.Basic.Properties(
            content_type=self.content_type,
            headers=self._headers(),
            delivery_mode=PERSISTENT,
            priority=0,
            correlation_id=self.correlation_id,
            message_id=self.message_id,
            message_type=self.message_type,
            app_id=self.app_id,
        )

    def to_aio_pika(self) -> aio_pika.Message:
        return aio_pika.Message(
            self.body,
            message_id=self.message_id,
            type=self.message_type,
            app_id=self.app_id,
            content_type=self.content_type,
            correlation_id=self.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=self._headers(),
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
    content_encoding: str | None
    correlation_id: str | None
    reply_to: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    #: failed deliveries so far, as the quorum queue counts them (``x-delivery-count``)
    delivery_count: int

    def header_str(self, name: str) -> str | None:
        """A header as text: a long string, or a byte array (AMQP field type ``x``, which
        pika, the Java and the Go clients send for bytes); None when absent or of another
        type (``header_type`` says which)."""
        value = self.headers.get(name)
        if isinstance(value, bytes | bytearray):
            return bytes(value).decode("utf-8", "replace")
        return value if isinstance(value, str) else None

    def header_type(self, name: str) -> str | None:
        """The Python type a present header decoded to, for a refusal that names it."""
        value = self.headers.get(name)
        return None if value is None else type(value).__name__


class Settlement(StrEnum):
    #: done: stored, or definitively answered
    ACK = "ack"
    #: the gateway cannot take it now (store down): ``basic.nack(requeue=True)``
    REQUEUE = "requeue"
    #: processing failed: ``basic.reject(requeue=True)``, counted toward the delivery limit
    REJECT = "reject"


DeliveryHandler = Callable[[Delivery], Awaitable[Settlement]]


class OutageHold:
    """Holds one delivery in process while what it needs (the store, the broker) is down,
    instead of returning it to the queue at each failed try.

    RabbitMQ before 4.3 counts a ``basic.nack(requeue=True)`` towards a quorum queue's
    ``x-delivery-limit`` like a reject, so returning a delivery for every failed try would
    have an outage of a few seconds dead-letter it, unanswered and unaudited. The delivery is
    held for ``hold_s``, tried again after each ``pause``, then returned (so that another
    replica may take it) only while its count leaves one more return before the limit after
    this one: that return is kept for a crash, a shutdown or a lost connection, which return
    it too, counted. A delivery without that margin is held until a try succeeds. Either way
    the hold ends when the consumers stop (``AmqpBroker.consuming``), and the delivery goes
    back. RabbitMQ 4.3 and later count only rejects: there the count stays low.
    """

    def __init__(
        self,
        broker: AmqpBroker,
        delivery: Delivery,
        *,
        hold_s: float | None,
        monotonic: Callable[[], float],
    ) -> None:
        self._broker = broker
        self._monotonic = monotonic
        self._started = monotonic()
        self._pause = _HOLD_FIRST_PAUSE_S
        #: how long the delivery is held before it goes back; None: until a try succeeds
        #: (``hold_s`` None asks for that whatever the count)
        self.hold_s: float | None = (
            hold_s
            if hold_s is not None and delivery.delivery_count + 2 <= broker.config.delivery_limit
            else None
        )

    async def pause(self) -> bool:
        """Wait before the next try (0.2 s, doubling up to 5 s); False, at once, when the
        delivery is to go back instead: held ``hold_s`` already, or the consumers stopping."""
        if self.hold_s is not None and self._monotonic() - self._started >= self.hold_s:
            return False
        if not self._broker.consuming:
            return False
        await asyncio.sleep(self._pause)
        self._pause = min(self._pause * 2, _HOLD_MAX_PAUSE_S)
        return True


async def held_through_outages(
    attempt: Callable[[], Awaitable[_T]],
    hold: Callable[[Unavailable], OutageHold],
) -> tuple[_T] | None:
    """``(attempt(),)``; while it raises ``Unavailable`` (the store, the broker), the delivery
    is held and ``attempt`` tried again as the ``OutageHold`` says, made by ``hold`` at the
    first failure (which it may log) so that the hold counts from there. None: the delivery is
    to go back to the queue (held long enough, or the consumers stopping)."""
    held: OutageHold | None = None
    while True:
        try:
            return (await attempt(),)
        except Unavailable as exc:
            if held is None:
                held = hold(exc)
        if not await held.pause():
            return None


class AmqpBroker:
    """The gateway's connection to RabbitMQ."""

    def __init__(self, config: AmqpConfig, *, connection_name: str = CONNECTION_NAME) -> None:
        if config.url is None:
            raise ValueError("AmqpBroker needs an AMQP URL")
        decode_leniently()
        self._config = config
        self._url = config.url
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channels: dict[str, AbstractRobustChannel] = {}
        self._lock = asyncio.Lock()
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: ack coalescing per protocol channel (a reconnect opens new ones)
        self._acks: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, _ChannelAcks] = (
            weakref.WeakKeyDictionary()
        )
        #: the readiness round trip in flight (``ping``) and when it was sent
        self._probe: asyncio.Task[None] | None = None
        self._probe_sent = 0.0
        #: connected, and not lost since (the robust connection calls ``_on_lost`` again on
        #: each failed reconnect attempt: one outage is one loss)
        self._up = False
        self._loss_callbacks: list[Callable[[], None]] = []

    @property
    def config(self) -> AmqpConfig:
        return self._config

    @property
    def in_flight(self) -> int:
        """Deliveries being handled, not yet settled."""
        return self._in_flight

    @property
    def connected(self) -> bool:
        """The connection is open and not reconnecting, and no readiness round trip
        (``ping``) has gone unanswered for ``PROBE_TIMEOUT_S`` (a silent path, which the
        heartbeat finds only later): ``c2c_amqp_connected``."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        probe = self._probe
        return (
            probe is None
            or probe.done()
            or probe.get_loop().time() - self._probe_sent < PROBE_TIMEOUT_S
        )

    def on_connection_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the open connection is lost (once per outage, however
        many reconnect attempts fail): ``c2c_amqp_connection_losses_total``."""
        self._loss_callbacks.append(callback)

    async def connect(self, *, timeout_s: float = 10.0) -> None:
        """Open the robust connection; raises ``Unavailable`` when the broker cannot be reached."""
        if self._connection is not None:
            return
        # What aio_pika.connect_robust does, but holding the connection: one whose first
        # attempt is cut short (the timeout, a stop) is closed. Left open, its reconnect task
        # goes on trying every second and swallows the cancel of asyncio.run's shutdown, so
        # the process never exits (a broker that takes the TCP connection and never answers).
        connection = aio_pika.RobustConnection(
            make_url(self._url),
            client_properties={"connection_name": self._connection_name},
            reconnect_interval=1.0,
        )
        try:
            async with asyncio.timeout(timeout_s):
                await connection.connect()
        except BaseException as exc:
            with contextlib.suppress(*_TRANSIENT, TimeoutError):
                await connection.close()
            if not isinstance(exc, (*_TRANSIENT, TimeoutError)):
                raise
            why = (
                f"no answer within {timeout_s:g} s"
                if isinstance(exc, TimeoutError) and not str(exc)
                else _describe(exc)
            )
            raise Unavailable(
                f"cannot connect to RabbitMQ at {_endpoint(self._url)}: {why}"
            ) from exc
        self._connection = connection
        self._connection.close_callbacks.add(self._on_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        self._up = True
        log.info("amqp_connected", connection_name=self._connection_name)

    def _on_lost(self, connection: object, exc: BaseException | None) -> None:
        if self._connection is not connection:
            return  # our own close
        if self._up:
            self._up = False
            for callback in self._loss_callbacks:
                callback()
        log.warning(
            "amqp_connection_lost",
            connection_name=self._connection_name,
            endpoint=_endpoint(self._url),
            reason=_describe(exc) if exc is not None else "closed",
            detail="reconnecting every second; unsettled deliveries go back to their queues",
        )

    def _on_reconnected(self, connection: object) -> None:
        self._up = True
        log.info("amqp_reconnected", connection_name=self._connection_name)

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
        connection, self._connection = self._connection, None
        self._up = False
        self._channels.clear()
        if connection is not None:
            with contextlib.suppress(*_TRANSIENT, TimeoutError):
                await connection.close()

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the broker answers now: not while the robust
        connection is reconnecting (a broker restart, a lost path found by the heartbeat),
        and not while a round trip to it goes unanswered for ``PROBE_TIMEOUT_S`` (a silent
        path, which the heartbeat finds only after two or three of its intervals).

        One round trip is in flight at a time: callers while it is unanswered share it, so a
        silent path never piles up requests behind it."""
        connection = self._connection
        if connection is None or connection.is_closed:
            raise Unavailable("RabbitMQ connection is not open")
        if not connection.connected.is_set():
            raise Unavailable("RabbitMQ connection lost, reconnecting")
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.create_task(self._round_trip())
            probe.add_done_callback(_retrieve)
            self._probe_sent = loop.time()
        done, _ = await asyncio.wait({probe}, timeout=PROBE_TIMEOUT_S)
        if not done:
            raise Unavailable(
                f"RabbitMQ has not answered a round trip sent"
                f" {loop.time() - self._probe_sent:.1f}s ago: a silent network path, or a"
                " broker too busy to answer"
            )
        probe.result()

    async def _round_trip(self) -> None:
        """A passive declare of ``amq.direct``, which every vhost has: an RPC with no effect."""
        try:
            robust = await self.channel("probe")
            channel = await robust.get_underlay_channel()
            await channel.exchange_declare(exchange="amq.direct", passive=True)
        except (*_TRANSIENT, RuntimeError) as exc:
            raise Unavailable(f"RabbitMQ round trip failed: {_describe(exc)}") from exc

    async def channel(self, concern: str, *, prefetch: int | None = None) -> AbstractRobustChannel:
        """The channel of one concern, opened once; publisher channels use confirms."""
        async with self._lock:
            channel = self._channels.get(concern)
            if channel is not None:
                return channel
            if self._connection is None:
                raise Unavailable("RabbitMQ connection is not open")
            if not self._connection.connected.is_set():
                raise Unavailable("cannot open a channel: RabbitMQ connection lost, reconnecting")
            try:
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                if prefetch is not None:
                    await channel.set_qos(prefetch_count=prefetch)
            except _TRANSIENT as exc:
                raise Unavailable(f"cannot open a channel: {_describe(exc)}") from exc
            except RuntimeError as exc:
                # aio-pika's "Connection was not opened": the connection was lost since the
                # check above (a reconnect under way)
                raise Unavailable(f"cannot open a channel: {exc}") from exc
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
            await channel.declare_exchange(
                OUTCOMES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
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
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raises ``Unavailable`` past the deadline,
        ``Refused`` (at once) when the broker returns it, or nacks it through an exchange.
        Without ``mandatory``, a message no queue is bound for is confirmed and dropped.

        A publish whose confirm was lost is sent again: receivers deduplicate by message_id.
        """
        loop = asyncio.get_running_loop()
        timeout_s = self._config.publish_timeout_s
        deadline = loop.time() + timeout_s
        attempt = 0
        last = "no attempt"
        properties = message.properties()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"publish of {message.message_id} to {exchange or '(default)'}/{routing_key} "
                    f"not confirmed within {timeout_s}s: {last}"
                )
            try:
                async with asyncio.timeout(remaining):
                    channel = await self._publisher(concern)
                    # wait=False: the confirm is awaited without first waiting for the frame
                    # to be written (the confirm cannot come earlier anyway), so the channel's
                    # lock is not held across one socket write per publish.
                    await channel.basic_publish(
                        message.body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=mandatory,
                        wait=False,
                    )
                return
            except aiormq.exceptions.PublishError as exc:
                # Returned as unroutable: no queue is bound. Retrying cannot help until an
                # operator (or a consumer) binds one; the caller keeps the record pending.
                raise Refused(
                    f"RabbitMQ returned {message.message_id} as unroutable "
                    f"({exchange or '(default)'}/{routing_key}): no queue bound"
                ) from exc
            except aiormq.exceptions.DeliveryError as exc:
                if not exchange:
                    # one queue (the default exchange): a re-publish can reach no other queue,
                    # and may find room once its consumer took some
                    last = _describe(exc)
                else:
                    # Nacked (a bound queue full with reject-publish, say): every other queue
                    # bound to the key has the message already, and a re-publish would put it
                    # there again, each time; the caller keeps the record pending instead.
                    raise Refused(
                        f"RabbitMQ refused {message.message_id} "
                        f"({exchange}/{routing_key}): {_describe(exc)}"
                    ) from exc
            except (*_TRANSIENT, TimeoutError) as exc:
                last = _describe(exc)
            attempt += 1
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0, max(deadline - loop.time(), 0)))

    async def _publisher(self, concern: str) -> aiormq.Channel:
        """The open protocol channel under a concern's robust channel (after a reconnect, the
        new one, once restored)."""
        robust = self._channels.get(concern) or await self.channel(concern)
        channel = await robust.get_underlay_channel()
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{concern} channel is closed")
        # aio-pika types it as the abstract channel; on a connection it is aiormq's channel
        assert isinstance(channel, aiormq.Channel)
        return channel

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        concern: str,
        exchange: str | None,
        prefetch: int | None = None,
    ) -> None:
        """Consume ``queue`` (declared with the standard arguments, bound to the fanout
        ``exchange`` its publishers write to; None: published to by name) until the broker
        closes.

        The consumer is restored with the channel after a reconnect, and after the broker
        cancels it: the queue deleted (by an operator, a policy), aio-pika declares it again
        and consumes it, and the binding made here is restored with it. Made on the topology
        channel only, the binding was not: the queue came back, consumed and reported ready,
        with nothing routed to it, and every message published meanwhile was dropped.
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
            if exchange is not None:
                await declared.bind(exchange)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await self._handle(queue, message, handler)

            tag = await declared.consume(on_message, no_ack=False)
        except _TRANSIENT as exc:
            raise Unavailable(f"cannot consume {queue}: {_describe(exc)}") from exc
        self._consumers.append((declared, tag))

    @property
    def consuming(self) -> bool:
        """A consumer is registered (``consume``) and ``stop_consuming`` has not run."""
        return bool(self._consumers)

    async def stop_consuming(self, *, timeout_s: float = 10.0) -> None:
        """Cancel every consumer, then wait for the deliveries being handled: all of it
        within ``timeout_s``, whatever the broker does.

        The cancels go out together and are given ``CANCEL_TIMEOUT_S`` at most: on a silent
        path (the connection still looks open) none is answered. While the robust connection
        is reconnecting (the broker refuses) they are not sent at all: aio-pika's own
        ``timeout`` does not bound its wait for the connection to come back, and a lost
        connection has no consumer left to cancel. Whatever is still unacked when the
        connection closes goes back to its queue.
        """
        consumers, self._consumers = self._consumers, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        connection = self._connection
        if (
            consumers
            and connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
        ):
            cancels = [
                asyncio.ensure_future(queue.cancel(tag, timeout=CANCEL_TIMEOUT_S))
                for queue, tag in consumers
            ]
            _, pending = await asyncio.wait(cancels, timeout=min(CANCEL_TIMEOUT_S, timeout_s))
            for cancel in pending:
                cancel.cancel()
            for cancel in cancels:
                cancel.add_done_callback(_retrieve)
            if pending:
                log.warning(
                    "amqp_cancel_unanswered",
                    consumers=len(pending),
                    detail="stopping without the broker's answer; the connection closes next",
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(deadline - loop.time(), 0.0))

    async def _handle(
        self, queue: str, message: AbstractIncomingMessage, handler: DeliveryHandler
    ) -> None:
        acks = self._acks.get(message.channel)
        if acks is None:
            acks = self._acks[message.channel] = _ChannelAcks(message.channel)
        tag = message.delivery_tag
        if tag is not None:
            acks.received(tag)
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._settle(queue, message, handler, acks)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _settle(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        handler: DeliveryHandler,
        acks: _ChannelAcks,
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
        tag = message.delivery_tag
        try:
            if tag is None:
                # not a basic.deliver (cannot happen on a consumer): settled the plain way
                if settlement is Settlement.ACK:
                    await message.ack()
                elif settlement is Settlement.REQUEUE:
                    await message.nack(requeue=True)
                else:
                    await message.reject(requeue=True)
            elif settlement is Settlement.ACK:
                await acks.ack(tag)
                # its basic.ack is handed to the connection (it may not be on the wire yet)
                crash_point("S7-after-response", message_id=delivery.message_id or "")
            else:
                await acks.refuse(tag, reject=settlement is Settlement.REJECT)
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


class _ChannelAcks:
    """Settles the deliveries of one channel, acks coalesced into as few frames as possible.

    ``basic.ack(multiple=True)`` acks every unsettled delivery up to its tag, so it is sent
    only over a run of tags that were all received here and are each either to be acked now
    or already settled by a frame queued before it: ``_through`` is the tag up to which
    everything is settled, and the run starts right after it. A tag never received (or one
    still being handled) ends the run; an ack behind it goes out alone at once, so no delivery
    waits for another. The acks of one loop iteration go out together, in order, from one
    task; a NACK or reject is sent by its delivery's own task and counts as settled only once
    its frame is queued, so a later ``multiple`` ack can never overtake it.
    """

    #: settled tags held behind an unsettled one before coalescing is given up on the channel
    MAX_AHEAD = 4096

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        # weak: the broker keeps this in a WeakKeyDictionary keyed by the channel
        self._channel_ref = weakref.ref(channel)
        self._loop = asyncio.get_running_loop()
        #: received and not settled: None while handled, the waiter once it is to be acked
        self._open: dict[int, asyncio.Future[None] | None] = {}
        #: settled tags above ``_through``
        self._ahead: set[int] = set()
        self._through = 0
        self._waiting = 0
        self._sender: asyncio.Task[None] | None = None
        self._coalesce = True

    def received(self, tag: int) -> None:
        self._open[tag] = None

    def ack(self, tag: int) -> asyncio.Future[None]:
        """Queue the ack of ``tag``; the future is done once its frame is queued."""
        waiter = self._loop.create_future()
        self._open[tag] = waiter
        self._waiting += 1
        if self._sender is None:
            self._sender = self._loop.create_task(self._send())
        return waiter

    async def refuse(self, tag: int, *, reject: bool) -> None:
        """``basic.reject(requeue=True)`` (counted) or ``basic.nack(requeue=True)``."""
        channel = self._channel()
        if reject:
            await channel.basic_reject(tag, requeue=True, wait=False)
        else:
            await channel.basic_nack(tag, requeue=True, wait=False)
        self._settled(tag)

    def _channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel_ref()
        if channel is None:
            raise ChannelInvalidStateError("the delivery's channel is gone")
        return channel

    def _settled(self, tag: int) -> None:
        self._open.pop(tag, None)
        if not self._coalesce or tag <= self._through:
            return
        if tag == self._through + 1:
            through = tag
            while through + 1 in self._ahead:
                through += 1
                self._ahead.remove(through)
            self._through = through
            return
        self._ahead.add(tag)
        if len(self._ahead) > self.MAX_AHEAD:
            # a tag that never settles holds the run back: ack one by one from now on
            self._coalesce = False
            self._ahead.clear()

    async def _send(self) -> None:
        frames: list[tuple[int, bool, list[asyncio.Future[None]]]] = []
        try:
            while frames := self._take():
                for tag, multiple, waiters in frames:
                    try:
                        await self._channel().basic_ack(tag, multiple=multiple, wait=False)
                    except Exception as exc:
                        for waiter in waiters:
                            if not waiter.done():
                                waiter.set_exception(exc)
                    else:
                        for waiter in waiters:
                            if not waiter.done():
                                waiter.set_result(None)
        finally:
            self._sender = None
            # cancelled (loop shutdown): the deliveries still waiting are not acked
            for _, _, waiters in frames:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.cancel()

    def _take(self) -> list[tuple[int, bool, list[asyncio.Future[None]]]]:
        """The ack frames to send now, in order: ``(tag, multiple, waiters)``."""
        if not self._waiting:
            return []
        frames: list[tuple[int, bool, list[asyncio.Future[None]]]] = []
        if self._coalesce:
            run: list[asyncio.Future[None]] = []
            last = 0
            tag = self._through + 1
            while True:
                if tag in self._ahead:
                    self._ahead.remove(tag)
                else:
                    waiter = self._open.get(tag)
                    if waiter is None:
                        break
                    del self._open[tag]
                    run.append(waiter)
                    last = tag
                tag += 1
            self._through = tag - 1
            if run:
                self._waiting -= len(run)
                frames.append((last, len(run) > 1, run))
        if self._waiting:
            alone = [(tag, waiter) for tag, waiter in self._open.items() if waiter is not None]
            for tag, waiter in alone:
                self._settled(tag)
                frames.append((tag, False, [waiter]))
            self._waiting = 0
        return frames


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
        content_encoding=message.content_encoding,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        headers=headers,
        redelivered=bool(message.redelivered),
        delivery_count=count if isinstance(count, int) and not isinstance(count, bool) else 0,
    )


def _endpoint(url: str) -> str:
    """Where ``url`` connects, as ``amqp://host:port/vhost``: never its user, password or
    query. The vhost is percent-encoded as RabbitMQ's URI spec writes it (the default one is
    ``/%2F``). A URL with an '@' after its host part may hold a password with an unencoded
    '/' or '?' (``user:12/34@host``: the host and port the driver sees are the user and
    ``12``): nothing of it but the scheme is shown."""
    try:
        server = split_server_url(url, schemes=("amqp", "amqps"), what="an AMQP URL")
    except UrlInvalid:
        return "the configured AMQP URL"
    scheme = server.parts.scheme
    if userinfo_past_netloc(server.parts):
        return f"{scheme}://{NOT_SHOWN}"
    if len(server.addresses) != 1:
        return f"{scheme}://(no host)"
    address = server.addresses[0]
    host = f"[{address.host}]" if ":" in address.host else address.host
    port = address.port or (5671 if scheme == "amqps" else 5672)
    # as aiormq reads it: an empty path or "/" is the default vhost
    path = server.parts.path
    vhost = unquote(path[1:]) if path not in ("", "/") else "/"
    return f"{scheme}://{host}:{port}/{quote(vhost, safe='')}"


#: ``<Connection.Close object at 0x7f8a...>``: pamqp's repr of a frame, which says nothing
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
#: the Connection.Close reply code of each exception aiormq raises with the reply text only
_CLOSE_CODES: dict[type[BaseException], int] = {
    **{cls: code for code, cls in aiormq.connection.EXCEPTION_MAPPING.items()},
    aiormq.exceptions.ProbableAuthenticationError: 403,
}
#: the aiormq functions that hold a Connection.Close received from the broker as a local:
#: ``_rpc`` (an answer during the handshake), ``__handle_close`` (on an open connection)
_RECEIVING = frozenset({"_rpc", "__handle_close"})


def _describe(exc: BaseException) -> str:
    """Why ``exc`` happened, on one line: the broker's reply code and text when it closed the
    connection (``connection closed by the broker: 530 NOT_ALLOWED - vhost x not found``),
    else the exception's type and text, without object reprs."""
    frame = _broker_close(exc.__traceback__)
    if frame is not None:
        return f"connection closed by the broker: {frame.reply_code} {frame.reply_text}".strip()
    if type(exc) is aiormq.exceptions.AMQPConnectionError and isinstance(exc.__cause__, OSError):
        # aiormq raises a failed TCP or TLS connect as its own type with the OSError's args:
        # ConnectionRefusedError, socket.gaierror, SSLCertVerificationError say more
        exc = exc.__cause__
    args = exc.args
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and len(args) == 2:
        text = f"{args[0]} {args[1]}"
    elif type(exc) in _CLOSE_CODES and len(args) == 1:
        text = f"{_CLOSE_CODES[type(exc)]} {args[0]}"
    else:
        text = _OBJECT_REPR.sub(r"\1", str(exc))
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _broker_close(tb: TracebackType | None) -> spec.Connection.Close | None:
    """The Connection.Close the broker sent, where it is behind an exception's traceback.

    aiormq keeps the frame in no exception: refused at Connection.Open (an unknown vhost, a
    vhost's connection limit, no permission on it), it raises ``InvalidFrameError("Expected
    one of ['Connection.OpenOk'], got <Connection.Close object at 0x...>")``, and a close on
    an open connection keeps the reply code only as the exception's class, or not at all
    (320 CONNECTION_FORCED). The frame is a local of the aiormq function that raised."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _RECEIVING and tb.tb_frame.f_globals.get("__name__") == (
            "aiormq.connection"
        ):
            frame = tb.tb_frame.f_locals.get("frame")
            if isinstance(frame, spec.Connection.Close):
                found = frame
        tb = tb.tb_next
    return found


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's failure as seen (a probe: the next ``ping`` starts a new one;
    a consumer cancel given up on at stop)."""
    if not task.cancelled():
        task.exception()


_strict_short_str = pamqp_decode.short_str
_strict_timestamp = pamqp_decode.timestamp
_strict_field_table = pamqp_decode.field_table


def decode_leniently() -> None:
    """Make pamqp decode what RabbitMQ forwards unchecked instead of failing the frame:

    - a short string (``message_id``, ``correlation_id``, ``reply_to``, ``type``, ``app_id``,
      a routing key ...) that is not UTF-8: with U+FFFD for each bad byte (AMQP short strings
      are octets; no id the gateway uses can hold U+FFFD, so such a value names nothing);
    - a ``timestamp`` (property or header) past what ``datetime`` holds, such as microseconds
      since the epoch: None (the gateway reads no timestamp);
    - a header name that is not UTF-8: with U+FFFD, as a short string.

    pamqp decodes content headers through its ``METHODS`` and ``TABLE_MAPPING`` tables (it
    offers no option for this; aiormq issue 186): their entries are replaced, once, for the
    process. A frame whose structure is broken still fails as before.
    """
    if pamqp_decode.METHODS.get("shortstr") is _lenient_short_str:
        return
    pamqp_decode.METHODS["shortstr"] = _lenient_short_str
    pamqp_decode.METHODS["timestamp"] = _lenient_timestamp
    pamqp_decode.METHODS["table"] = _lenient_field_table
    pamqp_decode.TABLE_MAPPING[b"T"] = _lenient_timestamp
    pamqp_decode.TABLE_MAPPING[b"F"] = _lenient_field_table


def _lenient_short_str(value: bytes) -> tuple[int, str]:
    try:
        return _strict_short_str(value)
    except UnicodeDecodeError:
        length = value[0]
        log.warning("amqp_short_string_not_utf8", length=length)
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def _lenient_timestamp(value: bytes) -> tuple[int, Any]:
    try:
        return _strict_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise  # truncated: the frame is broken, not just the value
        (seconds,) = struct.unpack(">Q", value[:8])
        log.warning("amqp_timestamp_out_of_range", value=seconds)
        return 8, None


def _lenient_field_table(value: bytes) -> tuple[int, Any]:
    try:
        return _strict_field_table(value)
    except UnicodeDecodeError:
        pass
    # pamqp's field_table with the name decoded leniently; its values come from
    # TABLE_MAPPING, so nested tables and timestamps are lenient too.
    (length,) = struct.unpack_from(">I", value, 0)
    end = 4 + length
    if end > len(value):
        raise ValueError("Field table length exceeds available data")
    offset = 4
    table: dict[str, Any] = {}
    while offset < end:
        key_length = value[offset]
        offset += 1
        if offset + key_length > end:
            raise ValueError("Field table key length exceeds data")
        key = value[offset : offset + key_length].decode("utf-8", "replace")
        offset += key_length
        consumed, item = pamqp_decode.embedded_value(value[offset:])
        offset += consumed
        table[key] = item
    log.warning("amqp_header_name_not_utf8")
    return end, table
