from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pgdb
import pytest
from outbound_env import Running, gateway_config, start_gateway
from own_broker import OwnBroker
from rabbit import RabbitVhost, create_vhost, delete_vhost
from tcp_proxy import TcpProxy

from gateway.clock import ManualClock
from gateway.store import Store, open_store


@pytest.fixture
def rabbit_vhost() -> Iterator[RabbitVhost]:
    """A fresh RabbitMQ vhost (the guest user has full rights on it), deleted afterwards."""
    vhost = create_vhost()
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    """A RabbitMQ node of this test's own (for a full restart or a resource alarm)."""
    broker = OwnBroker(tmp_path / "rabbitmq")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test run (on the local server), dropped at the end."""
    name = pgdb.create_database()
    try:
        yield name
    finally:
        pgdb.drop_database(name)


@pytest.fixture
async def pg_dsn(pg_database: str) -> AsyncIterator[str]:
    """A DSN whose search_path is a fresh schema, dropped after the test."""
    schema = await pgdb.create_schema(pg_database)
    try:
        yield pgdb.dsn(pg_database, schema=schema)
    finally:
        await pgdb.drop_schema(pg_database, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL for each backend: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    database: str = request.getfixturevalue("pg_database")
    schema = await pgdb.create_schema(database)
    try:
        yield pgdb.dsn(database, schema=schema)
    finally:
        await pgdb.drop_schema(database, schema)


@pytest.fixture
def store_clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))


@pytest.fixture
async def store(store_url: str, store_clock: ManualClock) -> AsyncIterator[Store]:
    """An open store on each backend (SQLite and PostgreSQL), closed after the test."""
    opened = open_store(store_url, clock=store_clock)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def us(tmp_path: Path) -> AsyncIterator[Running]:
    """US-CBP with its internal API; MX-ANAM's URL is a closed port, so messages stay queued."""
    running = await start_gateway(
        gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    )
    try:
        yield running
    finally:
        await running.gateway.stop()


@pytest.fixture
async def proxied(pg_dsn: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """PostgreSQL through a TCP proxy the test can make silent or cut (a network fault)."""
    proxy = TcpProxy(pgdb.PORT, pgdb.HOST)
    await proxy.start()
    try:
        yield proxy, pg_dsn.replace(f":{pgdb.PORT}/", f":{proxy.port}/", 1)
    finally:
        await proxy.cut()
