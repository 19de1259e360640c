"""Filings stored before the store kept versions of a document still list after an upgrade.

Migration ``documents`` (SQLite 0004, PostgreSQL 0006) added ``document_ref``, ``created_at``
and ``message_function`` to the inbox; rows written before it have them NULL. Opening the
store fills them from each row's stored body, as the gateway does at receipt, so the original
filing of a document amended after the upgrade is still listed, in its place, before the
amendment. Each test runs on SQLite and on the local PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog.testing

from gateway.clock import ManualClock
from gateway.documents import FILL_ROWS
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.store import Store, open_store
from gateway.store.base import InboundRecord
from gateway.store.migrations import Dialect, Migration, load_migrations

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SENDER = "MX-ANAM"
TYPE = "shipment.advance_data"
REF = "EXP-UPG-1"

#: the inbox columns the gateway wrote before migration ``documents``
OLD_COLUMNS = (
    "sender, message_id, recipient, message_type, schema_version, body, body_digest, "
    "signature, kid, transport, received_at, receipt_body, receipt_signature"
)


def filing(function: str, created_at: datetime, *, message_type: str = TYPE) -> tuple[str, bytes]:
    """A version of document REF as its sender signed it: (message_id, wire bytes)."""
    message_id = new_message_id()
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version="1.0",
        sender=SENDER,
        recipient="US-CBP",
        created_at=created_at,
    )
    payload = {"advance_data_ref": REF, "message_function": function}
    return message_id, encode_envelope(header, payload)


def old_row(message_id: str, body: bytes | None) -> list[Any]:
    """An inbox row as the gateway wrote it before migration ``documents``."""
    digest = "sha-256:" + hashlib.sha256(body or message_id.encode()).hexdigest()
    try:
        message_type = json.loads(body or b"")["header"]["message_type"]
    except ValueError:
        message_type = TYPE
    return [
        SENDER,
        message_id,
        "US-CBP",
        message_type,
        "1.0",
        body,
        digest,
        "sig",
        "kid-1",
        "https",
    ]


def before_documents(dialect: Dialect) -> list[Migration]:
    migrations = load_migrations(dialect)
    version = next(m.version for m in migrations if m.name == "documents")
    return [m for m in migrations if m.version < version]


async def make_old_store(store_url: str) -> None:
    """The store as a gateway of before migration ``documents`` left it: its migrations
    applied and recorded, as its open() did."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            for m in before_documents("sqlite"):
                db.executescript(m.sql)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (m.version, m.name))
        return
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for m in before_documents("postgres"):
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
    finally:
        await conn.close()


async def insert_old_rows(store_url: str, rows: list[tuple[str, bytes | None, datetime]]) -> None:
    """INSERT as the old gateway did (its column list, in seq order); a body of None stands
    for one retention purged."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            for message_id, body, at in rows:
                at_us = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
                db.execute(
                    f"INSERT INTO inbound_messages ({OLD_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                    (*old_row(message_id, body), at_us, b"{}", "rsig"),
                )
        return
    conn = await asyncpg.connect(store_url)
    try:
        for message_id, body, at in rows:
            await conn.execute(
                f"INSERT INTO inbound_messages ({OLD_COLUMNS}) "
                f"VALUES ({', '.join(f'${n}' for n in range(1, 14))})",
                *old_row(message_id, body),
                at,
                b"{}",
                "rsig",
            )
    finally:
        await conn.close()


async def columns_of(store_url: str, message_id: str) -> tuple[Any, ...]:
    sql = (
        "SELECT document_ref, created_at IS NOT NULL, message_function FROM inbound_messages "
        "WHERE message_id = "
    )
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            row = db.execute(sql + "?", (message_id,)).fetchone()
            return (row[0], bool(row[1]), row[2])
    conn = await asyncpg.connect(store_url)
    try:
        record = await conn.fetchrow(sql + "$1", message_id)
        assert record is not None
        return tuple(record)
    finally:
        await conn.close()


def amendment(message_id: str, body: bytes, created_at: datetime) -> InboundRecord:
    """The amendment as today's gateway stores it (document columns from the receipt)."""
    return InboundRecord(
        sender=SENDER,
        message_id=message_id,
        recipient="US-CBP",
        message_type=TYPE,
        schema_version="1.0",
        correlation_id=None,
        in_reply_to=None,
        body=body,
        body_digest="sha-256:" + hashlib.sha256(body).hexdigest(),
        signature="sig",
        kid="kid-1",
        transport="https",
        received_at=created_at + timedelta(seconds=1),
        receipt_body=b"{}",
        receipt_signature="rsig",
        document_ref=REF,
        created_at=created_at,
        message_function="4",
    )


