"""Outcome events of our outbound messages (transactional outbox of ``c2c.outcomes``).

When an outbound row reaches a final state (acknowledged, rejected, dead, closed) the store
writes, in the same transaction, a row of ``outbound_outcomes``: the event as it will be
published, its body a snapshot of the message at that moment. The outcome relay
(gateway/outcome_relay.py) claims those rows with a lease, publishes them and deletes them once
the bus confirmed them: an outcome committed is published at least once, never before its
commit. A message that reaches a final state again (an operator's retry, then a new end; a
partner's late receipt settling a dead message) gets a new event, numbered ``n`` per message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gateway.clock import format_rfc3339
from gateway.store.base import ACTIVE_STATES, OutboundRecord, OutboundState


def is_final(state: OutboundState) -> bool:
    """A state of which an outcome is published: every state the dispatcher is done with."""
    return state not in ACTIVE_STATES


@dataclass(frozen=True, kw_only=True, slots=True)
class OutcomeRecord:
    """One outcome still to publish (a row of ``outbound_outcomes``)."""

    #: its order in the store (claims take the oldest first)
    seq: int
    message_id: str
    recipient: str
    message_type: str
    state: OutboundState
    #: the how-manieth final state of this message (1 for its first)
    n: int
    #: the JSON body published (``outcome_body``)
    body: bytes
    #: when the final state was written
    at: datetime

    @property
    def outcome_id(self) -> str:
        """Stable across re-publishes of this event: consumers deduplicate by it."""
        return outcome_id(self.message_id, self.state, self.n)


def outcome_id(message_id: str, state: OutboundState, n: int) -> str:
    return f"{message_id}/{state.value}/{n}"


def receipt_summary(receipt_body: bytes | None) -> dict[str, Any] | None:
    """The ``status`` and ``code`` of a stored receipt (verified when it came), or None when
    there is none or it is not the canonical envelope."""
    if receipt_body is None:
        return None
    try:
        envelope = orjson.loads(receipt_body)
    except orjson.JSONDecodeError:
        return None
    payload = envelope.get("payload") if isinstance(envelope, dict) else None
    if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
        return None
    code = payload.get("code")
    return {"status": payload["status"], "code": code if isinstance(code, str) else None}


def outcome_body(record: OutboundRecord, n: int) -> bytes:
    """The event's JSON body: the message as it stands in its final state ``record.state``."""
    return orjson.dumps(
        {
            "outcome_id": outcome_id(record.message_id, record.state, n),
            "message_id": record.message_id,
            "recipient": record.recipient,
            "message_type": record.message_type,
            "state": record.state.value,
            "attempts": record.attempts,
            "last_error": record.last_error,
            "correlation_id": record.correlation_id,
            "in_reply_to": record.in_reply_to,
            "submitted_by": record.submitted_by,
            "idempotency_key": record.idempotency_key,
            "created_at": format_rfc3339(record.created_at),
            "updated_at": format_rfc3339(record.updated_at),
            "receipt": receipt_summary(record.receipt_body),
        }
    )


__all__ = ["OutcomeRecord", "is_final", "outcome_body", "outcome_id", "receipt_summary"]
