"""The running dispatcher's concurrency against real mutual-TLS partner stubs and a real store.

- A partner that holds its requests does not hold up another partner's messages: slots
  freed by finished attempts are refilled at once, not when the slowest of a batch ends.
- More messages to one partner than a connection pool of 8 would take at once: none of them
  waits for a pooled connection inside its send deadline, so none "times out" and each is
  sent exactly once.

The holding partner is released by the test (an event), not by a timed sleep; the
deadlines below are generous so that a loaded machine does not make them flaky.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from outbound_env import Running, free_port, gateway_config, row_until, start_gateway, submit_to
from partner_stub import PartnerStub

from gateway.config import OutboxConfig
from gateway.model import Priority
from gateway.outbound.dispatcher import MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_PARTNER
from gateway.store.base import OutboundState


@dataclass
class HoldingStub(PartnerStub):
    """Answers each request with an ACK once ``release`` is set; ``arrived`` counts the
    requests taken in (and is notified of each)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        async with self.changed:
            self.arrived += 1
            self.changed.notify_all()
        await self.release.wait()
        return await super()._handle(request)

    async def until_arrived(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.arrived >= count)


def message_ids(stub: PartnerStub) -> Counter[str]:
    return Counter(orjson.loads(seen.body)["header"]["message_id"] for seen in stub.seen)


@dataclass
class TwoPartners:
    running: Running
    mx: HoldingStub
    ca: PartnerStub


@pytest.fixture
async def two_partners(tmp_path: Path) -> AsyncIterator[TwoPartners]:
    mx_port, ca_port = free_port(), free_port()
    config = gateway_config(
        tmp_path,
        "US-CBP",
        peers={
            "MX-ANAM": f"https://127.0.0.1:{mx_port}",
            "CA-CBSA": f"https://127.0.0.1:{ca_port}",
        },
        # A deadline far longer than the test: MX-ANAM's attempts hang until it is released.
        outbox=OutboxConfig(
            send_timeout_s=120.0,
            breaker_failures=1000,
            base_delay_s=0.2,
            max_delay_s=0.5,
            poll_interval_s=0.05,
        ),
    )
    mx = HoldingStub(pki=tmp_path / "pki", party="MX-ANAM")
    ca = PartnerStub(pki=tmp_path / "pki", party="CA-CBSA")
    await mx.start(mx_port)
    await ca.start(ca_port)
    running = await start_gateway(config)
    try:
        yield TwoPartners(running, mx, ca)
    finally:
        mx.release.set()
        await running.gateway.stop()
        await mx.stop()
        await ca.stop()


async def test_a_partner_holding_its_requests_does_not_hold_up_another_partners(
    two_partners: TwoPartners,
) -> None:
    running, mx, ca = two_partners.running, two_partners.mx, two_partners.ca
    store = running.gateway.store
    held = [await submit_to(running, "MX-ANAM") for _ in range(3)]
    async with asyncio.timeout(30):
        await mx.until_arrived(1)
    # MX-ANAM's attempts hang in its endpoint; CA-CBSA's message is sent meanwhile.
    other = await submit_to(running, "CA-CBSA")
    acknowledged = await row_until(
        store, other.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED, within_s=30.0
    )
    assert acknowledged.attempts == 1
    assert message_ids(ca) == {other.message_id: 1}
    # MX-ANAM's attempts were still in its hands all along, and end when it answers.
    assert mx.seen == []
    mx.release.set()
    for record in held:
        done = await row_until(
            store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED, 30.0
        )
        assert done.attempts == 1
    assert message_ids(mx) == {record.message_id: 1 for record in held}


async def test_a_partner_holding_a_backlog_leaves_slots_for_the_others(
    two_partners: TwoPartners,
) -> None:
    """More messages to the holding partner than there are slots in all: it gets its share
    (MAX_IN_FLIGHT_PER_PARTNER), and another partner's message, urgent or not, still goes."""
    running, mx, ca = two_partners.running, two_partners.mx, two_partners.ca
    store = running.gateway.store
    held = [await submit_to(running, "MX-ANAM") for _ in range(MAX_IN_FLIGHT + 4)]
    async with asyncio.timeout(30):
        await mx.until_arrived(MAX_IN_FLIGHT_PER_PARTNER)
    others = [
        await submit_to(running, "CA-CBSA"),
        await submit_to(running, "CA-CBSA", priority=Priority.URGENT),
    ]
    for other in others:
        done = await row_until(
            store, other.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED, 30.0
        )
        assert done.attempts == 1
    assert message_ids(ca) == {other.message_id: 1 for other in others}
    # MX-ANAM never had more than its share in hand; none of its messages was sent twice
    assert mx.arrived == MAX_IN_FLIGHT_PER_PARTNER
    mx.release.set()
    for record in held:
        await row_until(
            store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED, 60.0
        )
    assert message_ids(mx) == {record.message_id: 1 for record in held}


#: more messages than the HTTPS client's old pool of 8 connections per partner, all due at
#: once, and no more than a partner's share of the dispatcher's slots
BACKLOG = 12


async def test_a_backlog_for_one_partner_does_not_wait_for_connections_inside_its_deadline(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = gateway_config(
        tmp_path,
        "US-CBP",
        peers={"MX-ANAM": f"https://127.0.0.1:{port}"},
        outbox=OutboxConfig(
            send_timeout_s=15.0,
            breaker_failures=1000,
            base_delay_s=0.2,
            max_delay_s=0.5,
            poll_interval_s=0.05,
        ),
    )
    mx = HoldingStub(pki=tmp_path / "pki", party="MX-ANAM")
    await mx.start(port)
    # Queued while its dispatcher is stopped (a restart's backlog): all due at the next
    # gateway's first claim.
    running = await start_gateway(config)
    running.dispatcher.stop()
    try:
        records = [await submit_to(running, "MX-ANAM") for _ in range(BACKLOG)]
    finally:
        await running.gateway.stop()
    running = await start_gateway(config)
    try:
        # Each request is held until all of them are in MX-ANAM's hands, then answered: with
        # a pool of 8 the 9th could not even reach the partner before the first 8 ended.
        try:
            async with asyncio.timeout(30):
                await mx.until_arrived(BACKLOG)
        except TimeoutError:
            pytest.fail(
                f"{mx.arrived} requests reached MX-ANAM in 30 s, not all {BACKLOG} at once: the"
                " others waited for a pooled connection (and their deadline ran out there)"
            )
        mx.release.set()
        for record in records:
            done = await row_until(
                running.gateway.store,
                record.message_id,
                lambda r: r.state is OutboundState.ACKNOWLEDGED,
                within_s=60.0,
            )
            assert done.attempts == 1, done.last_error
        assert message_ids(mx) == {record.message_id: 1 for record in records}
        retried = running.gateway.metrics.registry.get_sample_value(
            "c2c_outbound_attempts_total", {"partner": "MX-ANAM", "result": "retry"}
        )
        assert not retried
    finally:
        mx.release.set()
        await running.gateway.stop()
        await mx.stop()
