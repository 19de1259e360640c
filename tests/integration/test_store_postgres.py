"""PostgreSQL-only behaviour: a cut connection is Unavailable, then the pool recovers by itself;
dedupe and claims hold across replicas (separate pools)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import pwd
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pgdb
import pytest
import structlog
from tcp_proxy import TcpProxy
from test_store import T0, event, inbound, naive_root, outbound

from gateway.audit.events import EventKind
from gateway.audit.merkle import frontier, root_from_nodes
from gateway.clock import ManualClock
from gateway.errors import Unavailable
from gateway.store import postgres as pg_module
from gateway.store.base import AuditFilter, RelayLease
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres


async def assert_one_gap_free_tree(store: PostgresStore, size: int) -> None:
    """The log's entries are seqs 0..size-1 and its stored nodes give the root of its leaves."""
    rows = await store.audit_entries(AuditFilter(), limit=size)
    assert [r.seq for r in rows] == list(range(size))
    leaves = await store.audit_leaf_hashes(0, size)
    nodes = await store.audit_node_hashes(frontier(size))
    assert root_from_nodes(size, nodes) == naive_root(leaves)


async def test_cut_connection_is_unavailable_and_store_recovers(
    proxied: tuple[TcpProxy, str],
) -> None:
    proxy, dsn = proxied
    store = PostgresStore(dsn, clock=ManualClock(T0), max_size=4, command_timeout_s=5)
    await store.open()
    try:
        await store.store_inbound(inbound("before"), [event(EventKind.ACCEPTED, "before")])
        await proxy.cut()
        with pytest.raises(Unavailable, match="postgresql"):
            await store.store_inbound(inbound("during"), [event(EventKind.ACCEPTED, "during")])
        with pytest.raises(Unavailable):
            await store.ping()
        with pytest.raises(Unavailable):
            await store.audit_size()
        await proxy.start()
        await store.ping()
        outcome = await store.store_inbound(inbound("during"), [event(EventKind.ACCEPTED)])
        assert outcome.status == "stored"
        assert await store.audit_size() == 2
    finally:
        await store.close()


