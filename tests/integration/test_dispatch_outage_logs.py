"""What on-call reads in the log when a partner or the store is down (SRE drills):

- a partner's circuit breaker opening is one warning, ``outbound_breaker_open`` (the failures
  that opened it, the last error, when it is tried again), and its closing one line,
  ``outbound_breaker_closed`` (how long it was open): before, a partner down showed only as
  ``outbound_attempt`` lines at info, until ``outbound_dead`` at expiry, 24 h later;
- a message that expires behind the open breaker says so, and why the partner failed,
  where it said only "after 0 attempt(s)";
- a store outage is a warning at once, then at most one line a minute with the rounds failed
  since, and ``dispatcher_store_recovered`` at its end: before, a warning every round (twice a
  second) and no word of the end. ``c2c_dispatcher_failures_total`` still counts every round.

The partner is the mutual-TLS stub (first nothing listens, then it answers); the store is the
local PostgreSQL behind a TCP relay the test cuts and restores. Time is a ManualClock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from tcp_proxy import TcpProxy
from test_dispatch_faults import OUTBOX, Env, dispatcher_env

from gateway.clock import format_rfc3339
from gateway.metrics import Metrics
from gateway.outbound.breaker import BreakerState
from gateway.outbound.dispatcher import STORE_OUTAGE_LOG_EVERY_S
from gateway.store.base import OutboundRecord, OutboundState

MX = "MX-ANAM"


@pytest.fixture
async def down(tmp_path: Path) -> AsyncIterator[Env]:
    """US-CBP's dispatcher on SQLite, sending to MX-ANAM's stub, not started yet."""
    async with dispatcher_env(tmp_path, start=datetime.now(UTC)) as running:
        yield running


def lines(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == event]


async def attempt(env: Env, message_id: str) -> OutboundRecord:
    """Move the clock to the row's next attempt until one is made (a row the open breaker
    holds comes back at its next probe)."""
    before = (await env.row(message_id)).attempts
    for _ in range(5):
        row = await env.step(message_id)
        if row.attempts > before or row.state is not OutboundState.QUEUED:
            return row
    raise AssertionError(f"no attempt made for {message_id}")


async def test_a_partner_down_is_one_warning_when_its_breaker_opens_and_one_line_when_it_closes(
    down: Env,
) -> None:
    breaker = down.dispatcher.breakers.for_partner(MX)
    record = await down.submit()
    with structlog.testing.capture_logs() as logs:
        for _ in range(OUTBOX.breaker_failures):
            row = await attempt(down, record.message_id)
            opened_at, opened_mono = down.clock.now(), down.clock.monotonic()
    assert breaker.state is BreakerState.OPEN
    assert len(lines(logs, "outbound_attempt")) == OUTBOX.breaker_failures
    (line,) = lines(logs, "outbound_breaker_open")
    assert line["log_level"] == "warning"
    assert line["partner"] == MX
    assert line["failures"] == OUTBOX.breaker_failures
    assert line["last_error"] == row.last_error
    assert "connect" in line["last_error"]
    assert line["retry_in_s"] == OUTBOX.breaker_reset_s
    retry_at = opened_at + timedelta(seconds=OUTBOX.breaker_reset_s)
    assert line["retry_at"] == format_rfc3339(retry_at)
    assert lines(logs, "outbound_breaker_closed") == []

    # Held, then a probe that fails: open again, which is no news.
    with structlog.testing.capture_logs() as logs:
        probed = await attempt(down, record.message_id)
    assert probed.attempts == OUTBOX.breaker_failures + 1
    assert breaker.state is BreakerState.OPEN
    assert lines(logs, "outbound_attempt")
    assert lines(logs, "outbound_breaker_open") == []
    assert lines(logs, "outbound_breaker_closed") == []

    # The partner is back: the next probe's ACK closes it, said once.
    await down.stub.start(down.port)
    with structlog.testing.capture_logs() as logs:
        acked = await attempt(down, record.message_id)
    assert acked.state is OutboundState.ACKNOWLEDGED
    assert down.dispatcher.breaker_states()[MX] is BreakerState.CLOSED
    (line,) = lines(logs, "outbound_breaker_closed")
    assert line["log_level"] == "info"
    assert line["partner"] == MX
    assert line["opened_at"] == format_rfc3339(opened_at)
    assert line["open_s"] == round(down.clock.monotonic() - opened_mono, 1)
    assert line["open_s"] >= OUTBOX.breaker_reset_s * 2
    assert lines(logs, "outbound_breaker_open") == []

    # Down again: a second outage, a second warning.
    await down.stub.stop()
    again = await down.submit()
    with structlog.testing.capture_logs() as logs:
        for _ in range(OUTBOX.breaker_failures):
            await attempt(down, again.message_id)
    assert len(lines(logs, "outbound_breaker_open")) == 1


async def test_a_message_expiring_behind_an_open_breaker_says_so_and_why(down: Env) -> None:
    """It was never tried: its dead reason names the breaker and the partner's last failure,
    which its own last_error (none) cannot. With the breaker closed it reads as before."""
    alone = await down.submit(ttl_s=5)
    assert alone.expires_at is not None
    tried = await attempt(down, alone.message_id)
    down.clock.advance(alone.expires_at - down.clock.now())
    await down.dispatcher.run_once()
    assert down.dispatcher.breaker_states()[MX] is BreakerState.CLOSED
    assert (await down.row(alone.message_id)).last_error == (
        f"expired at {format_rfc3339(alone.expires_at)} after 1 attempt(s);"
        f" last error: {tried.last_error}"
    )

    tripping = failed = await down.submit(ttl_s=3600)
    while down.dispatcher.breaker_states()[MX] is not BreakerState.OPEN:
        failed = await attempt(down, tripping.message_id)
    opened_at = down.clock.now()
    record = await down.submit(ttl_s=5)
    assert record.expires_at is not None
    await down.dispatcher.run_once()
    assert (await down.row(record.message_id)).attempts == 0
    down.clock.advance(record.expires_at - down.clock.now())
    await down.dispatcher.run_once()
    dead = await down.row(record.message_id)
    assert dead.state is OutboundState.DEAD
    assert failed.last_error is not None
    assert "connect" in failed.last_error
    reason = (
        f"expired at {format_rfc3339(record.expires_at)} after 0 attempt(s);"
        f" partner circuit breaker open since {format_rfc3339(opened_at)},"
        f" after: {failed.last_error}"
    )
    assert dead.last_error == reason
    audited = json.loads((await down.events(record.message_id))[-1])
    assert (audited["event"], audited["reason"]) == ("dead", reason)


# --- the store ---------------------------------------------------------------------------


def failed_rounds(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "c2c_dispatcher_failures_total", {"reason": "store_unavailable"}
    )
    return value or 0.0


async def until(done: Callable[[], bool], within_s: float = 15.0) -> None:
    async with asyncio.timeout(within_s):
        while True:
            if done():
                return
            await asyncio.sleep(0.02)


async def wait_rounds(env: Env, more: int) -> None:
    """Until ``more`` rounds beyond those failed so far have failed."""
    target = failed_rounds(env.metrics) + more
    await until(lambda: failed_rounds(env.metrics) >= target)


@pytest.fixture
async def on_postgres(
    tmp_path: Path, proxied: tuple[TcpProxy, str]
) -> AsyncIterator[tuple[Env, TcpProxy]]:
    """US-CBP's dispatcher running (``run``), its store PostgreSQL through a relay."""
    proxy, dsn = proxied
    async with dispatcher_env(tmp_path, start=datetime.now(UTC), store_url=dsn, port=9) as env:
        task = asyncio.create_task(env.dispatcher.run())
        try:
            yield env, proxy
        finally:
            env.dispatcher.stop()
            await asyncio.wait_for(task, 10)


