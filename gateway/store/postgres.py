"""PostgreSQL store: several gateway replicas on one database.

Dedupe and the outbox rest on database constraints and row locks, never on process memory:
the inbox key is a UNIQUE constraint, outbox rows are claimed with ``FOR UPDATE SKIP LOCKED``
plus a lease, and audit appends serialize on the single ``audit_head`` row so sequence numbers
have no gaps. Writes are group-committed like the SQLite store's: one writer task per process
runs every queued unit in one transaction (a SAVEPOINT each, so a refused unit rolls back
alone), taking the head row first so replicas queue instead of deadlocking; each caller is
answered after COMMIT. Reads and claims use their own pooled connections. A broken connection
is dropped by the pool and replaced on the next call, so the store recovers by itself.
"""

# ruff: noqa: S608 -- SQL here is composed of constant fragments and placeholders; every
# value goes through a query parameter.

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, quote, unquote

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from gateway.audit.events import AuditEvent
from gateway.clock import Clock
from gateway.crashpoints import armed, crash_point
from gateway.documents import FILL_ROWS, DocumentColumns, fill_batch, fill_columns, log_filled
from gateway.errors import DuplicateConflict, Unavailable
from gateway.model import Direction, Priority
from gateway.store.audit_rows import entry_rows
from gateway.store.base import (
    ACTIVE_STATES,
    CLOCK_STEP_GRACE,
    DOCUMENT_VERSION_COLUMNS,
    GIVEN_UP_STATES,
    OUTBOX_BACKLOG_SQL,
    RETRYABLE_STATES,
    AttemptUpdate,
    AuditFilter,
    AuditIndex,
    AuditRow,
    Checkpoint,
    Cosignature,
    DocumentVersion,
    InboundKey,
    InboundOutcome,
    InboundRecord,
    InvalidTransition,
    LeaseLost,
    MessageFilter,
    MessageNotFound,
    MessagePage,
    MessageSummary,
    NodeKey,
    OutboundRecord,
    OutboundState,
    PartnerBacklog,
    RelayLease,
    Resigned,
    StoreError,
    WitnessedState,
    audit_head_size,
    document_version_of,
    empty_depth,
    resigned_columns,
    same_request,
)
from gateway.store.migrations import load_migrations
from gateway.store.outcomes import OutcomeRecord, is_final, outcome_body
from gateway.store.queries import Cursor, Dialect, audit_query, index_fields, messages_query
from gateway.store.url import POSTGRES_SCHEMES
from gateway.urls import NOT_SHOWN, UrlInvalid, split_server_url, userinfo_past_netloc

T = TypeVar("T")
log = structlog.get_logger(__name__)
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

#: pg_advisory_xact_lock key serializing migrations across processes ("c2cmigr")
_MIGRATION_LOCK = 0x6332636D69677200


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return moment


DIALECT = Dialect(placeholder=lambda n: f"${n}", timestamp=_aware, true="TRUE", false="FALSE")

#: what a database or network failure looks like from asyncpg; all become Unavailable
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

#: errors of a database that cannot serve anyone now, as against an error of one statement:
#: a lost connection or network (class 08), a full disk or no memory (53), a shutdown or a
#: cancelled command (57), an I/O error (58), a command timeout, a lock not had within
#: ``lock_timeout`` (55P03), a session ended for idling in a transaction (25P03), and
#: asyncpg's own state errors, which a connection cut in the middle of an operation raises
#: ("cannot switch to state 12; another operation (2) is in progress")
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresSystemError,
    asyncpg.LockNotAvailableError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

#: failures of writes that reads do not see: a full disk or no memory (53), an I/O error (58)
_WRITE_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.InsufficientResourcesError,
    asyncpg.PostgresSystemError,
)

#: rows one retention statement looks at (in primary key order), and the body bytes it may
#: drop at most: each statement is its own short transaction, far below any store timeout
_PURGE_ROWS = 1000
_PURGE_BYTES = 32 * 1024 * 1024

#: the readiness probe's body: incompressible, and larger than what is left of the pages a
#: message that just failed may have found
_PROBE_BODY_BYTES = 256 * 1024

_INBOUND_COLUMNS = (
    "sender, message_id, recipient, message_type, schema_version, correlation_id, in_reply_to, "
    "body, body_digest, signature, kid, transport, received_at, receipt_body, "
    "receipt_signature, seq, relayed, document_ref, created_at, message_function"
)
_OUTCOME_COLUMNS = "seq, message_id, recipient, message_type, state, n, body, at"
_OUTBOUND_COLUMNS = (
    "message_id, recipient, message_type, schema_version, correlation_id, in_reply_to, "
    "priority, body, body_digest, signature, kid, transport, created_at, expires_at, state, "
    "attempts, next_attempt_at, last_error, receipt_body, receipt_signature, submitted_by, "
    "updated_at, idempotency_key, request_digest"
)
_PRIORITY_RANK = {Priority.URGENT: 0, Priority.ROUTINE: 1}
#: the states retention purges the body of, as an SQL list of literals
_FINISHED = ", ".join(f"'{s.value}'" for s in OutboundState if s not in ACTIVE_STATES)


def _inbound(row: asyncpg.Record) -> InboundRecord:
    return InboundRecord(
        sender=row[0],
        message_id=row[1],
        recipient=row[2],
        message_type=row[3],
        schema_version=row[4],
        correlation_id=row[5],
        in_reply_to=row[6],
        body=row[7],
        body_digest=row[8],
        signature=row[9],
        kid=row[10],
        transport=row[11],
        received_at=row[12],
        receipt_body=row[13],
        receipt_signature=row[14],
        seq=row[15],
        relayed=row[16],
        document_ref=row[17],
        created_at=None if row[18] is None else row[18],
        message_function=row[19],
    )


def _outbound(row: asyncpg.Record) -> OutboundRecord:
    return OutboundRecord(
        message_id=row[0],
        recipient=row[1],
        message_type=row[2],
        schema_version=row[3],
        correlation_id=row[4],
        in_reply_to=row[5],
        priority=Priority(row[6]),
        body=row[7],
        body_digest=row[8],
        signature=row[9],
        kid=row[10],
        transport=row[11],
        created_at=row[12],
        expires_at=row[13],
        state=OutboundState(row[14]),
        attempts=row[15],
        next_attempt_at=row[16],
        last_error=row[17],
        receipt_body=row[18],
        receipt_signature=row[19],
        submitted_by=row[20],
        updated_at=row[21],
        idempotency_key=row[22],
        request_digest=row[23],
    )


class _Tx:
    """One group commit: its connection (head row locked) and the audit events its units
    append, written together at the end with a few multi-row statements."""

    def __init__(self, conn: Conn, size: int | None) -> None:
        self.conn = conn
        #: the head size, when the head row was locked before the units ran
        self.size = size
        self.events: list[AuditEvent] = []

    def audit(self, events: Sequence[AuditEvent]) -> list[int]:
        """Queue ``events`` for this commit and return the seqs they will have (known only
        when the head was locked first: inbox-only batches lock it last and ignore them)."""
        start = (-1 if self.size is None else self.size) + len(self.events)
        self.events.extend(events)
        if self.size is None:
            return []
        return list(range(start, start + len(events)))


