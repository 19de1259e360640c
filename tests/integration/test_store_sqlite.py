"""SQLite-only behaviour: group commit, pragmas, lock timeouts as Unavailable, recovery."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from test_store import T0, event, inbound, outbound

from gateway.audit.events import EventKind
from gateway.clock import ManualClock
from gateway.errors import DuplicateConflict, Unavailable
from gateway.store.sqlite import SqliteStore


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0), busy_timeout_ms=200)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_concurrent_writes_share_commits(sqlite_store: SqliteStore) -> None:
    before = sqlite_store.writer_stats
    outcomes = await asyncio.gather(
        *(
            sqlite_store.store_inbound(inbound(f"g-{i}"), [event(EventKind.ACCEPTED, f"g-{i}")])
            for i in range(300)
        )
    )
    assert {o.status for o in outcomes} == {"stored"}
    after = sqlite_store.writer_stats
    assert after.units - before.units == 300
    # far fewer fsyncs than messages: the writer batched what was queued
    assert after.commits - before.commits < 100


async def test_failing_unit_in_a_batch_rolls_back_alone(sqlite_store: SqliteStore) -> None:
    await sqlite_store.enqueue_outbound(outbound("o-1"), [])
    before = sqlite_store.writer_stats
    results = await asyncio.gather(
        sqlite_store.store_inbound(inbound("a"), [event(EventKind.ACCEPTED, "a")]),
        sqlite_store.enqueue_outbound(outbound("o-1"), [event(EventKind.SUBMITTED, "o-1")]),
        sqlite_store.store_inbound(inbound("b"), [event(EventKind.ACCEPTED, "b")]),
        return_exceptions=True,
    )
    assert sqlite_store.writer_stats.commits - before.commits == 1
    assert isinstance(results[1], DuplicateConflict)
    assert await sqlite_store.audit_size() == 2
    assert await sqlite_store.get_inbound("MX-SAT", "b") is not None


class _FailingCommit:
    """The writer's connection, whose next COMMIT raises what no database error is: the
    stand-in for a bug or MemoryError in the batch itself, which no real input causes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.armed = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise MemoryError
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


async def test_a_batch_failing_outside_the_database_is_refused_and_the_writer_goes_on(
    sqlite_store: SqliteStore,
) -> None:
    real = sqlite_store._writer_conn
    assert real is not None
    sqlite_store._writer_conn = _FailingCommit(real)  # type: ignore[assignment]
    with structlog.testing.capture_logs() as logs:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    sqlite_store.store_inbound(inbound(f"m-{i}"), [event(EventKind.ACCEPTED)])
                    for i in range(3)
                ),
                return_exceptions=True,
            ),
            timeout=10,
        )
    assert [type(r) for r in results] == [Unavailable] * 3
    assert "MemoryError" in str(results[0])
    failed = [e for e in logs if e["event"] == "sqlite_batch_failed"]
    assert [(e["units"], e["error"]) for e in failed] == [(3, "MemoryError")]
    # nothing of the refused batch was written, and the writer is still there
    assert await sqlite_store.audit_size() == 0
    assert await sqlite_store.get_inbound("MX-SAT", "m-0") is None
    await sqlite_store.ping()
    outcome = await sqlite_store.store_inbound(inbound("m-0"), [event(EventKind.ACCEPTED)])
    assert outcome.status == "stored"
    assert await sqlite_store.audit_size() == 1


