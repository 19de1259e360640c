"""The document a message is a version of, and the order of its versions (T47)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.documents import MAX_REF, document_ref, document_version, message_function
from gateway.schemas.registry import SchemaRegistry


@pytest.mark.parametrize(
    ("message_type", "payload", "ref"),
    [
        ("shipment.advance_data", {"advance_data_ref": "LRN-1"}, "LRN-1"),
        ("shipment.manifest", {"manifest_ref": "EK9021-LAX"}, "EK9021-LAX"),
        (
            "shipment.export_declaration",
            {"export_ref": {"scheme": "EU_MRN", "value": "26NL7Q3K9P2M8T4W1C"}},
            "EU_MRN:26NL7Q3K9P2M8T4W1C",
        ),
        (
            "enforcement.seizure_report",
            {"case_ref": "US-CBP-LAX-2026-SZ-000311", "event_type": "seizure"},
            "US-CBP-LAX-2026-SZ-000311/seizure",
        ),
        # no versions, or the fields are missing or empty
        ("shipment.status", {"advance_data_ref": "LRN-1"}, None),
        ("shipment.advance_data", {}, None),
        ("shipment.advance_data", {"advance_data_ref": ""}, None),
        ("shipment.export_declaration", {"export_ref": {"scheme": "EU_MRN"}}, None),
        ("enforcement.seizure_report", {"case_ref": "C-1"}, None),
        ("shipment.advance_data", {"advance_data_ref": "x" * (MAX_REF + 1)}, None),
    ],
)
def test_document_ref_names_the_document(
    message_type: str, payload: dict[str, object], ref: str | None
) -> None:
    assert document_ref(message_type, payload) == ref


def test_every_catalogue_example_of_a_versioned_type_names_its_document() -> None:
    registry = SchemaRegistry.load_builtin()
    for message_type in (
        "shipment.advance_data",
        "shipment.manifest",
        "shipment.export_declaration",
        "enforcement.seizure_report",
    ):
        for example in registry.examples(message_type, "1.0"):
            assert document_ref(message_type, example), message_type
            # optional in an export declaration
            assert message_function(example) in {"9", "5", "4", "1", "3", "6", None}


def test_versions_sort_by_created_at_then_arrival_as_strings() -> None:
    t0 = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    versions = [
        document_version(t0, 900),  # oldest, arrived last
        document_version(t0 + timedelta(microseconds=1), 5),
        document_version((t0 + timedelta(seconds=1)).astimezone(plus_two), 7),
        document_version(t0 + timedelta(seconds=1), 8),  # same instant, arrived later
        document_version(t0 + timedelta(days=400), 1),
    ]
    assert sorted(versions) == versions
    assert versions[2] == "2026-11-23T07:00:01.000000Z/00000000000000000007"
