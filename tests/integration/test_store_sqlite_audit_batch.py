"""SQLite: the audit frontier cached within one group-commit transaction stays exact, also when
units of the same batch fail after appending (their savepoint rollback must drop the cache)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from test_store import T0, event, inbound

from gateway.audit.events import EventKind
from gateway.audit.merkle import leaf_hash, root, root_from_nodes, root_plan
from gateway.clock import ManualClock
from gateway.store.base import AuditFilter
from gateway.store.sqlite import SqliteStore


class UnitFailed(Exception):
    """Raised by a unit after its audit append: the unit alone is rolled back."""


async def test_batch_with_failed_appending_units_keeps_the_tree_exact(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    await store.open()
    try:

        async def append_then_fail(index: int) -> None:
            def unit(conn: sqlite3.Connection) -> None:
                store._append_audit(conn, [event(EventKind.ACCEPTED, f"doomed-{index}")])
                raise UnitFailed(index)

            try:
                await store._write(unit)
            except UnitFailed:
                return
            raise AssertionError("the failing unit was committed")

        # Queued together, so the writer takes them as one (or a few) batches, interleaved.
        work: list[Coroutine[Any, Any, object]] = []
        for i in range(200):
            accepted = [event(EventKind.ACCEPTED, f"m-{i}")]
            work.append(store.store_inbound(inbound(f"m-{i}"), accepted))
            if i % 3 == 0:
                work.append(append_then_fail(i))
            if i % 7 == 0:
                work.append(store.append_audit([event(EventKind.DELIVERED, f"m-{i}")] * 2))
        await asyncio.gather(*work)
        assert store.writer_stats.commits < 200

        size = await store.audit_size()
        assert size == 200 + 2 * len(range(0, 200, 7))
        rows = await store.audit_entries(AuditFilter(), limit=100_000)
        assert all(b"doomed" not in row.entry for row in rows)
        leaves = await store.audit_leaf_hashes(0, size)
        assert leaves == [leaf_hash(row.entry) for row in rows]
        nodes = await store.audit_node_hashes(root_plan(size).node_keys())
        assert root_from_nodes(size, nodes) == root(leaves)
    finally:
        await store.close()


async def test_two_stores_on_one_file_append_in_turn_and_the_tree_stays_exact(
    tmp_path: Path,
) -> None:
    """Each store keeps its committed frontier; the other's appends must invalidate it."""
    first = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    second = SqliteStore(tmp_path / "gw.db", clock=ManualClock(T0))
    await first.open()
    await second.open()
    try:
        for i in range(40):
            writer = first if i % 3 else second
            await writer.append_audit([event(EventKind.DELIVERED, f"turn-{i}")] * (1 + i % 4))
        size = await first.audit_size()
        assert size == sum(1 + i % 4 for i in range(40))
        leaves = await second.audit_leaf_hashes(0, size)
        nodes = await first.audit_node_hashes(root_plan(size).node_keys())
        assert root_from_nodes(size, nodes) == root(leaves)
    finally:
        await first.close()
        await second.close()
