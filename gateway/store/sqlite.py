"""SQLite store: the embedded default (WAL, synchronous=FULL, one writer with group commit).

All writes go through ONE connection on ONE thread. The writer takes every write unit queued
at that moment, runs each inside its own SAVEPOINT (a unit that fails is rolled back alone)
and commits them together; each caller's future resolves only after COMMIT returned, so
nothing is acknowledged before it is durable, and concurrent messages share one fsync.
Reads run on separate connections in a small thread pool and never wait for the writer.

The batch runs in one thread hop with the stdlib ``sqlite3`` module: aiosqlite would cost a
hop per statement, which is what a group commit exists to avoid.
"""

# ruff: noqa: S608 -- SQL here is composed of constant fragments and placeholders; every
# value goes through a query parameter.

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.audit.events import AuditEvent
from gateway.audit.merkle import frontier
from gateway.clock import Clock
from gateway.crashpoints import crash_point
from gateway.documents import FILL_ROWS, fill_batch, fill_columns, log_filled
from gateway.errors import DuplicateConflict, Unavailable
from gateway.model import Direction, Priority
from gateway.store.audit_rows import plan_append
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
    events_for_marked,
    resigned_columns,
    same_request,
)
from gateway.store.migrations import load_migrations
from gateway.store.outcomes import OutcomeRecord, is_final, outcome_body
from gateway.store.queries import Cursor, Dialect, audit_query, index_fields, messages_query

T = TypeVar("T")
Conn = sqlite3.Connection

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)

log = structlog.get_logger(__name__)

# A column declared BLOB reads as bytes whatever a raw UPDATE left in it: SQLite keeps the
# type of the value written (replace() on a BLOB gives TEXT), and the audit check must see
# such an entry or hash as changed bytes, not fail on a str (connections read declared types).
sqlite3.register_converter("BLOB", lambda value: value)


def make_private_folder(folder: Path) -> None:
    """Make ``folder`` and each missing parent readable by its owner only, whatever the umask
    (``mkdir(parents=True)`` gives the mode to the last folder only). A folder already there is
    the operator's and keeps its mode."""
    missing: list[Path] = []
    for path in (folder, *folder.parents):
        if path.is_dir():
            break
        missing.append(path)
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def _us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return (moment - _EPOCH) // _MICRO


def _us_opt(moment: datetime | None) -> int | None:
    return None if moment is None else _us(moment)


def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _dt_opt(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


DIALECT = Dialect(placeholder=lambda n: f"?{n}", timestamp=_us, true="1", false="0")

_INBOUND_COLUMNS = (
    "sender, message_id, recipient, message_type, schema_version, correlation_id, in_reply_to, "
    "body, body_digest, signature, kid, transport, received_at, receipt_body, "
    "receipt_signature, seq, relayed, document_ref, created_at, message_function"
)
_OUTBOUND_COLUMNS = (
    "message_id, recipient, message_type, schema_version, correlation_id, in_reply_to, "
    "priority, body, body_digest, signature, kid, transport, created_at, expires_at, state, "
    "attempts, next_attempt_at, last_error, receipt_body, receipt_signature, submitted_by, "
    "updated_at, idempotency_key, request_digest"
)
_OUTCOME_COLUMNS = "seq, message_id, recipient, message_type, state, n, body, at"
_PRIORITY_RANK = {Priority.URGENT: 0, Priority.ROUTINE: 1}
_FINISHED = tuple(s.value for s in OutboundState if s not in ACTIVE_STATES)


def _inbound(row: Sequence[Any]) -> InboundRecord:
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
        received_at=_dt(row[12]),
        receipt_body=row[13],
        receipt_signature=row[14],
        seq=row[15],
        relayed=bool(row[16]),
        document_ref=row[17],
        created_at=None if row[18] is None else _dt(row[18]),
        message_function=row[19],
    )


def _outbound(row: Sequence[Any]) -> OutboundRecord:
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
        created_at=_dt(row[12]),
        expires_at=_dt_opt(row[13]),
        state=OutboundState(row[14]),
        attempts=row[15],
        next_attempt_at=_dt(row[16]),
        last_error=row[17],
        receipt_body=row[18],
        receipt_signature=row[19],
        submitted_by=row[20],
        updated_at=_dt(row[21]),
        idempotency_key=row[22],
        request_digest=row[23],
    )


def _outcome(row: Sequence[Any]) -> OutcomeRecord:
    return OutcomeRecord(
        seq=row[0],
        message_id=row[1],
        recipient=row[2],
        message_type=row[3],
        state=OutboundState(row[4]),
        n=row[5],
        body=row[6],
        at=_dt(row[7]),
    )


#: primary result codes of a database that cannot serve anyone now (busy or locked by another
#: process, out of memory, read-only, an I/O error, corrupt, full, cannot be opened), as
#: against an error of one statement (a constraint, a bug)
_OUTAGE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15})
#: SQLITE_READONLY_DIRECTORY: the database's directory is not writable, so SQLite cannot
#: create the files beside it that it needs (the -wal and -shm of WAL mode)
_READONLY_DIRECTORY = 8 | 6 << 8


def _unavailable(exc: sqlite3.Error, where: str = "") -> Unavailable:
    code = getattr(exc, "sqlite_errorcode", None)
    outage = code is not None and code & 0xFF in _OUTAGE_CODES
    return Unavailable(f"sqlite: {where}{type(exc).__name__}: {exc}", outage=outage)


