"""Strict envelope parsing: every refusal of PROTOCOL.md section 2 with its exact code."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import ManualClock
from gateway.envelope import (
    body_digest,
    check_freshness,
    encode_envelope,
    new_message_id,
    parse_envelope,
    parse_json_strict,
)
from gateway.errors import GatewayError, NackCode
from gateway.model import Priority

LIMIT = 1 << 20
NOW = datetime(2026, 11, 23, 7, 0, 0, tzinfo=UTC)


def header(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "message_id": "0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10",
        "message_type": "shipment.advance_data",
        "schema_version": "1.0",
        "sender": "MX-ANAM",
        "recipient": "US-CBP",
        "created_at": "2026-11-23T07:00:00Z",
        "expires_at": "2026-11-30T07:00:00Z",
        "correlation_id": "0192f4d6-0000-7000-8000-000000000001",
        "in_reply_to": None,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def envelope_bytes(hdr: dict[str, Any] | None = None, payload: Any = None) -> bytes:
    doc = {"header": hdr if hdr is not None else header(), "payload": payload or {}}
    return json.dumps(doc).encode()


def code_of(body: bytes, **kwargs: Any) -> NackCode:
    with pytest.raises(GatewayError) as info:
        parse_envelope(body, max_bytes=kwargs.pop("max_bytes", LIMIT), **kwargs)
    return info.value.code


def test_protocol_example_parses() -> None:
    env = parse_envelope(envelope_bytes(), max_bytes=LIMIT)
    assert env.header.sender == "MX-ANAM"
    assert env.header.created_at == NOW
    assert env.header.priority is Priority.ROUTINE
    assert env.header.in_reply_to is None
    assert env.payload == {}


def test_size_limit_is_checked_before_parsing() -> None:
    # Not even JSON: the size check must come first.
    assert code_of(b"\xff" * 101, max_bytes=100) is NackCode.TOO_LARGE
    assert code_of(b"x" * 100, max_bytes=100) is NackCode.MALFORMED


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xef\xbb\xbf" + envelope_bytes(), "byte-order mark"),
        (b"\xc0\xaf", "not valid UTF-8"),
        (b'{"header": "caf\xe9"}', "not valid UTF-8"),
        ('{"a": 1}'.encode("utf-16"), "UTF-8"),
        (b'{"a": 1, "a": 2}', "duplicate member name 'a'"),
        (b'{"header": {"x": {"k": 1, "k": 1}}, "payload": {}}', "duplicate member name 'k'"),
        (b"[NaN]", "NaN"),
        (b"[Infinity]", "Infinity"),
        (b"[-Infinity]", "-Infinity"),
        (b"[1e400]", "double range"),
        (b"[-1e309]", "double range"),
        # below the smallest double: read as 0 while the signed bytes say otherwise (claims)
        (b"[1e-400]", "double range (underflow)"),
        (b"[-2.4e-324]", "double range (underflow)"),
        (b'{"a": [1E-0400]}', "double range (underflow)"),
        (b"[0." + b"0" * 400 + b"1]", "double range (underflow)"),
        (b"[" + b"9" * 400 + b"]", "double range"),
        (b"[" + b"9" * 309 + b"]", "double range"),
        (b"[-" + b"9" * 309 + b"]", "double range"),
        (b"[" + b"1" * 5000 + b"]", "double range"),
        (b"[" * 33 + b"]" * 33, "nesting deeper than 32"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, "nesting deeper than 32"),
        (b"[" * 100_000, "nesting deeper than 32"),
        (b'["\\ud800"]', "lone UTF-16 surrogate"),
        (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
        (b'{"a": "\x01"}', "Invalid control character"),
        (b"{} {}", "Extra data"),
        (b"", "invalid JSON"),
        (b"{'a': 1}", "invalid JSON"),
    ],
)
def test_malformed_json(body: bytes, reason: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_json_strict(body, max_bytes=LIMIT)
    assert info.value.code is NackCode.MALFORMED
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b"[0.0]", 0.0),
        (b"[0e-400]", 0.0),
        (b"[-0.000e-999]", -0.0),
        (b"[4.9e-324]", 5e-324),  # the smallest subnormal
        (b"[2.5e-324]", 5e-324),  # rounds up to it
        (b"[1e-320]", 1e-320),
        (b'["note-123", "e-commerce 1e-400"]', "e-commerce 1e-400"),  # in strings: text
    ],
)
def test_zero_and_subnormal_numbers_are_not_underflow(body: bytes, value: object) -> None:
    assert parse_json_strict(body, max_bytes=LIMIT)[-1] == value


def test_nesting_of_exactly_32_is_allowed() -> None:
    assert parse_json_strict(b"[" * 32 + b"]" * 32, max_bytes=LIMIT) is not None


def test_numbers_inside_double_range_and_surrogate_pairs_are_fine() -> None:
    doc = parse_json_strict(
        b'[1.7976931348623157e308, 12345678901234567890, "\\ud83d\\ude00"]', max_bytes=LIMIT
    )
    assert doc[1] == 12345678901234567890
    assert doc[2] == "\U0001f600"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "envelope must be a JSON object"),
        (json.dumps({"header": header()}).encode(), "lacks member 'payload'"),
        (
            json.dumps({"header": header(), "payload": {}, "sig": 1}).encode(),
            "unknown member 'sig'",
        ),
        (envelope_bytes(payload=None).replace(b'"payload": {}', b'"payload": []'), "payload"),
        (json.dumps({"header": [], "payload": {}}).encode(), "header must be a JSON object"),
        (envelope_bytes(header(extra="x")), "unknown member 'extra'"),
        (envelope_bytes(header(message_id=_DROP)), "header.message_id is required"),
        (envelope_bytes(header(sender=None)), "header.sender is required"),
        (envelope_bytes(header(message_id="not-a-uuid")), "header.message_id"),
        (envelope_bytes(header(message_id="{0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10}")), "UUID"),
        (envelope_bytes(header(message_id="0192f4d67c1e7a3b9d2e5b8f1c3a9e10")), "UUID"),
        (envelope_bytes(header(message_id="٠192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10")), "UUID"),
        # version 1 UUIDs are not allowed as message ids (v4 or v7 only)
        (
            envelope_bytes(header(message_id="c232ab00-9414-11ec-b3c8-9e6bdeced846")),
            "UUID v4 or v7",
        ),
        (envelope_bytes(header(correlation_id="abc")), "header.correlation_id"),
        (envelope_bytes(header(in_reply_to=42)), "header.in_reply_to"),
        (envelope_bytes(header(sender="mx-anam")), "header.sender is not a party id"),
        (envelope_bytes(header(recipient="USA-CBP")), "header.recipient"),
        (envelope_bytes(header(sender="../../etc")), "header.sender"),
        (envelope_bytes(header(created_at="2026-11-23 07:00:00Z")), "header.created_at"),
        (envelope_bytes(header(created_at="2026-11-23T07:00:00+01:00")), "header.created_at"),
        (envelope_bytes(header(created_at="2026-11-23T07:00:00")), "header.created_at"),
        (envelope_bytes(header(created_at="2026-02-30T07:00:00Z")), "not a valid date"),
        (envelope_bytes(header(created_at=1700000000)), "header.created_at"),
        # RFC 3339 digits are ASCII: not fullwidth, not Arabic-Indic
        (envelope_bytes(header(created_at="２０２６-11-23T07:00:00Z")), "header.created_at"),
        (envelope_bytes(header(expires_at="٢٠٢٦-11-30T07:00:00Z")), "header.expires_at"),
        (envelope_bytes(header(created_at="2026-11-23T12:00:60Z")), "leap second"),
        (envelope_bytes(header(respond_by="2026-11-23T07:00:00+24:00")), "not a valid date"),
        (envelope_bytes(header(expires_at="tomorrow")), "header.expires_at"),
        (envelope_bytes(header(respond_by="soon")), "header.respond_by"),
        (envelope_bytes(header(priority="high")), "header.priority"),
        (envelope_bytes(header(legal_basis="")), "header.legal_basis"),
        (envelope_bytes(header(legal_basis="x" * 257)), "header.legal_basis"),
        (envelope_bytes(header(message_type=7)), "header.message_type must be a string"),
        (envelope_bytes(header(schema_version=1.0)), "header.schema_version must be a string"),
    ],
)
def test_malformed_envelope(body: bytes, reason: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_envelope(body, max_bytes=LIMIT)
    assert info.value.code is NackCode.MALFORMED
    assert reason in info.value.reason


#: what a timestamp beyond the instants a datetime holds is refused with, after its field name
OUT_OF_RANGE = "is out of range (years 0001 to 9999 UTC)"


@pytest.mark.parametrize(
    ("field", "text"),
    [
        # RFC 3339's grammar and jsonschema's date-time take the leap second after the last
        # second of 9999; the instant it names (10000-01-01T00:00:00Z) cannot be held
        ("created_at", "9999-12-31T23:59:60Z"),
        ("expires_at", "9999-12-31T23:59:60Z"),
        ("respond_by", "9999-12-31T23:59:60Z"),
        ("respond_by", "9999-12-31t23:59:60.5z"),
        ("respond_by", "9999-12-31T18:59:60-05:00"),
        # an offset that takes a valid local time out of range
        ("respond_by", "9999-12-31T23:30:00-01:00"),
        ("respond_by", "0001-01-01T00:30:00+01:00"),
    ],
)
def test_a_timestamp_beyond_the_years_a_datetime_holds_is_malformed(field: str, text: str) -> None:
    """MALFORMED naming the field, as for any other bad time: never an internal error (a
    partner would be told UNAVAILABLE, retry, and every retry would fail the same way)."""
    with pytest.raises(GatewayError) as info:
        parse_envelope(envelope_bytes(header(**{field: text})), max_bytes=LIMIT)
    assert info.value.code is NackCode.MALFORMED
    assert info.value.reason == f"header.{field} {OUT_OF_RANGE}: {text!r}"


def test_the_last_instants_of_the_range_are_accepted() -> None:
    env = parse_envelope(
        envelope_bytes(
            header(
                expires_at="9999-12-31T23:59:59.999999Z",
                respond_by="0001-01-01T01:00:00+01:00",
            )
        ),
        max_bytes=LIMIT,
    )
    assert env.header.expires_at == datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert env.header.respond_by == datetime(1, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "hdr",
    [header(expires_at=_DROP), header(expires_at=None)],
    ids=["absent", "null"],
)
def test_expires_at_is_required(hdr: dict[str, Any]) -> None:
    """PROTOCOL.md section 2 names the optional members (correlation_id, in_reply_to,
    priority, respond_by, legal_basis); expires_at is not one: a message without it would
    never expire."""
    with pytest.raises(GatewayError) as info:
        parse_envelope(envelope_bytes(hdr), max_bytes=LIMIT)
    assert info.value.code is NackCode.MALFORMED
    assert info.value.reason == "header.expires_at is required"


def test_a_body_stored_before_expires_at_was_required_can_still_be_read() -> None:
    """Messages without one were accepted before; a stored body is read again as it was."""
    for hdr in (header(expires_at=_DROP), header(expires_at=None)):
        env = parse_envelope(envelope_bytes(hdr), max_bytes=LIMIT, expires_at_required=False)
        assert env.header.expires_at is None
    env = parse_envelope(envelope_bytes(), max_bytes=LIMIT, expires_at_required=False)
    assert env.header.expires_at == datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    # every other required member still is
    with pytest.raises(GatewayError, match=r"^header\.created_at is required$"):
        parse_envelope(
            envelope_bytes(header(created_at=None)), max_bytes=LIMIT, expires_at_required=False
        )


def test_a_header_with_a_year_before_1000_round_trips() -> None:
    """RFC 3339's date-fullyear is 4 digits: a respond_by in year 1 is written 0001-..., so
    the signed envelope is one our own parser (and any partner's) accepts."""
    env = parse_envelope(envelope_bytes(header(respond_by="0001-01-01T00:00:00Z")), max_bytes=LIMIT)
    body = encode_envelope(env.header, env.payload)
    assert json.loads(body)["header"]["respond_by"] == "0001-01-01T00:00:00.000Z"
    assert parse_envelope(body, max_bytes=LIMIT) == env


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("created_at", "2026-11-23t07:00:00z", NOW),
        ("created_at", "2026-11-23T07:00:00-00:00", NOW),
        ("created_at", "2026-11-23T07:00:00.1234567891Z", NOW + timedelta(microseconds=123456)),
        ("expires_at", "2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),
        # respond_by is RFC 3339 with any offset (PROTOCOL.md section 2), read as UTC
        ("respond_by", "2026-11-23T09:00:00+02:00", NOW),
        ("respond_by", "2026-11-23T01:30:00-05:30", NOW),
    ],
)
def test_every_rfc_3339_form_of_a_timestamp_is_accepted(
    field: str, text: str, expected: datetime
) -> None:
    env = parse_envelope(envelope_bytes(header(**{field: text})), max_bytes=LIMIT)
    assert getattr(env.header, field) == expected


