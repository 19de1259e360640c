"""``OutgoingMessage.properties()`` (what the broker seam publishes) carries exactly the PROTOCOL
section 5 properties that the aio-pika message built from it would: same bytes on the wire."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest
from pamqp import frame
from pamqp.commands import Basic
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader

from gateway.transports.amqp import SIGNATURE_HEADER, Delivery, OutgoingMessage, decode_leniently

spec_properties = Basic.Properties


@pytest.mark.parametrize(
    "message",
    [
        OutgoingMessage(
            body=b'{"header": {}}',
            message_id="01J7Z3Q5V8K2M4N6P8R0T2W4Y6",
            message_type="receipt",
            app_id="US-CBP",
            signature="eyJhbGciOiJFZERTQSJ9..c2ln",
            correlation_id="01J7Z3Q5V8K2M4N6P8R0T2W4Y7",
        ),
        OutgoingMessage(
            body=b'{"type": "about:blank"}',
            message_id="01J7Z3Q5V8K2M4N6P8R0T2W4Y8",
            message_type="problem",
            app_id="US-CBP",
            content_type="application/problem+json",
        ),
        OutgoingMessage(
            body=b"{}",
            message_id="m-1",
            message_type="shipment.status",
            app_id="MX-ANAM",
            signature="sig",
            headers={"c2c-recipient": "US-CBP", "c2c-transport": "amqp", "c2c-kid": "k-1"},
        ),
    ],
)
def test_properties_are_those_of_the_aio_pika_message(message: OutgoingMessage) -> None:
    direct = ContentHeader(0, len(message.body), message.properties()).marshal()
    via_aio_pika = ContentHeader(0, len(message.body), message.to_aio_pika().properties).marshal()
    assert direct == via_aio_pika
    properties = message.properties()
    assert properties.delivery_mode == 2
    assert properties.message_id == message.message_id
    assert properties.app_id == message.app_id
    assert properties.message_type == message.message_type
    headers = properties.headers or {}
    assert headers.get("c2c-signature") == message.signature


def _content_header(edit: tuple[bytes, bytes], **properties: Any) -> bytes:
    """A content header frame as another client may send it: pamqp's bytes with ``edit``
    (old, new of the same length) applied, for what pamqp will not encode."""
    raw = frame.marshal(ContentHeader(0, 2, spec_properties(**properties)), 1)
    old, new = edit
    assert raw.count(old) == 1
    return raw.replace(old, new)


SENT = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("edit", "properties", "expected"),
    [
        (
            (b"XX-order-1", b"\xff\xfe-order-1"),
            {"message_id": "XX-order-1"},
            {"message_id": "\ufffd\ufffd-order-1"},
        ),
        (
            (struct.pack(">Q", int(SENT.timestamp())), struct.pack(">Q", 1_765_000_000_000_000)),
            {"message_id": "m-1", "timestamp": SENT},
            {"message_id": "m-1", "timestamp": None},
        ),
        (
            (b"\x03YYY", b"\x03\xe9t\xe9"),
            {"headers": {"YYY": "x", "c2c-signature": "s"}},
            {"headers": {"\ufffdt\ufffd": "x", "c2c-signature": "s"}},
        ),
        (
            (struct.pack(">Q", int(SENT.timestamp())), struct.pack(">Q", 2**64 - 1)),
            {"headers": {"nested": {"at": SENT}}},
            {"headers": {"nested": {"at": None}}},
        ),
    ],
    ids=["message_id not UTF-8", "timestamp in microseconds", "header name", "header time"],
)
def test_properties_other_clients_send_are_decoded_not_fatal(
    edit: tuple[bytes, bytes], properties: dict[str, Any], expected: dict[str, Any]
) -> None:
    """RabbitMQ forwards these as published; pamqp's strict decoding of one closed the whole
    connection (every consumer on it) on each redelivery."""
    decode_leniently()
    _, _, decoded = frame.unmarshal(_content_header(edit, **properties))
    assert isinstance(decoded, ContentHeader)
    for name, value in expected.items():
        assert getattr(decoded.properties, name) == value


def test_a_broken_frame_still_fails_to_decode() -> None:
    decode_leniently()
    raw = frame.marshal(ContentHeader(0, 2, spec_properties(headers={"a": "b"})), 1)
    # the header table's length claims more than the frame holds
    broken = raw.replace(b"\x00\x00\x00\x08\x01a", b"\x00\x00\xff\x08\x01a")
    assert broken != raw
    with pytest.raises(UnmarshalingException):
        frame.unmarshal(broken)


@pytest.mark.parametrize(
    ("value", "text", "kind"),
    [
        ("sig", "sig", "str"),
        (b"sig", "sig", "bytes"),
        (bytearray(b"sig"), "sig", "bytearray"),
        (42, None, "int"),
        (None, None, None),
    ],
)
def test_signature_header_as_text_or_bytes(value: Any, text: str | None, kind: str | None) -> None:
    headers = {} if value is None else {SIGNATURE_HEADER: value}
    delivery = Delivery(
        queue="q",
        body=b"",
        message_id=None,
        message_type=None,
        app_id=None,
        user_id=None,
        content_type=None,
        content_encoding=None,
        correlation_id=None,
        reply_to=None,
        headers=headers,
        redelivered=False,
        delivery_count=0,
    )
    assert delivery.header_str(SIGNATURE_HEADER) == text
    assert delivery.header_type(SIGNATURE_HEADER) == kind
