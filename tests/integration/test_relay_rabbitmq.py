"""The inbox relay on a real RabbitMQ bus, where a publish can fail for one record of a batch
(``mandatory``: a routing key no queue is bound for is returned) and the bus can refuse
everything for longer than the relay's lease.

- Every record the broker confirmed is marked relayed and audited ``delivered`` at once, even
  when a record before it in the batch failed; only the failed one stays pending, retried when
  its lease runs out (not in every round of the traffic behind it) and counted as a failure.
  Before, the relay marked only the records in front of the first failure: one partner's unroutable
  message made it publish every message behind it again, every round, forever.
- A relay marks what it published under the lease it holds then. Before, a handed-over row
  whose lease ran out during an outage was re-leased by the relay's own claim, yet marked under
  the hand-over lease: the mark matched nothing (``relay_lease_lost``) and the next claim
  published the message a second time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from amqp_env import ADVANCE_DATA, AMQP_PARTNER, GATEWAY, HTTPS_PARTNER, write_config
from rabbit import RabbitVhost
from store_rows import Database

from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import SigningKey, load_signing_key
from gateway.envelope import encode_envelope, new_message_id
from gateway.inbound import InboundRequest
from gateway.model import Header
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter

pytestmark = pytest.mark.rabbitmq

MX = AMQP_PARTNER
CA = HTTPS_PARTNER


@dataclass
class RelayEnv:
    gateway: Gateway
    clock: ManualClock
    channel: aio_pika.abc.AbstractChannel
    keys: dict[str, SigningKey]
    database: Database
    #: message ids as they reached the test's consumers on ``c2c.inbound``, repeats included
    received: list[str]

    async def accept(self, sender: str) -> str:
        """A signed message from ``sender`` through the inbound pipeline (its own transport),
        answered 202; returns its message_id."""
        message_id = new_message_id()
        header = Header(
            message_id=message_id,
            message_type=ADVANCE_DATA,
            schema_version="1.0",
            sender=sender,
            recipient=GATEWAY,
            created_at=self.clock.now(),
            expires_at=self.clock.now() + dt.timedelta(days=7),
            in_reply_to=None,
        )
        body = encode_envelope(header, self.gateway.registry.examples(ADVANCE_DATA, "1.0")[0])
        result = await self.gateway.pipeline.handle(
            InboundRequest(
                body=body,
                signature=sign_detached(body, self.keys[sender]),
                transport="amqp" if sender == MX else "https",
                peer=sender,
                content_type="application/json",
            )
        )
        assert result.http_status == 202, result
        return message_id

    async def bind(
        self, queue_name: str, routing_key: str, *, arguments: dict[str, Any] | None = None
    ) -> None:
        """A CBP system's queue on ``c2c.inbound`` for ``routing_key`` only, consumed."""

        async def on_message(message: AbstractIncomingMessage) -> None:
            assert message.message_id is not None
            self.received.append(message.message_id)

        queue = await self.channel.declare_queue(queue_name, exclusive=True, arguments=arguments)
        await queue.bind("c2c.inbound", routing_key=routing_key)
        await queue.consume(on_message, no_ack=True)

    def failures(self) -> float:
        value = self.gateway.metrics.registry.get_sample_value("c2c_relay_failures_total")
        return value or 0.0

    def published(self) -> float:
        value = self.gateway.metrics.registry.get_sample_value("c2c_relay_published_total")
        return value or 0.0

    async def until(self, done: Callable[[], Awaitable[bool]]) -> None:
        """Wait until ``done()``, waking the relay out of its backoff meanwhile, so that its
        rounds come at once."""
        async with asyncio.timeout(15):
            while not await done():
                self.gateway.relay.notify()
                await asyncio.sleep(0.05)

    async def failed_rounds(self, count: int) -> None:
        """Wait for ``count`` more relay rounds that failed."""
        target = self.failures() + count

        async def done() -> bool:
            return self.failures() >= target

        await self.until(done)

    async def nothing_pending(self) -> bool:
        return not await self.pending()

    async def pending(self) -> list[str]:
        return [r.message_id for r in await self.gateway.store.pending_relay(100)]

    async def audited_delivered(self) -> Counter[str]:
        rows = await self.gateway.store.audit_entries(AuditFilter(event="delivered"), limit=100)
        return Counter(orjson.loads(row.entry)["message_id"] for row in rows)