def test_uuids_in_upper_case_are_read_as_lowercase() -> None:
    """RFC 9562 section 4: hex digits are case insensitive on input (a .NET Guid's text is
    upper case); ids are kept lowercase, so one message has one id."""
    env = parse_envelope(
        envelope_bytes(
            header(
                message_id="0192F4D6-7C1E-7A3B-9D2E-5B8F1C3A9E10",
                correlation_id="0192F4D6-0000-7000-8000-00000000000A",
                in_reply_to="0192f4d6-0000-7000-8000-00000000000B",
            )
        ),
        max_bytes=LIMIT,
    )
    assert env.header.message_id == "0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10"
    assert env.header.correlation_id == "0192f4d6-0000-7000-8000-00000000000a"
    assert env.header.in_reply_to == "0192f4d6-0000-7000-8000-00000000000b"


def test_unknown_type_or_version_is_unsupported() -> None:
    def known(message_type: str, version: str) -> bool:
        return (message_type, version) == ("shipment.advance_data", "1.0")

    body = envelope_bytes(header(schema_version="2.0"))
    assert code_of(body, is_known_type=known) is NackCode.UNSUPPORTED_TYPE
    body = envelope_bytes(header(message_type="shipment.unknown"))
    assert code_of(body, is_known_type=known) is NackCode.UNSUPPORTED_TYPE
    # PROTOCOL section 2: a pair that is no known one, however it is spelt
    for odd in ({"schema_version": "1"}, {"schema_version": "1.0.0"}, {"message_type": "X y"}):
        body = envelope_bytes(header(**odd))
        assert code_of(body, is_known_type=known) is NackCode.UNSUPPORTED_TYPE
        assert code_of(body) is NackCode.UNSUPPORTED_TYPE
    with pytest.raises(GatewayError, match=r"schema_version \S{64}/1$"):
        parse_envelope(
            envelope_bytes(header(message_type="x" * 200, schema_version="1")), max_bytes=LIMIT
        )
    assert parse_envelope(envelope_bytes(), max_bytes=LIMIT, is_known_type=known)


