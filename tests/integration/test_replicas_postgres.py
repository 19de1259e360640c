"""Two ``c2c-gateway serve`` replicas of US-CBP on one PostgreSQL database drain one outbox of
500 queued messages to an MX-ANAM partner over mutual TLS. The partner counts, per message
id, sends that start while another send of the same id is still in flight: there must be
none, every message ends acknowledged with its receipt, and both replicas did part of it."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiohttp import web
from outbound_env import free_port, gateway_config
from partner_stub import PartnerStub
from serve_proc import ServeProcess, edit_toml

from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.outbound.submission import Submission, SubmissionServices, submit
from gateway.runtime import load_own_signing_keys
from gateway.schemas.registry import SchemaRegistry
from gateway.store import open_store

pytestmark = pytest.mark.postgres

MESSAGES = 500
OUTBOX = """
[outbox]
poll_interval_s = 0.05
send_timeout_s = 10.0
"""


@dataclass
class CountingPartner(PartnerStub):
    """ACKs every message after holding it ``hold_s``, so overlapping sends of one id show."""

    hold_s: float = 0.05
    in_flight: Counter[str] = field(default_factory=Counter)
    sends: Counter[str] = field(default_factory=Counter)
    concurrent_doubles: list[str] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        message_id = str(orjson.loads(await request.read())["header"]["message_id"])
        if self.in_flight[message_id]:
            self.concurrent_doubles.append(message_id)
        self.in_flight[message_id] += 1
        self.sends[message_id] += 1
        try:
            await asyncio.sleep(self.hold_s)
            return await super()._handle(request)
        finally:
            self.in_flight[message_id] -= 1


async def queue_messages(config: GatewayConfig, count: int) -> set[str]:
    """The real submission path (validate, sign, store) straight into the shared outbox."""
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    registry = SchemaRegistry.load_builtin()
    services = SubmissionServices(
        config=config,
        registry=registry,
        signing_keys=load_own_signing_keys(config),
        store=store,
        clock=SystemClock(),
    )
    submission = Submission(
        recipient="MX-ANAM",
        message_type="shipment.status",
        payload=registry.examples("shipment.status", "1.0")[0],
        actor="replica-test",
    )
    try:
        records = await asyncio.gather(*(submit(services, submission) for _ in range(count)))
    finally:
        await store.close()
    return {record.message_id for record in records}


def acknowledged_by(replica: ServeProcess) -> set[str]:
    """Message ids this replica's dispatcher logged as acknowledged."""
    acked = set()
    for line in replica.stderr_log.splitlines():
        if not line.startswith(b"{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "outbound_attempt" and entry.get("result") == "acknowledged":
            acked.add(entry["message_id"])
    return acked


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def outbox_states(dsn: str) -> dict[str, int]:
    rows = await fetch(dsn, "SELECT state, count(*) AS n FROM outbound_messages GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


async def test_two_replicas_drain_one_outbox_without_concurrent_double_sends(
    tmp_path: Path, pg_dsn: str
) -> None:
    mx_port = free_port()
    us = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{mx_port}"})
    edit_toml(us.source, 'store_url = "sqlite:///c2c.db"', f'store_url = "{pg_dsn}"')
    with us.source.open("a", encoding="utf-8") as handle:
        handle.write(OUTBOX)
    # the second replica: same party, keys and database; its own (ephemeral) ports
    second = us.source.with_name("gateway-b.toml")
    second.write_text(us.source.read_text(encoding="utf-8"), encoding="utf-8")
    ids = await queue_messages(load_config(us.source), MESSAGES)
    assert await outbox_states(pg_dsn) == {"queued": MESSAGES}

    partner = CountingPartner(pki=tmp_path / "pki")
    await partner.start(mx_port)
    replicas = [ServeProcess(us.source), ServeProcess(second)]
    try:
        await asyncio.gather(*(replica.start() for replica in replicas))
        assert replicas[0].partner_url != replicas[1].partner_url
        async with asyncio.timeout(60):
            for _ in range(600):
                if (states := await outbox_states(pg_dsn)) == {"acknowledged": MESSAGES}:
                    break
                await asyncio.sleep(0.1)
    finally:
        codes = [await replica.stop() for replica in replicas]
        await partner.stop()
    assert codes == [0, 0]
    assert states == {"acknowledged": MESSAGES}
    assert partner.concurrent_doubles == []
    unreceipted = "SELECT count(*) AS n FROM outbound_messages WHERE receipt_body IS NULL"
    assert (await fetch(pg_dsn, unreceipted))[0]["n"] == 0
    assert set(partner.sends) == ids
    shares = [acknowledged_by(replica) for replica in replicas]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == ids
    print(
        f"\nsplit: replica A acknowledged {len(shares[0])}, replica B {len(shares[1])};"
        f" sends {sum(partner.sends.values())} for {MESSAGES} messages"
    )
    assert all(len(share) >= MESSAGES // 10 for share in shares), [len(s) for s in shares]
