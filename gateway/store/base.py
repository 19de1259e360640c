"""The Store protocol and the records it keeps: inbox, outbox, audit log, checkpoints.

Two implementations pass one shared test suite: SQLite (embedded default) and PostgreSQL
(several replicas). Every write takes the audit events that record it and appends them in
the same transaction; every database failure surfaces as ``gateway.errors.Unavailable``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from gateway.audit.events import AuditEvent
from gateway.documents import document_version
from gateway.errors import IdempotencyKeyReused, Unavailable
from gateway.model import Direction, Priority

if TYPE_CHECKING:
    from gateway.store.outcomes import OutcomeRecord

#: ``(sender, message_id)``: the inbox key
InboundKey = tuple[str, str]
#: ``(level, idx)``: the perfect Merkle subtree over leaves ``[idx << level, (idx + 1) << level)``
NodeKey = tuple[int, int]


class StoreError(Exception):
    """A request the store refuses on its merits (not a database failure: that is Unavailable)."""


def audit_head_size(value: object) -> int:
    """The audit log's size from its head row; the row is made with the schema and never
    deleted by the gateway, so a missing one means the store was changed behind its back:
    nothing can be appended or checked against it."""
    if not isinstance(value, int):
        raise Unavailable(
            "the audit log's head row (audit_head) is missing: the store was changed outside"
            " the gateway; restore it from a backup"
        )
    return value


class MessageNotFound(StoreError):
    def __init__(self, message_id: str) -> None:
        super().__init__(f"no outbound message with message_id {message_id!r}")
        self.message_id = message_id


class LeaseLost(StoreError):
    """``finish_attempt`` by a worker that no longer holds the message's lease."""

    def __init__(self, message_id: str, worker_id: str) -> None:
        super().__init__(f"worker {worker_id!r} does not hold the lease on {message_id!r}")
        self.message_id = message_id
        self.worker_id = worker_id


class InvalidTransition(StoreError):
    def __init__(self, message_id: str, state: str, action: str) -> None:
        super().__init__(f"message {message_id!r} is {state}; cannot {action}")
        self.message_id = message_id
        self.state = state
        self.action = action


@dataclass(frozen=True, kw_only=True, slots=True)
class InboundRecord:
    """A partner's message as received and stored (the inbox row)."""

    sender: str
    message_id: str
    recipient: str
    message_type: str
    schema_version: str
    correlation_id: str | None
    in_reply_to: str | None
    #: the exact wire bytes; None once purged by retention
    body: bytes | None
    body_digest: str
    #: the detached JWS the partner sent
    signature: str
    kid: str
    transport: str
    received_at: datetime
    #: the receipt we sent back (exact bytes and its JWS), returned again for duplicates
    receipt_body: bytes
    receipt_signature: str
    #: inbox order, assigned by the store
    seq: int | None = None
    #: published to the internal bus (transactional-outbox relay)
    relayed: bool = False
    #: the document this message is a version of (gateway/documents.py), None for a type
    #: without versions, and for a row stored before versions were kept whose body was purged
    #: before the store filled its columns in (or does not parse)
    document_ref: str | None = None
    #: the header's ``created_at`` (orders a document's versions)
    created_at: datetime | None = None
    #: the payload's ``message_function`` (UNTDID 1225), where it has one
    message_function: str | None = None

    @property
    def key(self) -> InboundKey:
        return (self.sender, self.message_id)

    @property
    def document_version(self) -> str | None:
        """Where this message sorts among its document's versions (gateway/documents.py)."""
        if self.document_ref is None or self.created_at is None or self.seq is None:
            return None
        return document_version(self.created_at, self.seq)


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentVersion:
    """One version of a document (gateway/documents.py): an inbox row, without its body."""

    message_id: str
    created_at: datetime
    received_at: datetime
    seq: int
    message_function: str | None
    transport: str
    relayed: bool