@dataclass(kw_only=True, slots=True)
class _Unit:
    future: asyncio.Future[Any]
    #: a generic write, run in its own SAVEPOINT
    fn: Callable[[_Tx], Awaitable[Any]] | None = None
    #: an inbox insert, batched with the other inserts of the same commit
    inbound: tuple[InboundRecord, list[AuditEvent], RelayLease | None] | None = None


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        clock: Clock,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout_s: float = 30.0,
        max_batch: int = 256,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        self._max_batch = max_batch
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        #: why writes fail while reads succeed (a full tablespace), until a write commits or
        #: the readiness probe's write fits again
        self._write_failure: str | None = None

    # lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout_s,
                timeout=self._command_timeout_s,
                server_settings=session_settings(self._command_timeout_s),
            )
        except _DB_ERRORS as exc:
            # the reason names the server tried, which a URL from the environment hides
            failed = self._unavailable(exc, "connect")
            reason = " ".join(failed.reason.split())
            raise Unavailable(
                f"{reason}, connecting to {_endpoint(self._dsn)}", outage=failed.outage
            ) from exc
        self._pool = pool
        try:
            await self._transaction(_migrate)
            await self._fill_document_columns()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        self._queue = asyncio.Queue()
        self._writer_task = asyncio.create_task(self._writer_loop(), name="postgres-writer")

    async def _fill_document_columns(self) -> None:
        """Give inbox rows stored without document columns (before migration 0006, or by an
        older replica since) the columns their stored bodies say (gateway/documents.py), a
        batch at a time, each committed on its own: a crash keeps the batches done, no lock is
        held while the bodies are parsed, and a replica waits for another's batch at most. The
        values depend on the body alone, so replicas filling at once write the same. A body
        that does not parse is left, and tried again at the next open."""
        after = filled = unreadable = 0
        while True:
            seqs = fill_batch(await self._call(partial(_fill_sizes, after), "open"))
            if not seqs:
                break
            rows = await self._call(partial(_fill_bodies, seqs), "open")
            found = await asyncio.to_thread(fill_columns, rows)
            filled += await self._call(partial(_fill_update, found), "open")
            unreadable += sum(columns is None for _, columns in found)
            after = seqs[-1]
        log_filled(filled, unreadable)

    async def close(self) -> None:
        task, self._writer_task = self._writer_task, None
        if task is not None:
            await self._queue.put(None)
            await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        if self._writer_task is None or self._writer_task.done():
            raise Unavailable("postgresql: store is not open", outage=True)
        await self._call(lambda c: c.fetchval("SELECT size FROM audit_head WHERE id = 1"))
        if self._write_failure is not None:
            # a read tells nothing of a full tablespace: a message-like write, rolled back
            await self._call(_probe_write)
            self._writes_recovered("probe")

    def _note_write_failure(self, exc: BaseException) -> None:
        """One error log when writes start failing for a reason that reads do not see, not
        one per batch: on a full tablespace every message fails alike until space is freed."""
        if not isinstance(exc, _WRITE_FAILURES):
            return
        if self._write_failure is None:
            log.error(
                "postgres_write_failed",
                error=f"{type(exc).__name__}: {exc}",
                hint="nothing was acknowledged; partners are answered 503 until a write commits",
            )
        self._write_failure = type(exc).__name__

    def _writes_recovered(self, seen_by: str) -> None:
        if self._write_failure is not None:
            log.warning("postgres_writes_recovered", error=self._write_failure, seen_by=seen_by)
            self._write_failure = None

    async def _call(self, fn: Callable[[Conn], Awaitable[T]], what: str | None = None) -> T:
        pool = self._pool
        if pool is None:
            raise Unavailable("postgresql: store is not open", outage=True)
        try:
            async with pool.acquire() as conn:
                return await fn(conn)
        except _DB_ERRORS as exc:
            raise self._unavailable(exc, what or _operation(fn)) from exc

    async def _transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        async def in_transaction(conn: Conn) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self._call(in_transaction, _operation(fn))

    def _unavailable(self, exc: BaseException, what: str) -> Unavailable:
        return _unavailable(exc, what=what, timeout_s=self._command_timeout_s)

    # batched writes

    async def _write(self, fn: Callable[[_Tx], Awaitable[T]]) -> T:
        result: T = await self._enqueue(_Unit(fn=fn, future=self._future()))
        return result

    def _future(self) -> asyncio.Future[Any]:
        if self._writer_task is None or self._writer_task.done():
            raise Unavailable("postgresql: store is not open", outage=True)
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, unit: _Unit) -> Any:
        await self._queue.put(unit)
        return await unit.future

    async def _writer_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            batch = [u for u in batch if not u.future.cancelled()]
            # Inbox inserts and other units never share a transaction: the first lock the
            # audit head last, the others first (see _commit_batch), and a transaction holding
            # the head must never wait for an inbox key another one holds while it waits for
            # the head.
            for group in (
                [u for u in batch if u.inbound is not None],
                [u for u in batch if u.inbound is None],
            ):
                if group:
                    self._settle(group, await self._commit_guarded(group))

    async def _commit_guarded(self, units: list[_Unit]) -> list[Any]:
        try:
            return await self._commit_batch(units)
        except Exception as exc:
            # Not the database and not a unit (their errors are answered in _commit_batch):
            # a bug or MemoryError in the batch itself. Its transaction was rolled back on the
            # way out; the batch is refused and the writer goes on. Left to the loop, it would
            # end the writer with every caller of this batch waiting for an answer.
            log.exception("postgres_batch_failed", units=len(units), error=type(exc).__name__)
            return [Unavailable(f"postgresql: write batch failed: {type(exc).__name__}")] * len(
                units
            )

    @staticmethod
    def _settle(units: list[_Unit], results: list[Any]) -> None:
        for unit, result in zip(units, results, strict=True):
            if unit.future.done():
                continue
            if isinstance(result, BaseException):
                unit.future.set_exception(result)
            else:
                unit.future.set_result(result)

    async def _commit_batch(self, units: list[_Unit]) -> list[Any]:
        """Commit a batch of inbox inserts, or of other units (each in a SAVEPOINT), with
        their audit entries. Callers are answered only after COMMIT.

        The head row is what replicas queue on, so it is held as briefly as possible: an
        inbox batch is one autocommit statement that inserts and then appends (the head is
        held inside the database only, never across a round trip). Its inserts go in key
        order, so two replicas inserting the same keys wait for each other in one order and
        cannot deadlock. Other units (which may update rows in any order) run in a
        transaction that takes the head first, so that those are serialised across replicas
        as before."""
        pool = self._pool
        if pool is None:
            return [Unavailable("postgresql: store is not open", outage=True)] * len(units)
        results: list[Any] = [None] * len(units)
        # Set once the server has committed: a connection lost after that (the pool's reset
        # on release fails) loses nothing, and the batch is answered as written. Answered
        # Unavailable, a partner would hold a signed 503 for a message that was stored.
        committed: list[Any] | None = None
        if all(unit.inbound is not None for unit in units):
            try:
                async with pool.acquire() as conn:
                    if armed():
                        # one autocommit statement: the server commits it once it has it
                        crash_point("S6-before-commit", message_ids=_ids(units))
                    committed = await _store_inbound_statement(
                        conn, [unit.inbound for unit in units if unit.inbound is not None]
                    )
            except asyncpg.IntegrityConstraintViolationError:
                pass  # a row broke another constraint: the transaction below sorts them out
            except _DB_ERRORS as exc:
                if committed is None:
                    self._note_write_failure(exc)
                    return [self._unavailable(exc, _batch_operations(units))] * len(units)
                _lost_after_commit(exc)
            if committed is not None:
                self._writes_recovered("write")
                return committed
        try:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    written = await self._transaction_batch(conn, units, results)
                committed = written
        except _DB_ERRORS as exc:
            if committed is None:
                self._note_write_failure(exc)
                return [self._unavailable(exc, _batch_operations(units))] * len(units)
            _lost_after_commit(exc)
        except Unavailable as exc:
            return [exc] * len(units)
        assert committed is not None
        self._writes_recovered("write")
        return committed

    async def _transaction_batch(
        self, conn: Conn, units: list[_Unit], results: list[Any]
    ) -> list[Any]:
        """The units of ``_commit_batch`` in its transaction; ``results`` filled in order."""
        size: int | None = None
        if any(unit.fn is not None for unit in units):
            size = await conn.fetchval("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
        tx = _Tx(conn, size)
        inbound = [(i, u.inbound) for i, u in enumerate(units) if u.inbound is not None]
        if inbound:
            outcomes = await _store_inbound_batch(tx, [item for _, item in inbound])
            for (index, _), outcome in zip(inbound, outcomes, strict=True):
                results[index] = outcome
        for index, unit in enumerate(units):
            if unit.fn is not None:
                results[index] = await _run_unit(tx, unit.fn)
        if tx.events:
            first = await _append_audit(conn, tx.events)
            if size is not None and first != size:
                raise Unavailable(f"postgresql: audit head moved from {size} to {first}")
            crash_point("audit-append")
        if inbound and armed():
            crash_point("S6-before-commit", message_ids=_ids(units))
        return results

    # audit log

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[int]:
        events = list(events)

        async def unit(tx: _Tx) -> list[int]:
            return tx.audit(events)

        return await self._write(unit)

    async def audit_size(self) -> int:
        return audit_head_size(
            await self._call(lambda c: c.fetchval("SELECT size FROM audit_head WHERE id = 1"))
        )

    async def audit_entries(
        self,
        filter: AuditFilter,
        *,
        after_seq: int = -1,
        limit: int = 100,
        with_index: bool = False,
    ) -> list[AuditRow]:
        sql, params = audit_query(
            DIALECT, filter, after_seq=after_seq, limit=limit, with_index=with_index
        )
        rows = await self._call(lambda c: c.fetch(sql, *params))
        if not with_index:
            return [AuditRow(seq=r[0], entry=r[1], leaf_hash=r[2]) for r in rows]
        return [
            AuditRow(
                seq=r[0],
                entry=r[1],
                leaf_hash=r[2],
                index=AuditIndex(at=r[3], **index_fields(tuple(r))),
            )
            for r in rows
        ]

    async def audit_entry(self, seq: int) -> AuditRow | None:
        row = await self._call(
            lambda c: c.fetchrow(
                "SELECT seq, entry, leaf_hash FROM audit_entries WHERE seq = $1", seq
            )
        )
        return None if row is None else AuditRow(seq=row[0], entry=row[1], leaf_hash=row[2])

    async def audit_leaf_hashes(self, start: int, end: int) -> list[bytes]:
        rows = await self._call(
            lambda c: c.fetch(
                "SELECT leaf_hash FROM audit_entries WHERE seq >= $1 AND seq < $2 ORDER BY seq",
                start,
                end,
            )
        )
        return [r[0] for r in rows]

    async def audit_node_hashes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        return await self._call(lambda c: _fetch_nodes(c, wanted))

    async def save_checkpoint(
        self,
        size: int,
        root_hash: bytes,
        note: str,
        created_at: datetime,
        events: Sequence[AuditEvent] = (),
    ) -> None:
        events = list(events)

        async def unit(tx: _Tx) -> None:
            c = tx.conn
            existing = await c.fetchval(
                "SELECT root_hash FROM audit_checkpoints WHERE size = $1 FOR UPDATE", size
            )
            if existing is not None and bytes(existing) != root_hash:
                raise StoreError(f"a checkpoint of size {size} exists with another root hash")
            await c.execute(
                "INSERT INTO audit_checkpoints (size, root_hash, note, created_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (size) DO UPDATE SET note = EXCLUDED.note, "
                "created_at = EXCLUDED.created_at",
                size,
                root_hash,
                note,
                _aware(created_at),
            )
            tx.audit(events)

        await self._write(unit)

    async def latest_checkpoint(self) -> Checkpoint | None:
        return await self._checkpoint("ORDER BY size DESC LIMIT 1")

    async def checkpoint_for_size(self, size: int) -> Checkpoint | None:
        return await self._checkpoint("WHERE size = $1", size)

    async def _checkpoint(self, clause: str, *params: object) -> Checkpoint | None:
        row = await self._call(
            lambda c: c.fetchrow(
                f"SELECT size, root_hash, note, created_at FROM audit_checkpoints {clause}",
                *params,
            )
        )
        if row is None:
            return None
        return Checkpoint(size=row[0], root_hash=row[1], note=row[2], created_at=row[3])

    async def save_cosignature(
        self,
        partner: str,
        size: int,
        root_hash: bytes,
        note: str,
        received_at: datetime,
        events: Sequence[AuditEvent] = (),
    ) -> None:
        events = list(events)

        async def unit(tx: _Tx) -> None:
            c = tx.conn
            await c.execute(
                "INSERT INTO audit_cosignatures (partner, size, root_hash, note, received_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (partner, size) DO UPDATE SET "
                "root_hash = EXCLUDED.root_hash, note = EXCLUDED.note, "
                "received_at = EXCLUDED.received_at",
                partner,
                size,
                root_hash,
                note,
                _aware(received_at),
            )
            tx.audit(events)

        await self._write(unit)

    async def cosignatures(self, size: int | None = None) -> list[Cosignature]:
        sql = "SELECT partner, size, root_hash, note, received_at FROM audit_cosignatures"
        params: tuple[int, ...] = ()
        if size is not None:
            sql += " WHERE size = $1"
            params = (size,)
        rows = await self._call(lambda c: c.fetch(sql + " ORDER BY size, partner", *params))
        return [
            Cosignature(partner=r[0], size=r[1], root_hash=r[2], note=r[3], received_at=r[4])
            for r in rows
        ]

    async def latest_cosignatures(self, max_size: int) -> list[Cosignature]:
        sql = (
            "SELECT c.partner, c.size, c.root_hash, c.note, c.received_at FROM audit_cosignatures c"
            " JOIN (SELECT partner, max(size) AS size FROM audit_cosignatures WHERE size <= $1"
            " GROUP BY partner) m ON m.partner = c.partner AND m.size = c.size"
            " ORDER BY c.partner"
        )
        rows = await self._call(lambda c: c.fetch(sql, max_size))
        return [
            Cosignature(partner=r[0], size=r[1], root_hash=r[2], note=r[3], received_at=r[4])
            for r in rows
        ]

    async def get_witnessed(self, origin: str) -> WitnessedState | None:
        row = await self._call(
            lambda c: c.fetchrow(
                "SELECT size, root_hash, note FROM audit_witnessed WHERE origin = $1", origin
            )
        )
        return None if row is None else WitnessedState(row[0], row[1], row[2])

    async def set_witnessed(
        self,
        origin: str,
        size: int,
        root_hash: bytes,
        note: str,
        events: Sequence[AuditEvent] = (),
    ) -> None:
        events = list(events)

        async def unit(tx: _Tx) -> None:
            c = tx.conn
            await c.execute(
                "INSERT INTO audit_witnessed (origin, size, root_hash, note) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (origin) DO UPDATE SET "
                "size = EXCLUDED.size, root_hash = EXCLUDED.root_hash, note = EXCLUDED.note",
                origin,
                size,
                root_hash,
                note,
            )
            tx.audit(events)

        await self._write(unit)

    # inbox

    async def store_inbound(
        self,
        record: InboundRecord,
        events: Sequence[AuditEvent],
        *,
        relay_lease: RelayLease | None = None,
    ) -> InboundOutcome:
        unit = _Unit(future=self._future(), inbound=(record, list(events), relay_lease))
        outcome: InboundOutcome = await self._enqueue(unit)
        return outcome

    async def get_inbound(self, sender: str, message_id: str) -> InboundRecord | None:
        return await self._call(lambda c: _get_inbound(c, sender, message_id))

    async def find_inbound_reply(
        self, in_reply_to: str, *, sender: str, message_type: str | None = None
    ) -> InboundRecord | None:
        row = await self._call(
            lambda c: c.fetchrow(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages "
                "WHERE in_reply_to = $1 AND sender = $2 "
                "AND ($3::text IS NULL OR message_type = $3) ORDER BY seq LIMIT 1",
                in_reply_to,
                sender,
                message_type,
            )
        )
        return None if row is None else _inbound(row)

    async def document_versions(
        self, sender: str, message_type: str, document_ref: str, *, limit: int = 1000
    ) -> list[DocumentVersion]:
        rows = await self._call(
            lambda c: c.fetch(
                f"SELECT {DOCUMENT_VERSION_COLUMNS} FROM inbound_messages WHERE sender = $1 "
                "AND message_type = $2 AND document_ref = $3 "
                "ORDER BY created_at DESC, seq DESC LIMIT $4",
                sender,
                message_type,
                document_ref,
                limit,
            )
        )
        return [document_version_of(r, _aware) for r in reversed(rows)]

    async def pending_relay(self, limit: int) -> list[InboundRecord]:
        rows = await self._call(
            lambda c: c.fetch(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages "
                "WHERE NOT relayed ORDER BY seq LIMIT $1",
                limit,
            )
        )
        return [_inbound(r) for r in rows]

    async def claim_relay(
        self,
        owner: str,
        now: datetime,
        limit: int,
        lease_s: float,
        *,
        max_bytes: int | None = None,
    ) -> list[InboundRecord]:
        until = _aware(now) + timedelta(seconds=lease_s)
        cols = ", ".join(f"m.{col.strip()}" for col in _INBOUND_COLUMNS.split(","))
        # SKIP LOCKED: a replica claiming at the same moment takes the next rows instead of
        # waiting for these, and the lease keeps them out of its later claims. The running
        # total of the bodies' sizes (octet_length reads no body) cuts the batch at max_bytes.
        rows = await self._transaction(
            lambda c: c.fetch(
                "WITH due AS (SELECT seq, coalesce(octet_length(body), 0) AS n "
                "FROM inbound_messages WHERE NOT relayed "
                "AND (relay_owner IS NULL OR relay_lease_until <= $1) "
                "ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED), "
                "kept AS (SELECT seq FROM (SELECT seq, row_number() OVER w AS k, "
                "sum(n) OVER w AS total FROM due WINDOW w AS (ORDER BY seq)) AS t "
                "WHERE k = 1 OR $5::bigint IS NULL OR total <= $5::bigint) "
                "UPDATE inbound_messages AS m SET relay_owner = $3, relay_lease_until = $4 "
                f"FROM kept WHERE m.seq = kept.seq RETURNING {cols}",
                _aware(now),
                limit,
                owner,
                until,
                max_bytes,
            )
        )
        records = [_inbound(r) for r in rows]
        records.sort(key=lambda r: r.seq or 0)
        return records

    async def release_relay(self, owner: str) -> int:
        # no audit entry: the head is not taken (a mark holding rows may be waiting for it)
        status: str = await self._call(
            lambda c: c.execute(
                "UPDATE inbound_messages SET relay_owner = NULL, relay_lease_until = NULL "
                "WHERE NOT relayed AND relay_owner = $1",
                owner,
            )
        )
        return int(status.rsplit(" ", 1)[-1])

    async def mark_relayed(
        self,
        keys: Sequence[InboundKey],
        events: Sequence[AuditEvent] = (),
        *,
        owner: str | None = None,
    ) -> list[InboundKey]:
        """One autocommit statement (``_MARK_RELAYED_SQL``): the audit head is held inside
        the database only, not across round trips as in a unit of the writer."""
        keys = list(keys)
        keyed = [((e.sender, e.message_id), e) for e in events]
        row = await self._call(
            lambda c: c.fetchrow(
                _MARK_RELAYED_SQL,
                [k[0] for k in keys],
                [k[1] for k in keys],
                owner,
                *_keyed_event_args(keyed),
            )
        )
        if row is None:  # the statement returns one row
            raise Unavailable("postgresql: marking relayed rows returned nothing")
        return list(zip(row[0] or [], row[1] or [], strict=True))

    # outbox

    async def enqueue_outbound(
        self, record: OutboundRecord, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        events = list(events)

        async def unit(tx: _Tx) -> OutboundRecord:
            c = tx.conn
            # No conflict target: a reused Idempotency-Key (a unique index too) waits for the
            # row holding it to commit, then inserts nothing and is looked up below.
            inserted = await c.fetchval(
                f"INSERT INTO outbound_messages ({_OUTBOUND_COLUMNS}, priority_rank) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, "
                "$17, $18, $19, $20, $21, $22, $23, $24, $25) "
                "ON CONFLICT DO NOTHING RETURNING message_id",
                record.message_id,
                record.recipient,
                record.message_type,
                record.schema_version,
                record.correlation_id,
                record.in_reply_to,
                record.priority.value,
                record.body,
                record.body_digest,
                record.signature,
                record.kid,
                record.transport,
                _aware(record.created_at),
                None if record.expires_at is None else _aware(record.expires_at),
                record.state.value,
                record.attempts,
                _aware(record.next_attempt_at),
                record.last_error,
                record.receipt_body,
                record.receipt_signature,
                record.submitted_by,
                _aware(record.updated_at),
                record.idempotency_key,
                record.request_digest,
                _PRIORITY_RANK[record.priority],
            )
            if inserted is None:
                if record.idempotency_key is not None:
                    earlier = await _outbound_by_key(c, record.submitted_by, record.idempotency_key)
                    if earlier is not None:
                        return same_request(earlier, record.request_digest)
                raise DuplicateConflict(
                    f"outbound message_id {record.message_id!r} is already in the outbox"
                )
            tx.audit(events)
            return record

        return await self._write(unit)

    async def take_rate_tokens(
        self, partner: str, want: float, *, per_second: float, burst: float
    ) -> float | None:
        granted = await self._call(
            lambda c: c.fetchval(
                "SELECT c2c_take_tokens($1, $2, $3, $4)", partner, want, per_second, burst
            )
        )
        return float(granted)

    async def find_outbound_by_key(
        self, submitted_by: str, idempotency_key: str
    ) -> OutboundRecord | None:
        return await self._call(lambda c: _outbound_by_key(c, submitted_by, idempotency_key))

    async def claim_outbound(
        self,
        worker_id: str,
        now: datetime,
        limit: int,
        lease_s: float,
        *,
        exclude: Collection[str] = (),
    ) -> list[OutboundRecord]:
        until = _aware(now) + timedelta(seconds=lease_s)
        cols = ", ".join(f"o.{c.strip()}" for c in _OUTBOUND_COLUMNS.split(","))
        rows = await self._transaction(
            lambda c: c.fetch(
                "WITH due AS (SELECT message_id FROM outbound_messages "
                "WHERE state IN ('queued', 'sent') AND next_attempt_at <= $1 "
                "AND (lease_owner IS NULL OR lease_until <= $1) "
                "AND NOT (recipient = ANY($5::text[])) "
                "ORDER BY priority_rank, next_attempt_at, created_at LIMIT $2 "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE outbound_messages AS o SET lease_owner = $3, lease_until = $4 "
                f"FROM due WHERE o.message_id = due.message_id RETURNING {cols}",
                _aware(now),
                limit,
                worker_id,
                until,
                sorted(exclude),
            )
        )
        records = [_outbound(r) for r in rows]
        records.sort(key=lambda r: (_PRIORITY_RANK[r.priority], r.next_attempt_at, r.created_at))
        return records

    async def release_outbound(self, worker_id: str, message_ids: Collection[str]) -> None:
        if not message_ids:
            return
        await self._call(
            lambda c: c.execute(
                "UPDATE outbound_messages SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = $1 AND message_id = ANY($2::text[])",
                worker_id,
                sorted(message_ids),
            )
        )

    async def _apply_update(
        self, c: Conn, message_id: str, update: AttemptUpdate
    ) -> asyncpg.Record | None:
        """Record an attempt's or a late receipt's outcome and release any lease."""
        return await c.fetchrow(
            "UPDATE outbound_messages SET state = $1, attempts = $2, next_attempt_at = $3, "
            "last_error = $4, receipt_body = COALESCE($5, receipt_body), "
            "receipt_signature = COALESCE($6, receipt_signature), updated_at = $7, "
            "body = COALESCE($9, body), body_digest = COALESCE($10, body_digest), "
            "signature = COALESCE($11, signature), kid = COALESCE($12, kid), "
            "lease_owner = NULL, lease_until = NULL WHERE message_id = $8 "
            f"RETURNING {_OUTBOUND_COLUMNS}",
            update.state.value,
            update.attempts,
            _aware(update.next_attempt_at),
            update.last_error,
            update.receipt_body,
            update.receipt_signature,
            self._clock.now(),
            message_id,
            *update.resigned_columns(),
        )

    async def finish_attempt(
        self,
        message_id: str,
        worker_id: str,
        update: AttemptUpdate,
        events: Sequence[AuditEvent],
    ) -> OutboundRecord:
        events = list(events)

        async def unit(tx: _Tx) -> OutboundRecord:
            c = tx.conn
            row = await c.fetchrow(
                "SELECT lease_owner FROM outbound_messages WHERE message_id = $1 FOR UPDATE",
                message_id,
            )
            if row is None:
                raise MessageNotFound(message_id)
            if row[0] != worker_id:
                raise LeaseLost(message_id, worker_id)
            updated = await self._apply_update(c, message_id, update)
            if updated is None:
                raise MessageNotFound(message_id)
            tx.audit(events)
            finished = await _record_outcome(c, _outbound(updated))
            crash_point("S9-after-mark-before-commit", message_id=message_id)
            return finished

        return await self._write(unit)

    async def record_receipt(
        self,
        message_id: str,
        update: AttemptUpdate,
        events: Sequence[AuditEvent],
        *,
        dead_too: bool = False,
    ) -> OutboundRecord:
        events = list(events)

        async def unit(tx: _Tx) -> OutboundRecord:
            c = tx.conn
            state = await c.fetchval(
                "SELECT state FROM outbound_messages WHERE message_id = $1 FOR UPDATE",
                message_id,
            )
            if state is None:
                raise MessageNotFound(message_id)
            if OutboundState(state) not in ACTIVE_STATES and not (
                dead_too and OutboundState(state) in GIVEN_UP_STATES
            ):
                raise InvalidTransition(message_id, state, "record a receipt")
            updated = await self._apply_update(c, message_id, update)
            if updated is None:
                raise MessageNotFound(message_id)
            tx.audit(events)
            return await _record_outcome(c, _outbound(updated))

        return await self._write(unit)

    async def get_outbound(self, message_id: str) -> OutboundRecord | None:
        row = await self._call(
            lambda c: c.fetchrow(
                f"SELECT {_OUTBOUND_COLUMNS} FROM outbound_messages WHERE message_id = $1",
                message_id,
            )
        )
        return None if row is None else _outbound(row)

    async def retry_outbound(
        self,
        message_id: str,
        *,
        now: datetime,
        actor: str,
        events: Sequence[AuditEvent],
        resigned: Resigned | None = None,
    ) -> OutboundRecord:
        events = list(events)

        async def unit(tx: _Tx) -> OutboundRecord:
            c = tx.conn
            row = await c.fetchrow(
                "SELECT state, body IS NULL FROM outbound_messages "
                "WHERE message_id = $1 FOR UPDATE",
                message_id,
            )
            if row is None:
                raise MessageNotFound(message_id)
            state = OutboundState(row[0])
            if state not in RETRYABLE_STATES:
                raise InvalidTransition(message_id, state.value, "retry")
            if row[1]:
                raise InvalidTransition(message_id, f"{state.value} (body purged)", "retry")
            updated = await c.fetchrow(
                "UPDATE outbound_messages SET state = 'queued', attempts = 0, "
                "next_attempt_at = $1, last_error = NULL, updated_at = $1, lease_owner = NULL, "
                "lease_until = NULL, retried_by = $2, body = COALESCE($4, body), "
                "body_digest = COALESCE($5, body_digest), signature = COALESCE($6, signature), "
                "kid = COALESCE($7, kid), expires_at = COALESCE($8, expires_at) "
                f"WHERE message_id = $3 RETURNING {_OUTBOUND_COLUMNS}",
                _aware(now),
                actor,
                message_id,
                *resigned_columns(resigned),
                None
                if resigned is None or resigned.expires_at is None
                else _aware(resigned.expires_at),
            )
            if updated is None:
                raise MessageNotFound(message_id)
            tx.audit(events)
            return _outbound(updated)

        return await self._write(unit)

    async def close_outbound(
        self, message_id: str, *, now: datetime, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        events = list(events)

        async def unit(tx: _Tx) -> OutboundRecord:
            c = tx.conn
            state = await c.fetchval(
                "SELECT state FROM outbound_messages WHERE message_id = $1 FOR UPDATE",
                message_id,
            )
            if state is None:
                raise MessageNotFound(message_id)
            if OutboundState(state) is not OutboundState.DEAD:
                raise InvalidTransition(message_id, state, "close")
            updated = await c.fetchrow(
                "UPDATE outbound_messages SET state = 'closed', updated_at = $1 "
                f"WHERE message_id = $2 RETURNING {_OUTBOUND_COLUMNS}",
                _aware(now),
                message_id,
            )
            if updated is None:
                raise MessageNotFound(message_id)
            tx.audit(events)
            return await _record_outcome(c, _outbound(updated))

        return await self._write(unit)

    async def claim_outcomes(
        self, owner: str, now: datetime, limit: int, lease_s: float
    ) -> list[OutcomeRecord]:
        until = _aware(now) + timedelta(seconds=lease_s)
        cols = ", ".join(f"o.{col.strip()}" for col in _OUTCOME_COLUMNS.split(","))
        # SKIP LOCKED: a replica claiming at the same moment takes the next rows instead of
        # waiting for these, and the lease keeps them out of its later claims
        rows = await self._transaction(
            lambda c: c.fetch(
                "WITH due AS (SELECT seq FROM outbound_outcomes "
                "WHERE relay_owner IS NULL OR relay_lease_until <= $1 "
                "ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED) "
                "UPDATE outbound_outcomes AS o SET relay_owner = $3, relay_lease_until = $4 "
                f"FROM due WHERE o.seq = due.seq RETURNING {cols}",
                _aware(now),
                limit,
                owner,
                until,
            )
        )
        return sorted((_outcome(r) for r in rows), key=lambda o: o.seq)

    async def mark_outcomes_published(self, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        status: str = await self._call(
            lambda c: c.execute(
                "DELETE FROM outbound_outcomes WHERE seq = ANY($1::bigint[])", list(seqs)
            )
        )
        return int(status.rsplit(" ", 1)[-1])

    async def release_outcomes(self, owner: str) -> int:
        status: str = await self._call(
            lambda c: c.execute(
                "UPDATE outbound_outcomes SET relay_owner = NULL, relay_lease_until = NULL "
                "WHERE relay_owner = $1",
                owner,
            )
        )
        return int(status.rsplit(" ", 1)[-1])

    async def outbox_depth(self) -> dict[OutboundState, int]:
        rows = await self._call(
            lambda c: c.fetch("SELECT state, count(*) FROM outbound_messages GROUP BY state")
        )
        depth = empty_depth()
        for state, count in rows:
            depth[OutboundState(state)] = count
        return depth

    async def outbox_backlog(self) -> dict[str, PartnerBacklog]:
        rows = await self._call(lambda c: c.fetch(OUTBOX_BACKLOG_SQL))
        return {partner: PartnerBacklog(count, oldest) for partner, count, oldest in rows}

    async def list_messages(
        self, filter: MessageFilter, *, limit: int = 50, after: str | None = None
    ) -> MessagePage:
        query = messages_query(DIALECT, filter, limit=limit, after=after)
        if query is None:
            return MessagePage(items=[], next_cursor=None)
        sql, params = query
        rows = await self._call(lambda c: c.fetch(sql, *params))
        items = [
            MessageSummary(
                direction=Direction(r[0]),
                message_id=r[1],
                partner=r[2],
                message_type=r[3],
                schema_version=r[4],
                correlation_id=r[5],
                state=r[6],
                at=r[7],
                attempts=r[8],
                body_digest=r[9],
            )
            for r in rows
        ]
        next_cursor = None
        if items and len(items) == limit:
            last = items[-1]
            next_cursor = Cursor(
                at=last.at,
                direction=last.direction.value,
                partner=last.partner,
                message_id=last.message_id,
            ).encode()
        return MessagePage(items=items, next_cursor=next_cursor)

    # clock steps

    async def move_back_schedules(self, now: datetime, step: timedelta) -> tuple[int, int]:
        lease_cutoff = _aware(now) + step - CLOCK_STEP_GRACE

        async def unit(tx: _Tx) -> tuple[int, int]:
            c = tx.conn
            rows = await c.fetchval(
                "WITH m AS (UPDATE outbound_messages "
                "SET next_attempt_at = next_attempt_at - $1::interval, "
                "updated_at = updated_at - $1::interval "
                "WHERE state IN ('queued', 'sent') AND updated_at > $2 RETURNING 1) "
                "SELECT count(*) FROM m",
                step,
                _aware(now),
            )
            leases = await c.fetchval(
                "WITH m AS (UPDATE outbound_messages SET lease_until = lease_until - $1::interval "
                "WHERE lease_until > $2 RETURNING 1) SELECT count(*) FROM m",
                step,
                lease_cutoff,
            )
            relay = await c.fetchval(
                "WITH m AS (UPDATE inbound_messages "
                "SET relay_lease_until = relay_lease_until - $1::interval "
                "WHERE NOT relayed AND relay_lease_until > $2 RETURNING 1) SELECT count(*) FROM m",
                step,
                lease_cutoff,
            )
            return int(rows), int(leases) + int(relay)

        return await self._write(unit)

    # retention

    async def purge_bodies(self, older_than: datetime) -> int:
        """Drop old bodies a few rows at a time, each statement its own transaction outside
        the writer: a purge of months of rows neither runs into the store timeout as one
        statement nor holds the audit head (it appends nothing), so other writes go on."""
        cutoff = _aware(older_than)
        purged = 0
        start: tuple[tuple[str, object], ...] = ((_PURGE_INBOUND_SQL, 0), (_PURGE_OUTBOUND_SQL, ""))
        for sql, after in start:
            while True:
                try:
                    row = await self._call(partial(_purge_step, sql, cutoff, after), "purge_bodies")
                except Unavailable as exc:
                    if not purged:
                        raise
                    raise Unavailable(
                        f"{exc.reason} (after purging {purged} bodies, which stay purged)",
                        outage=exc.outage,
                    ) from exc
                if row is None or row[1] is None:  # no row past ``after``: the table is done
                    break
                purged += int(row[0])
                after = row[1]
        return purged


def session_settings(timeout_s: float) -> dict[str, str]:
    """What PostgreSQL itself enforces on each of the gateway's sessions (``server_settings``),
    from ``timeout_s`` (``[limits] store_timeout_s``).

    A replica that stops between two statements of a transaction (SIGSTOP, a paused VM, a
    partition) would hold its row locks, the audit head among them, for as long as it stays
    stopped, and every other replica's writes would queue behind it. PostgreSQL ends such a
    session after half the timeout (``idle_in_transaction_session_timeout``), which rolls its
    transaction back. A lock wait gives up after three quarters of it (``lock_timeout``):
    before the command timeout, so the reason says a lock was not had, and after a stopped
    holder was ended, so that its waiters get the lock rather than an error."""
    return {
        "idle_in_transaction_session_timeout": str(max(1, round(timeout_s * 500))),
        "lock_timeout": str(max(1, round(timeout_s * 750))),
    }


def _unavailable(
    exc: BaseException, *, what: str = "", timeout_s: float | None = None
) -> Unavailable:
    outage = isinstance(exc, _OUTAGE_ERRORS)
    if isinstance(exc, TimeoutError) and timeout_s is not None:
        # asyncpg's timeouts say nothing (str() is empty): name what waited, and how long
        return Unavailable(
            f"postgresql: {what or 'a store command'}: no answer within {timeout_s:g} s "
            "([limits] store_timeout_s)",
            outage=True,
        )
    if isinstance(exc, asyncpg.LockNotAvailableError) and timeout_s is not None:
        settings = session_settings(timeout_s)
        return Unavailable(
            f"postgresql: {what or 'a store command'}: {type(exc).__name__}: {exc} (a lock "
            f"another session held for over {int(settings['lock_timeout']) / 1000:g} s; a "
            "session idle in a transaction is ended after "
            f"{int(settings['idle_in_transaction_session_timeout']) / 1000:g} s)",
            outage=True,
        )
    return Unavailable(f"postgresql: {type(exc).__name__}: {exc}", outage=outage)


def _endpoint(dsn: str) -> str:
    """Where ``dsn`` connects, as ``postgresql://host:port[,host2:port2]/database``: never its
    user, password or other parameters. A Unix socket's folder is percent-encoded in the host's
    place, as in the URL. A URL with an '@' after its host part may hold a password with an
    unencoded '/' or '?' (``user:12/34@host/db``: the host and port the driver sees are the
    user and ``12``): nothing of it but the scheme is shown."""
    try:
        server = split_server_url(dsn, schemes=POSTGRES_SCHEMES, what="", several_hosts=True)
    except UrlInvalid:
        return "the configured PostgreSQL URL"
    parts = server.parts
    if userinfo_past_netloc(parts):
        return f"{parts.scheme}://{NOT_SHOWN}"
    query = parse_qs(parts.query)
    # as asyncpg reads them: ?host= when the URL names no host; for a host without a port,
    # ?port= (one for all, or one each), else PGPORT, else 5432
    named = [(a.host, a.port) for a in server.addresses] or [
        (host, None) for value in query.get("host", []) for host in value.split(",") if host
    ]
    given = [port for value in query.get("port", []) for port in value.split(",") if port]
    fallback = given[0] if len(given) == 1 else os.environ.get("PGPORT") or "5432"
    hosts = ",".join(
        f"{_host(host)}:{port or (given[i] if len(given) == len(named) else fallback)}"
        for i, (host, port) in enumerate(named)
    )
    database = unquote(parts.path[1:]) or next(
        (name for key in ("dbname", "database") for name in query.get(key, [])), ""
    )
    return f"{parts.scheme}://{hosts}/{quote(database, safe='')}"


def _host(host: str) -> str:
    """A host as a URL writes it: a Unix socket's folder percent-encoded, IPv6 in brackets."""
    if host.startswith("/"):
        return quote(host, safe="")
    return f"[{host}]" if ":" in host else host


def _operation(fn: Callable[..., object]) -> str:
    """The store method ``fn`` was written in (``audit_size`` for the lambda in it), to name
    it in a timeout's reason."""
    qualname: str = getattr(fn, "__qualname__", "")
    return qualname.split(".<locals>", 1)[0].rsplit(".", 1)[-1].lstrip("_") or "a store command"


def _batch_operations(units: Sequence[_Unit]) -> str:
    """A write batch's operations, for a reason: ``write batch (store_inbound x3, ...)``."""
    names = Counter("store_inbound" if u.fn is None else _operation(u.fn) for u in units)
    return (
        "write batch ("
        + ", ".join(name if n == 1 else f"{name} x{n}" for name, n in names.items())
        + ")"
    )


async def _purge_step(sql: str, cutoff: datetime, after: object, c: Conn) -> asyncpg.Record | None:
    return await c.fetchrow(sql, cutoff, after, _PURGE_ROWS, _PURGE_BYTES)


# Retention: one statement looks at the next $3 rows after key $2 (0 or '': from the first)
# in primary key order (a range of the key's index, whatever the plan), cut where the bodies
# it drops pass $4 bytes, and drops the bodies of those due; it returns how many it dropped
# and the last key it looked at (NULL once past the last row). The conditions are checked
# again on the row updated, so a row changed meanwhile (an outbound message retried) keeps
# its body.
_PURGE_INBOUND_SQL = (
    "WITH scan AS (SELECT seq, received_at < $1 AND relayed AND body IS NOT NULL AS due, "
    "octet_length(body) AS n FROM inbound_messages "
    "WHERE seq > $2 ORDER BY seq LIMIT $3), "
    "kept AS (SELECT seq, due FROM (SELECT seq, due, row_number() OVER w AS k, "
    "sum(CASE WHEN due THEN n ELSE 0 END) OVER w AS total FROM scan "
    "WINDOW w AS (ORDER BY seq)) AS t WHERE k = 1 OR total <= $4), "
    "p AS (UPDATE inbound_messages AS m SET body = NULL FROM kept "
    "WHERE m.seq = kept.seq AND kept.due AND m.received_at < $1 AND m.relayed "
    "AND m.body IS NOT NULL RETURNING 1) "
    "SELECT (SELECT count(*) FROM p), (SELECT max(seq) FROM kept)"
)
_PURGE_OUTBOUND_SQL = (
    "WITH scan AS (SELECT message_id, created_at < $1 "
    f"AND state IN ({_FINISHED}) AND body IS NOT NULL AS due, "
    "octet_length(body) AS n FROM outbound_messages "
    "WHERE message_id > $2 ORDER BY message_id LIMIT $3), "
    "kept AS (SELECT message_id, due FROM (SELECT message_id, due, row_number() OVER w AS k, "
    "sum(CASE WHEN due THEN n ELSE 0 END) OVER w AS total FROM scan "
    "WINDOW w AS (ORDER BY message_id)) AS t WHERE k = 1 OR total <= $4), "
    "p AS (UPDATE outbound_messages AS o SET body = NULL FROM kept "
    "WHERE o.message_id = kept.message_id AND kept.due AND o.created_at < $1 "
    f"AND o.state IN ({_FINISHED}) AND o.body IS NOT NULL RETURNING 1) "
    "SELECT (SELECT count(*) FROM p), (SELECT max(message_id) FROM kept)"
)


async def _get_inbound(c: Conn, sender: str, message_id: str) -> InboundRecord | None:
    row = await c.fetchrow(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages WHERE sender = $1 AND message_id = $2",
        sender,
        message_id,
    )
    return None if row is None else _inbound(row)


async def _fetch_nodes(c: Conn, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
    rows = await c.fetch(
        "SELECT n.level, n.idx, n.hash FROM audit_nodes AS n "
        "JOIN unnest($1::smallint[], $2::bigint[]) AS k(level, idx) "
        "ON n.level = k.level AND n.idx = k.idx",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r[0], r[1]): r[2] for r in rows}


def _lost_after_commit(exc: BaseException) -> None:
    """The server committed the write, then the connection died before the pool took it back
    (its reset failed): nothing of the write is lost; the pool replaces the connection."""
    log.warning("postgres_connection_lost_after_commit", error=f"{type(exc).__name__}: {exc}")


def _ids(units: list[_Unit]) -> str:
    """The message ids of a batch's inbox inserts (for a crash line)."""
    return " ".join(u.inbound[0].message_id for u in units if u.inbound is not None)


async def _probe_write(c: Conn) -> None:
    """Insert a row like a message's, with an incompressible body, and roll it back.

    PostgreSQL writes a relation's new pages when an insert needs them, so on a full
    tablespace the insert fails as the next message's would; nothing of it is kept (an
    identity value of ``inbound_messages.seq`` is used up, as by any failed insert)."""
    transaction = c.transaction()
    await transaction.start()
    try:
        await c.execute(
            "INSERT INTO inbound_messages (sender, message_id, recipient, message_type, "
            "schema_version, body, body_digest, signature, kid, transport, received_at, "
            "receipt_body, receipt_signature, relayed) "
            "VALUES ('~probe', $1, '~probe', '~probe', '0', $2, '~probe', '~probe', "
            "'~probe', '~probe', now(), ''::bytea, '~probe', TRUE)",
            f"readiness-{uuid.uuid4()}",
            os.urandom(_PROBE_BODY_BYTES),
        )
    finally:
        await transaction.rollback()


async def _run_unit(tx: _Tx, fn: Callable[[_Tx], Awaitable[Any]]) -> Any:
    """Run one unit in a SAVEPOINT: its refusal (or bug) rolls back its rows and its queued
    audit events alone and goes back to its caller; a database failure fails the batch."""
    mark = len(tx.events)
    try:
        async with tx.conn.transaction():
            return await fn(tx)
    except asyncpg.IntegrityConstraintViolationError as exc:
        del tx.events[mark:]
        return _unavailable(exc)
    except _DB_ERRORS:
        raise
    except Exception as exc:
        del tx.events[mark:]
        return exc


def _first_of_each_key(
    items: list[tuple[InboundRecord, list[AuditEvent], RelayLease | None]],
) -> dict[InboundKey, tuple[InboundRecord, list[AuditEvent], RelayLease | None]]:
    """The first item of each key, in key order: replicas inserting the same keys meet them in
    one order (no deadlock); a key repeated inside the batch is answered from its first."""
    first: dict[InboundKey, tuple[InboundRecord, list[AuditEvent], RelayLease | None]] = {}
    for item in sorted(items, key=lambda item: item[0].key):
        first.setdefault(item[0].key, item)
    return first


async def _store_inbound_statement(
    c: Conn, items: list[tuple[InboundRecord, list[AuditEvent], RelayLease | None]]
) -> list[InboundOutcome | BaseException]:
    """An inbox batch as one autocommit statement: the insert (the unique key decides which
    rows are new), then ``c2c_audit_append`` with the events of the rows inserted."""
    first = _first_of_each_key(items)
    records = [(record, lease) for record, _, lease in first.values()]
    events = [(record.key, event) for record, evs, _ in first.values() for event in evs]
    inserted = await c.fetch(
        _INSERT_INBOUND_SQL.replace(
            "RETURNING sender, message_id, seq",
            "RETURNING sender, message_id, seq), "
            + _keyed_events_cte(
                _INBOUND_PARAMS + 1,
                "JOIN ins ON ins.sender = e.k_sender AND ins.message_id = e.k_message_id",
            )
            + f" SELECT ins.sender, ins.message_id, ins.seq, {_APPEND_EV} FROM ins",
        ),
        *_inbound_args(records),
        *_keyed_event_args(events),
    )
    seqs: dict[InboundKey, int] = {(r[0], r[1]): r[2] for r in inserted}
    existing = await _get_inbound_many(c, [key for key in first if key not in seqs])
    return _inbound_outcomes(items, first, seqs, {}, existing, None)


def _keyed_events_cte(first_param: int, join: str) -> str:
    """``ev``: audit events, each with the inbox key it records (``k_sender``,
    ``k_message_id``) and its place (``ord``), from the twelve arrays of
    ``_keyed_event_args`` starting at ``$first_param``, joined with ``join``."""
    types = ["text", "text", "bytea", "bytea", "timestamptz"] + ["text"] * 7
    arrays = ", ".join(f"${first_param + i}::{t}[]" for i, t in enumerate(types))
    return (
        f"ev AS (SELECT e.* FROM unnest({arrays}) WITH ORDINALITY AS "
        "e(k_sender, k_message_id, entry, leaf_hash, at, event, message_id, sender, "
        f"recipient, message_type, outcome, correlation_id, ord) {join})"
    )


# ``ev`` appended in its order, in one call (the audit head is locked only when it has rows);
# the seq of its first entry, or NULL
_APPEND_EV = (
    "(SELECT CASE WHEN count(*) > 0 THEN c2c_audit_append("
    "array_agg(entry ORDER BY ord), array_agg(leaf_hash ORDER BY ord), "
    "array_agg(at ORDER BY ord), array_agg(event ORDER BY ord), "
    "array_agg(message_id ORDER BY ord), array_agg(sender ORDER BY ord), "
    "array_agg(recipient ORDER BY ord), array_agg(message_type ORDER BY ord), "
    "array_agg(outcome ORDER BY ord), array_agg(correlation_id ORDER BY ord)) END "
    "FROM ev)"
)


def _keyed_event_args(
    events: Sequence[tuple[tuple[str | None, str | None], AuditEvent]],
) -> list[list[Any]]:
    return [
        [key[0] for key, _ in events],
        [key[1] for key, _ in events],
        *_event_args([event for _, event in events]),
    ]


def _event_args(events: Sequence[AuditEvent]) -> list[list[Any]]:
    """The ten parallel arrays ``c2c_audit_append`` takes, one element per event."""
    rows = entry_rows(0, events)
    return [
        [r.entry for r in rows],
        [r.leaf_hash for r in rows],
        [_aware(r.at) for r in rows],
        [r.event for r in rows],
        [r.message_id for r in rows],
        [r.sender for r in rows],
        [r.recipient for r in rows],
        [r.message_type for r in rows],
        [r.outcome for r in rows],
        [r.correlation_id for r in rows],
    ]


# Marking relayed rows and appending the events of the rows marked, as one autocommit
# statement: the rows are locked in seq order (two marks of the same rows queue in one order),
# and the audit head only after them, inside the database.
_MARK_RELAYED_SQL = (
    "WITH due AS (SELECT m.seq FROM inbound_messages AS m "
    "JOIN unnest($1::text[], $2::text[]) AS k(sender, message_id) "
    "ON m.sender = k.sender AND m.message_id = k.message_id "
    "WHERE NOT m.relayed AND ($3::text IS NULL OR m.relay_owner = $3::text) "
    "ORDER BY m.seq FOR UPDATE OF m), "
    "marked AS (UPDATE inbound_messages AS m SET relayed = TRUE, relay_owner = NULL, "
    "relay_lease_until = NULL FROM due WHERE m.seq = due.seq "
    "RETURNING m.sender, m.message_id), "
    # the events of rows marked, and of keys not asked to be marked (as events_for_marked)
    + _keyed_events_cte(
        4,
        "LEFT JOIN marked ON marked.sender = e.k_sender AND marked.message_id = e.k_message_id "
        "WHERE marked.sender IS NOT NULL OR NOT EXISTS (SELECT 1 FROM "
        "unnest($1::text[], $2::text[]) AS k(sender, message_id) "
        "WHERE k.sender = e.k_sender AND k.message_id = e.k_message_id)",
    )
    + " SELECT (SELECT array_agg(sender) FROM marked), "
    "(SELECT array_agg(message_id) FROM marked), " + _APPEND_EV
)


async def _store_inbound_batch(
    tx: _Tx, items: list[tuple[InboundRecord, list[AuditEvent], RelayLease | None]]
) -> list[InboundOutcome | BaseException]:
    """Insert a batch's inbox rows inside ``tx``, one statement unless a row breaks another
    constraint (then each alone, so one bad row does not refuse the others)."""
    first = _first_of_each_key(items)
    records = [(record, lease) for record, _, lease in first.values()]
    failed: dict[InboundKey, BaseException] = {}
    try:
        async with tx.conn.transaction():
            seqs = await _insert_inbound(tx.conn, records)
    except asyncpg.IntegrityConstraintViolationError:
        seqs = {}
        for item in records:
            try:
                async with tx.conn.transaction():
                    seqs.update(await _insert_inbound(tx.conn, [item]))
            except asyncpg.IntegrityConstraintViolationError as exc:
                failed[item[0].key] = _unavailable(exc)
    existing = await _get_inbound_many(
        tx.conn, [key for key in first if key not in seqs and key not in failed]
    )
    return _inbound_outcomes(items, first, seqs, failed, existing, tx)


def _inbound_outcomes(
    items: list[tuple[InboundRecord, list[AuditEvent], RelayLease | None]],
    first: Mapping[InboundKey, tuple[InboundRecord, list[AuditEvent], RelayLease | None]],
    seqs: Mapping[InboundKey, int],
    failed: Mapping[InboundKey, BaseException],
    existing: Mapping[InboundKey, InboundRecord],
    tx: _Tx | None,
) -> list[InboundOutcome | BaseException]:
    """Each item's answer: stored (the first of its key, whose events ``tx`` appends when
    given), duplicate or conflict of the row that holds the key, or its failure."""
    outcomes: list[InboundOutcome | BaseException] = []
    answered: set[InboundKey] = set()
    for record, events, _ in items:
        key = record.key
        if key in failed:
            outcomes.append(failed[key])
            continue
        if key in seqs and key not in answered:
            answered.add(key)
            if tx is not None:
                tx.audit(events)
            stored = replace(record, seq=seqs[key], relayed=False)
            outcomes.append(InboundOutcome(status="stored", record=stored))
            continue
        original = (
            replace(first[key][0], seq=seqs[key], relayed=False)
            if key in seqs
            else existing.get(key)
        )
        if original is None:
            outcomes.append(Unavailable("postgresql: inbound row vanished after a key conflict"))
            continue
        same = original.body_digest == record.body_digest
        outcomes.append(InboundOutcome(status="duplicate" if same else "conflict", record=original))
    return outcomes


# ON CONFLICT waits for a concurrent insert of the same key to commit or abort, so a race
# between replicas ends as a duplicate, never as an error
_INSERT_INBOUND_SQL = (
    "WITH ins AS (INSERT INTO inbound_messages (sender, message_id, recipient, message_type, "
    "schema_version, correlation_id, in_reply_to, body, body_digest, signature, kid, "
    "transport, received_at, receipt_body, receipt_signature, relay_owner, "
    "relay_lease_until, document_ref, created_at, message_function) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
    "$6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[], $11::text[], $12::text[], "
    "$13::timestamptz[], $14::bytea[], $15::text[], $16::text[], $17::timestamptz[], "
    "$18::text[], $19::timestamptz[], $20::text[]) "
    "ON CONFLICT ON CONSTRAINT inbound_sender_message_id DO NOTHING "
    "RETURNING sender, message_id, seq"
)


#: the parameters of ``_INSERT_INBOUND_SQL`` (``_inbound_args``' arrays)
_INBOUND_PARAMS = 20


def _inbound_args(items: list[tuple[InboundRecord, RelayLease | None]]) -> list[list[Any]]:
    records = [record for record, _ in items]
    return [
        [r.sender for r in records],
        [r.message_id for r in records],
        [r.recipient for r in records],
        [r.message_type for r in records],
        [r.schema_version for r in records],
        [r.correlation_id for r in records],
        [r.in_reply_to for r in records],
        [r.body for r in records],
        [r.body_digest for r in records],
        [r.signature for r in records],
        [r.kid for r in records],
        [r.transport for r in records],
        [_aware(r.received_at) for r in records],
        [r.receipt_body for r in records],
        [r.receipt_signature for r in records],
        [None if lease is None else lease.owner for _, lease in items],
        [None if lease is None else _aware(lease.until) for _, lease in items],
        [r.document_ref for r in records],
        [None if r.created_at is None else _aware(r.created_at) for r in records],
        [r.message_function for r in records],
    ]


async def _insert_inbound(
    c: Conn, items: list[tuple[InboundRecord, RelayLease | None]]
) -> dict[InboundKey, int]:
    rows = await c.fetch(_INSERT_INBOUND_SQL + ") SELECT * FROM ins", *_inbound_args(items))
    return {(r[0], r[1]): r[2] for r in rows}


async def _get_inbound_many(c: Conn, keys: Sequence[InboundKey]) -> dict[InboundKey, InboundRecord]:
    if not keys:
        return {}
    cols = ", ".join(f"m.{col.strip()}" for col in _INBOUND_COLUMNS.split(","))
    rows = await c.fetch(
        f"SELECT {cols} FROM inbound_messages AS m "
        "JOIN unnest($1::text[], $2::text[]) AS k(sender, message_id) "
        "ON m.sender = k.sender AND m.message_id = k.message_id",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r[0], r[1]): _inbound(r) for r in rows}


async def _append_audit(c: Conn, events: Sequence[AuditEvent]) -> int:
    """Append a batch's entries with ``c2c_audit_append`` (migration 0003): the head is
    locked, the Merkle nodes hashed and everything written inside the database, in one round
    trip. Returns the seq of the first entry."""
    first: int = await c.fetchval(
        "SELECT c2c_audit_append($1::bytea[], $2::bytea[], $3::timestamptz[], $4::text[], "
        "$5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])",
        *_event_args(events),
    )
    return first


async def _record_outcome(c: Conn, record: OutboundRecord) -> OutboundRecord:
    """In the transaction that wrote ``record``'s state (its row locked): when it is final,
    the outcome to publish (gateway/store/outcomes.py). Returns ``record``."""
    if not is_final(record.state):
        return record
    n = await c.fetchval(
        "UPDATE outbound_messages SET outcomes = outcomes + 1 WHERE message_id = $1 "
        "RETURNING outcomes",
        record.message_id,
    )
    await c.execute(
        "INSERT INTO outbound_outcomes (message_id, recipient, message_type, state, n, body, at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        record.message_id,
        record.recipient,
        record.message_type,
        record.state.value,
        n,
        outcome_body(record, n),
        _aware(record.updated_at),
    )
    return record


def _outcome(row: asyncpg.Record) -> OutcomeRecord:
    return OutcomeRecord(
        seq=row[0],
        message_id=row[1],
        recipient=row[2],
        message_type=row[3],
        state=OutboundState(row[4]),
        n=row[5],
        body=row[6],
        at=row[7],
    )


async def _migrate(c: Conn) -> None:
    """Apply pending migrations; the advisory lock makes a second process wait, then skip."""
    await c.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
    await c.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
        "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    applied = {r[0] for r in await c.fetch("SELECT version FROM schema_migrations")}
    for migration in load_migrations("postgres"):
        if migration.version in applied:
            continue
        await c.execute(migration.sql)
        await c.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )


async def _fill_sizes(after: int, c: Conn) -> list[tuple[int, int]]:
    rows = await c.fetch(
        "SELECT seq, octet_length(body) FROM inbound_messages WHERE created_at IS NULL "
        "AND body IS NOT NULL AND seq > $1 ORDER BY seq LIMIT $2",
        after,
        FILL_ROWS,
    )
    return [(r[0], r[1]) for r in rows]


async def _fill_bodies(seqs: list[int], c: Conn) -> list[tuple[int, bytes]]:
    rows = await c.fetch(
        "SELECT seq, body FROM inbound_messages WHERE seq = ANY($1::bigint[]) "
        "AND created_at IS NULL AND body IS NOT NULL",
        seqs,
    )
    return [(r[0], r[1]) for r in rows]


async def _fill_update(found: list[tuple[int, DocumentColumns | None]], c: Conn) -> int:
    """How many rows it filled. The rows are locked in seq order first, so replicas filling
    the same batch at once queue one behind the other instead of deadlocking; the one behind
    finds them filled."""
    filled = [(seq, columns) for seq, columns in found if columns is not None]
    seqs = [seq for seq, _ in filled]
    async with c.transaction():
        await c.execute(
            "SELECT seq FROM inbound_messages WHERE seq = ANY($1::bigint[]) "
            "AND created_at IS NULL ORDER BY seq FOR UPDATE",
            seqs,
        )
        status = await c.execute(
            "UPDATE inbound_messages AS m SET document_ref = f.ref, created_at = f.at, "
            "message_function = f.fn FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], "
            "$4::text[]) AS f(seq, ref, at, fn) WHERE m.seq = f.seq AND m.created_at IS NULL",
            seqs,
            [columns.document_ref for _, columns in filled],
            [columns.created_at for _, columns in filled],
            [columns.message_function for _, columns in filled],
        )
    return int(status.rsplit(" ", 1)[-1])


async def _outbound_by_key(
    c: Conn, submitted_by: str | None, idempotency_key: str
) -> OutboundRecord | None:
    row = await c.fetchrow(
        f"SELECT {_OUTBOUND_COLUMNS} FROM outbound_messages "
        "WHERE submitted_by = $1 AND idempotency_key = $2",
        submitted_by,
        idempotency_key,
    )
    return None if row is None else _outbound(row)