@pytest.mark.parametrize("path", ["statement", "transaction"])
async def test_a_write_committed_before_its_connection_dies_is_answered_stored(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """pgcrash finding: the server committed the write, then its connection was cut before
    the pool took it back (``pg_terminate_backend`` under load). The release fails, yet the
    write is done: answered as stored, not ``Unavailable`` ("nothing was kept"), which gave
    partners a signed 503 for a message that was accepted and relayed."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0), min_size=1, max_size=2)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)

    async def cut(conn: Any) -> None:
        await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())

    if path == "statement":
        original_statement = pg_module._store_inbound_statement

        async def statement_then_cut(conn: Any, items: Any) -> Any:
            outcomes = await original_statement(conn, items)  # committed: one statement
            await cut(conn)
            return outcomes

        monkeypatch.setattr(pg_module, "_store_inbound_statement", statement_then_cut)
    else:
        # a unit that is not an inbox insert runs in a transaction; cut after its COMMIT
        original_commit = asyncpg.transaction.Transaction.__aexit__

        async def commit_then_cut(self: Any, *exc: Any) -> Any:
            result = await original_commit(self, *exc)
            if exc[0] is None and not self._nested:  # the outermost: its COMMIT went through
                await cut(self._connection)
            return result

        monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", commit_then_cut)
    try:
        if path == "statement":
            outcome = await store.store_inbound(inbound("cut"), [event(EventKind.ACCEPTED, "cut")])
            assert outcome.status == "stored"
        else:
            (seq,) = await store.append_audit([event(EventKind.OPERATOR_ACTION)])
            assert seq == 0
        monkeypatch.undo()
        # the pool replaced the dead connection by itself; the write is there exactly once
        assert await store.audit_size() == 1
        if path == "statement":
            again = await store.store_inbound(inbound("cut"), [event(EventKind.ACCEPTED, "cut")])
            assert again.status == "duplicate"
    finally:
        monkeypatch.undo()
        await admin.close()
        await store.close()


async def test_unreachable_server_at_open_is_unavailable(pg_dsn: str) -> None:
    proxy = TcpProxy(pgdb.PORT, pgdb.HOST)
    await proxy.start()
    await proxy.cut()
    dsn = pg_dsn.replace(f":{pgdb.PORT}/", f":{proxy.port}/", 1)
    store = PostgresStore(dsn, clock=ManualClock(T0), command_timeout_s=2)
    with pytest.raises(Unavailable, match="postgresql"):
        await store.open()


async def test_dedupe_and_claims_hold_across_replicas(pg_dsn: str) -> None:
    replicas = [PostgresStore(pg_dsn, clock=ManualClock(T0), max_size=5) for _ in range(2)]
    for replica in replicas:
        await replica.open()
    try:
        outcomes = await asyncio.gather(
            *(
                replicas[i % 2].store_inbound(inbound("x"), [event(EventKind.ACCEPTED, "x")])
                for i in range(40)
            )
        )
        assert sorted(o.status for o in outcomes) == ["duplicate"] * 39 + ["stored"]
        for i in range(60):
            await replicas[0].enqueue_outbound(outbound(f"o-{i}"), [])
        claimed = await asyncio.gather(
            *(replicas[i % 2].claim_outbound(f"w{i}", T0, 5, 60) for i in range(16))
        )
        ids = [r.message_id for batch in claimed for r in batch]
        assert len(ids) == len(set(ids)) == 60
        assert await replicas[1].audit_size() == 1
    finally:
        for replica in replicas:
            await replica.close()


async def test_replicas_interleaving_appends_keep_one_consistent_tree(pg_dsn: str) -> None:
    """Each replica caches its last frontier; after the other appended it must read it again."""
    replicas = [PostgresStore(pg_dsn, clock=ManualClock(T0), max_size=3) for _ in range(2)]
    for replica in replicas:
        await replica.open()
    try:
        for round_ in range(12):
            await asyncio.gather(
                *(
                    replicas[(round_ + i) % 2].store_inbound(
                        inbound(f"m-{round_}-{i}"), [event(EventKind.ACCEPTED, f"m-{round_}-{i}")]
                    )
                    for i in range(1 + round_ % 5)
                )
            )
        size = await replicas[0].audit_size()
        assert size == sum(1 + r % 5 for r in range(12))
        rows = await replicas[1].audit_entries(AuditFilter(), limit=size)
        assert [r.seq for r in rows] == list(range(size))
        await assert_one_tree(replicas, size)
    finally:
        for replica in replicas:
            await replica.close()


async def assert_one_tree(stores: list[PostgresStore], size: int) -> None:
    """Every tree size 1..size, its frontier nodes read through the stores in turn, has the
    naive RFC 6962 root of the leaves (read through the first store)."""
    leaves = await stores[0].audit_leaf_hashes(0, size)
    for n in range(1, size + 1):
        nodes = await stores[(n + 1) % len(stores)].audit_node_hashes(frontier(n))
        assert root_from_nodes(n, nodes) == naive_root(leaves[:n]), n


async def _lock_waiters(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return count
    finally:
        await conn.close()


async def test_append_after_waiting_for_the_head_reads_the_new_frontier(pg_dsn: str) -> None:
    """A replica that waited for the head lock while another appended must not build on the
    frontier of the snapshot its statement started with (that append's nodes are missing)."""
    first, second = (PostgresStore(pg_dsn, clock=ManualClock(T0)) for _ in range(2))
    await first.open()
    await second.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        await first.store_inbound(inbound("seed"), [event(EventKind.ACCEPTED, "seed")])
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
        # queued on the head in this order: the first appends, then the second goes on
        a = asyncio.create_task(first.append_audit([event(EventKind.ACCEPTED, "a")]))
        async with asyncio.timeout(10):
            while await _lock_waiters(pg_dsn) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        b = asyncio.create_task(
            second.store_inbound(inbound("b"), [event(EventKind.ACCEPTED, "b")])
        )
        async with asyncio.timeout(10):
            while await _lock_waiters(pg_dsn) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await tx.commit()
        async with asyncio.timeout(10):
            assert await a == [1]
            assert (await b).status == "stored"
        size = await second.audit_size()
        assert size == 3
        await assert_one_tree([second, first], size)
    finally:
        await holder.close()
        await first.close()
        await second.close()


async def test_inbox_insert_waiting_on_a_key_never_holds_the_head(pg_dsn: str) -> None:
    """Another replica has inserted key K (uncommitted) and will lock the audit head next;
    this one gets K again in the same batch as a unit that takes the head first. If both
    shared a transaction, it would hold the head while waiting for K: a deadlock."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0))
    await store.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        record = inbound("k")
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO inbound_messages (sender, message_id, recipient, message_type, "
            "schema_version, body, body_digest, signature, kid, transport, received_at, "
            "receipt_body, receipt_signature) "
            "VALUES ($1, $2, 'US-CBP', 'shipment.advance_data', '1.0', $3, $4, 's', 'kid-1', "
            "'https', now(), $5, 'r')",
            record.sender,
            record.message_id,
            record.body,
            record.body_digest,
            b"{}",
        )
        both = asyncio.gather(
            store.store_inbound(record, [event(EventKind.ACCEPTED, "k")]),
            store.append_audit([event(EventKind.REJECTED, "x")]),
        )
        async with asyncio.timeout(10):
            while await _lock_waiters(pg_dsn) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        # the other replica now takes the head (no deadlock: it is free) and commits
        async with asyncio.timeout(5):
            await other.execute("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
        await tx.commit()
        async with asyncio.timeout(10):
            outcome, seqs = await both
        assert outcome.status == "duplicate"
        assert seqs == [0]
    finally:
        await other.close()
        await store.close()


async def test_a_row_breaking_another_constraint_fails_alone(pg_dsn: str) -> None:
    """The one-statement inbox path falls back to row-by-row when a row breaks a constraint
    other than the unique key: the good rows of the batch are stored and audited."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0))
    await store.open()
    try:
        bad = dataclasses.replace(inbound("bad"), receipt_signature=None)  # NOT NULL
        good, refused, other = await asyncio.gather(
            store.store_inbound(inbound("good"), [event(EventKind.ACCEPTED, "good")]),
            store.store_inbound(bad, [event(EventKind.ACCEPTED, "bad")]),
            store.store_inbound(inbound("other"), [event(EventKind.ACCEPTED, "other")]),
            return_exceptions=True,
        )
        assert not isinstance(good, BaseException)
        assert not isinstance(other, BaseException)
        assert (good.status, other.status) == ("stored", "stored")
        assert isinstance(refused, Unavailable)
        assert await store.get_inbound("MX-SAT", "bad") is None
        assert await store.audit_size() == 2
    finally:
        await store.close()


async def test_a_batch_failing_outside_the_database_is_refused_and_the_writer_goes_on(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or MemoryError in the batch itself (injected: no real input causes one), on the
    inbox statement and inside a transaction: the batch is refused, rolled back, logged once,
    and the writer answers the next batch."""

    def failing_once(real: Any, exc: Exception) -> Any:
        calls = 0

        async def fail_first(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise exc
            return await real(*args)

        return fail_first

    monkeypatch.setattr(
        pg_module,
        "_store_inbound_statement",
        failing_once(pg_module._store_inbound_statement, MemoryError()),
    )
    monkeypatch.setattr(
        pg_module, "_append_audit", failing_once(pg_module._append_audit, RuntimeError("bug"))
    )
    store = PostgresStore(pg_dsn, clock=ManualClock(T0))
    await store.open()
    try:
        with structlog.testing.capture_logs() as logs:
            refused = await asyncio.wait_for(
                asyncio.gather(
                    store.store_inbound(inbound("m-1"), [event(EventKind.ACCEPTED, "m-1")]),
                    store.append_audit([event(EventKind.SUBMITTED, "o-1")]),
                    return_exceptions=True,
                ),
                timeout=10,
            )
        assert [type(r) for r in refused] == [Unavailable, Unavailable]
        assert "MemoryError" in str(refused[0])
        assert "RuntimeError" in str(refused[1])
        failed = [(e["units"], e["error"]) for e in logs if e["event"] == "postgres_batch_failed"]
        assert failed == [(1, "MemoryError"), (1, "RuntimeError")]
        assert await store.audit_size() == 0
        assert await store.get_inbound("MX-SAT", "m-1") is None
        await store.ping()
        outcome = await store.store_inbound(inbound("m-1"), [event(EventKind.ACCEPTED, "m-1")])
        assert outcome.status == "stored"
        assert await store.append_audit([event(EventKind.SUBMITTED, "o-1")]) == [1]
        await assert_one_gap_free_tree(store, 2)
    finally:
        await store.close()


async def test_release_relay_does_not_wait_for_the_audit_head(pg_dsn: str) -> None:
    """Releasing a relay's leases writes no audit entry, so it must not queue on the head: a
    mark holding rows may be waiting there."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0))
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        lease = RelayLease(owner="hand", until=T0 + timedelta(seconds=30))
        await store.store_inbound(inbound("l-0"), [], relay_lease=lease)
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
        async with asyncio.timeout(5):
            assert await store.release_relay("hand") == 1
        await tx.rollback()
    finally:
        await holder.close()
        await store.close()


async def test_replicas_marking_overlapping_rows_mark_and_audit_each_once(pg_dsn: str) -> None:
    """Marks are single statements that lock their rows (in seq order), then the head: two
    replicas marking the same rows in opposite orders, while appends go on, neither deadlock
    nor mark or audit a row twice."""
    replicas = [PostgresStore(pg_dsn, clock=ManualClock(T0), max_size=4) for _ in range(2)]
    for replica in replicas:
        await replica.open()
    try:
        keys = [
            (await replicas[0].store_inbound(inbound(f"v-{i:02d}"), [])).record.key
            for i in range(44)
        ]

        async def mark(i: int) -> list[tuple[str, str]]:
            chunk = keys[(i * 5) % 40 : (i * 5) % 40 + 8]
            ordered = chunk if i % 2 else list(reversed(chunk))
            delivered = [event(EventKind.DELIVERED, mid, sender=sender) for sender, mid in ordered]
            return await replicas[i % 2].mark_relayed(ordered, delivered)

        async def append(i: int) -> list[int]:
            return await replicas[i % 2].append_audit([event(EventKind.REJECTED, f"x-{i}")])

        results = await asyncio.gather(
            *(mark(i) for i in range(24)), *(append(i) for i in range(12))
        )
        marked = [key for batch in results[:24] for key in batch]
        assert len(marked) == len(set(marked))
        assert set(marked) == set(keys[:43])
        size = await replicas[0].audit_size()
        delivered = await replicas[1].audit_entries(AuditFilter(event="delivered"), limit=100)
        assert size == len(marked) + 12 == len(delivered) + 12
        assert sorted(r.entry for r in delivered) == sorted(set(r.entry for r in delivered))
        await assert_one_tree(replicas, size)
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_silent_drop_mid_run_is_unavailable_within_the_timeout_and_loses_nothing(
    proxied: tuple[TcpProxy, str],
) -> None:
    """T72: the path to the database goes silent (no reset, nothing delivered) while writes
    are under way. Each write fails as Unavailable within the command timeout, none hangs;
    once the path is back, retrying each write stores it once (a commit the database made but
    could not report is found as a duplicate with its receipt), and the log is one tree."""
    proxy, dsn = proxied
    timeout_s = 2.0
    store = PostgresStore(dsn, clock=ManualClock(T0), max_size=4, command_timeout_s=timeout_s)
    await store.open()
    try:
        await store.store_inbound(inbound("before"), [event(EventKind.ACCEPTED, "before")])
        proxy.black_hole = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        ids = [f"during-{n}" for n in range(8)]
        async with asyncio.timeout(6 * timeout_s):  # a write that hangs fails the test here
            results = await asyncio.gather(
                *(store.store_inbound(inbound(i), [event(EventKind.ACCEPTED, i)]) for i in ids),
                store.ping(),
                return_exceptions=True,
            )
        elapsed = loop.time() - started
        assert all(isinstance(r, Unavailable) for r in results), results
        # the writer batches the eight: one timeout, then the ping's (a connection of its own)
        assert elapsed < 4 * timeout_s, elapsed
        print(f"silent path: every write Unavailable after {elapsed:.2f} s")

        # the path comes back; connections open during the silence are gone
        proxy.black_hole = False
        await proxy.cut()
        await proxy.start()
        outcomes = []
        async with asyncio.timeout(30):
            for i in ids:
                while True:
                    try:
                        outcome = await store.store_inbound(
                            inbound(i), [event(EventKind.ACCEPTED, i)]
                        )
                    except Unavailable:
                        await asyncio.sleep(0.2)
                        continue
                    outcomes.append(outcome.status)
                    break
        assert set(outcomes) <= {"stored", "duplicate"}
        for i in ["before", *ids]:
            stored = await store.get_inbound("MX-SAT", i)
            assert stored is not None, i
        # one entry per message, gap-free: a retry of a stored one appended nothing
        size = await store.audit_size()
        assert size == 1 + len(ids)
        await assert_one_gap_free_tree(store, size)
    finally:
        await store.close()


async def _execute(dsn: str, sql: str) -> None:
    """One statement on its own connection."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(*command: str) -> None:
    proc = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, stderr = await proc.communicate()
    assert proc.returncode == 0, (command, stderr)


@pytest.fixture
async def small_tablespace(pg_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A tablespace on a tmpfs of 8 MiB (the DSN of a fresh schema whose tables are created
    there, and the mount point); unmounted and dropped afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.fail("the tablespace-full test mounts a tmpfs: it needs root and mount(8)")
    owner = pwd.getpwnam("postgres")
    mountpoint = tempfile.mkdtemp(prefix="c2c-pg-full-")
    name = f"c2c_full_{uuid.uuid4().hex[:12]}"
    await run("mount", "-t", "tmpfs", "-o", "size=8m", "c2c-test", mountpoint)
    try:
        os.chown(mountpoint, owner.pw_uid, owner.pw_gid)
        await _execute(pgdb.ADMIN_DSN, f"CREATE TABLESPACE {name} LOCATION '{mountpoint}'")
        try:
            yield f"{pg_dsn}&default_tablespace={name}", mountpoint
        finally:
            # the schema's tables go first (pg_dsn's teardown runs after this one)
            schema = pg_dsn.rsplit("search_path=", 1)[1]
            await _execute(pg_dsn.split("?", 1)[0], f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await _execute(pgdb.ADMIN_DSN, f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        await run("umount", "--lazy", mountpoint)
        os.rmdir(mountpoint)


async def test_a_full_tablespace_is_an_outage_that_writes_nothing_and_recovers(
    small_tablespace: tuple[str, str],
) -> None:
    """T70 on PostgreSQL: the tablespace holding the store's tables fills up under writes of
    incompressible bodies. Each failed write is an ``Unavailable`` outage (a full disk fails
    every write alike, so the AMQP ingress holds the delivery rather than count it towards
    dead-lettering) and keeps nothing; once the filesystem is grown, every refused write is
    stored once, and the audit log is one gap-free tree of exactly the stored ones.

    ``ping`` (``/readyz``) is a read, which a full tablespace does not stop: after a write
    failed, it also makes a message-like write and rolls it back, so it fails while the
    tablespace is full and passes again once it is grown, before any message is retried."""
    dsn, mountpoint = small_tablespace
    store = PostgresStore(dsn, clock=ManualClock(T0), max_size=4)
    await store.open()
    try:
        kept: list[str] = []
        refused: list[Unavailable] = []
        with structlog.testing.capture_logs() as logs:
            for n in range(2000):
                message_id = f"full-{n}"
                body = base64.b64encode(os.urandom(48 * 1024))  # 64 KiB no compression shrinks
                try:
                    await store.store_inbound(
                        inbound(message_id, body=body), [event(EventKind.ACCEPTED, message_id)]
                    )
                except Unavailable as exc:
                    refused.append(exc)
                    if len(refused) == 5:
                        break
                    continue
                kept.append(message_id)
        assert len(refused) == 5, "the tablespace never filled up"
        assert all(exc.outage and "DiskFullError" in exc.reason for exc in refused), refused
        # said once, not once per refused write
        assert [e["event"] for e in logs] == ["postgres_write_failed"], logs
        assert "DiskFullError" in logs[0]["error"]
        for _ in range(2):  # each probe is rolled back, and fails again
            with pytest.raises(Unavailable, match="DiskFullError"):
                await store.ping()
        refused_ids = [f"full-{n}" for n in range(len(kept), len(kept) + 5)]
        # nothing of a refused write was kept: no row, no audit entry
        for message_id in refused_ids:
            assert await store.get_inbound("MX-SAT", message_id) is None
        assert await store.audit_size() == len(kept)

        await run("mount", "-o", "remount,size=64m", mountpoint)
        with structlog.testing.capture_logs() as logs:
            await store.ping()
            await store.ping()
        assert [(e["event"], e["seen_by"]) for e in logs] == [
            ("postgres_writes_recovered", "probe")
        ]
        # the probes kept nothing
        assert await store.audit_size() == len(kept)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM inbound_messages") == len(kept)
        finally:
            await conn.close()
        for message_id in refused_ids:
            outcome = await store.store_inbound(
                inbound(message_id, body=b"{}"), [event(EventKind.ACCEPTED, message_id)]
            )
            assert outcome.status == "stored"
        size = await store.audit_size()
        assert size == len(kept) + len(refused_ids)
        await assert_one_gap_free_tree(store, size)
    finally:
        await store.close()