@asynccontextmanager
async def relay_env(
    root: Path, vhost: RabbitVhost, *, publish_timeout_s: float = 5.0
) -> AsyncIterator[RelayEnv]:
    """A started gateway on ``vhost`` (the RabbitMQ bus, SQLite, a manual clock) with no queue
    bound to ``c2c.inbound`` yet: the test binds what its CBP systems consume."""
    config = load_config(
        write_config(root, amqp_url=vhost.url(), publish_timeout_s=publish_timeout_s)
    )
    clock = ManualClock(dt.datetime.now(dt.UTC))
    gateway = Gateway(config, clock=clock)
    connection = await aio_pika.connect(vhost.url())
    try:
        channel = await connection.channel()
        await channel.declare_exchange("c2c.inbound", aio_pika.ExchangeType.TOPIC, durable=True)
        keys = {
            party: load_signing_key(root / "certs" / party / "sign.key", party=party, alg="EdDSA")
            for party in (MX, CA)
        }
        await gateway.start()
        try:
            yield RelayEnv(gateway, clock, channel, keys, Database(config.store_url), [])
        finally:
            await gateway.stop()
    finally:
        await connection.close()


async def test_an_unroutable_message_does_not_hold_back_the_confirmed_ones_behind_it(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with relay_env(tmp_path, rabbit_vhost) as env:
        await env.bind("cbp.mx-only", f"{MX}.#")
        ca_id = await env.accept(CA)
        mx_id = await env.accept(MX)

        async def mx_received() -> bool:
            return mx_id in env.received

        await env.until(mx_received)
        await asyncio.sleep(0.3)  # a publish confirmed in the last round reaches the consumer
        assert env.received == [mx_id]
        assert await env.pending() == [ca_id]
        assert await env.audited_delivered() == Counter({mx_id: 1})
        # counted as a failure (C2CRelayFailing), yet not retried in every round of the
        # traffic behind it: it waits for its lease to run out
        failures = env.failures()
        assert failures >= 1  # the round that took MX only (and one of CA alone, if it ran)
        more = [await env.accept(MX) for _ in range(3)]

        async def more_received() -> bool:
            return set(more) <= set(env.received)

        await env.until(more_received)
        assert env.failures() == failures
        assert await env.pending() == [ca_id]

        # a consumer bound for CA-CBSA at last; at the lease's end the message goes out, once
        await env.bind("cbp.ca-only", f"{CA}.#")
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))
        await env.until(env.nothing_pending)
        await asyncio.sleep(1.5)  # three more poll rounds: a second publish would show here
        assert sorted(env.received) == sorted([mx_id, ca_id, *more])
        assert await env.audited_delivered() == Counter({m: 1 for m in [mx_id, ca_id, *more]})
        assert env.published() == 5


async def test_an_outage_longer_than_the_lease_does_not_make_the_relay_deliver_twice(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with relay_env(tmp_path, rabbit_vhost) as env:
        relay = env.gateway.relay
        mx_id = await env.accept(MX)
        await env.failed_rounds(1)  # nothing bound: the handed-over message is not confirmed
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))

        async def claimed_by_the_relay() -> bool:
            owners = await env.database.rows("SELECT relay_owner FROM inbound_messages")
            return owners == [(relay.owner,)]

        # the hand-over lease ran out: the relay's own next claim takes the row
        await env.until(claimed_by_the_relay)
        await env.bind("cbp.all", "#")
        # refused again under the claim, it waits out that lease too
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))
        await env.until(env.nothing_pending)
        await asyncio.sleep(1.5)  # three more poll rounds: a second publish would show here
        assert env.received == [mx_id]
        assert await env.audited_delivered() == Counter({mx_id: 1})
        assert env.published() == 1


async def test_a_stopping_relay_gives_back_every_lease_it_holds(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """Rows the bus refused stay leased until the lease runs out; a relay that stops gives
    those back too (claimed or handed over), so the next relay takes them at once."""
    async with relay_env(tmp_path, rabbit_vhost) as env:
        relay = env.gateway.relay
        await env.accept(MX)
        await env.failed_rounds(1)
        failures = env.failures()
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))

        async def claimed_and_refused() -> bool:
            owners = await env.database.rows("SELECT relay_owner FROM inbound_messages")
            # its claimed copy is refused too, and waits out the claim's lease
            return owners == [(relay.owner,)] and env.failures() > failures

        await env.until(claimed_and_refused)
        await relay.stop()
        assert await env.database.rows("SELECT relay_owner FROM inbound_messages") == [(None,)]


