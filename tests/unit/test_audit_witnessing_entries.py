"""Which audit entries are witnessing's own exchange: growth of those alone calls for no offer."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.witnessing import CHECKPOINT_TYPE, COSIGNATURE_TYPE, is_witnessing_entry

AT = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event", "message_type", "own"),
    [
        (EventKind.SUBMITTED, CHECKPOINT_TYPE, True),
        (EventKind.ACKNOWLEDGED, CHECKPOINT_TYPE, True),
        (EventKind.ACCEPTED, COSIGNATURE_TYPE, True),
        (EventKind.DELIVERED, COSIGNATURE_TYPE, True),
        (EventKind.COSIGNATURE_RECEIVED, None, True),
        (EventKind.CHECKPOINT_WITNESSED, None, True),
        # an alert about the exchange is for the witnesses to see
        (EventKind.HISTORY_INCONSISTENT, COSIGNATURE_TYPE, False),
        (EventKind.HISTORY_INCONSISTENT, None, False),
        (EventKind.ACCEPTED, "shipment.manifest", False),
        # what a partner or a forger can cause with such a message is witnessed at once
        (EventKind.REJECTED, CHECKPOINT_TYPE, False),
        (EventKind.POISON, COSIGNATURE_TYPE, False),
        (EventKind.DEAD, CHECKPOINT_TYPE, False),
        (EventKind.PARTNER_REJECTED, CHECKPOINT_TYPE, False),
        (EventKind.OPERATOR_ACTION, None, False),
    ],
)
def test_witnessing_entries(event: EventKind, message_type: str | None, own: bool) -> None:
    entry = AuditEvent(event=event, at=AT, message_type=message_type).entry_bytes()
    assert is_witnessing_entry(entry) is own


def test_unreadable_bytes_are_not_witnessing_entries() -> None:
    assert not is_witnessing_entry(b"\xff not json")
    assert not is_witnessing_entry(b'["audit.checkpoint"]')