@pytest.mark.postgres
async def test_a_store_outage_is_a_warning_a_minute_and_a_line_when_it_ends(
    on_postgres: tuple[Env, TcpProxy],
) -> None:
    env, proxy = on_postgres
    await asyncio.sleep(0.2)  # rounds that succeed say nothing
    with structlog.testing.capture_logs() as logs:
        await proxy.cut()
        await wait_rounds(env, 10)
        (first,) = lines(logs, "dispatcher_store_unavailable")
        assert first["log_level"] == "warning"
        assert (first["failed_rounds"], first["down_s"]) == (1, 0.0)
        assert first["reason"]

        env.clock.advance(timedelta(seconds=STORE_OUTAGE_LOG_EVERY_S - 1))
        await wait_rounds(env, 5)
        assert len(lines(logs, "dispatcher_store_unavailable")) == 1
        before_second = failed_rounds(env.metrics)
        env.clock.advance(timedelta(seconds=1))
        await wait_rounds(env, 5)
        first, second = lines(logs, "dispatcher_store_unavailable")
        assert second["log_level"] == "warning"
        assert second["down_s"] == STORE_OUTAGE_LOG_EVERY_S
        # every round failed since the first line, the one that wrote this included
        assert second["failed_rounds"] == before_second
        assert lines(logs, "dispatcher_store_recovered") == []

        env.clock.advance(timedelta(seconds=5))
        await proxy.start()
        await until(lambda: bool(lines(logs, "dispatcher_store_recovered")))
        await asyncio.sleep(0.3)  # and nothing more once it answers
    (recovered,) = lines(logs, "dispatcher_store_recovered")
    assert recovered["log_level"] == "info"
    assert recovered["down_s"] == STORE_OUTAGE_LOG_EVERY_S + 5
    total = failed_rounds(env.metrics)
    assert recovered["failed_rounds_total"] == total
    assert len(lines(logs, "dispatcher_store_unavailable")) == 2


