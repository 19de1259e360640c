"""The orjson fast path of parse_json_strict and the trimmed header checks decide exactly as
the strict reference implementation they replaced (kept here, unchanged, as the oracle):
same accept/refuse, same NACK code and reason, and on accept the same value down to the
types (int vs float, -0.0) and the member order."""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from gateway import envelope
from gateway.envelope import parse_envelope, parse_json_strict
from gateway.errors import GatewayError, Malformed, TooLarge, UnsupportedType
from gateway.model import Envelope, Header, Priority, is_party_id

LIMIT = 1 << 20

# ---------------------------------------------------------------------------------------------
# The reference: parse_json_strict, parse_timestamp, parse_header and parse_envelope as they
# were before the fast path (stdlib json with hooks for every rule, then a walk of the tree).

_REF_MAX_DEPTH = 32
_REF_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def _ref_reject_constant(name: str) -> Any:
    raise Malformed(f"JSON literal {name} is not allowed")


def _ref_parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Malformed(f"number {text[:40]} is outside IEEE-754 double range")
    # Fixed later in both paths: a nonzero number below the smallest double was read as 0.
    if value == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        raise Malformed(f"number {text[:40]} is outside IEEE-754 double range (underflow)")
    return value


def _ref_parse_int(text: str) -> int:
    digits = len(text) - (1 if text.startswith("-") else 0)
    if digits > 309:
        raise Malformed(f"integer with {digits} digits is outside IEEE-754 double range")
    value = int(text)
    if digits == 309:
        # Fixed along with the fast path: float() raised OverflowError here, not Malformed.
        try:
            float(value)
        except OverflowError as exc:
            raise Malformed("integer is outside IEEE-754 double range") from exc
    return value


def _ref_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Malformed(f"duplicate member name {key[:64]!r}")
            seen.add(key)
    return result


_REF_DECODER = json.JSONDecoder(
    object_pairs_hook=_ref_no_duplicates,
    parse_float=_ref_parse_float,
    parse_int=_ref_parse_int,
    parse_constant=_ref_reject_constant,
    strict=True,
)


def _ref_check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Malformed("string contains a lone UTF-16 surrogate escape") from exc


def _ref_check_depth_and_text(document: Any, *, check_surrogates: bool) -> None:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > _REF_MAX_DEPTH:
                raise Malformed(f"nesting deeper than {_REF_MAX_DEPTH}")
            for key, value in node.items():
                if check_surrogates:
                    _ref_check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            if depth > _REF_MAX_DEPTH:
                raise Malformed(f"nesting deeper than {_REF_MAX_DEPTH}")
            stack.extend((value, depth + 1) for value in node)
        elif check_surrogates and isinstance(node, str):
            _ref_check_text(node)


def reference_parse_json_strict(body: bytes, *, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise TooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    if body.startswith(b"\xef\xbb\xbf"):
        raise Malformed("body starts with a UTF-8 byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        document = _REF_DECODER.decode(text)
    except Malformed:
        raise
    except RecursionError as exc:
        raise Malformed(f"nesting deeper than {_REF_MAX_DEPTH}") from exc
    except ValueError as exc:
        raise Malformed(f"invalid JSON: {str(exc)[:120]}") from exc
    _ref_check_depth_and_text(
        document, check_surrogates=_REF_SURROGATE_ESCAPE_RE.search(body) is not None
    )
    return document


_REF_TIMESTAMP_RE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|([+-])(\d\d):(\d\d))",
    re.ASCII,
)