def _probe_write(c: Conn) -> None:
    """A write that changes nothing once committed, yet logs a page (an UPDATE to the same
    value would be skipped and tell nothing)."""
    c.execute("UPDATE audit_head SET size = size + 1 WHERE id = 1")
    c.execute("UPDATE audit_head SET size = size - 1 WHERE id = 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class WriterStats:
    """Group-commit counters since open: transactions committed and write units in them."""

    commits: int
    units: int


@dataclass(kw_only=True, slots=True)
class _Unit:
    fn: Callable[[Conn], Any]
    future: asyncio.Future[Any]


class SqliteStore:
    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        busy_timeout_ms: int = 5_000,
        readers: int = 2,
        max_batch: int = 512,
        checkpoint_interval_s: float = 0.25,
        wal_truncate_frames: int = 4096,
    ) -> None:
        self._path = path
        #: past this many frames (16 MiB of 4 KiB pages), the writer checkpoints the WAL away
        self._wal_truncate_frames = wal_truncate_frames
        self._clock = clock
        self._busy_timeout_ms = busy_timeout_ms
        self._readers = readers
        self._max_batch = max_batch
        self._writer_pool: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._writer_conn: Conn | None = None
        self._reader_conns: list[Conn] = []
        self._reader_local = threading.local()
        self._reader_lock = threading.Lock()
        self._queue: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        # WAL checkpoints run here, beside the writer, never inside a commit: SQLite's
        # automatic checkpoint would stall the one commit that crosses 1,000 WAL pages (at one
        # message per commit that is every few dozen messages) for a copy and an fsync.
        self._checkpoint_interval_s = checkpoint_interval_s
        self._checkpoint_pool: ThreadPoolExecutor | None = None
        self._checkpoint_conn: Conn | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpointed_commits = 0
        self._commits = 0
        self._units = 0
        #: why write transactions fail (disk full, I/O error), until one commits again
        self._write_failure: str | None = None
        #: the WAL's length in frames, as the last checkpoint or the file's size says
        self._wal_frames = 0
        self._wal_path = f"{path}-wal"
        self._page_size = 4096
        self._failed_batches = 0
        # (size, frontier hashes) after the last audit append of the open write transaction,
        # and as last committed. Only the writer thread touches them. The log is append-only,
        # so a committed tree of a given size is the only one there will ever be at that size:
        # an equal head size (checked on every append) means the frontier is still exact,
        # also when another process shares the file. Any rollback drops the open one.
        self._tx_frontier: tuple[int, dict[NodeKey, bytes]] | None = None
        self._committed_frontier: tuple[int, dict[NodeKey, bytes]] | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def writer_stats(self) -> WriterStats:
        return WriterStats(commits=self._commits, units=self._units)

    # lifecycle

    async def open(self) -> None:
        if self._writer_task is not None:
            return
        loop = asyncio.get_running_loop()
        # the file may have been replaced while closed (a restore): nothing carried over
        self._committed_frontier = None
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-reader")
        try:
            self._make_file()
            self._writer_conn = await loop.run_in_executor(self._writer_pool, self._open_writer)
        except sqlite3.Error as exc:
            await self._shutdown_pools()
            raise self._open_error(exc) from exc
        except Unavailable:
            await self._shutdown_pools()
            raise
        self._queue = asyncio.Queue()
        self._writer_task = asyncio.create_task(self._writer_loop(), name="sqlite-writer")
        self._checkpoint_pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_task = asyncio.create_task(
            self._checkpoint_loop(), name="sqlite-checkpoint"
        )

    def _make_file(self) -> None:
        """A new store's directory (var/ of a fresh checkout) and file, private to the
        gateway: SQLite gives the -wal and -shm files the database file's mode. What cannot be
        made is named, with its path."""
        folder = self._path.parent
        try:
            make_private_folder(folder)
        except OSError as exc:
            # a folder above it, where that is what could not be made
            above = exc.filename is not None and Path(exc.filename) != folder
            where = f" ({exc.filename})" if above else ""
            raise Unavailable(
                f"sqlite: cannot create the store's directory {folder}{where}: "
                f"{exc.strerror or exc}",
                outage=True,
            ) from exc
        try:
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            # an unreadable one is for SQLite to report, with the path
            with contextlib.suppress(OSError):
                if self._path.is_file() and self._path.stat().st_mode & 0o077:
                    # the operator's (or an older version's) file: theirs to change, but said
                    log.warning("store_file_open_to_others", file=str(self._path))
        except OSError as exc:
            raise Unavailable(
                f"sqlite: cannot create the database file {self._path}: {exc.strerror or exc}",
                outage=True,
            ) from exc

    def _open_error(self, exc: sqlite3.Error) -> Unavailable:
        """An error opening the database, with its path: SQLite's own messages name none."""
        if getattr(exc, "sqlite_errorcode", None) == _READONLY_DIRECTORY:
            # the file is there and writable, but WAL mode needs two files beside it
            return Unavailable(
                f"sqlite: the store's directory {self._path.parent} is not writable: SQLite "
                f"needs to create {self._path}-wal and {self._path}-shm there",
                outage=True,
            )
        return _unavailable(exc, f"{self._path}: ")

    async def close(self) -> None:
        task = self._writer_task
        if task is None:
            return
        self._writer_task = None
        checkpointer, self._checkpoint_task = self._checkpoint_task, None
        if checkpointer is not None:
            checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpointer
        await self._queue.put(None)
        await task
        await self._shutdown_pools()

    async def ping(self) -> None:
        task = self._writer_task
        if task is None or task.done():
            raise Unavailable("sqlite: store is not open", outage=True)
        await self._read(lambda c: c.execute("SELECT 1 FROM audit_head").fetchone())
        if self._write_failure is not None:
            # a read tells nothing of a full disk; the probe goes through the writer, which
            # first empties the WAL (it fails while the disk is still full), then commits
            await self._write(_probe_write)

    async def _shutdown_pools(self) -> None:
        for pool in (self._writer_pool, self._reader_pool, self._checkpoint_pool):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        self._writer_pool = self._reader_pool = self._checkpoint_pool = None
        conns = [
            c
            for c in [self._checkpoint_conn, self._writer_conn, *self._reader_conns]
            if c is not None
        ]
        self._checkpoint_conn = None
        self._writer_conn = None
        self._reader_conns = []
        self._reader_local = threading.local()
        for conn in conns:
            conn.close()

    def _connect(self) -> Conn:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
            detect_types=sqlite3.PARSE_DECLTYPES,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        return conn

    def _open_writer(self) -> Conn:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            # checkpoints are the checkpointer's (``_checkpoint_loop``), not the commits'
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # the per-unit savepoints' sub-journals in memory, not in a temporary file that
            # each transaction would create, write and unlink
            conn.execute("PRAGMA temp_store = MEMORY")
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            if str(mode).lower() != "wal" or sync != 2:
                raise sqlite3.OperationalError(
                    f"{self._path}: needs journal_mode=wal and synchronous=FULL, "
                    f"got journal_mode={mode} synchronous={sync}"
                )
            _migrate(conn)
            _fill_document_columns(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    # the single writer

    async def _write(self, fn: Callable[[Conn], T]) -> T:
        if self._writer_task is None or self._writer_task.done():
            raise Unavailable("sqlite: store is not open", outage=True)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Unit(fn=fn, future=future))
        return await future

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
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
            if not batch:
                continue
            fns = [u.fn for u in batch]
            try:
                results = await loop.run_in_executor(self._writer_pool, self._commit_batch, fns)
            except RuntimeError as exc:
                # the pool is gone (interpreter shutting down): nothing was committed
                results = [Unavailable(f"sqlite: writer stopped: {exc}", outage=True)] * len(batch)
            for unit, result in zip(batch, results, strict=True):
                if unit.future.done():
                    continue
                if isinstance(result, BaseException):
                    unit.future.set_exception(result)
                else:
                    unit.future.set_result(result)

    def _commit_batch(self, fns: list[Callable[[Conn], Any]]) -> list[Any]:
        conn = self._writer_conn
        assert conn is not None
        results: list[Any] = []
        self._tx_frontier = self._committed_frontier
        try:
            if self._write_failure is not None or self._wal_frames > self._wal_truncate_frames:
                self._reclaim_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            for fn in fns:
                conn.execute("SAVEPOINT unit")
                try:
                    results.append(fn(conn))
                except sqlite3.IntegrityError as exc:
                    self._tx_frontier = None
                    conn.execute("ROLLBACK TO unit")
                    results.append(_unavailable(exc))
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    # the unit's own refusal (or bug) goes back to its caller alone
                    self._tx_frontier = None
                    conn.execute("ROLLBACK TO unit")
                    results.append(exc)
                conn.execute("RELEASE unit")
            conn.execute("COMMIT")
            # The checkpointer reports the WAL's frames every interval; commits faster than
            # that would grow it far past the bound in between, so the writer also looks at
            # the file's size (a WAL frame is a page and a 24-byte header).
            with contextlib.suppress(OSError):
                frames = os.stat(self._wal_path).st_size // (self._page_size + 24)
                self._wal_frames = max(self._wal_frames, frames)
            if self._write_failure is not None:
                log.warning(
                    "sqlite_writes_recovered",
                    failed_transactions=self._failed_batches,
                    error=self._write_failure,
                )
                self._write_failure = None
            self._committed_frontier = self._tx_frontier
            self._commits += 1
            self._units += len(fns)
        except sqlite3.Error as exc:
            # a failed statement (disk full, I/O error, lock timeout) or COMMIT: the whole
            # batch is rolled back and every caller told so; nothing was acknowledged
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._note_write_failure(exc)
            return [_unavailable(exc)] * len(fns)
        except Exception as exc:
            # Not the database and not a unit (their errors are caught above): a bug or
            # MemoryError in the batch itself. The batch is rolled back and refused, and the
            # writer goes on; left to the loop, it would end the writer with every caller of
            # this batch waiting for an answer that never comes.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            log.exception("sqlite_batch_failed", units=len(fns), error=type(exc).__name__)
            return [Unavailable(f"sqlite: write batch failed: {type(exc).__name__}")] * len(fns)
        finally:
            self._tx_frontier = None
        return results

    def _reclaim_wal(self, conn: Conn) -> None:
        """Empty the WAL into the database file before the next write transaction.

        The periodic PASSIVE checkpoint never resets a WAL that commits keep appending to, so
        under steady load it only grows. On a full disk the checkpoint fails too, because the
        database file cannot grow; once space is freed, new commits would take it for the WAL
        faster than the checkpointer can use it, and the disk would fill up again for good.
        So when the WAL has grown past a bound, or after a failed write, the writer itself
        runs a TRUNCATE checkpoint first: every frame into the file, the WAL's space given
        back. If even that fails (the disk is still full), the batch is refused unwritten.
        """
        # Never wait for readers here: a long one (an audit export) would hold up every
        # batch. Busy, it copies what it can, like PASSIVE, and the write goes on; the next
        # attempt waits for the checkpointer's next report.
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        self._wal_frames = 0

    def _note_write_failure(self, exc: sqlite3.Error) -> None:
        """One error log when writes start failing or fail for another reason, not one per
        transaction: on a full disk every message fails alike until space is freed."""
        error = f"{type(exc).__name__}: {exc}"
        if error != self._write_failure:
            log.error(
                "sqlite_write_failed",
                path=str(self._path),
                error=error,
                hint="nothing was acknowledged; partners are answered 503 until a write commits",
            )
            self._failed_batches = 0
        self._write_failure = error
        self._failed_batches += 1

    # WAL checkpoints

    async def _checkpoint_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._checkpoint_interval_s)
            commits = self._commits
            if commits == self._checkpointed_commits or self._checkpoint_pool is None:
                continue
            try:
                _, self._wal_frames, _ = await loop.run_in_executor(
                    self._checkpoint_pool, self._checkpoint_wal
                )
            except sqlite3.Error as exc:
                # not fatal: the WAL keeps every commit; the next round tries again
                log.warning("sqlite_checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            self._checkpointed_commits = commits

    def _checkpoint_wal(self) -> tuple[int, int, int]:
        """PASSIVE: copy what no reader still needs into the database file, without taking
        the write lock, so commits go on meanwhile."""
        conn = self._checkpoint_conn
        if conn is None:
            conn = self._checkpoint_conn = self._connect()
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(frames), int(done)

    # reads

    def _reader(self) -> Conn:
        conn: Conn | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _run_read(self, fn: Callable[[Conn], T]) -> T:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        pool = self._reader_pool
        if pool is None:
            raise Unavailable("sqlite: store is not open", outage=True)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._run_read, fn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    # audit log (the append runs inside the caller's unit)

    def _append_audit(self, conn: Conn, events: Sequence[AuditEvent]) -> list[int]:
        if not events:
            return []
        row = conn.execute("SELECT size FROM audit_head WHERE id = 1").fetchone()
        size = audit_head_size(None if row is None else row[0])
        cached = self._tx_frontier
        # Nearly every unit appends: re-reading the frontier (log2 n rows) each time was most
        # of what the audit log cost on the inbound path.
        self._tx_frontier = None
        if cached is not None and cached[0] == size:
            known = cached[1]
        else:
            keys = frontier(size)
            known = _node_hashes(conn, keys)
            for level, idx in keys:
                if (level, idx) not in known:
                    raise sqlite3.DatabaseError(
                        f"audit node ({level}, {idx}) missing at size {size}"
                    )
        plan = plan_append(size, known, events)
        conn.executemany(
            "INSERT INTO audit_entries (seq, entry, leaf_hash, at, event, message_id, sender, "
            "recipient, message_type, outcome, correlation_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.seq,
                    e.entry,
                    e.leaf_hash,
                    _us(e.at),
                    e.event,
                    e.message_id,
                    e.sender,
                    e.recipient,
                    e.message_type,
                    e.outcome,
                    e.correlation_id,
                )
                for e in plan.entries
            ],
        )
        conn.executemany(
            "INSERT INTO audit_nodes (level, idx, hash) VALUES (?, ?, ?)",
            [(level, idx, h) for (level, idx), h in plan.nodes.items()],
        )
        crash_point("audit-append")
        conn.execute("UPDATE audit_head SET size = ? WHERE id = 1", (plan.new_size,))
        merged = {**known, **plan.nodes}
        self._tx_frontier = (plan.new_size, {k: merged[k] for k in frontier(plan.new_size)})
        return [e.seq for e in plan.entries]

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[int]:
        events = list(events)
        return await self._write(lambda c: self._append_audit(c, events))

    async def audit_size(self) -> int:
        row = await self._read(
            lambda c: c.execute("SELECT size FROM audit_head WHERE id = 1").fetchone()
        )
        return audit_head_size(None if row is None else row[0])

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
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        if not with_index:
            return [AuditRow(seq=r[0], entry=r[1], leaf_hash=r[2]) for r in rows]
        return [
            AuditRow(
                seq=r[0],
                entry=r[1],
                leaf_hash=r[2],
                # SQLite keeps whatever type a raw UPDATE wrote: a non-integer is no time
                index=AuditIndex(at=_dt(r[3]) if type(r[3]) is int else None, **index_fields(r)),
            )
            for r in rows
        ]

    async def audit_entry(self, seq: int) -> AuditRow | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT seq, entry, leaf_hash FROM audit_entries WHERE seq = ?", (seq,)
            ).fetchone()
        )
        return None if row is None else AuditRow(seq=row[0], entry=row[1], leaf_hash=row[2])

    async def audit_leaf_hashes(self, start: int, end: int) -> list[bytes]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT leaf_hash FROM audit_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                (start, end),
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def audit_node_hashes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        return await self._read(lambda c: _node_hashes(c, wanted))

    async def save_checkpoint(
        self,
        size: int,
        root_hash: bytes,
        note: str,
        created_at: datetime,
        events: Sequence[AuditEvent] = (),
    ) -> None:
        events = list(events)

        def unit(c: Conn) -> None:
            row = c.execute(
                "SELECT root_hash FROM audit_checkpoints WHERE size = ?", (size,)
            ).fetchone()
            if row is not None and bytes(row[0]) != root_hash:
                raise StoreError(f"a checkpoint of size {size} exists with another root hash")
            c.execute(
                "INSERT INTO audit_checkpoints (size, root_hash, note, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (size) DO UPDATE SET note = excluded.note, "
                "created_at = excluded.created_at",
                (size, root_hash, note, _us(created_at)),
            )
            self._append_audit(c, events)

        await self._write(unit)

    async def latest_checkpoint(self) -> Checkpoint | None:
        return await self._checkpoint("ORDER BY size DESC LIMIT 1", ())

    async def checkpoint_for_size(self, size: int) -> Checkpoint | None:
        return await self._checkpoint("WHERE size = ?", (size,))

    async def _checkpoint(self, clause: str, params: tuple[int, ...]) -> Checkpoint | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT size, root_hash, note, created_at FROM audit_checkpoints {clause}",
                params,
            ).fetchone()
        )
        if row is None:
            return None
        return Checkpoint(size=row[0], root_hash=row[1], note=row[2], created_at=_dt(row[3]))

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

        def unit(c: Conn) -> None:
            c.execute(
                "INSERT INTO audit_cosignatures (partner, size, root_hash, note, received_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (partner, size) DO UPDATE SET "
                "root_hash = excluded.root_hash, note = excluded.note, "
                "received_at = excluded.received_at",
                (partner, size, root_hash, note, _us(received_at)),
            )
            self._append_audit(c, events)

        await self._write(unit)

    async def cosignatures(self, size: int | None = None) -> list[Cosignature]:
        sql = "SELECT partner, size, root_hash, note, received_at FROM audit_cosignatures"
        params: tuple[int, ...] = ()
        if size is not None:
            sql += " WHERE size = ?"
            params = (size,)
        rows = await self._read(
            lambda c: c.execute(sql + " ORDER BY size, partner", params).fetchall()
        )
        return [
            Cosignature(partner=r[0], size=r[1], root_hash=r[2], note=r[3], received_at=_dt(r[4]))
            for r in rows
        ]

    async def latest_cosignatures(self, max_size: int) -> list[Cosignature]:
        sql = (
            "SELECT c.partner, c.size, c.root_hash, c.note, c.received_at FROM audit_cosignatures c"
            " JOIN (SELECT partner, max(size) AS size FROM audit_cosignatures WHERE size <= ?"
            " GROUP BY partner) m ON m.partner = c.partner AND m.size = c.size"
            " ORDER BY c.partner"
        )
        rows = await self._read(lambda c: c.execute(sql, (max_size,)).fetchall())
        return [
            Cosignature(partner=r[0], size=r[1], root_hash=r[2], note=r[3], received_at=_dt(r[4]))
            for r in rows
        ]

    async def get_witnessed(self, origin: str) -> WitnessedState | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT size, root_hash, note FROM audit_witnessed WHERE origin = ?", (origin,)
            ).fetchone()
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

        def unit(c: Conn) -> None:
            c.execute(
                "INSERT INTO audit_witnessed (origin, size, root_hash, note) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (origin) DO UPDATE SET size = excluded.size, "
                "root_hash = excluded.root_hash, note = excluded.note",
                (origin, size, root_hash, note),
            )
            self._append_audit(c, events)

        await self._write(unit)

    # inbox

    async def store_inbound(
        self,
        record: InboundRecord,
        events: Sequence[AuditEvent],
        *,
        relay_lease: RelayLease | None = None,
    ) -> InboundOutcome:
        events = list(events)
        owner = None if relay_lease is None else relay_lease.owner
        until = None if relay_lease is None else _us(relay_lease.until)

        def unit(c: Conn) -> InboundOutcome:
            cur = c.execute(
                "INSERT INTO inbound_messages (sender, message_id, recipient, message_type, "
                "schema_version, correlation_id, in_reply_to, body, body_digest, signature, kid, "
                "transport, received_at, receipt_body, receipt_signature, relayed, "
                "relay_owner, relay_lease_until, document_ref, created_at, message_function) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sender, message_id) DO NOTHING",
                (
                    record.sender,
                    record.message_id,
                    record.recipient,
                    record.message_type,
                    record.schema_version,
                    record.correlation_id,
                    record.in_reply_to,
                    record.body,
                    record.body_digest,
                    record.signature,
                    record.kid,
                    record.transport,
                    _us(record.received_at),
                    record.receipt_body,
                    record.receipt_signature,
                    owner,
                    until,
                    record.document_ref,
                    None if record.created_at is None else _us(record.created_at),
                    record.message_function,
                ),
            )
            if cur.rowcount == 1:
                self._append_audit(c, events)
                crash_point("S6-before-commit", message_ids=record.message_id)
                stored = replace(record, seq=cur.lastrowid, relayed=False)
                return InboundOutcome(status="stored", record=stored)
            existing = _get_inbound(c, record.sender, record.message_id)
            if existing is None:
                raise sqlite3.IntegrityError("inbound row vanished after a key conflict")
            same = existing.body_digest == record.body_digest
            return InboundOutcome(status="duplicate" if same else "conflict", record=existing)

        return await self._write(unit)

    async def get_inbound(self, sender: str, message_id: str) -> InboundRecord | None:
        return await self._read(lambda c: _get_inbound(c, sender, message_id))

    async def find_inbound_reply(
        self, in_reply_to: str, *, sender: str, message_type: str | None = None
    ) -> InboundRecord | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages "
                "WHERE in_reply_to = ? AND sender = ? AND (? IS NULL OR message_type = ?) "
                "ORDER BY seq LIMIT 1",
                (in_reply_to, sender, message_type, message_type),
            ).fetchone()
        )
        return None if row is None else _inbound(row)

    async def document_versions(
        self, sender: str, message_type: str, document_ref: str, *, limit: int = 1000
    ) -> list[DocumentVersion]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {DOCUMENT_VERSION_COLUMNS} FROM inbound_messages WHERE sender = ? "
                "AND message_type = ? AND document_ref = ? "
                "ORDER BY created_at DESC, seq DESC LIMIT ?",
                (sender, message_type, document_ref, limit),
            ).fetchall()
        )
        return [document_version_of(r, _dt) for r in reversed(rows)]

    async def pending_relay(self, limit: int) -> list[InboundRecord]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages "
                "WHERE relayed = 0 ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
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
        now_us = _us(now)
        until_us = _us(now + timedelta(seconds=lease_s))

        # one write unit: the single writer makes select-and-lease atomic across callers
        def unit(c: Conn) -> list[InboundRecord]:
            # the seqs first, with the bodies' running total: no body past the budget is read
            due = c.execute(
                "SELECT seq, sum(n) OVER (ORDER BY seq) FROM (SELECT seq, "
                "coalesce(length(body), 0) AS n FROM inbound_messages WHERE relayed = 0 "
                "AND (relay_owner IS NULL OR relay_lease_until <= ?) "
                "ORDER BY seq LIMIT ?)",
                (now_us, limit),
            ).fetchall()
            seqs: list[int] = []
            for seq, total in due:
                if seqs and max_bytes is not None and total > max_bytes:
                    break
                seqs.append(seq)
            marks = ", ".join("?" * len(seqs))
            rows = c.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages WHERE seq IN ({marks}) "
                "ORDER BY seq",
                seqs,
            ).fetchall()
            c.executemany(
                "UPDATE inbound_messages SET relay_owner = ?, relay_lease_until = ? WHERE seq = ?",
                [(owner, until_us, seq) for seq in seqs],
            )
            return [_inbound(r) for r in rows]

        return await self._write(unit)

    async def release_relay(self, owner: str) -> int:
        def unit(c: Conn) -> int:
            cur = c.execute(
                "UPDATE inbound_messages SET relay_owner = NULL, relay_lease_until = NULL "
                "WHERE relayed = 0 AND relay_owner = ?",
                (owner,),
            )
            return int(cur.rowcount)

        return await self._write(unit)

    async def mark_relayed(
        self,
        keys: Sequence[InboundKey],
        events: Sequence[AuditEvent] = (),
        *,
        owner: str | None = None,
    ) -> list[InboundKey]:
        keys = list(keys)
        events = list(events)

        def unit(c: Conn) -> list[InboundKey]:
            marked: list[InboundKey] = []
            for sender, message_id in keys:
                cur = c.execute(
                    "UPDATE inbound_messages SET relayed = 1, relay_owner = NULL, "
                    "relay_lease_until = NULL WHERE sender = ?1 AND message_id = ?2 "
                    "AND relayed = 0 AND (?3 IS NULL OR relay_owner = ?3)",
                    (sender, message_id, owner),
                )
                if cur.rowcount == 1:
                    marked.append((sender, message_id))
            self._append_audit(c, events_for_marked(keys, marked, events))
            return marked

        return await self._write(unit)

    # outbox

    async def enqueue_outbound(
        self, record: OutboundRecord, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        events = list(events)

        def unit(c: Conn) -> OutboundRecord:
            if record.idempotency_key is not None:
                # The writer runs units one at a time, so no other insert can come between.
                earlier = _outbound_by_key(c, record.submitted_by, record.idempotency_key)
                if earlier is not None:
                    return same_request(earlier, record.request_digest)
            cur = c.execute(
                f"INSERT INTO outbound_messages ({_OUTBOUND_COLUMNS}, priority_rank) "
                f"VALUES ({', '.join('?' * 25)}) "
                "ON CONFLICT (message_id) DO NOTHING",
                (
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
                    _us(record.created_at),
                    _us_opt(record.expires_at),
                    record.state.value,
                    record.attempts,
                    _us(record.next_attempt_at),
                    record.last_error,
                    record.receipt_body,
                    record.receipt_signature,
                    record.submitted_by,
                    _us(record.updated_at),
                    record.idempotency_key,
                    record.request_digest,
                    _PRIORITY_RANK[record.priority],
                ),
            )
            if cur.rowcount != 1:
                raise DuplicateConflict(
                    f"outbound message_id {record.message_id!r} is already in the outbox"
                )
            self._append_audit(c, events)
            return record

        return await self._write(unit)

    async def take_rate_tokens(
        self, partner: str, want: float, *, per_second: float, burst: float
    ) -> float | None:
        # Replicas share a PostgreSQL store; a SQLite store's one process keeps its own buckets.
        return None

    async def find_outbound_by_key(
        self, submitted_by: str, idempotency_key: str
    ) -> OutboundRecord | None:
        return await self._read(lambda c: _outbound_by_key(c, submitted_by, idempotency_key))

    async def claim_outbound(
        self,
        worker_id: str,
        now: datetime,
        limit: int,
        lease_s: float,
        *,
        exclude: Collection[str] = (),
    ) -> list[OutboundRecord]:
        now_us = _us(now)
        until_us = _us(now + timedelta(seconds=lease_s))
        excluded = sorted(exclude)
        not_for = f"AND recipient NOT IN ({', '.join('?' * len(excluded))}) " if excluded else ""

        def unit(c: Conn) -> list[OutboundRecord]:
            rows = c.execute(
                f"SELECT {_OUTBOUND_COLUMNS} FROM outbound_messages "
                "WHERE state IN ('queued', 'sent') AND next_attempt_at <= ? "
                f"AND (lease_owner IS NULL OR lease_until <= ?) {not_for}"
                "ORDER BY priority_rank, next_attempt_at, created_at LIMIT ?",
                (now_us, now_us, *excluded, limit),
            ).fetchall()
            c.executemany(
                "UPDATE outbound_messages SET lease_owner = ?, lease_until = ? "
                "WHERE message_id = ?",
                [(worker_id, until_us, r[0]) for r in rows],
            )
            return [_outbound(r) for r in rows]

        return await self._write(unit)

    async def release_outbound(self, worker_id: str, message_ids: Collection[str]) -> None:
        ids = sorted(message_ids)
        if not ids:
            return
        marks = ", ".join("?" * len(ids))
        await self._write(
            lambda c: c.execute(
                "UPDATE outbound_messages SET lease_owner = NULL, lease_until = NULL "
                f"WHERE lease_owner = ? AND message_id IN ({marks})",
                (worker_id, *ids),
            )
        )

    def _apply_update(self, c: Conn, message_id: str, update: AttemptUpdate) -> None:
        """Record an attempt's or a late receipt's outcome and release any lease."""
        c.execute(
            "UPDATE outbound_messages SET state = ?, attempts = ?, next_attempt_at = ?, "
            "last_error = ?, receipt_body = COALESCE(?, receipt_body), "
            "receipt_signature = COALESCE(?, receipt_signature), updated_at = ?, "
            "body = COALESCE(?, body), body_digest = COALESCE(?, body_digest), "
            "signature = COALESCE(?, signature), kid = COALESCE(?, kid), "
            "lease_owner = NULL, lease_until = NULL WHERE message_id = ?",
            (
                update.state.value,
                update.attempts,
                _us(update.next_attempt_at),
                update.last_error,
                update.receipt_body,
                update.receipt_signature,
                _us(self._clock.now()),
                *update.resigned_columns(),
                message_id,
            ),
        )

    async def finish_attempt(
        self,
        message_id: str,
        worker_id: str,
        update: AttemptUpdate,
        events: Sequence[AuditEvent],
    ) -> OutboundRecord:
        events = list(events)

        def unit(c: Conn) -> OutboundRecord:
            row = c.execute(
                "SELECT lease_owner FROM outbound_messages WHERE message_id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise MessageNotFound(message_id)
            if row[0] != worker_id:
                raise LeaseLost(message_id, worker_id)
            self._apply_update(c, message_id, update)
            self._append_audit(c, events)
            finished = _record_outcome(c, _require_outbound(c, message_id))
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

        def unit(c: Conn) -> OutboundRecord:
            row = c.execute(
                "SELECT state FROM outbound_messages WHERE message_id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise MessageNotFound(message_id)
            state = OutboundState(row[0])
            if state not in ACTIVE_STATES and not (dead_too and state in GIVEN_UP_STATES):
                raise InvalidTransition(message_id, state.value, "record a receipt")
            self._apply_update(c, message_id, update)
            self._append_audit(c, events)
            return _record_outcome(c, _require_outbound(c, message_id))

        return await self._write(unit)

    async def get_outbound(self, message_id: str) -> OutboundRecord | None:
        return await self._read(lambda c: _get_outbound(c, message_id))

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

        def unit(c: Conn) -> OutboundRecord:
            row = c.execute(
                "SELECT state, body IS NULL FROM outbound_messages WHERE message_id = ?",
                (message_id,),
            ).fetchone()
            if row is None:
                raise MessageNotFound(message_id)
            state = OutboundState(row[0])
            if state not in RETRYABLE_STATES:
                raise InvalidTransition(message_id, state.value, "retry")
            if row[1]:
                raise InvalidTransition(message_id, f"{state.value} (body purged)", "retry")
            c.execute(
                "UPDATE outbound_messages SET state = 'queued', attempts = 0, "
                "next_attempt_at = ?, last_error = NULL, updated_at = ?, lease_owner = NULL, "
                "lease_until = NULL, retried_by = ?, body = COALESCE(?, body), "
                "body_digest = COALESCE(?, body_digest), signature = COALESCE(?, signature), "
                "kid = COALESCE(?, kid), expires_at = COALESCE(?, expires_at) "
                "WHERE message_id = ?",
                (
                    _us(now),
                    _us(now),
                    actor,
                    *resigned_columns(resigned),
                    _us_opt(None if resigned is None else resigned.expires_at),
                    message_id,
                ),
            )
            self._append_audit(c, events)
            return _require_outbound(c, message_id)

        return await self._write(unit)

    async def close_outbound(
        self, message_id: str, *, now: datetime, events: Sequence[AuditEvent]
    ) -> OutboundRecord:
        events = list(events)

        def unit(c: Conn) -> OutboundRecord:
            row = c.execute(
                "SELECT state FROM outbound_messages WHERE message_id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise MessageNotFound(message_id)
            state = OutboundState(row[0])
            if state is not OutboundState.DEAD:
                raise InvalidTransition(message_id, state.value, "close")
            c.execute(
                "UPDATE outbound_messages SET state = 'closed', updated_at = ? "
                "WHERE message_id = ?",
                (_us(now), message_id),
            )
            self._append_audit(c, events)
            return _record_outcome(c, _require_outbound(c, message_id))

        return await self._write(unit)

    async def claim_outcomes(
        self, owner: str, now: datetime, limit: int, lease_s: float
    ) -> list[OutcomeRecord]:
        now_us = _us(now)
        until_us = _us(now + timedelta(seconds=lease_s))

        # one write unit: the single writer makes select-and-lease atomic across callers
        def unit(c: Conn) -> list[OutcomeRecord]:
            rows = c.execute(
                f"SELECT {_OUTCOME_COLUMNS} FROM outbound_outcomes "
                "WHERE relay_owner IS NULL OR relay_lease_until <= ? ORDER BY seq LIMIT ?",
                (now_us, limit),
            ).fetchall()
            c.executemany(
                "UPDATE outbound_outcomes SET relay_owner = ?, relay_lease_until = ? WHERE seq = ?",
                [(owner, until_us, r[0]) for r in rows],
            )
            return [_outcome(r) for r in rows]

        return await self._write(unit)

    async def mark_outcomes_published(self, seqs: Sequence[int]) -> int:
        seqs = list(seqs)
        if not seqs:
            return 0

        def unit(c: Conn) -> int:
            marks = ", ".join("?" * len(seqs))
            cur = c.execute(f"DELETE FROM outbound_outcomes WHERE seq IN ({marks})", seqs)
            return int(cur.rowcount)

        return await self._write(unit)

    async def release_outcomes(self, owner: str) -> int:
        def unit(c: Conn) -> int:
            cur = c.execute(
                "UPDATE outbound_outcomes SET relay_owner = NULL, relay_lease_until = NULL "
                "WHERE relay_owner = ?",
                (owner,),
            )
            return int(cur.rowcount)

        return await self._write(unit)

    async def outbox_depth(self) -> dict[OutboundState, int]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT state, count(*) FROM outbound_messages GROUP BY state"
            ).fetchall()
        )
        depth = empty_depth()
        for state, count in rows:
            depth[OutboundState(state)] = count
        return depth

    async def outbox_backlog(self) -> dict[str, PartnerBacklog]:
        rows = await self._read(lambda c: c.execute(OUTBOX_BACKLOG_SQL).fetchall())
        return {partner: PartnerBacklog(count, _dt(oldest)) for partner, count, oldest in rows}

    async def list_messages(
        self, filter: MessageFilter, *, limit: int = 50, after: str | None = None
    ) -> MessagePage:
        query = messages_query(DIALECT, filter, limit=limit, after=after)
        if query is None:
            return MessagePage(items=[], next_cursor=None)
        sql, params = query
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        items = [
            MessageSummary(
                direction=Direction(r[0]),
                message_id=r[1],
                partner=r[2],
                message_type=r[3],
                schema_version=r[4],
                correlation_id=r[5],
                state=r[6],
                at=_dt(r[7]),
                attempts=r[8],
                body_digest=r[9],
            )
            for r in rows
        ]
        return MessagePage(items=items, next_cursor=_next_cursor(items, limit))

    # clock steps

    async def move_back_schedules(self, now: datetime, step: timedelta) -> tuple[int, int]:
        now_us, step_us = _us(now), step // _MICRO
        lease_cutoff = _us(now + step - CLOCK_STEP_GRACE)

        def unit(c: Conn) -> tuple[int, int]:
            rows = c.execute(
                "UPDATE outbound_messages SET next_attempt_at = next_attempt_at - ?1, "
                "updated_at = updated_at - ?1 "
                "WHERE state IN ('queued', 'sent') AND updated_at > ?2",
                (step_us, now_us),
            ).rowcount
            leases = c.execute(
                "UPDATE outbound_messages SET lease_until = lease_until - ? WHERE lease_until > ?",
                (step_us, lease_cutoff),
            ).rowcount
            leases += c.execute(
                "UPDATE inbound_messages SET relay_lease_until = relay_lease_until - ? "
                "WHERE relayed = 0 AND relay_lease_until > ?",
                (step_us, lease_cutoff),
            ).rowcount
            return int(rows), int(leases)

        return await self._write(unit)

    # retention

    async def purge_bodies(self, older_than: datetime) -> int:
        cutoff = _us(older_than)

        def unit(c: Conn) -> int:
            inbound = c.execute(
                "UPDATE inbound_messages SET body = NULL "
                "WHERE received_at < ? AND relayed = 1 AND body IS NOT NULL",
                (cutoff,),
            ).rowcount
            outbound = c.execute(
                "UPDATE outbound_messages SET body = NULL WHERE created_at < ? "
                f"AND state IN ({', '.join('?' for _ in _FINISHED)}) AND body IS NOT NULL",
                (cutoff, *_FINISHED),
            ).rowcount
            return inbound + outbound

        return await self._write(unit)

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``ok`` or the problems SQLite found."""
        rows = await self._read(lambda c: c.execute("PRAGMA integrity_check").fetchall())
        return "\n".join(str(r[0]) for r in rows)


def _next_cursor(items: list[MessageSummary], limit: int) -> str | None:
    if len(items) < limit or not items:
        return None
    last = items[-1]
    return Cursor(
        at=last.at, direction=last.direction.value, partner=last.partner, message_id=last.message_id
    ).encode()


#: node keys per lookup statement (two parameters each, far below SQLite's variable limit)
NODE_BATCH = 500


def _node_hashes(c: Conn, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
    """Stored subtree hashes for ``keys``: one primary-key join per NODE_BATCH keys."""
    found: dict[NodeKey, bytes] = {}
    for start in range(0, len(keys), NODE_BATCH):
        chunk = keys[start : start + NODE_BATCH]
        values = ", ".join("(?, ?)" for _ in chunk)
        rows = c.execute(
            f"WITH k(level, idx) AS (VALUES {values}) "
            "SELECT n.level, n.idx, n.hash FROM k JOIN audit_nodes AS n "
            "ON n.level = k.level AND n.idx = k.idx",
            [v for key in chunk for v in key],
        ).fetchall()
        for level, idx, value in rows:
            found[(level, idx)] = value
    return found


def _get_inbound(c: Conn, sender: str, message_id: str) -> InboundRecord | None:
    row = c.execute(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound_messages WHERE sender = ? AND message_id = ?",
        (sender, message_id),
    ).fetchone()
    return None if row is None else _inbound(row)


def _get_outbound(c: Conn, message_id: str) -> OutboundRecord | None:
    row = c.execute(
        f"SELECT {_OUTBOUND_COLUMNS} FROM outbound_messages WHERE message_id = ?",
        (message_id,),
    ).fetchone()
    return None if row is None else _outbound(row)


def _outbound_by_key(
    c: Conn, submitted_by: str | None, idempotency_key: str
) -> OutboundRecord | None:
    row = c.execute(
        f"SELECT {_OUTBOUND_COLUMNS} FROM outbound_messages "
        "WHERE submitted_by = ? AND idempotency_key = ?",
        (submitted_by, idempotency_key),
    ).fetchone()
    return None if row is None else _outbound(row)


def _record_outcome(c: Conn, record: OutboundRecord) -> OutboundRecord:
    """In the transaction that wrote ``record``'s state: when it is final, the outcome to
    publish (gateway/store/outcomes.py). Returns ``record``."""
    if not is_final(record.state):
        return record
    c.execute(
        "UPDATE outbound_messages SET outcomes = outcomes + 1 WHERE message_id = ?",
        (record.message_id,),
    )
    (n,) = c.execute(
        "SELECT outcomes FROM outbound_messages WHERE message_id = ?", (record.message_id,)
    ).fetchone()
    c.execute(
        "INSERT INTO outbound_outcomes (message_id, recipient, message_type, state, n, body, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.message_id,
            record.recipient,
            record.message_type,
            record.state.value,
            n,
            outcome_body(record, n),
            _us(record.updated_at),
        ),
    )
    return record


def _require_outbound(c: Conn, message_id: str) -> OutboundRecord:
    record = _get_outbound(c, message_id)
    if record is None:
        raise MessageNotFound(message_id)
    return record


def _migrate(conn: Conn) -> None:
    """Apply pending migrations under the write lock (a second process waits, then skips)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for migration in load_migrations("sqlite"):
            if migration.version in applied:
                continue
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, _us(datetime.now(UTC))),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _fill_document_columns(conn: Conn) -> None:
    """Give inbox rows stored without document columns (before migration 0004, or by an older
    gateway since) the columns their stored bodies say (gateway/documents.py), a batch per
    transaction: a crash keeps the batches done, and another process on the file waits for
    one batch at most. The values depend on the body alone, so two processes filling at once
    write the same. A body that does not parse is left, and tried again at the next open."""
    after = filled = unreadable = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            seqs = fill_batch(
                conn.execute(
                    "SELECT seq, length(body) FROM inbound_messages WHERE created_at IS NULL "
                    "AND body IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?",
                    (after, FILL_ROWS),
                ).fetchall()
            )
            if not seqs:
                conn.execute("COMMIT")
                break
            marks = ", ".join("?" * len(seqs))
            rows = conn.execute(
                f"SELECT seq, body FROM inbound_messages WHERE seq IN ({marks}) "
                "AND created_at IS NULL AND body IS NOT NULL",
                seqs,
            ).fetchall()
            found = fill_columns(rows)
            cur = conn.executemany(
                "UPDATE inbound_messages SET document_ref = ?, created_at = ?, "
                "message_function = ? WHERE seq = ? AND created_at IS NULL",
                [
                    (columns.document_ref, _us(columns.created_at), columns.message_function, seq)
                    for seq, columns in found
                    if columns is not None
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        filled += cur.rowcount
        unreadable += sum(columns is None for _, columns in found)
        after = seqs[-1]
    log_filled(filled, unreadable)


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (``executescript`` would COMMIT our lock)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()
    ):
        raise sqlite3.OperationalError(f"incomplete SQL statement in migration: {pending[:80]!r}")
    return out