def test_optional_members_parse() -> None:
    env = parse_envelope(
        envelope_bytes(
            header(
                priority="urgent",
                respond_by="2026-11-24T07:00:00.123456789Z",
                legal_basis="US-MX CMAA 1976",
                created_at="2026-11-23T07:00:00+00:00",
            )
        ),
        max_bytes=LIMIT,
    )
    assert env.header.priority is Priority.URGENT
    assert env.header.respond_by == datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=UTC)
    assert env.header.legal_basis == "US-MX CMAA 1976"


class TestFreshness:
    def check(self, now: datetime, **overrides: Any) -> None:
        env = parse_envelope(envelope_bytes(header(**overrides)), max_bytes=LIMIT)
        check_freshness(env.header, now=now, replay_window_s=900, max_skew_s=120)

    def test_inside_the_window(self) -> None:
        self.check(NOW)
        self.check(NOW + timedelta(seconds=900))
        self.check(NOW - timedelta(seconds=120))

    @pytest.mark.parametrize(
        ("now", "overrides", "reason"),
        [
            (NOW + timedelta(seconds=901), {}, "beyond the replay window of 900s"),
            (NOW - timedelta(seconds=121), {}, "in the future, beyond the allowed skew of 120s"),
            (NOW + timedelta(days=7), {}, "replay window"),
            (
                NOW + timedelta(seconds=10),
                {"expires_at": "2026-11-23T07:00:05Z"},
                "expires_at 2026-11-23T07:00:05.000Z has passed",
            ),
        ],
    )
    def test_stale(self, now: datetime, overrides: dict[str, Any], reason: str) -> None:
        with pytest.raises(GatewayError) as info:
            self.check(now, **overrides)
        assert info.value.code is NackCode.STALE
        assert info.value.http_status == 422
        assert reason in info.value.reason

    def test_with_an_injected_clock(self) -> None:
        clock = ManualClock(NOW)
        self.check(clock.now())
        clock.advance(timedelta(minutes=16))
        with pytest.raises(GatewayError):
            self.check(clock.now())


