"""Store URLs: which backend, and where. One parser for the config loader and ``open_store``.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: the rest of the URL is the
file's path, taken literally, so a query or fragment is refused rather than becoming part of
a file name. ``postgresql://user@host[:port][,host2...]/database[?param=value...]``: a host and
a database are required, or libpq's defaults would pick a database named after the OS user
and the gateway would create its schema there.

Reasons never repeat the URL: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

from gateway.urls import NO_HOST, UrlInvalid, port_number, split_server_url

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
EXPECTED = "a sqlite:/// or postgresql:// URL"


class InvalidStoreUrl(ValueError):
    """The store URL is malformed; the message says why without repeating the URL."""


@dataclass(frozen=True, kw_only=True)
class SqliteUrl:
    #: the database file as written: relative to the working directory unless absolute
    path: str


@dataclass(frozen=True, kw_only=True)
class PostgresUrl:
    #: the URL itself, handed to the driver unchanged
    dsn: str


def _sqlite(url: str) -> SqliteUrl:
    path = url.removeprefix(SQLITE_PREFIX)
    if not path or path == ":memory:":
        raise InvalidStoreUrl(
            "store URL sqlite:/// needs a file path (sqlite:///relative.db or "
            "sqlite:////absolute.db); an in-memory database is not durable"
        )
    if "?" in path or "#" in path:
        raise InvalidStoreUrl(
            "a sqlite:/// URL takes no query or fragment ('?', '#'): its path is the"
            " database file's name, and SQLite options are not read from it"
        )
    return SqliteUrl(path=path)


def _query(text: str) -> dict[str, list[str]]:
    if not text:
        return {}
    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidStoreUrl(
            "not a valid URL: the query must be name=value pairs joined by '&'"
        ) from None


def _postgres(url: str) -> PostgresUrl:
    try:
        server = split_server_url(url, schemes=POSTGRES_SCHEMES, what=EXPECTED, several_hosts=True)
    except UrlInvalid as exc:
        raise InvalidStoreUrl(exc.reason) from None
    query = _query(server.parts.query)
    # the driver reads ?port=5432[,5433] only when the hosts carry none: checked all the same
    for ports in query.get("port", []):
        for port in ports.split(","):
            try:
                port_number(port)
            except UrlInvalid as exc:
                raise InvalidStoreUrl(exc.reason) from None
    database = unquote(server.parts.path.removeprefix("/"))
    named = [name for key in ("dbname", "database") for name in query.get(key, [])]
    if not database.strip() and not any(name.strip() for name in named):
        raise InvalidStoreUrl(
            "the URL names no database (e.g. postgresql://user@host:5432/c2c); without one the"
            " server's default, named after the user, would get the gateway's tables"
        )
    if not server.addresses and not any(query.get("host", [])):
        raise InvalidStoreUrl(
            f"{NO_HOST} (a Unix socket's folder goes percent-encoded in its place,"
            " e.g. postgresql://%2Frun%2Fpostgresql/c2c)"
        )
    return PostgresUrl(dsn=url)


def parse_store_url(url: str) -> SqliteUrl | PostgresUrl:
    """Which store ``url`` names; ``InvalidStoreUrl`` with the reason when it is malformed."""
    if url.startswith(SQLITE_PREFIX):
        return _sqlite(url)
    if url.startswith("sqlite:"):
        raise InvalidStoreUrl(
            "a sqlite URL has three slashes: sqlite:///relative.db or sqlite:////absolute.db"
        )
    scheme = url.split(":", 1)[0] if ":" in url else url
    if scheme.lower() not in POSTGRES_SCHEMES:
        raise InvalidStoreUrl(f"unsupported store URL scheme {scheme[:20]!r}: expected {EXPECTED}")
    return _postgres(url)


__all__ = ["InvalidStoreUrl", "PostgresUrl", "SqliteUrl", "parse_store_url"]
