"""Durable store: inbox, outbox, audit log. ``open_store(url, clock=...)`` picks the backend.

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``postgresql://...``.
The returned store is not yet open: call ``await store.open()`` (connects, migrates).
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from gateway.store.base import Store


class InvalidStoreUrl(ValueError):
    pass


def open_store(url: str, *, clock: Clock, timeout_s: float = 30.0) -> Store:
    """``timeout_s``: PostgreSQL's connect and command timeout; past it an operation fails
    ``Unavailable`` as an outage."""
    if url.startswith("sqlite:///"):
        from gateway.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite:///")
        if not path or path == ":memory:":
            raise InvalidStoreUrl(
                "store URL sqlite:/// needs a file path (sqlite:///relative.db or "
                "sqlite:////absolute.db); an in-memory database is not durable"
            )
        return SqliteStore(Path(path), clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.store.postgres import PostgresStore

        return PostgresStore(url, clock=clock, command_timeout_s=timeout_s)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise InvalidStoreUrl(
        f"unsupported store URL scheme {scheme!r}: use sqlite:///path.db or postgresql://..."
    )


__all__ = ["InvalidStoreUrl", "Store", "open_store"]
