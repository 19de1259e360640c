"""T71: a step of the wall clock is noticed against the monotonic clock, counted, logged and
audited; a step back moves back what the clock before it had scheduled.

Real SQLite store; a ManualClock whose wall time is stepped while monotonic time is not.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.devenv import prepare_dev_environment
from gateway.model import Priority
from gateway.runtime import Gateway
from gateway.store.base import AttemptUpdate, AuditFilter, OutboundRecord, OutboundState

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(load_config(prepare_dev_environment(tmp_path)), clock=ManualClock(NOW))
    await gw.store.open()
    await gw.clock_watch.start()
    try:
        yield gw
    finally:
        await gw.clock_watch.stop()
        await gw.store.close()


def clock_of(gateway: Gateway) -> ManualClock:
    assert isinstance(gateway.clock, ManualClock)
    return gateway.clock


async def clock_entries(gateway: Gateway) -> list[dict[str, str]]:
    rows = await gateway.store.audit_entries(AuditFilter(event="operator_action"))
    return [json.loads(row.entry) for row in rows]


def steps(gateway: Gateway, direction: str) -> float | None:
    return gateway.metrics.registry.get_sample_value(
        "c2c_clock_steps_total", {"direction": direction}
    )


async def retry_scheduled(gateway: Gateway, *, in_s: float) -> OutboundRecord:
    """An outbound message that failed once and is due again ``in_s`` seconds from now."""
    now = clock_of(gateway).now()
    body = b'{"out": 1}'
    record = OutboundRecord(
        message_id="7f1c2a4e-0000-4000-8000-000000000001",
        recipient="MX-ANAM",
        message_type="shipment.advance_data",
        schema_version="1.0",
        correlation_id=None,
        in_reply_to=None,
        priority=Priority.ROUTINE,
        body=body,
        body_digest="sha-256:x",
        signature="eyJhbGciOiJFZERTQSJ9..b3V0",
        kid="kid-1",
        transport="https",
        created_at=now,
        expires_at=None,
        next_attempt_at=now,
        updated_at=now,
        submitted_by="svc-test",
    )
    await gateway.store.enqueue_outbound(record, [])
    await gateway.store.claim_outbound("w1", now, 1, 30)
    return await gateway.store.finish_attempt(
        record.message_id,
        "w1",
        AttemptUpdate(
            state=OutboundState.SENT,
            attempts=1,
            next_attempt_at=now + dt.timedelta(seconds=in_s),
            last_error="HTTP 503",
        ),
        [],
    )


async def test_time_passing_is_no_step(gateway: Gateway) -> None:
    clock = clock_of(gateway)
    clock.advance(dt.timedelta(minutes=10))
    assert await gateway.clock_watch.check() is None
    clock.step(dt.timedelta(milliseconds=900))
    assert await gateway.clock_watch.check() is None
    assert steps(gateway, "forward") == 0.0  # exported at 0 from start, for the alert
    assert await gateway.store.audit_size() == 0


async def test_a_step_back_moves_the_retries_scheduled_before_it(gateway: Gateway) -> None:
    clock = clock_of(gateway)
    # the clock runs an hour ahead (RELIABILITY-SECURITY T71: +1 h, then -1 h) while a retry
    # is scheduled; then it is set right
    clock.step(HOUR)
    assert await gateway.clock_watch.check() == pytest.approx(3600.0)
    retry = await retry_scheduled(gateway, in_s=5)
    clock.step(-HOUR)
    with structlog.testing.capture_logs() as logs:
        assert await gateway.clock_watch.check() == pytest.approx(-3600.0)
    assert steps(gateway, "back") == 1.0
    # due 5 s after the step by the clock set right, not an hour and 5 s
    due = await gateway.store.claim_outbound("w2", clock.now() + dt.timedelta(seconds=5), 1, 30)
    assert [r.message_id for r in due] == [retry.message_id]
    ahead, back = await clock_entries(gateway)
    assert (back["outcome"], back["actor"]) == ("clock_stepped", "watch:clock")
    assert back["reason"] == (
        "the wall clock stepped back 3600.000 s (monotonic time did not); "
        "1 outbound schedules and 0 leases moved back with it"
    )
    assert ahead["reason"] == "the wall clock stepped forward 3600.000 s (monotonic time did not)"
    assert [(e["event"], e["log_level"], e["step_s"]) for e in logs] == [
        ("clock_stepped", "warning", -3600.0)
    ]


async def test_a_step_forward_is_counted_and_audited_and_moves_nothing(gateway: Gateway) -> None:
    clock = clock_of(gateway)
    retry = await retry_scheduled(gateway, in_s=5)
    clock.step(HOUR)
    assert await gateway.clock_watch.check() == pytest.approx(3600.0)
    assert steps(gateway, "forward") == 1.0
    assert (await gateway.store.get_outbound(retry.message_id)).next_attempt_at == (
        retry.next_attempt_at
    )
    (entry,) = await clock_entries(gateway)
    assert (entry["outcome"], entry["actor"]) == ("clock_stepped", "watch:clock")
    assert entry["reason"] == "the wall clock stepped forward 3600.000 s (monotonic time did not)"
    # a single step is reported once
    clock.advance(dt.timedelta(seconds=1))
    assert await gateway.clock_watch.check() is None
