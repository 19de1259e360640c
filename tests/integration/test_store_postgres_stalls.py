"""PostgreSQL sessions that stall or vanish: a replica frozen inside a transaction (holding
the audit head) is ended by PostgreSQL itself, so the other replicas write on; a lock another
session keeps fails a write before the store timeout, saying so; a timeout names what waited;
backends terminated under load are outages, whatever asyncpg raises for them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from tcp_proxy import TcpProxy
from test_store import T0, event, inbound
from test_store_postgres import assert_one_gap_free_tree

from gateway.audit.events import EventKind
from gateway.clock import ManualClock
from gateway.errors import Unavailable
from gateway.store.base import AuditFilter
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres

TIMEOUT_S = 2.0

#: a replica in a process of its own: appends one entry after another (each a writer unit
#: that takes the audit head first and holds it across round trips), one line per result
REPLICA = """
import asyncio, sys
from datetime import UTC, datetime
from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.errors import Unavailable
from gateway.store.base import AuditFilter
from gateway.store.postgres import PostgresStore

async def main():
    store = PostgresStore(sys.argv[1], clock=SystemClock(), max_size=2,
                          command_timeout_s=float(sys.argv[2]))
    await store.open()
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        try:
            await store.append_audit([AuditEvent(event=EventKind.SUBMITTED,
                                                 at=datetime.now(UTC), message_id=f"b-{n}")])
            print("ok", flush=True)
        except Unavailable as exc:
            print(f"unavailable outage={exc.outage} {exc.reason}", flush=True)
            await asyncio.sleep(0.05)

asyncio.run(main())
"""


def with_name(dsn: str, name: str) -> str:
    return f"{dsn}&application_name={name}"


async def head_holder_idle(admin: asyncpg.Connection, name: str) -> int | None:
    """The backend of application ``name`` idle inside a transaction that locked the head."""
    pid: int | None = await admin.fetchval(
        "SELECT a.pid FROM pg_stat_activity AS a JOIN pg_locks AS l ON l.pid = a.pid "
        "WHERE a.application_name = $1 AND a.state = 'idle in transaction' "
        "AND l.locktype = 'relation' AND l.relation = 'audit_head'::regclass LIMIT 1",
        name,
    )
    return pid


class Replica:
    """The REPLICA script as a real process: its output lines, and SIGSTOP/SIGCONT."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        #: set at each ``ok`` line (a write committed)
        self.ok = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, dsn: str) -> Replica:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REPLICA,
            dsn,
            str(TIMEOUT_S),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        replica = cls(proc)
        await asyncio.wait_for(replica.ok.wait(), 30)
        return replica

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().strip())
            if self.lines[-1] == "ok":
                self.ok.set()

    def stopped(self) -> bool:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        await self.proc.wait()
        await self._reader


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_replica_frozen_holding_the_head_is_ended_and_the_others_write_on(
    pg_dsn: str, admin: asyncpg.Connection
) -> None:
    """A replica stopped (SIGSTOP) between two statements of a writer unit keeps the audit
    head locked while it is stopped. PostgreSQL ends its session after half the store
    timeout: another replica's write waits that long at most instead of failing, and later
    ones do not wait at all while the frozen one stays stopped. Once resumed, the frozen
    replica sees an outage on that session and writes on; the log is one gap-free tree."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0), command_timeout_s=TIMEOUT_S)
    await store.open()
    frozen = await Replica.start(with_name(pg_dsn, "frozen-replica"))
    try:
        pid = None
        for _ in range(500):
            frozen.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.02)
            pid = await head_holder_idle(admin, "frozen-replica")
            if pid is not None:
                break
            frozen.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.01)
        assert pid is not None, "the replica was never stopped while holding the head"

        loop = asyncio.get_running_loop()
        waits = []
        until = loop.time() + 2 * TIMEOUT_S  # it stays stopped longer than the store timeout
        while loop.time() < until:
            started = loop.time()
            await store.append_audit([event(EventKind.SUBMITTED, f"a-{len(waits)}")])
            waits.append(loop.time() - started)
        print(f"writes while a replica is frozen: {len(waits)}, first waited {waits[0]:.2f} s")
        assert waits[0] < TIMEOUT_S / 2 + 0.5, waits[0]
        assert max(waits[1:]) < 0.5, waits
        gone = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        assert gone == 0
        assert frozen.stopped()

        seen = len(frozen.lines)  # all it wrote before it was stopped, read by now
        frozen.ok.clear()
        frozen.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(frozen.ok.wait(), 10)
        failed = [line for line in frozen.lines[seen:] if line.startswith("unavailable")]
        assert failed, frozen.lines[seen:]
        assert all(line.startswith("unavailable outage=True") for line in failed), failed
    finally:
        await frozen.stop()
        await store.close()
    check = PostgresStore(pg_dsn, clock=ManualClock(T0))
    await check.open()
    try:
        await assert_one_gap_free_tree(check, await check.audit_size())
    finally:
        await check.close()


async def test_the_session_bounds_hold_on_a_reused_connection(pg_dsn: str) -> None:
    """The bounds are the session's own (startup parameters, from the store timeout), so a
    connection given back to the pool (which runs RESET ALL) keeps them."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0), max_size=1, command_timeout_s=10)
    await store.open()
    try:
        for _ in range(3):
            await store.append_audit([event(EventKind.SUBMITTED)])
            settings = await store._call(  # what the session itself says
                lambda c: c.fetchrow(
                    "SELECT current_setting('idle_in_transaction_session_timeout'), "
                    "current_setting('lock_timeout')"
                )
            )
            assert tuple(settings) == ("5s", "7500ms")
    finally:
        await store.close()


