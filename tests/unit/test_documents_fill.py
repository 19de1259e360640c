"""Document columns of inbox rows stored before they were kept, read from the stored body."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.documents import (
    FILL_BYTES,
    DocumentColumns,
    document_ref,
    fill_batch,
    fill_columns,
    message_function,
    stored_document_columns,
)
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header

AT = datetime(2026, 11, 24, 12, 0, 0, 123000, tzinfo=UTC)


def body(message_type: str, payload: dict[str, object]) -> bytes:
    header = Header(
        message_id=new_message_id(),
        message_type=message_type,
        schema_version="1.0",
        sender="MX-ANAM",
        recipient="US-CBP",
        created_at=AT,
    )
    return encode_envelope(header, payload)


def test_a_stored_body_gives_the_columns_receipt_would_have() -> None:
    payload: dict[str, object] = {
        "export_ref": {"scheme": "EU_MRN", "value": "26NL7Q3K9P2M8T4W1C"},
        "message_function": "5",
    }
    columns = stored_document_columns(body("shipment.export_declaration", payload))
    assert columns == DocumentColumns(
        document_ref=document_ref("shipment.export_declaration", payload),
        created_at=AT,
        message_function=message_function(payload),
    )
    assert columns.document_ref == "EU_MRN:26NL7Q3K9P2M8T4W1C"


def test_a_type_without_versions_gets_its_created_at_and_no_document() -> None:
    columns = stored_document_columns(body("shipment.status", {"advance_data_ref": "LRN-1"}))
    assert columns == DocumentColumns(document_ref=None, created_at=AT, message_function=None)


def test_a_body_that_is_no_envelope_gives_nothing() -> None:
    for stored in (b"", b"old", b"{}", b'{"header": {}, "payload": {}}', b"\xff"):
        assert stored_document_columns(stored) is None
    good = body("shipment.advance_data", {"advance_data_ref": "LRN-1"})
    found = fill_columns([(1, b"old"), (2, good)])
    assert [seq for seq, _ in found] == [1, 2]
    assert found[0][1] is None
    assert found[1][1] is not None
    assert found[1][1].document_ref == "LRN-1"


def test_a_batch_is_cut_where_its_bodies_pass_the_byte_budget() -> None:
    assert fill_batch([]) == []
    # the first row always, however large, so a large body never stops the fill
    assert fill_batch([(7, FILL_BYTES * 3), (8, 1)]) == [7]
    half = FILL_BYTES // 2
    assert fill_batch([(1, half), (2, half), (3, 1), (4, 1)]) == [1, 2]
    assert fill_batch([(1, 10), (2, 20), (3, 30)]) == [1, 2, 3]
