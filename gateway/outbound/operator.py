"""Operator actions on the outbox (API and CLI share them): audited with the actor."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import format_rfc3339
from gateway.config import GatewayConfig
from gateway.crypto.keys import SigningKey
from gateway.errors import GatewayError
from gateway.store.base import (
    InvalidTransition,
    MessageNotFound,
    OutboundRecord,
    Resigned,
    Store,
)


class RetryRefused(Exception):
    def __init__(self, reason: str, *, kind: Literal["not_found", "conflict"]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


async def operator_retry(
    store: Store,
    *,
    party: str,
    message_id: str,
    actor: str,
    now: datetime,
    config: GatewayConfig,
    signing_keys: Sequence[SigningKey],
) -> OutboundRecord:
    """Put a dead or rejected message back in the queue, attempts reset, same signed bytes.

    An expired message (PROTOCOL.md section 7: retryable by an operator) is signed again, as
    a partner's ``STALE`` answer has it signed again (docs/operations.md): the same
    message_id and payload, ``created_at`` now and ``expires_at`` its time-to-live from now,
    with the newest valid key of ``signing_keys``."""
    record = await store.get_outbound(message_id)
    if record is None:
        raise RetryRefused(f"no outbound message with message_id {message_id}", kind="not_found")
    resigned: Resigned | None = None
    reason = f"operator retry of a {record.state.value} message"
    if record.expires_at is not None and record.expires_at <= now:
        resigned = _sign_again(record, config, signing_keys, now)
        renewed = (
            f", expires_at {format_rfc3339(resigned.expires_at)}" if resigned.expires_at else ""
        )
        reason += (
            f" that expired at {format_rfc3339(record.expires_at)}: signed again at"
            f" {format_rfc3339(now)} (key {resigned.kid}){renewed}; the bytes"
            f" {record.body_digest} replaced"
        )
    event = AuditEvent(
        event=EventKind.OPERATOR_ACTION,
        at=now,
        message_id=message_id,
        sender=party,
        recipient=record.recipient,
        message_type=record.message_type,
        correlation_id=record.correlation_id,
        body_digest=record.body_digest if resigned is None else resigned.body_digest,
        outcome="retry",
        reason=reason,
        actor=actor,
    )
    try:
        return await store.retry_outbound(
            message_id,
            now=now,
            actor=actor,
            events=[event],
            resigned=resigned,
        )
    except MessageNotFound:
        raise RetryRefused(
            f"no outbound message with message_id {message_id}", kind="not_found"
        ) from None
    except InvalidTransition as exc:
        raise RetryRefused(
            f"message {message_id} is {exc.state}; only dead or rejected messages can be retried",
            kind="conflict",
        ) from None


def _sign_again(
    record: OutboundRecord,
    config: GatewayConfig,
    signing_keys: Sequence[SigningKey],
    now: datetime,
) -> Resigned:
    """An expired message's new bytes, ``expires_at`` its time-to-live from now."""
    # imported here: the dispatcher's module imports the transports
    from gateway.outbound.dispatcher import sign_again

    assert record.expires_at is not None
    expired = f"message {record.message_id} expired at {format_rfc3339(record.expires_at)}"
    if record.state.value not in ("dead", "rejected"):
        raise RetryRefused(
            f"message {record.message_id} is {record.state.value}; only dead or rejected"
            " messages can be retried",
            kind="conflict",
        )
    if record.body is None:
        raise RetryRefused(
            f"{expired} and its body was purged by retention: it cannot be signed again",
            kind="conflict",
        )
    partner = config.partners.get(record.recipient)
    if partner is None:
        raise RetryRefused(
            f"{expired}; it must be signed again, and {record.recipient} is no longer a"
            " configured partner",
            kind="conflict",
        )
    try:
        resigned = sign_again(
            record.body, partner=partner, signing_keys=signing_keys, now=now, renew_expiry=True
        )
    except GatewayError as exc:
        raise RetryRefused(
            f"{expired}; signing it again failed: {exc.reason}", kind="conflict"
        ) from None
    assert resigned is not None
    return resigned
