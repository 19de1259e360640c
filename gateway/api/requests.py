"""Reading the internal API's JSON bodies and query strings, with exact refusals."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.envelope import (
    TimestampError,
    TimestampOutOfRange,
    parse_json_strict,
    parse_rfc3339,
    parse_rfc3339_bound,
)
from gateway.errors import Malformed, TooLarge

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_TEXT = 200


async def read_body(request: web.Request, *, max_bytes: int) -> bytes:
    """The whole body, however many reads it takes to arrive; TooLarge past ``max_bytes``
    (from its Content-Length, before reading it, when it says so). Sent as it is: a
    Content-Encoding is refused, as on the partner endpoint."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise Malformed(
            f"Content-Encoding {encoding[:32]!r} is not accepted: send the JSON as it is"
        )
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise TooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: web.Request, *, max_bytes: int) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Malformed(f"Content-Type must be application/json, not {request.content_type!r}")
    body = await read_body(request, max_bytes=max_bytes)
    document = parse_json_strict(body, max_bytes=max_bytes)
    if not isinstance(document, dict):
        raise Malformed("the request body must be a JSON object")
    return document


class Fields:
    """Typed access to a JSON object's members; unknown members are refused."""

    def __init__(self, document: Mapping[str, Any], *, allowed: frozenset[str]) -> None:
        unknown = sorted(set(document) - allowed)
        if unknown:
            names = ", ".join(name[:40] for name in unknown[:5])
            raise Malformed(f"unknown member(s): {names}; allowed: {', '.join(sorted(allowed))}")
        self._doc = document

    def text(self, name: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
        value = self._doc.get(name)
        if value is None:
            if required:
                raise Malformed(f"{name} is required")
            return None
        if not isinstance(value, str) or not value or len(value) > limit:
            raise Malformed(f"{name} must be a non-empty string of at most {limit} characters")
        return value

    def required_text(self, name: str, *, limit: int = MAX_TEXT) -> str:
        value = self.text(name, required=True, limit=limit)
        assert value is not None
        return value

    def uuid(self, name: str) -> str | None:
        value = self.text(name, limit=36)
        if value is not None and not UUID_RE.fullmatch(value):
            raise Malformed(f"{name} must be a lowercase UUID")
        return value

    def obj(self, name: str) -> dict[str, Any]:
        value = self._doc.get(name)
        if not isinstance(value, dict):
            raise Malformed(f"{name} is required and must be a JSON object")
        return value

    def integer(self, name: str, *, low: int, high: int) -> int | None:
        value = self._doc.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Malformed(f"{name} must be an integer from {low} to {high}")
        return value

    def decimal(self, name: str, *, low: int, high: int = 2**62) -> int | None:
        """An integer written in ASCII decimal digits (a query parameter's): ``str.isdigit``
        alone also takes superscripts, which ``int`` refuses, and other scripts' digits."""
        text = self.text(name, limit=20)
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise Malformed(f"{name} must be an integer from {low} to {high}")
        return int(text)

    def number(self, name: str, *, low: float, high: float) -> float | None:
        value = self._doc.get(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise Malformed(f"{name} must be a number from {low} to {high}")
        return float(value)

    def timestamp(self, name: str, *, utc: bool = True, bound: bool = False) -> datetime | None:
        """An RFC 3339 time, as an aware UTC datetime. With ``utc`` (the query parameters'
        "RFC 3339 UTC") only a UTC offset is taken; without it (``respond_by``: PROTOCOL.md
        section 2 "RFC 3339", OpenAPI ``date-time``) any offset, converted to UTC. A ``bound``
        on audit entries' millisecond times is rounded up to the millisecond
        (``parse_rfc3339_bound``, UTC)."""
        value = self._doc.get(name)
        if value is None:
            return None
        try:
            return parse_rfc3339_bound(value) if bound else parse_rfc3339(value, utc=utc)
        except TimestampOutOfRange as exc:
            raise Malformed(f"{name} {exc}: {str(value)[:40]!r}") from None
        except TimestampError:
            kind = "an RFC 3339 UTC timestamp" if utc else "an RFC 3339 timestamp"
            raise Malformed(f"{name} must be {kind}") from None

    def choice(self, name: str, options: frozenset[str]) -> str | None:
        value = self._doc.get(name)
        if value is None:
            return None
        if value not in options:
            raise Malformed(f"{name} must be one of {', '.join(sorted(options))}")
        assert isinstance(value, str)
        return value


def path_uuid(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not UUID_RE.fullmatch(value):
        raise Malformed(f"{name} must be a lowercase UUID")
    return value


def query_fields(
    request: web.Request, allowed: frozenset[str], *, repeatable: frozenset[str] = frozenset()
) -> Fields:
    """The request's query parameters as ``Fields``: an unknown or repeated one is refused.
    Those ``repeatable`` are allowed too, and left out: ``query_uuids`` reads them."""
    query = request.query
    unknown = sorted(set(query) - allowed - repeatable)
    if unknown:
        raise Malformed(
            f"unknown query parameter(s): {', '.join(n[:40] for n in unknown[:5])};"
            f" allowed: {', '.join(sorted(allowed | repeatable))}"
        )
    for name in allowed:
        if len(query.getall(name, [])) > 1:
            raise Malformed(f"query parameter {name} given more than once")
    return Fields({k: v for k, v in query.items() if k in allowed}, allowed=allowed)


def query_uuids(request: web.Request, name: str, *, most: int) -> list[str]:
    """Every value of the repeatable query parameter ``name`` (``?name=A&name=B``), each a
    lowercase UUID, at most ``most`` of them."""
    values = request.query.getall(name, [])
    if len(values) > most:
        raise Malformed(f"query parameter {name} given {len(values)} times; at most {most}")
    for value in values:
        if not UUID_RE.fullmatch(value):
            raise Malformed(f"{name} must be a lowercase UUID, not {value[:40]!r}")
    return values