def reference_parse_timestamp(value: object, field: str, *, utc: bool = True) -> datetime:
    """RFC 3339 section 5.6 as PROTOCOL.md uses it (changed since the fast path: ASCII digits
    only, t/z in either case, any fraction, -00:00, leap seconds; offsets for respond_by; an
    instant outside the years 0001 to 9999 UTC is out of range, not an internal error)."""
    kind = "an RFC 3339 UTC timestamp" if utc else "an RFC 3339 timestamp"
    if not isinstance(value, str):
        raise Malformed(f"header.{field} must be {kind} string")
    match = _REF_TIMESTAMP_RE.fullmatch(value)
    if match is None:
        raise Malformed(f"header.{field} is not {kind}: {value[:40]!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, sign = match.group(7), match.group(9)
    hours, minutes = (0, 0) if sign is None else (int(match.group(10)), int(match.group(11)))
    if utc and (hours, minutes) != (0, 0):
        raise Malformed(f"header.{field} is not {kind}: {value[:40]!r}")
    micros = int((fraction[1:] + "000000")[:6]) if fraction else 0
    try:
        if hours > 23 or minutes > 59 or second > 60:
            raise ValueError(hours, minutes, second)
        at = datetime(year, month, day, hour, minute, min(second, 59), micros, tzinfo=UTC)
    except ValueError as exc:
        raise Malformed(f"header.{field} is not a valid date/time: {value[:40]!r}") from exc
    out_of_range = Malformed(
        f"header.{field} is out of range (years 0001 to 9999 UTC): {value[:40]!r}"
    )
    try:
        at += (-1 if sign == "+" else 1) * timedelta(hours=hours, minutes=minutes)
    except OverflowError:
        raise out_of_range from None
    if second == 60:
        if (at.hour, at.minute) != (23, 59):
            raise Malformed(f"header.{field} has a leap second away from 23:59 UTC: {value[:40]!r}")
        if at.date() == date.max:
            raise out_of_range
        at += timedelta(seconds=1)
    return at


def _ref_uuid(header: Mapping[str, Any], field: str, *, message_id: bool = False) -> str | None:
    """RFC 9562's 8-4-4-4-12 form in either case, kept lowercase (changed since the fast
    path, which took lowercase only); a message id is a version 4 or 7 UUID."""
    value = header.get(field)
    if value is None:
        return None
    kind = "a UUID v4 or v7" if message_id else "a UUID"
    refused = Malformed(f"header.{field} must be {kind} (8-4-4-4-12 hex digits)")
    if not isinstance(value, str) or len(value) != 36 or not value.isascii():
        raise refused
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise refused from None
    if str(parsed) != value.lower() or (message_id and parsed.version not in (4, 7)):
        raise refused
    return str(parsed)


def _ref_party(header: Mapping[str, Any], field: str) -> str:
    value = header[field]
    if not is_party_id(value):
        raise Malformed(f"header.{field} is not a party id (CC-AGENCY)")
    return str(value)


def reference_parse_header(
    raw: object, *, is_known_type: Callable[[str, str], bool] | None = None
) -> Header:
    if not isinstance(raw, dict):
        raise Malformed("header must be a JSON object")
    unknown = sorted(set(raw) - envelope._HEADER_FIELDS)
    if unknown:
        raise Malformed(f"header has unknown member {unknown[0][:64]!r}")
    for field in envelope._HEADER_REQUIRED:
        if raw.get(field) is None:
            raise Malformed(f"header.{field} is required")
    message_id = _ref_uuid(raw, "message_id", message_id=True)
    assert message_id is not None
    message_type = raw["message_type"]
    schema_version = raw["schema_version"]
    # (since changed: a string type or version that is no known one is UNSUPPORTED_TYPE)
    if not isinstance(message_type, str):
        raise Malformed("header.message_type must be a string")
    if not isinstance(schema_version, str):
        raise Malformed("header.schema_version must be a string")
    if (
        envelope._TYPE_RE.fullmatch(message_type) is None
        or envelope._VERSION_RE.fullmatch(schema_version) is None
        or (is_known_type is not None and not is_known_type(message_type, schema_version))
    ):
        raise UnsupportedType(
            f"unknown message_type/schema_version {message_type[:64]}/{schema_version[:16]}"
        )
    priority_raw = raw.get("priority", Priority.ROUTINE.value)
    if priority_raw is None:
        priority_raw = Priority.ROUTINE.value
    if priority_raw not in (Priority.ROUTINE.value, Priority.URGENT.value):
        raise Malformed("header.priority must be 'routine' or 'urgent'")
    legal_basis = raw.get("legal_basis")
    if legal_basis is not None and (
        not isinstance(legal_basis, str) or not 0 < len(legal_basis) <= envelope.MAX_LEGAL_BASIS
    ):
        raise Malformed(
            f"header.legal_basis must be a string of 1-{envelope.MAX_LEGAL_BASIS} characters"
        )
    expires_raw = raw.get("expires_at")
    respond_raw = raw.get("respond_by")
    return Header(
        message_id=message_id,
        message_type=message_type,
        schema_version=schema_version,
        sender=_ref_party(raw, "sender"),
        recipient=_ref_party(raw, "recipient"),
        created_at=reference_parse_timestamp(raw["created_at"], "created_at"),
        expires_at=(
            None if expires_raw is None else reference_parse_timestamp(expires_raw, "expires_at")
        ),
        correlation_id=_ref_uuid(raw, "correlation_id"),
        in_reply_to=_ref_uuid(raw, "in_reply_to"),
        priority=Priority(priority_raw),
        respond_by=(
            None
            if respond_raw is None
            else reference_parse_timestamp(respond_raw, "respond_by", utc=False)
        ),
        legal_basis=legal_basis,
    )


def reference_parse_envelope(
    body: bytes,
    *,
    max_bytes: int,
    is_known_type: Callable[[str, str], bool] | None = None,
) -> Envelope:
    document = reference_parse_json_strict(body, max_bytes=max_bytes)
    if not isinstance(document, dict):
        raise Malformed("envelope must be a JSON object")
    if set(document) != {"header", "payload"}:
        extra = sorted(set(document) - {"header", "payload"})
        if extra:
            raise Malformed(f"envelope has unknown member {extra[0][:64]!r}")
        missing = sorted({"header", "payload"} - set(document))
        raise Malformed(f"envelope lacks member {missing[0]!r}")
    header = reference_parse_header(document["header"], is_known_type=is_known_type)
    payload = document["payload"]
    if not isinstance(payload, dict):
        raise Malformed("payload must be a JSON object")
    return Envelope(header=header, payload=payload)


# ---------------------------------------------------------------------------------------------
# Comparison


def same_value(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down, -0.0 apart from 0.0, and the same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return bool(a == b)


def outcome(parse: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("accepted", parse())
    except GatewayError as exc:
        return ("refused", (exc.code, exc.reason))


def assert_json_agrees(body: bytes, max_bytes: int = LIMIT) -> tuple[str, Any]:
    new = outcome(lambda: parse_json_strict(body, max_bytes=max_bytes))
    ref = outcome(lambda: reference_parse_json_strict(body, max_bytes=max_bytes))
    assert new[0] == ref[0], (body[:300], new, ref)
    if new[0] == "refused":
        assert new[1] == ref[1], body[:300]
    else:
        assert same_value(new[1], ref[1]), (body[:300], new[1], ref[1])
    return new


# ---------------------------------------------------------------------------------------------
# JSON texts: valid and nearly valid, written in every way the grammar allows


def rarely(
    good: st.SearchStrategy[str], bad: st.SearchStrategy[str], one_in: int
) -> st.SearchStrategy[str]:
    """``good`` mostly, ``bad`` about once in ``one_in`` draws (so that most documents stay
    valid and reach the fast path, while every kind of fault still shows up). Hypothesis
    favours the smallest and largest choices, so ``bad`` sits in the middle."""
    return st.integers(0, one_in).flatmap(lambda i: bad if i == one_in // 2 else good)


WS = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n", "   "])
BAD_WS = st.sampled_from(["\x0c", "\x0b", "\xa0", "\u2028", "\u3000", "\x00"])
ANY_WS = rarely(WS, BAD_WS, 40)

# Pieces of string literals: raw text, every kind of escape (including escaped colons and
# surrogate pairs, which the fast path's checks depend on), lone surrogates, bad escapes and
# raw control characters (refused).
_ESCAPES = [
    '\\"',
    "\\\\",
    "\\/",
    "\\b",
    "\\f",
    "\\n",
    "\\r",
    "\\t",
    "\\u0061",
    "\\u003a",
    "\\u003A",
    "\\u0022",
    "\\u005c",
    "\\u005B",
    "\\u0000",
    "\\u001f",
    "\\u00e9",
    "\\u20AC",
    "\\u2028",
    "\\ufffd",
    "\\ud83d\\ude00",
    "\\uD83D\\uDE00",
    "\\udbff\\udfff",
]
_RAW = [":", "[", "]", "{", "}", ",", "e+", "1e+20", "é", "€", "😀", "\u2028", "\x7f", " "]
_BAD = ["\\ud800", "\\uDBFF", "\\udc00", "\\uDFFF", "\\ud83d", "\\ud83d\\u0041"]
_BAD += ["\\x41", "\\u00", "\\U0041", "\\'", "\\a", "\\", "\x01", "\x1f", "\n", "\x00"]
_GOOD_PIECE = st.one_of(
    st.text(st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters='"\\'), max_size=6),
    st.sampled_from(_ESCAPES),
    st.sampled_from(_RAW),
)
STRING_PIECE = rarely(_GOOD_PIECE, st.sampled_from(_BAD), 40)
STRING = st.lists(STRING_PIECE, max_size=5).map(lambda parts: '"' + "".join(parts) + '"')

KEY = st.one_of(
    st.sampled_from(['"a"', '"\\u0061"', '"b"', '"a:"', '":"', '"\\u003a"', '"\\u003A"', '""']),
    st.sampled_from(['"k"', '"header"', '"payload"', '"\\ud83d\\ude00"', '"😀"']),
    STRING,
)

_BIG_INTS = [
    str(2**53),
    str(2**63 - 1),
    str(2**63),
    str(-(2**63)),
    str(-(2**63) - 1),
    str(2**64 - 1),
    str(2**64),
    str(10**19),
    str(-(10**19)),
    str(10**25),
    str(-(10**25)),
    "9" * 308,
    "9" * 309,
    "-" + "9" * 309,
    "1" + "0" * 308,
    "1" + "7" * 308,
    "1" + "8" * 308,
    "9" * 310,
    "1" * 5000,
]

NUMBER = rarely(
    st.one_of(
        st.integers().map(str),
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(_BIG_INTS),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.from_regex(
            r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][-+]?[0-9]{1,3})?", fullmatch=True
        ),
        st.sampled_from(
            [
                "-0",
                "-0.0",
                "0e0",
                "-0e0",
                "1e400",
                "-1e309",
                "1e-400",
                "-1e-400",
                "1e-4000",
                "-9.5E-00000400",
                "1.7976931348623157e308",
                "1.7976931348623158e308",
                "1.79769313486231581e308",
                "1.7976931348623159e308",
                "4.9e-324",
                "2.4e-324",
                "2.5e-324",
                "1e16",
                "1E+2",
            ]
        ),
    ),
    st.sampled_from(
        ["01", "1.", ".5", "+1", "1e", "-", "0x10", "NaN", "Infinity", "-Infinity", "nan", "1_000"]
    ),
    20,
)

SCALAR = st.one_of(
    rarely(
        st.sampled_from(["null", "true", "false"]), st.sampled_from(["nul", "True", "None"]), 20
    ),
    NUMBER,
    STRING,
)


def _array(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    items = st.lists(st.tuples(ANY_WS, children, ANY_WS), max_size=4)
    return st.tuples(WS, items).map(
        lambda t: "[" + t[0] + ",".join(a + v + b for a, v, b in t[1]) + "]"
    )


def _object(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    members = st.lists(st.tuples(ANY_WS, KEY, WS, WS, children, ANY_WS), max_size=5)
    return st.tuples(WS, members).map(
        lambda t: "{" + t[0] + ",".join(f"{a}{k}{b}:{c}{v}{d}" for a, k, b, c, v, d in t[1]) + "}"
    )


VALUE = st.recursive(
    SCALAR, lambda children: st.one_of(_array(children), _object(children)), max_leaves=25
)


_LEVEL = st.tuples(
    st.sampled_from(['"k"', '"a"', '"\\u0061"', None]),  # None: an array
    st.sampled_from([None, None, "1", '"x"', "[]", "{}", "1e+16"]),
)


@st.composite
def deep_value(draw: st.DrawFn) -> str:
    """A value wrapped in 24-40 more levels of arrays and objects, some with siblings."""
    text = draw(VALUE)
    for key, sibling in draw(st.lists(_LEVEL, min_size=24, max_size=40)):
        if key is None:
            text = "[" + text + ("" if sibling is None else "," + sibling) + "]"
        else:
            text = "{" + key + ":" + text + ("" if sibling is None else ',"s":' + sibling) + "}"
    return text


_PREFIXES = ["\ufeff", " ,", "{} ", "[1]", "\x00"]
_SUFFIXES = [",", " {}", "x", "\x00", "]", "\ud800"]


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    """A JSON text; now and then with a BOM, junk before or junk after."""
    text = draw(WS) + draw(rarely(VALUE, deep_value(), 4)) + draw(WS)
    text = draw(rarely(st.just(""), st.sampled_from(_PREFIXES), 30)) + text
    text += draw(rarely(st.just(""), st.sampled_from(_SUFFIXES), 30))
    # lone surrogate characters become invalid UTF-8 (ED A0 80 ...), which must be refused
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=700, deadline=None)
@given(json_body())
@example(b'{"a":1,"\\u0061":2}')
@example(b'{"a":1,"b":"\\u003a","a":2}')
@example(b'{"a":1,"b":"\\u003A","a":2}')
@example(b'{"a":{"b":1,"b":1}}')
@example(b'[{"a":1,"a":1}]')
@example(b"[" * 32 + b"]" * 32)
@example(b"[" * 33 + b"]" * 33)
@example(b"[" * 32 + b"1" + b"]" * 32)
@example(b"[" * 32 + b"[]" + b"]" * 32)
@example(b'{"a":' * 32 + b"{}" + b"}" * 32)
@example(b'{"a":' * 33 + b"1" + b"}" * 33)
@example(b"[" * 300 + b"]" * 300)
@example(b"[" * 2000 + b"]" * 2000)
@example(b"[18446744073709551616, 9223372036854775807, -9223372036854775809]")
@example(b'["\\ud800"]')
@example(b'["\\ud83d\\ude00", "\\ude00\\ud83d"]')
@example(b'["\\ud83d\\u0041"]')
@example(b'{"e+":1e+16}')
def test_parse_json_strict_matches_the_reference(body: bytes) -> None:
    event(assert_json_agrees(body)[0])


@settings(max_examples=500, deadline=None)
@given(json_body(), st.data())
def test_mutated_json_matches_the_reference(body: bytes, data: st.DataObject) -> None:
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "duplicate"]))
        pos = data.draw(st.integers(0, len(mutated)))
        if op == "flip" and pos < len(mutated):
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete" and pos < len(mutated):
            del mutated[pos]
        elif op == "insert":
            mutated[pos:pos] = data.draw(
                st.sampled_from([b":", b",", b'"', b"\\", b"[", b"{", b"}", b"]", b"\n", b"e+"])
            )
        else:
            end = data.draw(st.integers(pos, len(mutated)))
            mutated[end:end] = mutated[pos:end]
    event(assert_json_agrees(bytes(mutated))[0])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 250))
