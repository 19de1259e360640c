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

Inbox rows stored before the store kept these (migration ``documents``) get them when the
store is opened, read from their stored bodies (:func:`stored_document_columns`) with the same
rules as at receipt; a row whose body retention purged has nothing to read them from and
belongs to no document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway.envelope import parse_envelope
from gateway.errors import GatewayError

log = structlog.get_logger(__name__)

#: per message type, the payload fields that name one document (its versions share them)
DOCUMENT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "shipment.advance_data": ("advance_data_ref",),
    "shipment.manifest": ("manifest_ref",),
    # {scheme, value}: an EU MRN, a US AES ITN or a national number
    "shipment.export_declaration": ("export_ref",),
    # a case's seizure, detention, suspension and forfeiture are separate reports
    "enforcement.seizure_report": ("case_ref", "event_type"),
}

#: reference fields that are an object {scheme, value}: their part is ``scheme:value``
SCHEMED_FIELDS = frozenset({"export_ref"})

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


def not_found(message_type: str, partner: str, ref: str) -> str:
    """What to say when ``partner`` filed no ``message_type`` under ``ref``: with the form of
    that type's reference, which is not always one field (a seizure report's is
    ``case_ref/event_type``)."""
    form = "/".join(
        f"{name}.scheme:{name}.value" if name in SCHEMED_FIELDS else name
        for name in DOCUMENT_FIELDS[message_type]
    )
    return (
        f"no {message_type} from {partner} with reference {ref[:MAX_REF]}"
        f" ({message_type} is named by its payload's {form})"
    )


def message_function(payload: Mapping[str, Any]) -> str | None:
    value = payload.get("message_function")
    return value if isinstance(value, str) else None


def document_version(created_at: datetime, seq: int) -> str:
    """``<created_at, UTC, microseconds>/<inbox seq, 20 digits>``: compared as strings,
    versions sort by ``created_at``, then by the order the store received them."""
    utc = created_at.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + f"/{seq:020d}"


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentColumns:
    """What the inbox keeps of a message for its document's versions."""

    #: :func:`document_ref`: None for a type without versions
    document_ref: str | None
    #: the header's ``created_at``
    created_at: datetime
    #: :func:`message_function`
    message_function: str | None


def stored_document_columns(body: bytes) -> DocumentColumns | None:
    """The columns of an inbox row stored before they were kept, read from its stored body
    (the exact bytes received, parsed as at receipt), or None for a body that does not parse
    as an envelope."""
    try:
        envelope = parse_envelope(body, max_bytes=len(body), expires_at_required=False)
    except GatewayError:
        return None
    header = envelope.header
    return DocumentColumns(
        document_ref=document_ref(header.message_type, envelope.payload),
        created_at=header.created_at,
        message_function=message_function(envelope.payload),
    )


#: inbox rows, and bytes of their bodies, read at a time when filling older rows' columns
FILL_ROWS = 500
FILL_BYTES = 4 * 1024 * 1024


def fill_batch(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Of the next rows to fill, ``(seq, length of the body)`` in seq order, the seqs to read
    now: the first, then each next one while their bodies total at most FILL_BYTES."""
    seqs: list[int] = []
    total = 0
    for seq, size in sizes:
        total += size
        if seqs and total > FILL_BYTES:
            break
        seqs.append(seq)
    return seqs


def fill_columns(rows: Iterable[tuple[int, bytes]]) -> list[tuple[int, DocumentColumns | None]]:
    """``(seq, stored body)`` of inbox rows stored without their document columns: each seq
    with its columns, or None where the body does not parse."""
    return [(seq, stored_document_columns(body)) for seq, body in rows]


def log_filled(filled: int, unreadable: int) -> None:
    """Tell the operator what an open of the store filled (nothing when nothing was to do)."""
    if filled:
        log.info("inbound_document_columns_filled", rows=filled)
    if unreadable:
        log.warning(
            "inbound_bodies_unreadable",
            rows=unreadable,
            hint="stored bodies that do not parse as an envelope: these messages are listed "
            "in no document's versions",
        )