#: a relay batch far smaller than the default, so that a backlog larger than a batch is quick
SMALL_BATCH = 4


async def test_a_backlog_of_unroutable_messages_larger_than_a_batch_holds_nothing_up(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """More unroutable messages than a relay batch, then a routable one: it arrives at once,
    and the unroutable ones are tried again only when their lease runs out. Before, a batch
    the bus refused entirely went back to the front of the hand-over queue, and the claim
    re-took the rows the relay held whatever their lease: the same refused batch was published
    in every round, and nothing behind it ever reached ``c2c.inbound``."""
    async with relay_env(tmp_path, rabbit_vhost) as env:
        env.gateway.relay._batch = SMALL_BATCH
        await env.bind("cbp.ship", f"{CA}.#")  # no queue binds MX-ANAM's messages
        unroutable = [await env.accept(MX) for _ in range(3 * SMALL_BATCH)]
        await env.failed_rounds(1)
        ca_id = await env.accept(CA)

        async def ca_received() -> bool:
            return ca_id in env.received

        await env.until(ca_received)
        assert sorted(await env.pending()) == sorted(unroutable)

        # not tried again in every round: the lease has not run out (a manual clock)
        failures = env.failures()
        for _ in range(6):
            env.gateway.relay.notify()
            await asyncio.sleep(0.25)
        assert env.failures() == failures

        # once the lease ran out they are tried again, and go out once a queue is bound
        await env.bind("cbp.mx", f"{MX}.#")
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))
        await env.until(env.nothing_pending)
        await asyncio.sleep(0.3)
        assert Counter(env.received) == Counter({m: 1 for m in [ca_id, *unroutable]})


async def test_an_unroutable_backlog_on_the_claim_path_holds_nothing_up(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """The same backlog with no hand-over (rows stored while the relay was stopped, as after a
    restart): claims take the rows behind the refused ones while those wait for their lease.
    Before, every claim took the relay's own refused rows again, oldest first."""
    async with relay_env(tmp_path, rabbit_vhost) as env:
        relay = env.gateway.relay
        relay._batch = SMALL_BATCH
        await env.bind("cbp.ship", f"{CA}.#")
        await relay.stop()
        unroutable = [await env.accept(MX) for _ in range(3 * SMALL_BATCH)]
        ca_id = await env.accept(CA)
        relay.start()

        async def ca_received() -> bool:
            return ca_id in env.received

        await env.until(ca_received)
        assert sorted(await env.pending()) == sorted(unroutable)


async def test_a_full_queue_that_nacks_is_a_refusal_not_a_republish_loop(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A CBP queue bounded with ``reject-publish`` is full: the broker nacks the publish. The
    row waits for its lease like an unroutable one, counted; each relay attempt puts the
    message once in the other queue bound to its key, and another partner's messages are not
    held up. Before, a nack was re-published until the publish deadline: copy after copy into
    the other queue, and the whole batch waited for it."""
    async with relay_env(tmp_path, rabbit_vhost, publish_timeout_s=30.0) as env:
        await env.bind("cbp.all", "#")
        full = await env.channel.declare_queue(
            "cbp.full",
            exclusive=True,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await full.bind("c2c.inbound", routing_key=f"{MX}.#")  # not consumed: it stays full
        first = await env.accept(MX)

        async def first_received() -> bool:
            return first in env.received

        await env.until(first_received)
        nacked = [await env.accept(MX) for _ in range(2)]
        await env.failed_rounds(1)
        ca_id = await env.accept(CA)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def ca_received() -> bool:
            return ca_id in env.received

        await env.until(ca_received)
        # well under the 30 s publish deadline a nack was re-published for
        assert loop.time() - started < 10
        for _ in range(6):
            env.gateway.relay.notify()
            await asyncio.sleep(0.25)
        counts = Counter(env.received)
        assert all(counts[m] == 1 for m in [first, ca_id, *nacked]), counts
        assert sorted(await env.pending()) == sorted(nacked)

        # the lease ran out: tried once more each, nacked again, one more copy each
        failures = env.failures()
        env.clock.advance(dt.timedelta(seconds=env.gateway.config.relay.lease_s + 1))
        await env.failed_rounds(1)
        for _ in range(6):
            env.gateway.relay.notify()
            await asyncio.sleep(0.25)
        counts = Counter(env.received)
        assert all(counts[m] == 2 for m in nacked), counts
        assert env.failures() == failures + 1
        assert sorted(await env.pending()) == sorted(nacked)