async def test_a_lock_held_by_a_busy_session_fails_a_write_before_the_timeout_saying_so(
    pg_dsn: str, admin: asyncpg.Connection
) -> None:
    """A session that holds the head and keeps working (not idle: nothing ends it) makes a
    write wait ``lock_timeout``, three quarters of the store timeout: the write fails as an
    outage, before the command timeout, and the reason says a lock was not had and what
    waited for it."""
    store = PostgresStore(pg_dsn, clock=ManualClock(T0), command_timeout_s=TIMEOUT_S)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
    busy = asyncio.create_task(holder.execute("SELECT pg_sleep(30)"))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable) as refused:
            await store.append_audit([event(EventKind.SUBMITTED, "o-1")])
        elapsed = loop.time() - started
        assert elapsed < TIMEOUT_S, elapsed
        assert refused.value.outage
        assert refused.value.reason == (
            "postgresql: write batch (append_audit): LockNotAvailableError: canceling "
            "statement due to lock timeout (a lock another session held for over 1.5 s; a "
            "session idle in a transaction is ended after 1 s)"
        )
        await admin.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
        assert await store.append_audit([event(EventKind.SUBMITTED, "o-1")]) == [0]
    finally:
        holder.terminate()
        await asyncio.gather(busy, return_exceptions=True)
        await store.close()


async def test_a_timeout_says_what_waited_and_how_long(proxied: tuple[TcpProxy, str]) -> None:
    """asyncpg's TimeoutError has no message: the reason names the store operation (or the
    write batch's) and the timeout instead of ``TimeoutError:`` and nothing."""
    proxy, dsn = proxied
    store = PostgresStore(dsn, clock=ManualClock(T0), max_size=2, command_timeout_s=1)
    await store.open()
    try:
        await store.append_audit([event(EventKind.SUBMITTED)])
        proxy.black_hole = True
        refused = await asyncio.gather(
            store.audit_size(),
            store.store_inbound(inbound("m-1"), [event(EventKind.ACCEPTED, "m-1")]),
            return_exceptions=True,
        )
        assert [(type(r), getattr(r, "outage", None)) for r in refused] == [
            (Unavailable, True),
            (Unavailable, True),
        ]
        assert [str(r) for r in refused] == [
            "postgresql: audit_size: no answer within 1 s ([limits] store_timeout_s)",
            "postgresql: write batch (store_inbound): no answer within 1 s "
            "([limits] store_timeout_s)",
        ]
    finally:
        proxy.black_hole = False
        await proxy.cut()
        await store.close()


async def test_backends_terminated_under_load_are_outages(
    pg_dsn: str, admin: asyncpg.Connection
) -> None:
    """pg_terminate_backend of the store's own backends in the middle of writes, claims and
    reads: every failure is an outage (over AMQP it must not count against a message's
    delivery limit), whichever error asyncpg raises (a lost connection, or its
    ``InternalClientError`` "cannot switch to state ...; another operation is in progress"
    when a connection is cut between two of its steps), and the store recovers by itself."""
    name = "terminated-replica"
    store = PostgresStore(
        with_name(pg_dsn, name), clock=ManualClock(T0), max_size=4, command_timeout_s=10
    )
    await store.open()
    failures: list[Unavailable] = []
    stop = asyncio.Event()

    async def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            mid = f"t-{n}-{i}"
            try:
                if n % 3 == 0:
                    await store.store_inbound(inbound(mid), [event(EventKind.ACCEPTED, mid)])
                elif n % 3 == 1:
                    await store.append_audit([event(EventKind.SUBMITTED, mid)])
                else:
                    await store.claim_relay("r", T0, 20, 30)
                    await store.audit_entries(AuditFilter(), after_seq=max(0, i - 20), limit=20)
            except Unavailable as exc:
                failures.append(exc)

    workers = [asyncio.create_task(load(n)) for n in range(9)]
    causes: Counter[str] = Counter()
    try:
        for _ in range(60):
            await asyncio.sleep(0.05)
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                name,
            )
            # "postgresql: <error>: ...", or a timeout's "postgresql: <operation>: no answer ..."
            causes = Counter(f.reason.split(": ")[1] for f in failures)
            if causes["InternalClientError"] >= 3:
                break
    finally:
        stop.set()
        await asyncio.gather(*workers)
    try:
        print("failures by cause:", dict(causes))
        assert failures
        not_outages = [f.reason for f in failures if not f.outage]
        assert not_outages == []
        async with asyncio.timeout(10):
            while True:
                try:
                    await store.append_audit([event(EventKind.SUBMITTED, "after")])
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)
    finally:
        await store.close()
