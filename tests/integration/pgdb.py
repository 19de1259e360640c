"""The real local PostgreSQL for integration tests: one database per test run, dropped afterwards.

Each test gets its own schema in that database (``search_path`` set in its DSN), so tests
never see each other's rows and need no per-test CREATE DATABASE.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import asyncpg

ADMIN_DSN = os.environ.get("C2C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
HOST = os.environ.get("C2C_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("C2C_TEST_PG_PORT", "5432"))
USER = os.environ.get("C2C_TEST_PG_USER", "postgres")


def dsn(database: str, *, schema: str | None = None, port: int = PORT) -> str:
    url = f"postgresql://{quote(USER)}@{HOST}:{port}/{database}"
    return url if schema is None else f"{url}?search_path={schema}"


async def _admin_async(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin(sql: str) -> None:
    # a thread of its own: the caller may already be inside a running event loop
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(_admin_async(sql))).result()


def create_database() -> str:
    name = f"c2c_test_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def create_schema(database: str) -> str:
    name = f"s_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn(database))
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    return name


async def drop_schema(database: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn(database))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
