"""Body retention runs by itself in a started gateway: old bodies go, digests, metadata,
receipts and the audit log stay; bodies still needed (not yet relayed, still being sent) stay."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import structlog
from outbound_env import gateway_config
from test_store import T0, event, inbound, outbound

from gateway.audit.events import EventKind
from gateway.clock import ManualClock
from gateway.config import RetentionConfig
from gateway.errors import Unavailable
from gateway.retention import RetentionService
from gateway.runtime import Gateway
from gateway.store import open_store
from gateway.store.base import AttemptUpdate, AuditFilter, OutboundState
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore

NOW = T0 + timedelta(days=40)


async def test_started_gateway_purges_old_bodies_and_keeps_the_record(tmp_path: Path) -> None:
    config = dataclasses.replace(
        gateway_config(tmp_path, "US-CBP"),
        retention=RetentionConfig(body_retention_days=30),
    )
    clock = ManualClock(NOW)
    seed = open_store(config.store_url, clock=clock)
    await seed.open()
    old, recent = inbound("in-old", at=T0), inbound("in-recent", at=NOW - timedelta(days=1))
    for record in (old, recent):
        await seed.store_inbound(record, [event(EventKind.ACCEPTED, record.message_id)])
    await seed.mark_relayed([old.key, recent.key], [event(EventKind.DELIVERED, "in-old")])
    await seed.enqueue_outbound(outbound("out-done"), [event(EventKind.SUBMITTED, "out-done")])
    await seed.enqueue_outbound(
        outbound("out-busy", recipient="CA-CBSA"), [event(EventKind.SUBMITTED, "out-busy")]
    )
    await seed.claim_outbound("w", NOW, 10, 60)
    await seed.finish_attempt(
        "out-done",
        "w",
        AttemptUpdate(
            state=OutboundState.ACKNOWLEDGED,
            attempts=1,
            next_attempt_at=NOW,
            receipt_body=b"their receipt",
            receipt_signature="sig",
        ),
        [event(EventKind.ACKNOWLEDGED, "out-done")],
    )
    # still being delivered (sent, retrying in a day): its body is needed whatever its age
    await seed.finish_attempt(
        "out-busy",
        "w",
        AttemptUpdate(state=OutboundState.SENT, attempts=1, next_attempt_at=NOW + timedelta(1)),
        [],
    )
    audit_before = await seed.audit_entries(AuditFilter(), limit=100)
    await seed.close()

    gateway = Gateway(config, clock=clock)
    assert gateway.retention is not None
    await gateway.start()
    try:
        store = gateway.store
        # the first purge runs as the gateway starts, without anyone asking for it
        for _ in range(500):
            purged_in = await store.get_inbound(old.sender, old.message_id)
            assert purged_in is not None
            if purged_in.body is None:
                break
            await asyncio.sleep(0.02)
        assert purged_in is not None
        assert purged_in == dataclasses.replace(old, body=None, seq=purged_in.seq, relayed=True)
        kept_in = await store.get_inbound(recent.sender, recent.message_id)
        assert kept_in is not None
        assert kept_in.body == recent.body
        done = await store.get_outbound("out-done")
        assert done is not None
        assert done.body is None
        assert (done.body_digest, done.receipt_body) == (
            outbound("out-done").body_digest,
            b"their receipt",
        )
        busy = await store.get_outbound("out-busy")
        assert busy is not None
        assert busy.body == outbound("out-busy").body
        assert await store.audit_entries(AuditFilter(), limit=100) == audit_before
        assert await gateway.retention.purge_once() == 0
    finally:
        await gateway.stop()


async def test_an_unexpected_purge_failure_is_logged_and_retried(tmp_path: Path) -> None:
    """A bug in the purge (here a cutoff before year 1: the injected clock stands at the
    earliest date) is logged each round with its traceback; the task neither dies unseen nor
    makes its stop fail."""
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    await store.open()
    early = ManualClock(datetime(1, 1, 2, tzinfo=UTC))
    service = RetentionService(store=store, clock=early, retention_days=30, interval_s=0.01)
    try:
        with structlog.testing.capture_logs() as logs:
            await service.start()
            for _ in range(500):
                if len([e for e in logs if e["event"] == "retention_purge_failed"]) >= 2:
                    break
                await asyncio.sleep(0.01)
            await service.stop()
    finally:
        await store.close()
    failures = [e for e in logs if e["event"] == "retention_purge_failed"]
    assert len(failures) >= 2
    assert failures[0]["log_level"] == "error"
    assert failures[0]["error"] == "OverflowError"
    assert failures[0]["exc_info"] is True


class _Recorded:
    def __init__(self, stopped: list[str], name: str, *, fails: bool = False) -> None:
        self._stopped, self._name, self._fails = stopped, name, fails

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._stopped.append(self._name)
        if self._fails:
            raise RuntimeError(f"{self._name} failed to stop")


async def test_gateway_stop_goes_on_past_a_service_whose_stop_raises(tmp_path: Path) -> None:
    """One service's fault (a stand-in: no real service fails to stop once the purge above
    cannot) must not leave the services started before it, the bus and the store open."""
    gateway = Gateway(gateway_config(tmp_path, "US-CBP"), clock=ManualClock(NOW))
    stopped: list[str] = []
    gateway.add_service(_Recorded(stopped, "first"))
    gateway.add_service(_Recorded(stopped, "broken", fails=True))
    await gateway.start()
    with structlog.testing.capture_logs() as logs:
        await gateway.stop()
    assert stopped == ["broken", "first"]
    with pytest.raises(Unavailable, match="not open"):
        await gateway.store.ping()
    events = [e["event"] for e in logs]
    assert "service_stop_failed" in events
    assert events[-1] == "gateway_stopped"
    [failed] = [e for e in logs if e["event"] == "service_stop_failed"]
    assert (failed["service"], failed["log_level"]) == ("_Recorded", "error")


# every tenth row not yet relayed, every tenth recent: those keep their bodies; one in a
# thousand has a body of 1 MiB
_SEED_INBOUND = """
INSERT INTO inbound_messages (sender, message_id, recipient, message_type, schema_version,
    body, body_digest, signature, kid, transport, received_at, receipt_body,
    receipt_signature, relayed)
