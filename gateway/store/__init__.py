"""Durable store: inbox, outbox, audit log. ``open_store(url, clock=...)`` picks the backend.

URLs (gateway/store/url.py): ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
``postgresql://user@host/database``. The returned store is not yet open: call
``await store.open()`` (connects, migrates).
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from gateway.store.base import Store
from gateway.store.url import InvalidStoreUrl, SqliteUrl, parse_store_url


def open_store(url: str, *, clock: Clock, timeout_s: float = 30.0) -> Store:
    """``timeout_s``: PostgreSQL's connect and command timeout, past which an operation fails
    ``Unavailable`` as an outage, and the bounds of its sessions' ``lock_timeout`` (3/4 of
    it) and ``idle_in_transaction_session_timeout`` (1/2). ``InvalidStoreUrl`` when the URL
    is malformed."""
    parsed = parse_store_url(url)
    if isinstance(parsed, SqliteUrl):
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(Path(parsed.path), clock=clock)
    from gateway.store.postgres import PostgresStore

    return PostgresStore(parsed.dsn, clock=clock, command_timeout_s=timeout_s)


__all__ = ["InvalidStoreUrl", "Store", "open_store"]
