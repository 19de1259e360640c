"""The store of a ``c2c-gateway serve`` under test, read beside the process with plain SQL
(the crash and partition tests): SQLite's file, or a PostgreSQL schema of the test's own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pgdb
import pytest
from serve_proc import edit_toml


class Database:
    """Reads the gateway's store with plain SQL (the same on both backends), beside it."""

    def __init__(self, store_url: str, pg: tuple[str, str] | None = None) -> None:
        self.store_url = store_url
        #: PostgreSQL: the test run's database and this test's schema, dropped by ``drop``
        self._pg = pg

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self._pg is None:
            path = self.store_url.removeprefix("sqlite:///")
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
                return [tuple(row) for row in db.execute(sql).fetchall()]
        conn = await asyncpg.connect(self.store_url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def until(self, sql: str, expected: list[tuple[Any, ...]], timeout_s: float) -> None:
        """Wait until ``sql`` reads ``expected``."""
        async with asyncio.timeout(timeout_s):
            while True:
                if await self.rows(sql) == expected:
                    return
                await asyncio.sleep(0.05)

    async def assert_stored_once(self, sent: dict[str, bytes]) -> None:
        """Each message stored once with its bytes, with one ``accepted`` entry (none of a
        rolled-back write) and one or more ``delivered`` ones."""
        stored = await self.rows("SELECT message_id, body FROM inbound_messages")
        assert sorted(stored) == sorted(sent.items())
        events = await self.rows(
            "SELECT message_id, event FROM audit_entries WHERE event IN ('accepted', 'delivered')"
        )
        accepted = Counter(m for m, event in events if event == "accepted")
        assert accepted == Counter(list(sent)), "one accepted entry per message"
        assert {m for m, event in events if event == "delivered"} == set(sent)

    async def drop(self) -> None:
        if self._pg is not None:
            await pgdb.drop_schema(*self._pg)


async def use_store(source: Path, backend: str, request: pytest.FixtureRequest) -> Database:
    """SQLite (the file the configuration names) or a fresh PostgreSQL schema."""
    if backend == "sqlite":
        return Database(f"sqlite:///{source.parent / 'c2c.db'}")
    database: str = request.getfixturevalue("pg_database")
    schema = await pgdb.create_schema(database)
    dsn = pgdb.dsn(database, schema=schema)
    edit_toml(source, 'store_url = "sqlite:///c2c.db"', f'store_url = "{dsn}"')
    return Database(dsn, (database, schema))
