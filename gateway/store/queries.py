"""Filtered listings (audit entries, messages) as SQL, shared by both backends.

A ``Dialect`` says how a backend writes a parameter and a timestamp; the rest of the SQL
is common. Listings are keyset-paged, so a page costs the same at any depth.
"""

# ruff: noqa: S608 -- SQL here is composed of constant fragments and placeholders; every
# value goes through a query parameter.

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from gateway.model import Direction
from gateway.store.base import (
    INBOUND_DELIVERED,
    INBOUND_RECEIVED,
    AuditFilter,
    MessageFilter,
    OutboundState,
    StoreError,
)


class InvalidCursor(StoreError):
    def __init__(self, cursor: str) -> None:
        super().__init__(f"invalid page cursor {cursor!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Dialect:
    #: the placeholder for the n-th (1-based) parameter
    placeholder: Callable[[int], str]
    #: a datetime as the backend stores it
    timestamp: Callable[[datetime], object]
    #: a boolean SQL literal
    true: str
    false: str


@dataclass(kw_only=True, slots=True)
class _Params:
    dialect: Dialect
    values: list[object] = field(default_factory=list)

    def add(self, value: object) -> str:
        self.values.append(value)
        return self.dialect.placeholder(len(self.values))


AUDIT_COLUMNS = "seq, entry, leaf_hash"
#: the filter columns, in ``AuditIndex`` order, after AUDIT_COLUMNS
AUDIT_INDEX_COLUMNS = (
    "at, event, message_id, sender, recipient, message_type, outcome, correlation_id"
)


def index_fields(row: Sequence[object]) -> dict[str, object]:
    """``AuditIndex``'s fields but ``at``, from a row selected with AUDIT_INDEX_COLUMNS."""
    return dict(
        zip(
            ("event", "message_id", "sender", "recipient", "message_type", "outcome"),
            row[4:10],
            strict=True,
        ),
        correlation_id=row[10],
    )


def audit_query(
    dialect: Dialect, filt: AuditFilter, *, after_seq: int, limit: int, with_index: bool = False
) -> tuple[str, list[object]]:
    p = _Params(dialect=dialect)
    where = [f"seq > {p.add(after_seq)}"]
    if filt.since is not None:
        where.append(f"at >= {p.add(dialect.timestamp(filt.since))}")
    if filt.until is not None:
        where.append(f"at < {p.add(dialect.timestamp(filt.until))}")
    if filt.partner is not None:
        where.append(f"(sender = {p.add(filt.partner)} OR recipient = {p.add(filt.partner)})")
    for column, value in (
        ("message_type", filt.message_type),
        ("message_id", filt.message_id),
        ("outcome", filt.outcome),
        ("event", filt.event),
        ("correlation_id", filt.correlation_id),
    ):
        if value is not None:
            where.append(f"{column} = {p.add(value)}")
    sql = (
        f"SELECT {AUDIT_COLUMNS}{', ' + AUDIT_INDEX_COLUMNS if with_index else ''}"
        f" FROM audit_entries WHERE {' AND '.join(where)} "
        f"ORDER BY seq LIMIT {p.add(limit)}"
    )
    return sql, p.values


@dataclass(frozen=True, kw_only=True, slots=True)
class Cursor:
    """The last row of a page: ``(at, direction, partner, message_id)``, newest first."""

    at: datetime
    direction: str
    partner: str
    message_id: str

    def encode(self) -> str:
        raw = orjson.dumps([self.at.isoformat(), self.direction, self.partner, self.message_id])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            at, direction, partner, message_id = orjson.loads(raw)
            moment = datetime.fromisoformat(at)
        except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise InvalidCursor(text) from exc
        if moment.tzinfo is None or not all(
            isinstance(v, str) for v in (direction, partner, message_id)
        ):
            raise InvalidCursor(text)
        return cls(at=moment, direction=direction, partner=partner, message_id=message_id)


#: columns of a MessageSummary row, in order
SUMMARY_COLUMNS = (
    "direction, message_id, partner, message_type, schema_version, correlation_id, "
    "state, at, attempts, body_digest"
)
_OUTBOUND_STATES = frozenset(s.value for s in OutboundState)


def messages_query(
    dialect: Dialect, filt: MessageFilter, *, limit: int, after: str | None
) -> tuple[str, list[object]] | None:
    """The listing SQL, or None when the filter can match nothing."""
    cursor = Cursor.decode(after) if after is not None else None
    p = _Params(dialect=dialect)
    branches: list[str] = []
    if filt.direction in (None, Direction.INBOUND) and filt.state in (
        None,
        INBOUND_RECEIVED,
        INBOUND_DELIVERED,
    ):
        where = _common_where(p, filt, cursor, "inbound", "sender", "received_at")
        if filt.state is not None:
            relayed = dialect.true if filt.state == INBOUND_DELIVERED else dialect.false
            where.append(f"relayed = {relayed}")
        branches.append(
            "SELECT 'inbound' AS direction, message_id, sender AS partner, message_type, "
            "schema_version, correlation_id, "
            f"CASE WHEN relayed THEN '{INBOUND_DELIVERED}' ELSE '{INBOUND_RECEIVED}' END AS state, "
            "received_at AS at, 0 AS attempts, body_digest FROM inbound_messages"
            + _where_sql(where)
        )
    if filt.direction in (None, Direction.OUTBOUND) and (
        filt.state is None or filt.state in _OUTBOUND_STATES
    ):
        where = _common_where(p, filt, cursor, "outbound", "recipient", "created_at")
        if filt.state is not None:
            where.append(f"state = {p.add(filt.state)}")
        branches.append(
            "SELECT 'outbound' AS direction, message_id, recipient AS partner, message_type, "
            "schema_version, correlation_id, state, created_at AS at, attempts, body_digest "
            "FROM outbound_messages" + _where_sql(where)
        )
    if not branches:
        return None
    union = " UNION ALL ".join(f"SELECT * FROM ({b}) AS b{i}" for i, b in enumerate(branches))
    sql = (
        f"SELECT {SUMMARY_COLUMNS} FROM ({union}) AS m "
        f"ORDER BY at DESC, direction DESC, partner DESC, message_id DESC LIMIT {p.add(limit)}"
    )
    return sql, p.values


def _common_where(
    p: _Params,
    filt: MessageFilter,
    cursor: Cursor | None,
    direction: str,
    partner_column: str,
    at_column: str,
) -> list[str]:
    where: list[str] = []
    if filt.partner is not None:
        where.append(f"{partner_column} = {p.add(filt.partner)}")
    if filt.message_type is not None:
        where.append(f"message_type = {p.add(filt.message_type)}")
    if filt.correlation_id is not None:
        where.append(f"correlation_id = {p.add(filt.correlation_id)}")
    if filt.since is not None:
        where.append(f"{at_column} >= {p.add(p.dialect.timestamp(filt.since))}")
    if filt.until is not None:
        where.append(f"{at_column} < {p.add(p.dialect.timestamp(filt.until))}")
    if cursor is not None:
        at = p.add(p.dialect.timestamp(cursor.at))
        where.append(
            f"({at_column} < {at} OR ({at_column} = {at} AND "
            f"(CAST('{direction}' AS TEXT), {partner_column}, message_id) < "
            f"({p.add(cursor.direction)}, {p.add(cursor.partner)}, {p.add(cursor.message_id)})))"
        )
    return where


def _where_sql(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""
