"""Body retention runs by itself in a started gateway: old bodies go, digests, metadata,
receipts and the audit log stay; bodies still needed (not yet relayed, still being sent) stay."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from pathlib import Path

from outbound_env import gateway_config
from test_store import T0, event, inbound, outbound

from gateway.audit.events import EventKind
from gateway.clock import ManualClock
from gateway.config import RetentionConfig
from gateway.runtime import Gateway
from gateway.store import open_store
from gateway.store.base import AttemptUpdate, AuditFilter, OutboundState

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