SELECT 'MX-SAT', 'in-' || g, 'US-CBP', 'shipment.status', '1.0',
    CASE WHEN g % 1000 = 7 THEN convert_to(repeat('x', 1048576), 'UTF8')
    ELSE convert_to(repeat(md5(g::text), 16), 'UTF8') END, 'd', 's', 'k', 'https',
    CASE WHEN g % 10 = 1 THEN $1::timestamptz ELSE $2::timestamptz END, ''::bytea, 'r',
    g % 10 <> 0
FROM generate_series(1, 66666) AS g
"""
# finished and old (purged), still queued, or finished but recent (kept)
_SEED_OUTBOUND = """
INSERT INTO outbound_messages (message_id, recipient, message_type, schema_version, priority,
    priority_rank, body, body_digest, signature, kid, transport, created_at, state, attempts,
    next_attempt_at, updated_at)
SELECT 'out-' || g, 'MX-SAT', 'shipment.status', '1.0', 'routine', 1,
    convert_to(md5(g::text), 'UTF8'), 'd', 's', 'k', 'https',
    CASE WHEN g % 7 = 1 THEN $1::timestamptz ELSE $2::timestamptz END,
    (ARRAY['acknowledged', 'rejected', 'dead', 'queued'])[g % 4 + 1], 1, $2, $2
FROM generate_series(1, 2500) AS g
"""
# bodies left: all, and those the purge must keep
_BODIES_LEFT = """
SELECT (SELECT count(*) FROM inbound_messages WHERE body IS NOT NULL),
    (SELECT count(*) FROM inbound_messages WHERE body IS NOT NULL
        AND (NOT relayed OR received_at >= $1)),
    (SELECT count(*) FROM outbound_messages WHERE body IS NOT NULL),
    (SELECT count(*) FROM outbound_messages WHERE body IS NOT NULL
        AND (state = 'queued' OR created_at >= $1))
"""


@pytest.mark.postgres
async def test_a_large_purge_on_postgresql_goes_in_short_steps_beside_other_writes(
    pg_dsn: str,
) -> None:
    """53 000 old bodies (one statement for them all takes longer than the store timeout),
    some of 1 MiB: the purge drops them a few at a time, each step its own short transaction
    that leaves the audit head alone, so it completes within a short store timeout while
    another replica's writes go on unhindered; it keeps what SQLite's keeps."""
    timeout_s = 0.5
    cutoff = NOW - timedelta(days=30)
    purger = PostgresStore(pg_dsn, clock=ManualClock(NOW), command_timeout_s=timeout_s)
    writer = PostgresStore(pg_dsn, clock=ManualClock(NOW), command_timeout_s=timeout_s)
    await purger.open()
    await writer.open()
    seed = await asyncpg.connect(pg_dsn)
    try:
        await seed.execute(_SEED_INBOUND, NOW - timedelta(days=1), T0)
        await seed.execute(_SEED_OUTBOUND, NOW - timedelta(days=1), T0)
        left = tuple(await seed.fetchrow(_BODIES_LEFT, cutoff))
        due_in, due_out = left[0] - left[1], left[2] - left[3]
        assert (due_in, due_out) == (53333, 1606)

        loop = asyncio.get_running_loop()
        waits: list[float] = []
        purging = asyncio.create_task(purger.purge_bodies(cutoff))
        try:
            while not purging.done():
                started = loop.time()
                await writer.append_audit([event(EventKind.SUBMITTED, f"w-{len(waits)}")])
                waits.append(loop.time() - started)
        finally:
            await asyncio.gather(purging, return_exceptions=True)
        assert purging.result() == due_in + due_out
        print(f"{len(waits)} writes during the purge, the slowest {max(waits):.3f} s")
        assert len(waits) > 10
        assert max(waits) < timeout_s

        assert tuple(await seed.fetchrow(_BODIES_LEFT, cutoff)) == (
            left[1],
            left[1],
            left[3],
            left[3],
        )
        assert await purger.purge_bodies(cutoff) == 0
    finally:
        await seed.close()
        await writer.close()
        await purger.close()
