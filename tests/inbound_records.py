"""A stored inbound record for tests of what happens after the store (bus, relay)."""

from __future__ import annotations

import datetime as dt

from gateway.envelope import body_digest, new_message_id
from gateway.store.base import InboundRecord


def sample_record(
    index: int = 0, *, sender: str = "MX-ANAM", recipient: str = "US-CBP"
) -> InboundRecord:
    body = b'{"header": {}, "payload": {"n": %d}}' % index
    return InboundRecord(
        sender=sender,
        message_id=new_message_id(),
        recipient=recipient,
        message_type="shipment.status",
        schema_version="1.0",
        correlation_id=None,
        in_reply_to=None,
        body=body,
        body_digest=body_digest(body),
        signature="sig",
        kid="kid",
        transport="amqp",
        received_at=dt.datetime.now(dt.UTC),
        # as the pipeline stores every row: a row without it is one from before the store
        # kept it, whose columns the store fills from its body when it opens
        created_at=dt.datetime.now(dt.UTC),
        receipt_body=b"{}",
        receipt_signature="rsig",
    )