async def versions(store: Store) -> list[tuple[str, str | None]]:
    listed = await store.document_versions(SENDER, TYPE, REF, limit=10 * FILL_ROWS)
    return [(v.message_id, v.message_function) for v in listed]


async def test_a_filing_stored_before_the_upgrade_is_listed_before_its_amendment(
    store_url: str,
) -> None:
    await make_old_store(store_url)
    original_id, original = filing("9", T0)
    change_id, change = filing("5", T0 + timedelta(seconds=30))  # also before the upgrade
    other_id, other = filing("9", T0, message_type="shipment.status")  # a type without versions
    purged_id, garbled_id = new_message_id(), new_message_id()
    await insert_old_rows(
        store_url,
        [
            (change_id, change, T0 + timedelta(seconds=31)),  # arrived first
            (original_id, original, T0 + timedelta(seconds=32)),
            (other_id, other, T0 + timedelta(seconds=33)),
            (purged_id, None, T0 + timedelta(seconds=34)),  # body purged by retention
            (garbled_id, b"old", T0 + timedelta(seconds=35)),  # not an envelope
        ],
    )

    store = open_store(store_url, clock=ManualClock(T0))
    with structlog.testing.capture_logs() as logs:
        await store.open()  # applies the pending migrations, fills the old rows' columns
    try:
        said = {e["event"]: e.get("rows") for e in logs}
        assert said["inbound_document_columns_filled"] == 3
        assert said["inbound_bodies_unreadable"] == 1
        garbled = await store.get_inbound(SENDER, garbled_id)
        assert garbled is not None
        assert garbled.body == b"old"  # kept as it was, in no document
        assert (garbled.document_ref, garbled.created_at, garbled.message_function) == (
            None,
            None,
            None,
        )
        new_id, new = filing("4", T0 + timedelta(minutes=5))
        stored = await store.store_inbound(amendment(new_id, new, T0 + timedelta(minutes=5)), [])
        assert stored.status == "stored"
        # in created_at order, whatever the order of arrival; the amendment after the upgrade
        # is current, the original filing is not lost
        assert await versions(store) == [(original_id, "9"), (change_id, "5"), (new_id, "4")]
        kept = await store.get_inbound(SENDER, original_id)
        assert kept is not None
        assert (kept.document_ref, kept.created_at, kept.message_function) == (REF, T0, "9")
        assert kept.document_version is not None
    finally:
        await store.close()
    # a type without versions gets its created_at, and no document
    assert await columns_of(store_url, other_id) == (None, True, "9")
    # a row whose body retention purged has nothing to read them from: left as it was
    assert await columns_of(store_url, purged_id) == (None, False, None)


async def test_the_fill_is_idempotent_and_safe_for_replicas_opening_at_once(store_url: str) -> None:
    """Several processes open the old store at once (replicas of one PostgreSQL store, a CLI
    beside ``serve`` on SQLite): each opens, every row is filled once and alike; a row an older
    gateway wrote after the upgrade (a rolling upgrade) is filled at the next open."""
    await make_old_store(store_url)
    # more than one batch (gateway/documents.py: FILL_ROWS)
    rows = [
        filing("9" if i % 2 else "4", T0 + timedelta(seconds=i)) for i in range(2 * FILL_ROWS + 9)
    ]
    await insert_old_rows(store_url, [(mid, body, T0) for mid, body in rows])

    clock = ManualClock(T0)
    stores = [open_store(store_url, clock=clock) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        expected = [(mid, "9" if i % 2 else "4") for i, (mid, _) in enumerate(rows)]
        for store in stores:
            assert await versions(store) == expected
    finally:
        for store in stores:
            await store.close()

    late_id, late = filing("5", T0 + timedelta(hours=1))
    await insert_old_rows(store_url, [(late_id, late, T0 + timedelta(hours=1))])
    again = open_store(store_url, clock=clock)
    await again.open()
    try:
        assert await versions(again) == [*expected, (late_id, "5")]
    finally:
        await again.close()
