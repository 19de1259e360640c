"""Audit leaf bytes are RFC 8785 canonical JSON, whichever serializer writes them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.events import AuditEvent, EventKind

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
#: any text a field may carry, except lone surrogates (not representable in UTF-8)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]))


@settings(max_examples=500)
@given(
    message_id=st.none() | TEXT,
    sender=st.none() | TEXT,
    reason=st.none() | TEXT,
    actor=st.none() | TEXT,
    outcome=st.none() | TEXT,
)
def test_entry_bytes_are_the_rfc8785_bytes(
    message_id: str | None,
    sender: str | None,
    reason: str | None,
    actor: str | None,
    outcome: str | None,
) -> None:
    event = AuditEvent(
        event=EventKind.REJECTED,
        at=T0,
        message_id=message_id,
        sender=sender,
        reason=reason,
        actor=actor,
        outcome=outcome,
    )
    assert event.entry_bytes() == bytes(rfc8785.dumps(event.to_entry()))


def test_every_control_character_and_edge_code_point_is_escaped_canonically() -> None:
    text = "".join(chr(cp) for cp in [*range(0x20), 0x22, 0x2F, 0x5C, 0x7F, 0x2028, 0x10FFFF])
    event = AuditEvent(event=EventKind.QUERY, at=T0, reason=text)
    assert event.entry_bytes() == bytes(rfc8785.dumps(event.to_entry()))


def test_a_lone_surrogate_is_refused_as_before() -> None:
    event = AuditEvent(event=EventKind.QUERY, at=T0, reason="\ud800")
    with pytest.raises(rfc8785.CanonicalizationError):
        event.entry_bytes()
