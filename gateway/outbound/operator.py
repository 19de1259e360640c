"""Operator actions on the outbox (API and CLI share them): audited with the actor."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import format_rfc3339
from gateway.config import GatewayConfig
from gateway.crypto.keys import SigningKey
from gateway.errors import GatewayError
from gateway.store.base import (
    RETRYABLE_STATES,
    InvalidTransition,
    MessageNotFound,
    OutboundRecord,
    Resigned,
    Store,
)

#: the longest reason an operator may give for a retry or a close (it is kept in the audit log)
MAX_OPERATOR_REASON = 500
#: Unicode categories a reason may not hold: control characters (C0, DEL, C1) and line or
#: paragraph separators, which would break the audit entry's one line of text in a terminal
#: or a log; and lone surrogates (undecodable bytes of a command line), which no UTF-8 entry
#: can hold
_NOT_TEXT = frozenset({"Cc", "Zl", "Zp", "Cs"})


class OperatorRefused(Exception):
    """An operator action refused: ``kind`` says why (the API answers 404, 409 or 400)."""

    def __init__(self, reason: str, *, kind: Literal["not_found", "conflict", "invalid"]) -> None:
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
    why: str | None = None,
) -> OutboundRecord:
    """Put a dead, closed or rejected message back in the queue, attempts reset, same signed
    bytes. ``why``, the operator's reason (a ticket, what was fixed), goes into the audit entry.

    An expired message (PROTOCOL.md section 7: retryable by an operator) is signed again, as
    a partner's ``STALE`` answer has it signed again (docs/operations.md): the same
    message_id and payload, ``created_at`` now and ``expires_at`` its time-to-live from now,
    with the newest valid key of ``signing_keys``."""
    given = None if why is None else operator_reason(why, asked="say why it is sent again")
    record = await store.get_outbound(message_id)
    if record is None:
        raise OperatorRefused(f"no outbound message with message_id {message_id}", kind="not_found")
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
        reason=reason if given is None else f"{reason}; the operator's reason: {given}",
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
        raise OperatorRefused(
            f"no outbound message with message_id {message_id}", kind="not_found"
        ) from None
    except InvalidTransition as exc:
        raise OperatorRefused(
            f"message {message_id} is {exc.state}; only dead, closed or rejected messages can"
            " be retried",
            kind="conflict",
        ) from None


async def operator_close(
    store: Store,
    *,
    party: str,
    message_id: str,
    actor: str,
    reason: str,
    now: datetime,
) -> OutboundRecord:
    """Close a dead message that will not be sent again (its body purged by retention, its
    partner removed, its case settled another way): it is no longer counted as dead, so
    ``C2COutboxDead`` clears. The operator says why, and the audit entry keeps it with the
    actor. ``operator_retry`` undoes a close, and the partner's late receipt still settles
    the message."""
    why = operator_reason(reason, asked="say why the message will not be sent again")
    record = await store.get_outbound(message_id)
    if record is None:
        raise OperatorRefused(f"no outbound message with message_id {message_id}", kind="not_found")
    event = AuditEvent(
        event=EventKind.OPERATOR_ACTION,
        at=now,
        message_id=message_id,
        sender=party,
        recipient=record.recipient,
        message_type=record.message_type,
        correlation_id=record.correlation_id,
        body_digest=record.body_digest,
        outcome="close",
        reason=f"operator closed a dead message: {why}",
        actor=actor,
    )
    try:
        return await store.close_outbound(message_id, now=now, events=[event])
    except MessageNotFound:
        raise OperatorRefused(
            f"no outbound message with message_id {message_id}", kind="not_found"
        ) from None
    except InvalidTransition as exc:
        raise OperatorRefused(
            f"message {message_id} is {exc.state}; only a dead message can be closed",
            kind="conflict",
        ) from None


def operator_reason(reason: str, *, asked: str) -> str:
    """The operator's reason for an action, without surrounding blanks: one line of text.
    ``asked`` says what it should say, for an empty one."""
    text = reason.strip()
    if not text:
        raise OperatorRefused(f"a reason is required: {asked}", kind="invalid")
    if len(text) > MAX_OPERATOR_REASON:
        raise OperatorRefused(
            f"the reason has {len(text)} characters; at most {MAX_OPERATOR_REASON} are allowed",
            kind="invalid",
        )
    for at, char in enumerate(text, start=1):
        if unicodedata.category(char) in _NOT_TEXT:
            raise OperatorRefused(
                f"the reason has a control character or line break (U+{ord(char):04X}) at"
                f" character {at}: give it as one line of text",
                kind="invalid",
            )
    return text


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
    if record.state not in RETRYABLE_STATES:
        raise OperatorRefused(
            f"message {record.message_id} is {record.state.value}; only dead, closed or"
            " rejected messages can be retried",
            kind="conflict",
        )
    if record.body is None:
        raise OperatorRefused(
            f"{expired} and its body was purged by retention: it cannot be signed again",
            kind="conflict",
        )
    partner = config.partners.get(record.recipient)
    if partner is None:
        raise OperatorRefused(
            f"{expired}; it must be signed again, and {record.recipient} is no longer a"
            " configured partner",
            kind="conflict",
        )
    try:
        resigned = sign_again(
            record.body, partner=partner, signing_keys=signing_keys, now=now, renew_expiry=True
        )
    except GatewayError as exc:
        raise OperatorRefused(
            f"{expired}; signing it again failed: {exc.reason}", kind="conflict"
        ) from None
    assert resigned is not None
    return resigned