async def test_wal_and_full_sync_are_in_force(sqlite_store: SqliteStore) -> None:
    with sqlite3.connect(sqlite_store.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await sqlite_store.integrity_check() == "ok"


def file_size(path: Path) -> int:
    return path.stat().st_size


#: the WAL's ceiling with the writer's bound of 256 frames
BOUNDED_PEAK = 8 << 20


@pytest.mark.parametrize(("bound", "peak_at_most"), [(256, BOUNDED_PEAK), (None, None)])
async def test_wal_stays_bounded_under_steady_writes(
    tmp_path: Path, bound: int | None, peak_at_most: int | None
) -> None:
    """Commits that never pause leave PASSIVE checkpoints no moment to reset the WAL: without
    the writer's own TRUNCATE checkpoint past the bound it grows past the bounded ceiling (the
    second case shows that it would, so the first one means something). How far past depends
    on the machine: on a loaded one the writer pauses more, and a PASSIVE checkpoint resets
    the WAL now and then (seen: 13.7 MiB where an idle run reaches more than 16)."""
    path = tmp_path / "steady.db"
    store = SqliteStore(
        path, clock=ManualClock(T0), wal_truncate_frames=bound if bound else 1 << 30
    )
    await store.open()
    wal = Path(f"{path}-wal")
    peak = 0
    try:
        for start in range(0, 6_000, 50):
            await asyncio.gather(
                *(
                    store.store_inbound(inbound(f"m{i}"), [event(EventKind.ACCEPTED)])
                    for i in range(start, start + 50)
                )
            )
            peak = max(peak, file_size(wal))
        assert await store.audit_size() == 6_000
    finally:
        await store.close()
    if peak_at_most is not None:
        assert peak <= peak_at_most, f"WAL peaked at {peak / 2**20:.1f} MiB"
    else:
        assert peak > BOUNDED_PEAK, f"WAL peaked at {peak / 2**20:.1f} MiB only"


async def test_a_long_reader_does_not_hold_up_writes_past_the_wal_bound(tmp_path: Path) -> None:
    """A reader's snapshot (an audit export, say) keeps the WAL from being emptied; the
    writer's checkpoint must then copy what it can and go on, not wait out busy_timeout."""
    path = tmp_path / "reader.db"
    store = SqliteStore(
        path, clock=ManualClock(T0), wal_truncate_frames=64, checkpoint_interval_s=0.02
    )
    await store.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await store.store_inbound(inbound("first"), [event(EventKind.ACCEPTED)])
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM inbound_messages").fetchone() == (1,)
        loop = asyncio.get_running_loop()
        slowest = 0.0
        for start in range(0, 1_000, 50):
            began = loop.time()
            await asyncio.gather(
                *(
                    store.store_inbound(inbound(f"m{i}"), [event(EventKind.ACCEPTED)])
                    for i in range(start, start + 50)
                )
            )
            slowest = max(slowest, loop.time() - began)
        # the snapshot still reads as it was
        assert reader.execute("SELECT count(*) FROM inbound_messages").fetchone() == (1,)
    finally:
        reader.close()
        await store.close()
    # busy_timeout is 5 s: one wait for the reader would show
    assert slowest < 2.0, f"a batch of 50 took {slowest:.1f} s"


async def test_writer_keeps_savepoint_journals_in_memory(sqlite_store: SqliteStore) -> None:
    """Every unit runs in a SAVEPOINT; with temp_store=FILE each transaction would create,
    write and unlink a sub-journal file (four more syscalls and a copy of each page)."""
    mode = await sqlite_store._write(lambda c: c.execute("PRAGMA temp_store").fetchone()[0])
    assert mode == 2  # MEMORY


async def test_lock_timeout_is_unavailable_then_recovers(sqlite_store: SqliteStore) -> None:
    blocker = sqlite3.connect(sqlite_store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable, match="locked"):
            await sqlite_store.store_inbound(inbound("blocked"), [event(EventKind.ACCEPTED)])
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert await sqlite_store.get_inbound("MX-SAT", "blocked") is None
    assert await sqlite_store.audit_size() == 0
    outcome = await sqlite_store.store_inbound(inbound("blocked"), [event(EventKind.ACCEPTED)])
    assert outcome.status == "stored"
    await sqlite_store.ping()


async def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "gw.db").mkdir()  # a directory where the database file should be
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    with pytest.raises(Unavailable, match="unable to open"):
        await store.open()
    with pytest.raises(Unavailable, match="not open"):
        await store.ping()
    (tmp_path / "a-file").write_text("")
    store = SqliteStore(tmp_path / "a-file" / "gw.db", clock=ManualClock(T0))
    with pytest.raises(Unavailable, match=r"cannot create the store's directory .*a-file"):
        await store.open()


async def test_a_missing_folder_is_made_private(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "var" / "gw.db", clock=ManualClock(T0))
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    await store.open()
    await store.close()
    with pytest.raises(Unavailable, match="not open"):
        await store.store_inbound(inbound("late"), [])
    with pytest.raises(Unavailable, match="not open"):
        await store.audit_size()


async def _fill(store: SqliteStore, prefix: str) -> None:
    # one commit each, about 2 MB of WAL in all: past SQLite's automatic checkpoint point
    for i in range(150):
        body = (f'{{"n": {i}, "pad": "' + "x" * 12_000 + '"}').encode()
        await store.store_inbound(inbound(f"{prefix}-{i}", body=body), [])


async def test_commits_never_checkpoint_the_wal_themselves(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0), checkpoint_interval_s=3600)
    await store.open()
    try:
        await _fill(store, "n")
        # everything is still in the WAL: no commit stopped to copy it into the database
        assert (tmp_path / "gw.db").stat().st_size < 500_000
        assert (tmp_path / "gw.db-wal").stat().st_size > 1_500_000
    finally:
        await store.close()


async def test_the_checkpointer_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0), checkpoint_interval_s=0.05)
    await store.open()
    try:
        await _fill(store, "c")
        async with asyncio.timeout(5):
            while (tmp_path / "gw.db").stat().st_size < 1_500_000:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await store.pending_relay(500)) == 150
    finally:
        await store.close()
