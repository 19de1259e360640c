"""``OutgoingMessage.properties()`` (what the broker seam publishes) carries exactly the PROTOCOL
section 5 properties that the aio-pika message built from it would: same bytes on the wire."""

from __future__ import annotations

import pytest
from pamqp.header import ContentHeader

from gateway.transports.amqp import OutgoingMessage


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
