"""Two real gateways over mutual TLS: a message queued through a partner outage longer than
the partner's replay window is refused as STALE, signed again, and accepted."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from outbound_env import (
    RETRYING_OUTBOX,
    free_port,
    gateway_config,
    row_until,
    start_gateway,
    submit_to,
)

from gateway.clock import ManualClock
from gateway.store.base import AuditFilter, OutboundState, Store

US, MX = "US-CBP", "MX-ANAM"


async def events(store: Store, message_id: str) -> list[dict[str, str]]:
    rows = await store.audit_entries(AuditFilter(message_id=message_id))
    return [json.loads(row.entry) for row in rows]


async def test_a_message_queued_past_the_partners_replay_window_is_delivered(
    tmp_path: Path,
) -> None:
    ports = {US: free_port(), MX: free_port()}
    url = {party: f"https://127.0.0.1:{port}" for party, port in ports.items()}
    us_config = gateway_config(
        tmp_path, US, peers={MX: url[MX]}, outbox=RETRYING_OUTBOX, partner_port=ports[US]
    )
    mx_config = gateway_config(tmp_path, MX, peers={US: url[US]}, partner_port=ports[MX])
    # US-CBP's clock starts 20 minutes back and is moved by hand: the message is signed then.
    clock = ManualClock(datetime.now(UTC) - timedelta(minutes=20))
    us = await start_gateway(us_config, clock=clock)
    try:
        record = await submit_to(us, MX)
        store = us.gateway.store
        # MX-ANAM is down: the attempt cannot connect, and the next waits on US-CBP's clock
        down = await row_until(store, record.message_id, lambda r: r.attempts >= 1)
        assert down.state is OutboundState.QUEUED
        mx = await start_gateway(mx_config)
        try:
            clock.advance(timedelta(minutes=20))  # 20 minutes later: MX-ANAM is back
            us.dispatcher.wake()
            done = await row_until(
                store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
            )
            stored = await mx.gateway.store.get_inbound(US, record.message_id)
            assert stored is not None
            # MX-ANAM stored the bytes signed again, once; the first copy it refused as STALE
            assert stored.body_digest == done.body_digest != record.body_digest
            assert stored.body == done.body
            theirs = await events(mx.gateway.store, record.message_id)
            assert [(e["event"], e["outcome"]) for e in theirs][:2] == [
                ("rejected", "STALE"),
                ("accepted", "ACK"),
            ]
            assert theirs[0]["body_digest"] == record.body_digest
            ours = [e["event"] for e in await events(store, record.message_id)]
            assert ours[-4:] == ["resigned", "sent", "receipt_received", "acknowledged"]
            assert ours.count("resigned") == 1
        finally:
            await mx.gateway.stop()
    finally:
        await us.gateway.stop()
