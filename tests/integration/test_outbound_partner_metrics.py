"""A partner that stays down shows on /metrics by name (SRE review M3): its circuit breaker
in ``c2c_outbound_breaker_open{partner}`` and its failed attempts in
``c2c_outbound_attempts_total{partner,result="retry"}``, both exported at 0 for every
configured partner from the start, which ``C2CPartnerUnreachable`` reads.

The dispatcher against a real mutual-TLS partner stub that first refuses connections (nothing
listens), then answers; time is a ManualClock moved to each row's next attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from test_dispatch_faults import OUTBOX, Env, dispatcher_env

from gateway.outbound.breaker import BreakerState
from gateway.store.base import OutboundState


@pytest.fixture
async def down(tmp_path: Path) -> AsyncIterator[Env]:
    async with dispatcher_env(tmp_path, start=datetime.now(UTC)) as running:
        yield running


def breaker_open(env: Env, partner: str) -> float | None:
    return env.metrics.registry.get_sample_value("c2c_outbound_breaker_open", {"partner": partner})


async def test_a_partner_down_opens_its_breaker_gauge_until_a_send_succeeds(down: Env) -> None:
    partners = sorted(down.config.partners)
    assert "MX-ANAM" in partners
    # every configured partner from the start, at 0; nothing else
    for partner in partners:
        assert breaker_open(down, partner) == 0.0
        for result in ("acknowledged", "rejected", "retry", "dead", "handed"):
            assert (
                down.metrics.registry.get_sample_value(
                    "c2c_outbound_attempts_total", {"partner": partner, "result": result}
                )
                == 0.0
            )
    assert breaker_open(down, "-") is None

    record = await down.submit()
    with structlog.testing.capture_logs() as logs:
        for _ in range(OUTBOX.breaker_failures):
            assert (await down.step(record.message_id)).state is OutboundState.QUEUED
    # SRE review L2: each failed attempt's log line says why, as its last_error does
    lines = [line for line in logs if line["event"] == "outbound_attempt"]
    assert lines
    row = await down.row(record.message_id)
    assert lines[-1]["error"] == row.last_error
    assert "connect" in lines[-1]["error"], lines[-1]
    assert down.dispatcher.breakers.for_partner("MX-ANAM").state is BreakerState.OPEN
    assert breaker_open(down, "MX-ANAM") == 1.0
    assert down.attempts("retry") == OUTBOX.breaker_failures
    assert down.attempts("acknowledged") == 0.0

    # half-open after the timeout: still shown open until a probe succeeds
    await down.stub.start(down.port)
    row = await down.row(record.message_id)
    down.clock.advance(row.next_attempt_at - down.clock.now())
    if down.dispatcher.breakers.for_partner("MX-ANAM").state is BreakerState.OPEN:
        assert await down.dispatcher.run_once() == 1
        assert breaker_open(down, "MX-ANAM") == 1.0
    with structlog.testing.capture_logs() as logs:
        acked = await down.step(record.message_id)
    assert acked.state is OutboundState.ACKNOWLEDGED
    (line,) = [line for line in logs if line["event"] == "outbound_attempt"]
    assert (line["result"], line["error"]) == ("acknowledged", None)
    assert breaker_open(down, "MX-ANAM") == 0.0
    assert down.attempts("acknowledged") == 1.0


def sample(env: Env, name: str, partner: str = "MX-ANAM") -> float | None:
    return env.metrics.registry.get_sample_value(name, {"partner": partner})


async def test_a_partners_backlog_and_delivery_time_are_shown(down: Env) -> None:
    """c2c_outbound_pending and c2c_outbound_oldest_pending_age_seconds from the store (as
    /metrics reads them at each scrape), c2c_outbound_delivery_seconds at the ACK."""
    for partner in down.config.partners:
        assert sample(down, "c2c_outbound_pending", partner) == 0.0
        assert sample(down, "c2c_outbound_oldest_pending_age_seconds", partner) == 0.0
        assert sample(down, "c2c_outbound_delivery_seconds_count", partner) == 0.0
    record = await down.submit()
    for _ in range(3):
        assert (await down.step(record.message_id)).state is OutboundState.QUEUED
    down.clock.advance(timedelta(seconds=90))
    waited = (down.clock.now() - record.created_at).total_seconds()
    assert waited > 90
    down.metrics.show_backlog(await down.store.outbox_backlog(), down.clock.now())
    assert sample(down, "c2c_outbound_pending") == 1.0
    assert sample(down, "c2c_outbound_oldest_pending_age_seconds") == waited
    assert sample(down, "c2c_outbound_pending", "CA-CBSA") == 0.0

    await down.stub.start(down.port)
    acked = await down.step(record.message_id)
    assert acked.state is OutboundState.ACKNOWLEDGED
    delivered = (down.clock.now() - record.created_at).total_seconds()
    assert sample(down, "c2c_outbound_delivery_seconds_count") == 1.0
    assert sample(down, "c2c_outbound_delivery_seconds_sum") == delivered
    down.metrics.show_backlog(await down.store.outbox_backlog(), down.clock.now())
    assert sample(down, "c2c_outbound_pending") == 0.0
    assert sample(down, "c2c_outbound_oldest_pending_age_seconds") == 0.0