def test_junk_bytes_and_size_limit_match_the_reference(body: bytes, max_bytes: int) -> None:
    assert_json_agrees(body, max_bytes)


def test_the_fast_path_is_taken_for_ordinary_envelopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a timing test: the strict parser (the slow path) is not even consulted."""
    body = json.dumps(
        {"header": {"a": "x:y"}, "payload": {"n": [1, 2.5, -0.0, None, True], "s": "é😀"}},
        ensure_ascii=False,
    ).encode()

    def refuse(text: str, body: bytes) -> Any:
        raise AssertionError("strict path used")

    monkeypatch.setattr(envelope, "_parse_json_text_strict", refuse)
    assert same_value(parse_json_strict(body, max_bytes=LIMIT), json.loads(body))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[18446744073709551616]", [18446744073709551616]),
        (b"[-9223372036854775809]", [-9223372036854775809]),
        (b"[" + b"9" * 308 + b"]", [int("9" * 308)]),
        (b'["\\ud83d\\ude00"]', ["\U0001f600"]),
        (b'{"a":1,"a":2}', "duplicate member name 'a'"),
        (b'{"a":1,"\\u0061":2}', "duplicate member name 'a'"),
        (b'{"a":":","b":"\\u003a","a":2}', "duplicate member name 'a'"),
        (b"[" * 33 + b"]" * 33, "nesting deeper than 32"),
        (b"[" * 32 + b"[1]" + b"]" * 32, "nesting deeper than 32"),
    ],
)
def test_what_orjson_reads_differently_or_lets_through(body: bytes, expected: Any) -> None:
    """Big integers (orjson: floats), duplicates (orjson: last wins), deep nesting."""
    result = assert_json_agrees(body)
    if isinstance(expected, str):
        assert result[0] == "refused"
        assert expected in result[1][1]
    else:
        assert result[0] == "accepted"
        assert same_value(result[1], expected)


# ---------------------------------------------------------------------------------------------
# Header checks


TIMESTAMP = st.one_of(
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,12})?"
        r"(Z|z|[+-][0-9]{2}:[0-9]{2})?",
        fullmatch=True,
    ),
    st.sampled_from(
        [
            "2026-11-23T07:00:00Z",
            "2026-11-23T07:00:00.5Z",
            "2026-11-23T07:00:00.123456789+00:00",
            "2024-02-29T23:59:59Z",
            "2026-02-29T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T23:59:60Z",
            "0000-01-01T00:00:00Z",
            "٢٠٢٦-11-23T07:00:00Z",
            "2026-11-23T07:00:00Z\n",
            "2026-11-23t07:00:00Z",
            "2026-11-23T07:00:00-00:00",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.999z",
            "2017-01-01T00:59:60+01:00",
            "2017-01-01T00:59:60Z",
            "２０２６-11-23T07:00:00Z",
            "2026-11-23T07:00:00+24:00",
            "2026-11-23T07:00:00+05:60",  # datetime.fromisoformat reads it as +06:00
            "2026-11-23T07:00:00-00:75",
            "2026-11-23T07:00:00+23:59",
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:60Z",
            "9999-12-31T18:59:60-05:00",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01T00:30:00+01:00",
            "0001-01-01T01:00:00+01:00",
        ]
    ),
    st.integers(),
    st.none(),
)
FIELD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "message_id": st.sampled_from(
        [
            "0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10",
            "0192f4d6-7c1e-4a3b-9d2e-5b8f1c3a9e10",
            "0192f4d6-7c1e-1a3b-9d2e-5b8f1c3a9e10",
            "0192F4D6-7c1e-7a3b-9d2e-5b8f1c3a9e10",
        ]
    ),
    "message_type": st.sampled_from(["shipment.advance_data", "Shipment", "a..b", "x"]),
    "schema_version": st.sampled_from(["1.0", "2.0", "1", "1000.0", "１.0"]),
    "sender": st.sampled_from(["MX-ANAM", "US-CBP", "mx-anam", "MX-A", "MX-ANAM\n"]),
    "recipient": st.sampled_from(["US-CBP", "MX-ANAM", "USA-CBP"]),
    "created_at": TIMESTAMP,
    "expires_at": TIMESTAMP,
    "respond_by": TIMESTAMP,
    "correlation_id": st.sampled_from(
        ["0192f4d6-0000-7000-8000-000000000001", "0192f4d6-0000-1000-0000-000000000001", "abc"]
    ),
    "in_reply_to": st.sampled_from(["0192f4d6-0000-7000-8000-000000000001", "ABC"]),
    "priority": st.sampled_from(["routine", "urgent", "Routine", "ROUTINE", "high", ""]),
    "legal_basis": st.one_of(st.text(max_size=3), st.just("x" * 256), st.just("x" * 257)),
    "extra": st.just("x"),
    "Message_id": st.just("x"),
}


@st.composite
def header_document(draw: st.DrawFn) -> dict[str, Any]:
    """Each field valid, nearly valid, junk, null or absent; now and then an unknown one."""
    hdr: dict[str, Any] = {}
    for field, values in HEADER_VALUES.items():
        choice = draw(st.integers(0, 19))
        if field not in envelope._HEADER_FIELDS:
            if choice == 0:
                hdr[field] = draw(values)
        elif choice == 0:
            hdr[field] = draw(FIELD_VALUE)
        elif choice == 1:
            hdr[field] = None
        elif choice > 2:
            hdr[field] = draw(values)
    return hdr


def _known(message_type: str, version: str) -> bool:
    return (message_type, version) == ("shipment.advance_data", "1.0")


@settings(max_examples=500, deadline=None)
@given(
    header_document(),
    st.one_of(st.just({}), FIELD_VALUE),
    st.sampled_from([None, _known]),
    st.sampled_from([None, "sig", "Header"]),
)
def test_parse_envelope_matches_the_reference(
    hdr: dict[str, Any],
    payload: Any,
    is_known_type: Callable[[str, str], bool] | None,
    extra: str | None,
) -> None:
    document: dict[str, Any] = {"header": hdr, "payload": payload}
    if extra is not None:
        document[extra] = 1
    body = json.dumps(document, ensure_ascii=False).encode()
    new = outcome(lambda: parse_envelope(body, max_bytes=LIMIT, is_known_type=is_known_type))
    ref = outcome(
        lambda: reference_parse_envelope(body, max_bytes=LIMIT, is_known_type=is_known_type)
    )
    assert new == ref
    if new[0] == "accepted":
        assert same_value(new[1].payload, ref[1].payload)


@settings(max_examples=1000, deadline=None)
@given(TIMESTAMP, st.booleans())
def test_parse_timestamp_matches_the_reference(value: Any, utc: bool) -> None:
    new = outcome(lambda: envelope.parse_timestamp(value, "created_at", utc=utc))
    ref = outcome(lambda: reference_parse_timestamp(value, "created_at", utc=utc))
    assert new == ref
    if new[0] == "accepted":  # datetime.fromisoformat's "Z" read as the reference's UTC
        assert new[1].tzinfo is UTC


@pytest.mark.parametrize(
    "message_id",
    [
        "0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10",
        "019af5c7-9c77-7d0e-890a-5b8f1c3a9e10",  # "0e-890a": not an exponent
        "019af5c7-9c77-710e-4567-5b8f1c3a9e10",  # "0e-4567-": not one either
    ],
)
def test_a_message_id_never_sends_an_envelope_down_the_strict_path(
    message_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a UUID's hex digits look like a mantissa and its "e-" like a negative exponent: 3 % of
    # random ids once took the stdlib parser (about 100 us more per message)
    def strict(text: str, body: bytes) -> Any:
        raise AssertionError(f"strict path taken for {body[:120]!r}")

    monkeypatch.setattr(envelope, "_parse_json_text_strict", strict)
    body = json.dumps({"header": {"message_id": message_id}, "payload": {"w": 1.5e-3}}).encode()
    assert parse_json_strict(body, max_bytes=LIMIT)["header"]["message_id"] == message_id