#: the columns ``document_version_of`` reads, in its order
DOCUMENT_VERSION_COLUMNS = (
    "message_id, created_at, received_at, seq, message_function, transport, relayed"
)


class IndexedRow(Protocol):
    """A result row of either backend (an sqlite3 tuple, an asyncpg Record)."""

    def __getitem__(self, index: int, /) -> Any: ...


def document_version_of(row: IndexedRow, when: Callable[[Any], datetime]) -> DocumentVersion:
    """A row of ``DOCUMENT_VERSION_COLUMNS``; ``when`` turns the backend's time into a datetime."""
    return DocumentVersion(
        message_id=row[0],
        created_at=when(row[1]),
        received_at=when(row[2]),
        seq=row[3],
        message_function=row[4],
        transport=row[5],
        relayed=bool(row[6]),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayLease:
    """The relay lease a new inbox row is stored under: the relay that will publish it got
    the record in memory, so it needs no claim (no second write, no re-read of the body)."""

    owner: str
    until: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class InboundOutcome:
    status: Literal["stored", "duplicate", "conflict"]
    #: the stored row; for duplicate/conflict the original one, with its original receipt
    record: InboundRecord


class OutboundState(StrEnum):
    QUEUED = "queued"
    #: handed to the partner at least once, no receipt yet (retrying)
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    REJECTED = "rejected"
    DEAD = "dead"
    #: a dead message an operator closed (it will not be sent again): no more attempts, and
    #: not counted as dead, so its alert clears; a retry or the partner's late receipt still
    #: ends it
    CLOSED = "closed"


#: states the dispatcher still works on
ACTIVE_STATES = frozenset({OutboundState.QUEUED, OutboundState.SENT})
#: states an operator may retry (a close made by mistake is undone so)
RETRYABLE_STATES = frozenset({OutboundState.DEAD, OutboundState.CLOSED, OutboundState.REJECTED})
#: states a partner's late receipt settles with ``dead_too``: given up on, not settled
GIVEN_UP_STATES = frozenset({OutboundState.DEAD, OutboundState.CLOSED})


@dataclass(frozen=True, kw_only=True, slots=True)
class OutboundRecord:
    """A message to a partner (the outbox row)."""

    message_id: str
    recipient: str
    message_type: str
    schema_version: str
    correlation_id: str | None
    in_reply_to: str | None
    priority: Priority
    #: the exact signed bytes sent on every attempt; None once purged by retention
    body: bytes | None
    body_digest: str
    signature: str
    kid: str
    transport: Literal["https", "amqp"]
    created_at: datetime
    expires_at: datetime | None
    next_attempt_at: datetime
    updated_at: datetime
    state: OutboundState = OutboundState.QUEUED
    attempts: int = 0
    last_error: str | None = None
    #: the partner's receipt (exact bytes and its JWS) once it came
    receipt_body: bytes | None = None
    receipt_signature: str | None = None
    #: who submitted it (a JWT subject, ``amqp:<app>``)
    submitted_by: str | None = None
    #: the submitter's Idempotency-Key (unique per ``submitted_by``) and a digest of its
    #: request: a retry with the same key and request gets this message back
    idempotency_key: str | None = None
    request_digest: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Resigned:
    """New signed bytes of an outbound message (the same message, signed again later)."""

    body: bytes
    body_digest: str
    signature: str
    kid: str
    #: the new ``expires_at`` when the signing changed it (an operator retry of an expired
    #: message); None: unchanged
    expires_at: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptUpdate:
    """The result of one delivery attempt, written by ``finish_attempt``."""

    state: OutboundState
    attempts: int
    next_attempt_at: datetime
    last_error: str | None = None
    receipt_body: bytes | None = None
    receipt_signature: str | None = None
    #: the bytes to send from now on, in place of the stored ones
    resigned: Resigned | None = None

    def resigned_columns(self) -> tuple[bytes | None, str | None, str | None, str | None]:
        """``body``, ``body_digest``, ``signature``, ``kid`` to store (None: keep)."""
        return resigned_columns(self.resigned)


def resigned_columns(
    r: Resigned | None,
) -> tuple[bytes | None, str | None, str | None, str | None]:
    """``body``, ``body_digest``, ``signature``, ``kid`` to store (None: keep)."""
    return (None, None, None, None) if r is None else (r.body, r.body_digest, r.signature, r.kid)


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageFilter:
    """Listing filter; None means any. ``partner`` is the sender (inbound) or recipient."""

    direction: Direction | None = None
    partner: str | None = None
    message_type: str | None = None
    #: an OutboundState value, or ``received`` / ``delivered`` for inbound messages
    state: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    correlation_id: str | None = None


#: inbound listing states
INBOUND_RECEIVED = "received"
INBOUND_DELIVERED = "delivered"


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageSummary:
    direction: Direction
    message_id: str
    #: the sender of an inbound message, the recipient of an outbound one
    partner: str
    message_type: str
    schema_version: str
    correlation_id: str | None
    state: str
    #: received_at (inbound) or created_at (outbound)
    at: datetime
    attempts: int
    body_digest: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessagePage:
    """Newest first; pass ``next_cursor`` as ``after`` for the next page (None: no more)."""

    items: list[MessageSummary]
    next_cursor: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditFilter:
    """Audit query; None means any. ``partner`` matches the sender or the recipient."""

    since: datetime | None = None
    until: datetime | None = None
    partner: str | None = None
    message_type: str | None = None
    message_id: str | None = None
    outcome: str | None = None
    event: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRow:
    #: 0-based leaf index
    seq: int
    #: the leaf data: RFC 8785 JSON from ``AuditEvent.entry_bytes()``
    entry: bytes
    leaf_hash: bytes
    #: the columns the filters read, when asked for (``audit_entries(with_index=True)``)
    index: AuditIndex | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditIndex:
    """The columns stored beside an entry, copied from its event, that the audit filters
    read. They are not hashed into the tree: ``audit check`` compares them with the entry, so
    one changed behind the gateway's back cannot hide an entry from a filtered view."""

    #: None when the stored value is not a time at all
    at: datetime | None
    event: object
    message_id: object
    sender: object
    recipient: object
    message_type: object
    outcome: object
    correlation_id: object


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    size: int
    root_hash: bytes
    #: the signed note (C2SP checkpoint format)
    note: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Cosignature:
    partner: str
    size: int
    root_hash: bytes
    note: str
    received_at: datetime


class WitnessedState(NamedTuple):
    """The latest checkpoint of a partner's log we verified (unpacks as a tuple)."""

    size: int
    root_hash: bytes
    note: str


class Store(Protocol):
    # lifecycle
    async def open(self) -> None:
        """Connect and apply pending migrations (idempotent, safe from two processes)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise Unavailable when the database cannot be reached. SQLite: also when its last
        write transaction failed and none has committed since (a full disk); a probe write is
        tried then, so it reports ready again as soon as it can write, traffic or not."""
        ...

    # inbox
    async def store_inbound(
        self,
        record: InboundRecord,
        events: Sequence[AuditEvent],
        *,
        relay_lease: RelayLease | None = None,
    ) -> InboundOutcome:
        """Insert the row and append ``events`` in one transaction; duplicate/conflict
        (by ``(sender, message_id)``) return the original row and append nothing. With
        ``relay_lease`` the new row is born leased to that relay (as ``claim_relay`` would)."""
        ...

    async def get_inbound(self, sender: str, message_id: str) -> InboundRecord | None: ...

    async def find_inbound_reply(
        self, in_reply_to: str, *, sender: str, message_type: str | None = None
    ) -> InboundRecord | None:
        """The earliest inbound message from ``sender`` (the party we sent ours to) answering
        our message ``in_reply_to``; of ``message_type`` when given. Another party naming our
        message, or another kind of reply from the same party, is not its answer."""
        ...

    async def document_versions(
        self, sender: str, message_type: str, document_ref: str, *, limit: int = 1000
    ) -> list[DocumentVersion]:
        """The stored versions of one document, oldest version first: by the header's
        ``created_at``, then by ``seq`` (gateway/documents.py), at most ``limit`` (the
        newest)."""
        ...

    async def pending_relay(self, limit: int) -> list[InboundRecord]:
        """Stored inbound messages not yet published to the internal bus, oldest first.
        A read, not a claim: the relay publishes what ``claim_relay`` leased to it."""
        ...

    async def claim_relay(
        self,
        owner: str,
        now: datetime,
        limit: int,
        lease_s: float,
        *,
        max_bytes: int | None = None,
    ) -> list[InboundRecord]:
        """Lease up to ``limit`` unrelayed rows (oldest first) to ``owner`` for ``lease_s``
        seconds. A leased row is skipped until its lease ends, whoever holds it, ``owner``
        too: a row the bus refused waits out its lease while the rows behind it are claimed,
        instead of being claimed again in front of them every time (``release_relay`` lets
        rows go at once). With ``max_bytes``, the rows stop before the one whose body would
        take their bodies past it, so a backlog of large messages is read a bounded amount at
        a time; the first row comes whatever its size."""
        ...

    async def release_relay(self, owner: str) -> int:
        """End ``owner``'s leases on rows it has not relayed (a relay stopping cleanly), so
        the next relay takes them at once; returns how many were released."""
        ...

    async def mark_relayed(
        self,
        keys: Sequence[InboundKey],
        events: Sequence[AuditEvent] = (),
        *,
        owner: str | None = None,
    ) -> list[InboundKey]:
        """Mark the rows relayed and release their lease; returns the keys marked now. A row
        already relayed, or (with ``owner``) leased to someone else, is left alone and the
        events naming it (by sender and message_id) are not appended: no second audit."""
        ...

    # outbox
    async def enqueue_outbound(
        self, record: OutboundRecord, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        """Store the row with its events; returns what is stored. Raise DuplicateConflict when
        ``message_id`` is already in the outbox. With an ``idempotency_key`` that its submitter
        already used, nothing is written: the earlier row is returned when its
        ``request_digest`` is the same, else IdempotencyKeyReused is raised."""
        ...

    async def take_rate_tokens(
        self, partner: str, want: float, *, per_second: float, burst: float
    ) -> float | None:
        """Take up to ``want`` whole tokens from the partner's bucket shared by every process
        on this store (refilled at ``per_second``, at most ``burst``); returns how many were
        granted. None: this store serves one process, whose own buckets are exact."""
        ...

    async def find_outbound_by_key(
        self, submitted_by: str, idempotency_key: str
    ) -> OutboundRecord | None:
        """The row a submitter created with this Idempotency-Key, if it is still kept."""
        ...

    async def claim_outbound(
        self,
        worker_id: str,
        now: datetime,
        limit: int,
        lease_s: float,
        *,
        exclude: Collection[str] = (),
    ) -> list[OutboundRecord]:
        """Lease up to ``limit`` queued/sent rows due at ``now`` (urgent first) to ``worker_id``
        for ``lease_s`` seconds, none for a recipient in ``exclude``. Expired rows are returned
        too: the caller finishes them as dead. A row leased by another worker is skipped until
        that lease ends."""
        ...

    async def release_outbound(self, worker_id: str, message_ids: Collection[str]) -> None:
        """Give back ``worker_id``'s leases on these rows, unchanged otherwise: claimed but not
        to be attempted now, they are due again at once for any worker."""
        ...

    async def finish_attempt(
        self,
        message_id: str,
        worker_id: str,
        update: AttemptUpdate,
        events: Sequence[AuditEvent],
    ) -> OutboundRecord:
        """Write an attempt's result and release the lease; LeaseLost if not the holder."""
        ...

    async def record_receipt(
        self,
        message_id: str,
        update: AttemptUpdate,
        events: Sequence[AuditEvent],
        *,
        dead_too: bool = False,
    ) -> OutboundRecord:
        """Apply a partner receipt that came in on its own (over AMQP), without a lease: only
        while the message is queued or sent, or with ``dead_too`` also dead or closed (a late
        receipt settling a message given up on; ``update`` is then its final answer: the
        partner's word outweighs an operator's close); else InvalidTransition;
        MessageNotFound. Any lease is dropped, so a worker still sending it gets LeaseLost and
        its result yields."""
        ...

    async def get_outbound(self, message_id: str) -> OutboundRecord | None: ...

    async def retry_outbound(
        self,
        message_id: str,
        *,
        now: datetime,
        actor: str,
        events: Sequence[AuditEvent],
        resigned: Resigned | None = None,
    ) -> OutboundRecord:
        """dead/closed/rejected -> queued with attempts reset; MessageNotFound /
        InvalidTransition. With ``resigned`` (an expired message signed again), its bytes and
        ``expires_at`` replace the stored ones."""
        ...

    async def close_outbound(
        self, message_id: str, *, now: datetime, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        """dead -> closed, with ``events`` (the operator's entry, which names who closed it and
        why: no column does); MessageNotFound / InvalidTransition, and then nothing is
        written."""
        ...

    # outcomes of outbound messages (gateway/store/outcomes.py): the rows written with each
    # final state of a message by finish_attempt, record_receipt and close_outbound
    async def claim_outcomes(
        self, owner: str, now: datetime, limit: int, lease_s: float
    ) -> list[OutcomeRecord]:
        """Lease up to ``limit`` outcomes still to publish (oldest first) to ``owner`` for
        ``lease_s`` seconds; one leased by anyone (``owner`` too) is skipped until its lease
        ends, so a refused one waits out its lease while the others go out."""
        ...

    async def mark_outcomes_published(self, seqs: Sequence[int]) -> int:
        """Forget the outcomes the bus confirmed; returns how many were still there (one
        published twice, after its lease ran out, is forgotten once)."""
        ...

    async def release_outcomes(self, owner: str) -> int:
        """End ``owner``'s leases on outcomes (a relay stopping cleanly, or after an outage),
        so the next round takes them at once; returns how many were released."""
        ...

    async def outbox_depth(self) -> dict[OutboundState, int]: ...

    async def outbox_backlog(self) -> dict[str, PartnerBacklog]:
        """Per recipient with outbound messages still at work (queued, or sent and waiting
        for a receipt): how many, and the creation time of the oldest."""
        ...

    async def list_messages(
        self, filter: MessageFilter, *, limit: int = 50, after: str | None = None
    ) -> MessagePage: ...

    # audit log
    async def append_audit(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append leaves (and the perfect subtrees they complete); returns their seqs."""
        ...

    async def audit_size(self) -> int: ...

    async def audit_entries(
        self,
        filter: AuditFilter,
        *,
        after_seq: int = -1,
        limit: int = 100,
        with_index: bool = False,
    ) -> list[AuditRow]:
        """Entries with seq > after_seq matching ``filter``, in seq order; ``with_index``:
        with the filter columns stored beside each (``AuditRow.index``)."""
        ...

    async def audit_entry(self, seq: int) -> AuditRow | None: ...

    async def audit_leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes for seqs ``[start, end)``."""
        ...

    async def audit_node_hashes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """Stored perfect-subtree hashes; keys of incomplete subtrees are absent."""
        ...

    async def save_checkpoint(
        self,
        size: int,
        root_hash: bytes,
        note: str,
        created_at: datetime,
        events: Sequence[AuditEvent] = (),
    ) -> None: ...

    async def latest_checkpoint(self) -> Checkpoint | None: ...

    async def checkpoint_for_size(self, size: int) -> Checkpoint | None: ...

    async def save_cosignature(
        self,
        partner: str,
        size: int,
        root_hash: bytes,
        note: str,
        received_at: datetime,
        events: Sequence[AuditEvent] = (),
    ) -> None: ...

    async def cosignatures(self, size: int | None = None) -> list[Cosignature]: ...

    async def latest_cosignatures(self, max_size: int) -> list[Cosignature]:
        """Per partner, its cosignature of the largest tree up to ``max_size``, by partner:
        what the auditor API and an export show (one row per witnessing round is kept, so
        reading them all to pick these grows without bound)."""
        ...

    async def get_witnessed(self, origin: str) -> WitnessedState | None: ...

    async def set_witnessed(
        self,
        origin: str,
        size: int,
        root_hash: bytes,
        note: str,
        events: Sequence[AuditEvent] = (),
    ) -> None: ...

    # clock steps (RELIABILITY-SECURITY T71)
    async def move_back_schedules(self, now: datetime, step: timedelta) -> tuple[int, int]:
        """The wall clock went back by ``step`` and now reads ``now``: what was scheduled by
        the clock before the step would otherwise wait ``step`` longer. Moves back by ``step``
        the outbound schedules written before it (stamped after ``now``), and the outbound
        and relay leases that end more than ``step`` less ``CLOCK_STEP_GRACE`` ahead; returns
        how many outbound rows and leases were moved."""
        ...

    # retention
    async def purge_bodies(self, older_than: datetime) -> int:
        """Null the bodies of inbound (already relayed) and finished outbound messages
        older than ``older_than``; digests, metadata and audit entries are kept."""
        ...


#: how late a step of the clock may be noticed (the clock watch looks every second); a lease
#: taken after the step ends at most this much less than ``step`` ahead of a lease taken before
CLOCK_STEP_GRACE = timedelta(seconds=2)


def empty_depth() -> dict[OutboundState, int]:
    return dict.fromkeys(OutboundState, 0)


@dataclass(frozen=True)
class PartnerBacklog:
    """A partner's outbound messages still at work (``Store.outbox_backlog``)."""

    pending: int
    oldest_created_at: datetime


#: ``Store.outbox_backlog`` on both backends (``outbound_state`` is the index it reads)
OUTBOX_BACKLOG_SQL = (
    "SELECT recipient, count(*), min(created_at) FROM outbound_messages"
    " WHERE state IN ('queued', 'sent') GROUP BY recipient"
)


def same_request(earlier: OutboundRecord, request_digest: str | None) -> OutboundRecord:
    """``earlier`` (the row found by submitter and Idempotency-Key) when the request with
    ``request_digest`` repeats its request."""
    if earlier.request_digest != request_digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {earlier.idempotency_key!r} of {earlier.submitted_by} was used for"
            f" message {earlier.message_id} with a different request"
        )
    return earlier


def events_for_marked(
    keys: Sequence[InboundKey], marked: Sequence[InboundKey], events: Sequence[AuditEvent]
) -> list[AuditEvent]:
    """``events`` without those recording a key of ``keys`` that ``mark_relayed`` skipped."""
    skipped = set(keys).difference(marked)
    if not skipped:
        return list(events)
    return [e for e in events if (e.sender, e.message_id) not in skipped]


__all__ = [
    "ACTIVE_STATES",
    "GIVEN_UP_STATES",
    "INBOUND_DELIVERED",
    "INBOUND_RECEIVED",
    "RETRYABLE_STATES",
    "AttemptUpdate",
    "AuditFilter",
    "AuditRow",
    "Checkpoint",
    "Cosignature",
    "InboundKey",
    "InboundOutcome",
    "InboundRecord",
    "InvalidTransition",
    "LeaseLost",
    "MessageFilter",
    "MessageNotFound",
    "MessagePage",
    "MessageSummary",
    "NodeKey",
    "OutboundRecord",
    "OutboundState",
    "Store",
    "StoreError",
    "WitnessedState",
    "empty_depth",
    "events_for_marked",
]
