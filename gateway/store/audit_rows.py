"""What appending audit events writes: one entry row per event plus the Merkle nodes it completes.

Pure and shared by both backends; the caller reads the head size and the frontier nodes and
writes the result in the transaction that holds the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from gateway.audit.events import AuditEvent
from gateway.audit.merkle import append_nodes, leaf_hash
from gateway.store.base import NodeKey


@dataclass(frozen=True, kw_only=True, slots=True)
class EntryRow:
    seq: int
    entry: bytes
    leaf_hash: bytes
    at: datetime
    event: str
    message_id: str | None
    sender: str | None
    recipient: str | None
    message_type: str | None
    outcome: str | None
    correlation_id: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditAppend:
    entries: list[EntryRow]
    nodes: dict[NodeKey, bytes]
    new_size: int


def plan_append(
    size: int, frontier_hashes: Mapping[NodeKey, bytes], events: Sequence[AuditEvent]
) -> AuditAppend:
    entries = entry_rows(size, events)
    nodes = append_nodes(size, frontier_hashes, [e.leaf_hash for e in entries])
    return AuditAppend(entries=entries, nodes=nodes, new_size=size + len(entries))


def entry_rows(size: int, events: Sequence[AuditEvent]) -> list[EntryRow]:
    """The entry rows of ``events`` appended to a log of ``size`` entries (leaf data and hash)."""
    entries: list[EntryRow] = []
    for offset, event in enumerate(events):
        data = event.entry_bytes()
        entries.append(
            EntryRow(
                seq=size + offset,
                entry=data,
                leaf_hash=leaf_hash(data),
                at=event.at,
                event=event.event.value,
                message_id=event.message_id,
                sender=event.sender,
                recipient=event.recipient,
                message_type=event.message_type,
                outcome=event.outcome,
                correlation_id=event.correlation_id,
            )
        )
    return entries
