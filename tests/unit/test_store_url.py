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


def test_postgres_url_forms_the_driver_takes() -> None:
    for url in (
        "postgres://u@db/c2c",
        "postgresql://u:pw@[::1]:5432/c2c?search_path=s1&sslmode=disable",
        "postgresql://u@db1:5432,db2:5433/c2c?target_session_attrs=read-write",
        "postgresql://%2Frun%2Fpostgresql/c2c",
        "postgresql:///c2c?host=/run/postgresql",
        "postgresql://u@db/?dbname=c2c",
    ):
        assert isinstance(open_store(url, clock=CLOCK), PostgresStore), url


NO_DATABASE = (
    "the URL names no database (e.g. postgresql://user@host:5432/c2c); without one the"
    " server's default, named after the user, would get the gateway's tables"
)
BRACKETS = "not a valid URL: '[' and ']' must enclose an IPv6 address, e.g. [::1]"
PORT = "not a valid URL: the port must be a number from 1 to 65535"
SQLITE_QUERY = (
    "a sqlite:/// URL takes no query or fragment ('?', '#'): its path is the database file's"
    " name, and SQLite options are not read from it"
)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://gw:hunter2@[::1/c2c", BRACKETS),
        ("postgresql://gw:hunter2@[not-v6]/c2c", BRACKETS),
        ("postgresql://gw:hunter2@::1/c2c", BRACKETS),
        ("postgresql://gw:hunter2@127.0.0.1:abc/c2c", PORT),
        ("postgresql://gw:hunter2@127.0.0.1:99999/c2c", PORT),
        ("postgresql://gw:hunter2@127.0.0.1:0/c2c", PORT),
        ("postgresql://gw:hunter2@127.0.0.1:-1/c2c", PORT),
        ("postgresql://gw:hunter2@127.0.0.1:" + "5" * 5000 + "/c2c", PORT),
        ("postgresql://gw:hunter2@db1:5432,db2:x/c2c", PORT),
        ("postgresql://gw:hunter2@db/c2c?port=abc", PORT),
        # an unencoded '/' in the password: what follows it is no longer the host
        ("postgresql://gw:hun/ter2@db/c2c", PORT),
        (
            "postgresql://gw:hunt@er2@db/c2c",
            "not a valid URL: an '@' in the user or password must be written %40",
        ),
        (
            "postgresql://gw:hunter2@db/c2c?sslmode",
            "not a valid URL: the query must be name=value pairs",
        ),
        ("postgresql://gw:hunter2@db/c2c#primary", "not a valid URL: a server URL has no fragment"),
        ("postgresql://", NO_DATABASE),
        ("postgresql://gw:hunter2@127.0.0.1:5432", NO_DATABASE),
        ("postgresql://gw:hunter2@127.0.0.1:5432/", NO_DATABASE),
        ("postgresql://gw:hunter2@/c2c", "not a valid URL: it names no host (a Unix socket's"),
        ("sqlite:///var/c2c.db?mode=ro", SQLITE_QUERY),
        ("sqlite:///var/c2c.db#frag", SQLITE_QUERY),
        ("sqlite:////var/c2c.db?", SQLITE_QUERY),
        ("sqlite://var/c2c.db", "a sqlite URL has three slashes"),
    ],
)
def test_malformed_urls_are_refused_without_repeating_them(url: str, reason: str) -> None:
    with pytest.raises(InvalidStoreUrl) as caught:
        open_store(url, clock=CLOCK)
    assert str(caught.value).startswith(reason)
    assert "hunter2" not in str(caught.value)
    assert "ter2" not in str(caught.value)
