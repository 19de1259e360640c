"""Messages already final when the store is upgraded are not published as outcomes.

Migration ``outbound_outcomes`` (SQLite 0006, PostgreSQL 0008) added the outcomes to publish on
``c2c.outcomes``. A store upgraded with a history of acknowledged, rejected and dead messages
must not flood the bus with all of them: they have no outcome to publish; only a later final
state of theirs (after an operator's retry) is published. Each test runs on SQLite and on the
local PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.clock import ManualClock
from gateway.store import open_store
from gateway.store.base import AttemptUpdate, OutboundState
from gateway.store.migrations import Dialect, Migration, load_migrations

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
#: the NOT NULL outbox columns of the gateway before migration ``outbound_outcomes``
OLD_COLUMNS = (
    "message_id, recipient, message_type, schema_version, priority, priority_rank, body, "
    "body_digest, signature, kid, transport, created_at, state, attempts, next_attempt_at, "
    "updated_at"
)
FINAL = {"o-ack": "acknowledged", "o-rej": "rejected", "o-dead": "dead", "o-closed": "closed"}


def before_outcomes(dialect: Dialect) -> list[Migration]:
    migrations = load_migrations(dialect)
    version = next(m.version for m in migrations if m.name == "outbound_outcomes")
    return [m for m in migrations if m.version < version]


def old_row(message_id: str, state: str) -> list[object]:
    return [
        message_id,
        "MX-ANAM",
        "shipment.status",
        "1.0",
        "routine",
        1,
        b"{}",
        "sha-256:x",
        "sig",
        "kid-1",
        "https",
        T0,
        state,
        1,
        T0,
        T0,
    ]


async def make_old_store(store_url: str) -> None:
    """The store as a gateway of before migration ``outbound_outcomes`` left it, with a
    history of final messages."""
    rows = [old_row(message_id, state) for message_id, state in FINAL.items()]
    marks = ", ".join(f"${i}" for i in range(1, 17))
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            for m in before_outcomes("sqlite"):
                db.executescript(m.sql)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (m.version, m.name))
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            for row in rows:
                values = [
                    (v - epoch) // timedelta(microseconds=1) if isinstance(v, datetime) else v
                    for v in row
                ]
                db.execute(
                    f"INSERT INTO outbound_messages ({OLD_COLUMNS}) VALUES ({', '.join('?' * 16)})",
                    values,
                )
        return
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for m in before_outcomes("postgres"):
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
        await conn.executemany(
            f"INSERT INTO outbound_messages ({OLD_COLUMNS}) VALUES ({marks})", rows
        )
    finally:
        await conn.close()


async def test_messages_final_before_the_upgrade_are_not_published(store_url: str) -> None:
    await make_old_store(store_url)
    store = open_store(store_url, clock=ManualClock(T0))
    await store.open()
    try:
        for message_id, state in FINAL.items():
            stored = await store.get_outbound(message_id)
            assert stored is not None
            assert stored.state.value == state
        assert await store.claim_outcomes("r1", T0 + timedelta(days=1), 100, 30) == []
        # a message retried after the upgrade has its new end published, as its first outcome
        later = T0 + timedelta(hours=1)
        await store.retry_outbound("o-dead", now=later, actor="cli:ops", events=[])
        (claimed,) = await store.claim_outbound("w1", later, 10, 30)
        update = AttemptUpdate(state=OutboundState.REJECTED, attempts=1, next_attempt_at=later)
        await store.finish_attempt(claimed.message_id, "w1", update, [])
        (outcome,) = await store.claim_outcomes("r1", later, 100, 30)
        assert (outcome.outcome_id, outcome.recipient) == ("o-dead/rejected/1", "MX-ANAM")
    finally:
        await store.close()
