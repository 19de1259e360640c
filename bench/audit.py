"""Audit log at scale: append rate and proof latency at 1,000,000 entries (100,000 quick).

This module measures, on the SQLite store, ``append_audit`` in
batches of 1,000 events (RFC 8785 entry, leaf hash, Merkle nodes, one commit per batch) vs raw
``sqlite3`` inserts of the same rows and batches without any hashing; then inclusion and
consistency proofs at the final size (node reads + proof assembly) vs a raw point read of as
many rows. When ``bench/audit_scale.py`` (the audit owner's benchmark: SQLite and
PostgreSQL, lookups and verified proofs) is present, its output is added to the table's notes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sqlite3
import sys
import time
from pathlib import Path

from bench.common import Table, percentile, scaled
from gateway.audit import merkle
from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.store.sqlite import SqliteStore

BATCH = 1_000
PROOFS = 300


def events(start: int) -> list[AuditEvent]:
    at = dt.datetime.now(dt.UTC)
    return [
        AuditEvent(
            event=EventKind.ACCEPTED,
            at=at,
            message_id=f"00000000-0000-4000-8000-{start + i:012d}",
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.advance_data",
            body_digest="sha-256:47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
            outcome="ACK",
            transport="https",
        )
        for i in range(BATCH)
    ]


def raw_append_rate(path: Path, total: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, entry BLOB, leaf_hash BLOB)")
    entry = events(0)[0].entry_bytes()
    leaf = merkle.leaf_hash(entry)
    started = time.perf_counter()
    for start in range(0, total, BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO log VALUES (?, ?, ?)", [(start + i, entry, leaf) for i in range(BATCH)]
        )
        conn.execute("COMMIT")
    rate = total / (time.perf_counter() - started)
    conn.close()
    return rate


def raw_read_ms(path: Path, total: int, rows: int) -> list[float]:
    conn = sqlite3.connect(path)
    out = []
    for _ in range(PROOFS):
        started = time.perf_counter()
        for seq in random.sample(range(total), rows):
            conn.execute("SELECT leaf_hash FROM log WHERE seq = ?", (seq,)).fetchone()
        out.append((time.perf_counter() - started) * 1000)
    conn.close()
    return sorted(out)


async def minimal(root: Path) -> Table:
    total = int(scaled(1_000_000, 100_000))
    store = SqliteStore(root / "audit.db", clock=SystemClock())
    await store.open()
    try:
        started = time.perf_counter()
        for start in range(0, total, BATCH):
            await store.append_audit(events(start))
        append_rate = total / (time.perf_counter() - started)
        size = await store.audit_size()
        inclusion: list[float] = []
        consistency: list[float] = []
        nodes_read = 0
        for _ in range(PROOFS):
            index = random.randrange(size)
            t0 = time.perf_counter()
            plan = merkle.inclusion_plan(index, size)
            hashes = await store.audit_node_hashes(plan.node_keys())
            merkle.inclusion_proof(index, size, hashes)
            inclusion.append((time.perf_counter() - t0) * 1000)
            nodes_read = max(nodes_read, len(hashes))
            old = random.randrange(1, size)
            t0 = time.perf_counter()
            cplan = merkle.consistency_plan(old, size)
            merkle.consistency_proof(old, size, await store.audit_node_hashes(cplan.node_keys()))
            consistency.append((time.perf_counter() - t0) * 1000)
    finally:
        await store.close()
    raw_rate = raw_append_rate(root / "raw.db", total)
    raw_reads = raw_read_ms(root / "raw.db", total, nodes_read)
    inclusion.sort()
    consistency.sort()
    table = Table(f"6. Audit log at {total:,} entries (SQLite)")
    table.add(f"append entries/s (batches of {BATCH:,})", raw_rate, append_rate, "/s")
    for name, values in (("inclusion proof", inclusion), ("consistency proof", consistency)):
        table.add(f"{name} p50", percentile(raw_reads, 0.5), percentile(values, 0.5), "ms")
        table.add(f"{name} p99", percentile(raw_reads, 0.99), percentile(values, 0.99), "ms")
    table.notes.append(
        "baseline: raw sqlite3 inserts of the same rows without hashing; for proofs, "
        f"{nodes_read} random point reads (the node count of one inclusion proof)"
    )
    return table


async def audit(root: Path) -> Table:
    table = await minimal(root)
    script = Path(__file__).with_name("audit_scale.py")
    if not script.exists():
        table.notes.append("bench/audit_scale.py is not present: the figures above only")
        return table
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=str(root),
    )
    out, _ = await proc.communicate()
    table.notes.append("bench/audit_scale.py (store append path, lookups, verified proofs):")
    table.notes.extend(line for line in out.decode().splitlines() if line.strip())
    if proc.returncode != 0:
        table.notes.append(f"bench/audit_scale.py exited with {proc.returncode}")
    return table
