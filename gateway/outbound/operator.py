"""Operator actions on the outbox (API and CLI share them): audited with the actor."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import format_rfc3339
from gateway.store.base import InvalidTransition, MessageNotFound, OutboundRecord, Store


class RetryRefused(Exception):
    def __init__(self, reason: str, *, kind: Literal["not_found", "conflict"]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


async def operator_retry(
    store: Store, *, party: str, message_id: str, actor: str, now: datetime
) -> OutboundRecord:
    """Put a dead or rejected message back in the queue, attempts reset, same signed bytes."""
    record = await store.get_outbound(message_id)
    if record is None:
        raise RetryRefused(f"no outbound message with message_id {message_id}", kind="not_found")
    if record.expires_at is not None and record.expires_at <= now:
        # Its signed header says it expired: any partner must refuse these bytes as STALE.
        raise RetryRefused(
            f"message {message_id} expired at {format_rfc3339(record.expires_at)}; its signed"
            " bytes would be refused as STALE: submit the content again as a new message",
            kind="conflict",
        )
    event = AuditEvent(
        event=EventKind.OPERATOR_ACTION,
        at=now,
        message_id=message_id,
        sender=party,
        recipient=record.recipient,
        message_type=record.message_type,
        correlation_id=record.correlation_id,
        body_digest=record.body_digest,
        outcome="retry",
        reason=f"operator retry of a {record.state.value} message",
        actor=actor,
    )
    try:
        return await store.retry_outbound(message_id, now=now, actor=actor, events=[event])
    except MessageNotFound:
        raise RetryRefused(
            f"no outbound message with message_id {message_id}", kind="not_found"
        ) from None
    except InvalidTransition as exc:
        raise RetryRefused(
            f"message {message_id} is {exc.state}; only dead or rejected messages can be retried",
            kind="conflict",
        ) from None