def test_encode_round_trip_and_digest() -> None:
    env = parse_envelope(envelope_bytes(payload={"a": [1, 2.5, "x"]}), max_bytes=LIMIT)
    again = parse_envelope(encode_envelope(env.header, env.payload), max_bytes=LIMIT)
    assert again == env
    assert body_digest(b"abc") == "sha-256:ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"


def test_new_message_ids_are_v7_and_unique() -> None:
    ids = {new_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(pattern.fullmatch(i) for i in ids)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_junk_bytes_only_raise_gateway_errors(body: bytes) -> None:
    with contextlib.suppress(GatewayError):
        parse_envelope(body, max_bytes=200)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_junk_json_only_raises_gateway_errors(value: Any) -> None:
    body = json.dumps(value, allow_nan=True).encode()
    with contextlib.suppress(GatewayError):
        parse_envelope(body, max_bytes=LIMIT)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_envelopes_only_raise_gateway_errors(data: st.DataObject) -> None:
    body = bytearray(envelope_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        pos = data.draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del body[pos]
        else:
            body.insert(pos, data.draw(st.integers(0, 255)))
    with contextlib.suppress(GatewayError):
        parse_envelope(bytes(body), max_bytes=LIMIT)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(header())), json_values, max_size=9))
def test_header_field_junk_only_raises_gateway_errors(fields: dict[str, Any]) -> None:
    hdr = header()
    hdr.update(fields)
    with contextlib.suppress(GatewayError):
        parse_envelope(json.dumps({"header": hdr, "payload": {}}).encode(), max_bytes=LIMIT)