def claims_answered(env: Env) -> list[int]:
    """The store's answers to the dispatcher's claims from now on (rows claimed by each)."""
    answered: list[int] = []
    claim = env.store.claim_outbound

    async def observed(*args: Any, **kwargs: Any) -> list[OutboundRecord]:
        records = await claim(*args, **kwargs)
        answered.append(len(records))
        return records

    env.store.claim_outbound = observed  # type: ignore[method-assign]
    return answered


@pytest.mark.postgres
async def test_a_flapping_store_is_not_two_lines_a_blip(
    on_postgres: tuple[Env, TcpProxy],
) -> None:
    """Outages within a minute of the last line are counted into the next one, their ends
    not logged: else a store failing every other round floods the log as before."""
    env, proxy = on_postgres
    answered = claims_answered(env)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await proxy.cut()
            await wait_rounds(env, 3)
            answered.clear()
            await proxy.start()
            await until(lambda: bool(answered))  # a round succeeded: that outage is over
            env.clock.advance(timedelta(seconds=1))
        assert len(lines(logs, "dispatcher_store_unavailable")) == 1
        assert len(lines(logs, "dispatcher_store_recovered")) == 1
        blips = failed_rounds(env.metrics)
        # a minute after the last line, the next outage is news again, with the blips' rounds
        env.clock.advance(timedelta(seconds=STORE_OUTAGE_LOG_EVERY_S))
        await proxy.cut()
        await wait_rounds(env, 1)
        await proxy.start()
        await until(lambda: len(lines(logs, "dispatcher_store_recovered")) == 2)
    first, second = lines(logs, "dispatcher_store_unavailable")
    assert first["failed_rounds"] == 1
    # the rounds of the blips after the first line, and the one that wrote this
    assert (second["failed_rounds"], second["down_s"]) == (blips, 0.0)
