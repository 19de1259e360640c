"""Strict envelope parsing (PROTOCOL.md section 2).

The body is checked in this order: size (before anything is decoded), encoding (UTF-8, no
BOM), JSON syntax with the protocol's extra rules (no duplicate member names, no
NaN/Infinity, nesting at most 32, numbers within IEEE-754 double range, no lone surrogates),
then the envelope's shape and every header field. Everything refused raises a GatewayError.

JSON is first parsed by orjson and a few cheap checks confirm that the strict parser would
return the same value; whenever that cannot be shown (orjson refuses, duplicates, deep
nesting, big integers, surrogate escapes), the strict parser decides, so every refusal and
its reason come from one place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.clock import format_rfc3339
from gateway.errors import Malformed, Stale, TooLarge, UnsupportedType
from gateway.model import Envelope, Header, Priority, is_party_id

MAX_DEPTH = 32
MAX_LEGAL_BASIS = 256
_BOM = b"\xef\xbb\xbf"
# RFC 9562 section 4: hex digits are case insensitive on input. Ids are kept lowercase (the
# form the RFC says to output), so one message has one id whatever case its sender wrote.
_MESSAGE_ID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[47][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE
)
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# RFC 3339 section 5.6 date-time: ASCII digits only, "T" and "Z" in either case (its note to
# the ABNF), any number of fraction digits, a numeric offset or Z.
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_VERSION_RE = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}$")
# A surrogate escape (\uD800-\uDFFF) may form a valid pair; only then is the decoded text checked.
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
# PROTOCOL.md section 2 names the optional members; every other one is required, expires_at
# included (a message without one would never expire). A required member may not be null.
_HEADER_REQUIRED = (
    "message_id",
    "message_type",
    "schema_version",
    "sender",
    "recipient",
    "created_at",
    "expires_at",
)
_HEADER_OPTIONAL = (
    "correlation_id",
    "in_reply_to",
    "priority",
    "respond_by",
    "legal_basis",
)
_HEADER_FIELDS = frozenset(_HEADER_REQUIRED + _HEADER_OPTIONAL)
_PRIORITIES = {p.value: p for p in Priority}
# In orjson's 2-space indented output, what starts an element nested deeper than MAX_DEPTH.
_DEEP_INDENT = b"\n" + b" " * (2 * MAX_DEPTH)
#: a nonzero digit (in a number's mantissa)
_NONZERO_DIGIT_RE = re.compile(r"[1-9]")
#: what a number below the smallest double (4.9e-324) needs, see _may_underflow
_ZEROS = b"0" * 300
_DIGIT_OR_POINT = frozenset(b"0123456789.")
# The digits of a valid JSON number end at whitespace, ",", "]", "}" or the end: a letter,
# digit or "-" after three digits is a UUID's "...0e-890a..." or "...7e-4567-...", not one.
_LONG_EXPONENT = re.compile(rb"0*[1-9][0-9]{2,}(?![0-9A-Za-z-])")
# Longest decimal integer that can still be within double range (DBL_MAX has 309 digits).
_MAX_INT_DIGITS = 309


def _refused(reason: str, detail: str | None = None) -> Malformed:
    """MALFORMED telling the sender what is wrong: ``detail`` names the member and the rule
    and never a value of theirs (``reason``, for the audit log, may quote one); ``reason``
    itself where it quotes none. "Not a well-formed envelope" alone left a partner guessing
    which of a dozen rules its message broke."""
    return Malformed(reason, detail=reason if detail is None else detail)


def _reject_constant(name: str) -> Any:
    raise _refused(f"JSON literal {name} is not allowed")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _refused(
            f"number {text[:40]} is outside IEEE-754 double range",
            "a number is outside IEEE-754 double range",
        )
    if value == 0.0 and _NONZERO_DIGIT_RE.search(text.partition("e")[0].partition("E")[0]):
        # below the smallest subnormal: the reader would see 0 where the signed bytes do not
        raise _refused(
            f"number {text[:40]} is outside IEEE-754 double range (underflow)",
            "a number is outside IEEE-754 double range (underflow: it would read as 0)",
        )
    return value


def _parse_int(text: str) -> int:
    digits = len(text) - (1 if text.startswith("-") else 0)
    if digits > _MAX_INT_DIGITS:
        raise _refused(f"integer with {digits} digits is outside IEEE-754 double range")
    value = int(text)
    if digits == _MAX_INT_DIGITS:
        try:
            float(value)
        except OverflowError as exc:  # int to float never gives inf, it raises instead
            raise _refused("integer is outside IEEE-754 double range") from exc
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _refused(
                    f"duplicate member name {key[:64]!r}", "an object has a duplicate member name"
                )
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_float=_parse_float,
    parse_int=_parse_int,
    parse_constant=_reject_constant,
    strict=True,
)


def _check_depth_and_text(document: Any, *, check_surrogates: bool) -> None:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_DEPTH:
                raise _refused(f"nesting deeper than {MAX_DEPTH}")
            for key, value in node.items():
                if check_surrogates:
                    _check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_DEPTH:
                raise _refused(f"nesting deeper than {MAX_DEPTH}")
            stack.extend((value, depth + 1) for value in node)
        elif check_surrogates and isinstance(node, str):
            _check_text(node)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _refused("string contains a lone UTF-16 surrogate escape") from exc


def parse_json_strict(body: bytes, *, max_bytes: int) -> Any:
    """Parse ``body`` as strict UTF-8 JSON or raise TooLarge/Malformed."""
    if len(body) > max_bytes:
        raise TooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    if body.startswith(_BOM):
        raise _refused("body starts with a UTF-8 byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refused(f"body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        document = orjson.loads(body)
        indented = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _parse_json_text_strict(text, body)
    if _same_as_strict(body, indented):
        return document
    return _parse_json_text_strict(text, body)


def _same_as_strict(body: bytes, indented: bytes) -> bool:
    """Whether orjson's value for ``body`` (re-encoded as ``indented``) is the strict value.

    orjson itself refuses what the strict parser refuses except for three things it lets
    through, which are checked here conservatively (a false "no" only costs the slow path):

    - duplicate member names (orjson keeps the last one): every member has exactly one ``:``
      outside strings in ``body`` and in ``indented``, and the strings hold the same colons
      (orjson never escapes one; a body that might, with a ``\\u003.`` escape, takes the
      strict path), so fewer colons in ``indented`` means a member was dropped;
    - nesting: in ``indented`` the elements of a container at depth d start on a line
      indented by 2*d spaces, so a container deeper than MAX_DEPTH starts after a newline and
      2*MAX_DEPTH spaces (raw newlines never occur inside encoded strings);
    - integers beyond 64 bits, which orjson turns into floats: those are at least 9.2e18 and
      are encoded in exponent form ``e+NN``;
    - numbers below the smallest double, which orjson reads as 0: the body holds a negative
      exponent of three digits or a run of 300 zeros (a false "no" is again only slower).

    orjson refuses lone surrogate escapes too; bodies with any surrogate escape still take the
    strict path so that this never depends on it.
    """
    if b"\\" in body and (b"\\u003" in body or _SURROGATE_ESCAPE_RE.search(body) is not None):
        return False
    return (
        body.count(b":") == indented.count(b":")
        and _DEEP_INDENT not in indented
        and (b"+" not in indented or b"e+" not in indented)  # "+" is rare, "e" is not
        and not _may_underflow(body)
    )


def _may_underflow(body: bytes) -> bool:
    """Whether ``body`` may hold a number below the smallest double (4.9e-324): a negative
    exponent of three digits or more after a digit or a point, ending where a number ends, or
    a run of 300 zeros. Substring searches and anchored matches only: a regex search over the
    body costs ~10 us."""
    if _ZEROS in body:
        return True
    for marker in (b"e-", b"E-"):
        at = body.find(marker)
        while at != -1:
            if at > 0 and body[at - 1] in _DIGIT_OR_POINT and _LONG_EXPONENT.match(body, at + 2):
                return True
            at = body.find(marker, at + 2)
    return False


def _parse_json_text_strict(text: str, body: bytes) -> Any:
    """The strict parser: stdlib json with hooks for every rule, then a walk for the rest."""
    try:
        document = _DECODER.decode(text)
    except Malformed:
        raise
    except RecursionError as exc:
        raise _refused(f"nesting deeper than {MAX_DEPTH}") from exc
    except ValueError as exc:  # json.JSONDecodeError and int() digit-limit errors
        raise _refused(f"invalid JSON: {str(exc)[:120]}") from exc
    _check_depth_and_text(document, check_surrogates=_SURROGATE_ESCAPE_RE.search(body) is not None)
    return document


class TimestampError(ValueError):
    """Why a value is not an RFC 3339 timestamp the gateway can use. Its text names no field
    or value (``"is not a valid date/time"``): each caller says which input it was."""


class TimestampOutOfRange(TimestampError):
    """An RFC 3339 timestamp whose instant is outside the years 0001 to 9999 UTC: the leap
    second after the last second of 9999, or an offset that takes a time across either end."""


#: the text of TimestampOutOfRange
OUT_OF_RANGE = "is out of range (years 0001 to 9999 UTC)"


def parse_rfc3339(value: object, *, utc: bool = True) -> datetime:
    """Parse an RFC 3339 date-time into an aware UTC datetime, or raise TimestampError.

    With ``utc`` (PROTOCOL.md's "RFC 3339 UTC") the offset must be ``Z``, ``+00:00`` or
    ``-00:00`` (section 4.3: UTC, local offset unknown); otherwise any offset is converted.
    Fractions beyond microseconds are truncated; a leap second (``23:59:60`` UTC) is read as
    the instant after ``23:59:59``, since Python's datetime has no second 60. The one parser
    of RFC 3339 times: envelope headers, payload date-times (the cross-field rules), the
    internal API's parameters and the CLI's options.
    """
    kind = "an RFC 3339 UTC timestamp" if utc else "an RFC 3339 timestamp"
    if not isinstance(value, str):
        raise TimestampError(f"must be {kind} string")
    match = _RFC3339_RE.fullmatch(value)
    if match is None:
        raise TimestampError(f"is not {kind}")
    zulu = match.group(8) is None
    if match.group(4) < "24" and (zulu or (not utc and match.group(10) < "60")):
        # "Z" (nearly every header time) or, where any offset is taken, a numeric offset (the
        # payloads' local times): the C parser reads what the pattern let through as
        # _from_fields does, 30 times faster. What it refuses (a leap second, 30 February,
        # year 0, a lowercase "z", an offset of 24 hours, a time an offset takes out of the
        # years 1-9999) _from_fields reads or names, as it does hour 24 (which newer Pythons
        # read as the next midnight) and offset minutes of 60 or more (which the C parser
        # carries into the hours).
        try:
            moment = datetime.fromisoformat(value)
            return moment if zulu else moment.astimezone(UTC)
        except (ValueError, OverflowError):
            pass
    return _from_fields(match, utc=utc, kind=kind)


def _from_fields(match: re.Match[str], *, utc: bool, kind: str) -> datetime:
    """:func:`parse_rfc3339` of a value its pattern matched, read field by field."""
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = 0 if sign is None else int(off_h) * 60 + int(off_m)
    if utc and offset != 0:
        raise TimestampError(f"is not {kind}")
    micros = int((fraction[1:] + "000000")[:6]) if fraction else 0
    leap = second == "60"
    try:
        if off_h is not None and (int(off_h) > 23 or int(off_m) > 59):
            raise ValueError("offset out of range")
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            59 if leap else int(second),
            micros,
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise TimestampError("is not a valid date/time") from exc
    try:
        at = local - timedelta(minutes=-offset if sign == "-" else offset)
        if leap:
            if (at.hour, at.minute) != (23, 59):
                raise TimestampError("has a leap second away from 23:59 UTC")
            at += timedelta(seconds=1)
    except OverflowError as exc:
        raise TimestampOutOfRange(OUT_OF_RANGE) from exc
    return at


def parse_rfc3339_bound(value: object) -> datetime:
    """:func:`parse_rfc3339` (UTC) of a ``since``/``until`` bound on millisecond times (audit
    entries): rounded up to the next millisecond when it has sub-millisecond digits, any of
    them (those beyond the microseconds a datetime keeps too), so "at or after since" and
    "before until" hold for the times the entries show. TimestampError as the parser."""
    moment = parse_rfc3339(value)
    assert isinstance(value, str)  # parse_rfc3339 took it
    fraction = _FRACTION_DIGITS.match(value.partition(".")[2])
    if fraction is None or not fraction.group()[3:].strip("0"):
        return moment
    floor = moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)
    try:
        return floor + timedelta(milliseconds=1)
    except OverflowError as exc:
        raise TimestampOutOfRange(OUT_OF_RANGE) from exc


_FRACTION_DIGITS = re.compile(r"[0-9]*")


def parse_timestamp(value: object, field: str, *, utc: bool = True) -> datetime:
    """:func:`parse_rfc3339` of the header member ``field``; Malformed naming it otherwise."""
    try:
        return parse_rfc3339(value, utc=utc)
    except TimestampError as exc:
        shown = f": {value[:40]!r}" if isinstance(value, str) else ""
        raise _refused(f"header.{field} {exc}{shown}", f"header.{field} {exc}") from exc


def _uuid(header: Mapping[str, Any], field: str, pattern: re.Pattern[str]) -> str | None:
    value = header.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        kind = "a UUID v4 or v7" if pattern is _MESSAGE_ID_RE else "a UUID"
        raise _refused(f"header.{field} must be {kind} (8-4-4-4-12 hex digits)")
    return value.lower()


def _party(header: Mapping[str, Any], field: str) -> str:
    value = header[field]
    if not is_party_id(value):
        raise _refused(f"header.{field} is not a party id (CC-AGENCY)")
    return str(value)


def parse_header(
    raw: object,
    *,
    is_known_type: Callable[[str, str], bool] | None = None,
    expires_at_required: bool = True,
) -> Header:
    """See :func:`parse_envelope`."""
    if not isinstance(raw, dict):
        raise _refused("header must be a JSON object")
    if not raw.keys() <= _HEADER_FIELDS:
        unknown = sorted(set(raw) - _HEADER_FIELDS)
        raise _refused(
            f"header has unknown member {unknown[0][:64]!r}",
            "header has a member PROTOCOL section 2 does not define",
        )
    for field in _HEADER_REQUIRED:
        if raw.get(field) is None and (expires_at_required or field != "expires_at"):
            raise _refused(f"header.{field} is required")
    message_id = _uuid(raw, "message_id", _MESSAGE_ID_RE)
    assert message_id is not None
    message_type = raw["message_type"]
    schema_version = raw["schema_version"]
    if not isinstance(message_type, str):
        raise _refused("header.message_type must be a string")
    if not isinstance(schema_version, str):
        raise _refused("header.schema_version must be a string")
    # PROTOCOL section 2: any other pair, whatever its spelling, is an unknown one
    if (
        _TYPE_RE.fullmatch(message_type) is None
        or _VERSION_RE.fullmatch(schema_version) is None
        or (is_known_type is not None and not is_known_type(message_type, schema_version))
    ):
        raise UnsupportedType(
            f"unknown message_type/schema_version {message_type[:64]}/{schema_version[:16]}"
        )
    priority_raw = raw.get("priority", Priority.ROUTINE.value)
    if priority_raw is None:
        priority_raw = Priority.ROUTINE.value
    priority = _PRIORITIES.get(priority_raw) if isinstance(priority_raw, str) else None
    if priority is None:
        raise _refused("header.priority must be 'routine' or 'urgent'")
    legal_basis = raw.get("legal_basis")
    if legal_basis is not None and (
        not isinstance(legal_basis, str) or not 0 < len(legal_basis) <= MAX_LEGAL_BASIS
    ):
        raise _refused(f"header.legal_basis must be a string of 1-{MAX_LEGAL_BASIS} characters")
    expires_raw = raw.get("expires_at")
    respond_raw = raw.get("respond_by")
    return Header(
        message_id=message_id,
        message_type=message_type,
        schema_version=schema_version,
        sender=_party(raw, "sender"),
        recipient=_party(raw, "recipient"),
        created_at=parse_timestamp(raw["created_at"], "created_at"),
        expires_at=None if expires_raw is None else parse_timestamp(expires_raw, "expires_at"),
        correlation_id=_uuid(raw, "correlation_id", _UUID_RE),
        in_reply_to=_uuid(raw, "in_reply_to", _UUID_RE),
        priority=priority,
        respond_by=(
            None if respond_raw is None else parse_timestamp(respond_raw, "respond_by", utc=False)
        ),
        legal_basis=legal_basis,
    )


def parse_envelope(
    body: bytes,
    *,
    max_bytes: int,
    is_known_type: Callable[[str, str], bool] | None = None,
    expires_at_required: bool = True,
) -> Envelope:
    """Parse and check a canonical envelope; raises TooLarge, Malformed or UnsupportedType.

    ``expires_at_required=False`` is only for re-reading bodies stored before ``expires_at``
    was required (a message without one was accepted then, and its header's ``expires_at``
    is None); a message or receipt arriving is always parsed with it required.
    """
    document = parse_json_strict(body, max_bytes=max_bytes)
    if not isinstance(document, dict):
        raise _refused("envelope must be a JSON object")
    if len(document) != 2 or "header" not in document or "payload" not in document:
        extra = sorted(set(document) - {"header", "payload"})
        if extra:
            raise _refused(
                f"envelope has unknown member {extra[0][:64]!r}",
                "envelope has a member other than header and payload",
            )
        missing = sorted({"header", "payload"} - set(document))
        raise _refused(f"envelope lacks member {missing[0]!r}")
    header = parse_header(
        document["header"],
        is_known_type=is_known_type,
        expires_at_required=expires_at_required,
    )
    payload = document["payload"]
    if not isinstance(payload, dict):
        raise _refused("payload must be a JSON object")
    return Envelope(header=header, payload=payload)


def check_freshness(
    header: Header, *, now: datetime, replay_window_s: float, max_skew_s: float
) -> None:
    """Refuse a message outside the replay window, from the future, or expired (STALE)."""
    age = now - header.created_at
    if age > timedelta(seconds=replay_window_s):
        raise Stale(
            f"created_at {format_rfc3339(header.created_at)} is {age.total_seconds():.0f}s old,"
            f" beyond the replay window of {replay_window_s:.0f}s"
        )
    if -age > timedelta(seconds=max_skew_s):
        raise Stale(
            f"created_at {format_rfc3339(header.created_at)} is"
            f" {-age.total_seconds():.0f}s in the future, beyond the allowed skew of"
            f" {max_skew_s:.0f}s"
        )
    if header.expires_at is not None and header.expires_at <= now:
        raise Stale(f"expires_at {format_rfc3339(header.expires_at)} has passed")


def header_to_json(header: Header) -> dict[str, Any]:
    """The wire form of a header; optional members that are unset are left out."""
    out: dict[str, Any] = {
        "message_id": header.message_id,
        "message_type": header.message_type,
        "schema_version": header.schema_version,
        "sender": header.sender,
        "recipient": header.recipient,
        "created_at": format_rfc3339(header.created_at),
    }
    if header.expires_at is not None:
        out["expires_at"] = format_rfc3339(header.expires_at)
    out["correlation_id"] = header.correlation_id
    out["in_reply_to"] = header.in_reply_to
    if header.priority is not Priority.ROUTINE:
        out["priority"] = header.priority.value
    if header.respond_by is not None:
        out["respond_by"] = format_rfc3339(header.respond_by)
    if header.legal_basis is not None:
        out["legal_basis"] = header.legal_basis
    return out


def encode_envelope(header: Header, payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON bytes of an envelope, ready to be signed as they are."""
    return orjson.dumps({"header": header_to_json(header), "payload": payload})


def body_digest(body: bytes) -> str:
    """``sha-256:<base64url>`` of the exact bytes (PROTOCOL.md section 4, ref_digest)."""
    digest = hashlib.sha256(body).digest()
    return "sha-256:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_message_id() -> str:
    """A fresh UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
