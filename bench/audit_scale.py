"""Audit log at 1,000,000 entries on SQLite and PostgreSQL: append rate, lookups, proofs.

Builds the log through the store's own append path (``Store.append_audit``: RFC 8785 entry,
leaf hash, Merkle nodes, head, one transaction per batch) in large batches, then measures on
the full log: query by message id (``audit_entries`` with a message_id filter), inclusion
proofs of random entries in the full tree and consistency proofs from random older sizes
(node reads + assembly, as the auditor API serves them), p50/p99 over many requests.

Run: ``python bench/audit_scale.py [--entries N] [--backend sqlite|postgres|both]``; with
BENCH_QUICK set the default is 100,000 entries. PostgreSQL runs in a throwaway database on the
server named by ``--admin-dsn`` (or ``C2C_BENCH_PG_DSN``), dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from tqdm import tqdm

from gateway.audit import merkle
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.crypto.notes import load_note_signer
from gateway.crypto.pki import generate_signing_key
from gateway.store import Store
from gateway.store.base import AuditFilter
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
BATCH = 10_000
SAMPLES = 500


def message_id(n: int) -> str:
    return f"00000000-0000-7000-8000-{n:012d}"


def batch_events(start: int, count: int, at: dt.datetime) -> list[AuditEvent]:
    return [
        AuditEvent(
            event=EventKind.ACCEPTED,
            at=at,
            message_id=message_id(start + i),
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.advance_data",
            body_digest="sha-256:47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
            outcome="ACK",
            transport="https",
        )
        for i in range(count)
    ]


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def timed(n: int, call: Callable[[int], Awaitable[None]]) -> list[float]:
    samples: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return samples


async def measure(name: str, store: Store, entries: int, progress: bool) -> list[str]:
    at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    with tqdm(total=entries, unit="entry", desc=f"{name} append", disable=not progress) as bar:
        for start in range(0, entries, BATCH):
            count = min(BATCH, entries - start)
            await store.append_audit(batch_events(start, count, at))
            bar.update(count)
    append_s = time.perf_counter() - started
    size = await store.audit_size()
    assert size == entries, size
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="c2c-audit-key-") as tmp:
        generate_signing_key(Path(tmp) / "audit.key")
        signer = load_note_signer(Path(tmp) / "audit.key", "bench/US-CBP")
    audit = AuditLog(store, signer=signer, clock=SystemClock())
    _, root = await audit.root()

    async def by_id(_: int) -> None:
        n = rng.randrange(entries)
        rows = await store.audit_entries(AuditFilter(message_id=message_id(n)), limit=10)
        assert [r.seq for r in rows] == [n]

    async def inclusion(_: int) -> None:
        index = rng.randrange(entries)
        proof = await audit.inclusion_proof(index, entries)
        merkle.verify_inclusion(index, entries, proof.leaf_hash, proof.hashes, root)

    async def consistency(_: int) -> None:
        old = rng.randrange(1, entries)
        await audit.consistency_proof(old, entries)

    lookups = await timed(SAMPLES, by_id)
    inclusions = await timed(SAMPLES, inclusion)
    consistencies = await timed(SAMPLES, consistency)
    return [
        f"{name}: {entries:,} entries appended in batches of {BATCH:,} in {append_s:.1f} s "
        f"= {entries / append_s:,.0f} entries/s",
        f"{name}: query by message id ({SAMPLES} random): {quantiles(lookups)}",
        f"{name}: inclusion proof in the full tree, verified ({SAMPLES} random): "
        f"{quantiles(inclusions)}",
        f"{name}: consistency proof from a random size ({SAMPLES}): {quantiles(consistencies)}",
    ]


async def run_sqlite(entries: int, progress: bool) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="c2c-audit-scale-") as tmp:
        store = SqliteStore(Path(tmp) / "audit.db", clock=SystemClock())
        await store.open()
        try:
            return await measure("SQLite", store, entries, progress)
        finally:
            await store.close()


async def run_postgres(admin_dsn: str, entries: int, progress: bool) -> list[str]:
    name = f"c2c_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))
            store = PostgresStore(url, clock=SystemClock())
            await store.open()
            try:
                return await measure("PostgreSQL", store, entries, progress)
            finally:
                await store.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main_async(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty()
    lines: list[str] = []
    if args.backend in ("sqlite", "both"):
        lines += await run_sqlite(args.entries, progress)
        print("\n".join(lines), flush=True)
    if args.backend in ("postgres", "both"):
        try:
            pg = await run_postgres(args.admin_dsn, args.entries, progress)
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"PostgreSQL: not measured ({type(exc).__name__}: {exc})", flush=True)
            return 1
        print("\n".join(pg), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000 if QUICK else 1_000_000)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get("C2C_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
