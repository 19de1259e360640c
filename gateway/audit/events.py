"""Audit events: what happened, to which message, with which outcome and exact reason.

An event becomes one leaf of the Merkle log: the leaf bytes are the RFC 8785 canonical
JSON of ``AuditEvent.to_entry()`` (None fields left out). Entries hold metadata and
digests only, never bodies, signatures, keys or tokens.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
import rfc8785
import structlog

from gateway.clock import format_rfc3339
from gateway.errors import GatewayError


class EventKind(StrEnum):
    #: not written by this gateway: accepted/duplicate/rejected carry the receipt time
    #: (docs/audit-events.md); kept so entries of that kind still parse
    RECEIVED = "received"
    REJECTED = "rejected"
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    DELIVERED = "delivered"
    SUBMITTED = "submitted"
    SUBMIT_REJECTED = "submit_rejected"
    SENT = "sent"
    ATTEMPT_FAILED = "attempt_failed"
    RECEIPT_RECEIVED = "receipt_received"
    ACKNOWLEDGED = "acknowledged"
    PARTNER_REJECTED = "partner_rejected"
    RESIGNED = "resigned"
    DEAD = "dead"
    QUERY = "query"
    OPERATOR_ACTION = "operator_action"
    KEY_CHANGE = "key_change"
    POISON = "poison"
    TLS_REFUSED = "tls_refused"
    #: not written: a checkpoint offer is audited as the outbound message it is (submitted);
    #: kept so entries of that kind still parse
    CHECKPOINT_SENT = "checkpoint_sent"
    CHECKPOINT_WITNESSED = "checkpoint_witnessed"
    COSIGNATURE_RECEIVED = "cosignature_received"
    HISTORY_INCONSISTENT = "history_inconsistent"


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEvent:
    event: EventKind
    at: datetime
    message_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    message_type: str | None = None
    correlation_id: str | None = None
    #: ``sha-256:<base64url>`` of the exact body bytes
    body_digest: str | None = None
    #: ``ACK``, a NACK code, or a short state word (``sent``, ``dead`` ...)
    outcome: str | None = None
    #: the exact reason of a rejection or failure (operator-facing, never sent to partners)
    reason: str | None = None
    #: who did it, for operator actions and API submissions (a JWT subject, ``cli:<user>``)
    actor: str | None = None
    transport: str | None = None

    def to_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"event": self.event.value, "at": format_rfc3339(self.at)}
        for name in (
            "message_id",
            "sender",
            "recipient",
            "message_type",
            "correlation_id",
            "body_digest",
            "outcome",
            "reason",
            "actor",
            "transport",
        ):
            value = getattr(self, name)
            if value is not None:
                entry[name] = value
        return entry

    def entry_bytes(self) -> bytes:
        """The leaf data: RFC 8785 canonical JSON of the entry."""
        entry = self.to_entry()
        if all(type(value) is str for value in entry.values()):
            # A flat object of ASCII keys and string values: orjson with sorted keys writes
            # the very RFC 8785 bytes (same escapes, UTF-8, no whitespace) about 20x faster
            # than the pure-Python canonicalizer; two entries are written per message.
            try:
                return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)
            except orjson.JSONEncodeError:
                pass  # a lone surrogate: the canonicalizer below reports it
        return bytes(rfc8785.dumps(entry))


def entry_view(entry: bytes) -> dict[str, Any]:
    """A stored entry as the JSON object it holds, for listings. Bytes that hold no JSON
    object were changed behind the gateway's back (``audit check`` names them): they are shown
    as ``{"unreadable": <base64>}`` rather than failing the whole listing."""
    try:
        value = orjson.loads(entry)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"unreadable": base64.b64encode(entry).decode("ascii")}


async def record_or_log(
    append: Callable[[AuditEvent], Awaitable[object]], event: AuditEvent
) -> None:
    """Append ``event``; if the store cannot take it, the log carries the entry instead (the
    action it records has happened either way)."""
    try:
        await append(event)
    except GatewayError as exc:
        structlog.get_logger(__name__).error(
            "audit_entry_not_written", entry=event.to_entry(), error=exc.reason
        )
