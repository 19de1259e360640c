"""Versions of one document: an original filing, its amendments and its cancellation.

A partner files a declaration (``shipment.advance_data``, ``shipment.manifest``,
``shipment.export_declaration``) or an enforcement report (``enforcement.seizure_report``)
and may amend or cancel it later (``message_function``: 9 original, 5 replace, 4 change,
1 cancellation, 3 deletion, 6 confirmation). Each version is its own message, with its own
``message_id``, stored, receipted and audited like any other. Versions can arrive out of order
(parallel connections, a re-send after a timeout, AMQP redelivery): amendment v2 before v1
(RELIABILITY-SECURITY T47).

PROTOCOL has no version number, so the gateway orders the versions of a document by the
sender's ``created_at`` (signed, in the header), and versions with the same ``created_at`` in
the order the store received them (its inbox ``seq``). Both go into one string,
:func:`document_version`, that sorts as the versions do. Internal consumers apply
highest-version-wins: a delivery whose version is lower than the one they hold is kept as
history and changes nothing, so the state they derive never goes back from v2 to v1, whatever
the order of arrival or of delivery. ``GET /api/v1/documents`` answers with the same order.

A document is named by its sender, its message type and its reference, read from the payload
(:data:`DOCUMENT_FIELDS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: per message type, the payload fields that name one document (its versions share them)
DOCUMENT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "shipment.advance_data": ("advance_data_ref",),
    "shipment.manifest": ("manifest_ref",),
    # {scheme, value}: an EU MRN, a US AES ITN or a national number
    "shipment.export_declaration": ("export_ref",),
    # a case's seizure, detention, suspension and forfeiture are separate reports
    "enforcement.seizure_report": ("case_ref", "event_type"),
}

#: longest reference kept (the schemas allow far less; the API takes up to this)
MAX_REF = 200

#: UNTDID 1225 codes that end a document
CANCELLING_FUNCTIONS = frozenset({"1", "3"})


def _part(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):
        scheme, inner = value.get("scheme"), value.get("value")
        if isinstance(scheme, str) and isinstance(inner, str) and inner:
            return f"{scheme}:{inner}"
    return None


def document_ref(message_type: str, payload: Mapping[str, Any]) -> str | None:
    """The reference that names the document this message is a version of, or None for a
    message type without versions (or a payload that lacks the fields)."""
    fields = DOCUMENT_FIELDS.get(message_type)
    if fields is None:
        return None
    parts = [_part(payload.get(name)) for name in fields]
    if any(part is None for part in parts):
        return None
    ref = "/".join(part for part in parts if part is not None)
    return ref if len(ref) <= MAX_REF else None


def message_function(payload: Mapping[str, Any]) -> str | None:
    value = payload.get("message_function")
    return value if isinstance(value, str) else None


def document_version(created_at: datetime, seq: int) -> str:
    """``<created_at, UTC, microseconds>/<inbox seq, 20 digits>``: compared as strings,
    versions sort by ``created_at``, then by the order the store received them."""
    utc = created_at.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + f"/{seq:020d}"
