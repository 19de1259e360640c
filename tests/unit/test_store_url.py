from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.store import InvalidStoreUrl, open_store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore

CLOCK = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))


def test_sqlite_relative_and_absolute_paths() -> None:
    relative = open_store("sqlite:///var/c2c.db", clock=CLOCK)
    absolute = open_store("sqlite:////var/c2c.db", clock=CLOCK)
    assert isinstance(relative, SqliteStore)
    assert isinstance(absolute, SqliteStore)
    assert relative.path == Path("var/c2c.db")
    assert absolute.path == Path("/var/c2c.db")


def test_postgres_url() -> None:
    assert isinstance(open_store("postgresql://u@db/c2c", clock=CLOCK), PostgresStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x/y", "unsupported store URL scheme 'mysql'"),
        ("sqlite:///", "needs a file path"),
        ("sqlite:///:memory:", "in-memory database is not durable"),
        ("c2c.db", "unsupported store URL scheme 'c2c.db'"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidStoreUrl, match=message):
        open_store(url, clock=CLOCK)
