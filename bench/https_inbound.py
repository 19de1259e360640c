"""HTTPS inbound: raw mutual-TLS aiohttp server vs the gateway's full inbound path.

The gateway path is ``c2c-gateway serve`` (mTLS, detached JWS verify, schema validation,
dedupe, durable store with its audit entry, signed receipt). Scenarios: SQLite store at
concurrency 1 and 32; PostgreSQL store (own database, dropped afterwards) at 1 and 32; two
gateway processes on one PostgreSQL (scale-out factor); and the gateway's RSS after 10k and
100k messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.common import (
    HOME,
    QUICK,
    LoadResult,
    Process,
    Serve,
    Table,
    cpu_seconds,
    prepare,
    rss_mib,
    run_load,
    scaled,
    sign_messages,
)

MESSAGES_PATH = "/c2c/v1/messages"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


@dataclass
class Payloads:
    """One signed file, handed out in disjoint slices (the gateway refuses a replayed id)."""

    path: Path
    size: int
    used: int = 0

    def take(self, count: int) -> tuple[int, int]:
        if self.used + count > self.size:
            raise RuntimeError(f"payload file exhausted: {self.used}+{count} > {self.size}")
        start, self.used = self.used, self.used + count
        return start, count


@contextlib.asynccontextmanager
async def raw_server(pki: Path) -> AsyncIterator[Process]:
    server = await Process(
        [
            "-m",
            "bench.raw_https",
            "--ca",
            str(pki / "ca.pem"),
            "--cert",
            str(pki / HOME / "tls.pem"),
            "--key",
            str(pki / HOME / "tls.key"),
        ]
    ).start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def gateways(config: Path, count: int = 1) -> AsyncIterator[list[Serve]]:
    started: list[Serve] = []
    try:
        for _ in range(count):
            started.append(await Serve(config).start())
        yield started
    finally:
        for serve in started:
            await serve.stop()


def urls_of(servers: Sequence[Serve]) -> list[str]:
    return [s.partner_url + MESSAGES_PATH for s in servers]


@dataclass(frozen=True)
class Measured:
    """A load run and the server's CPU time per request over it (robust to a noisy box)."""

    load: LoadResult
    cpu_us: float

    @property
    def rate(self) -> float:
        return self.load.rate


async def measured(pids: Sequence[int], run: Awaitable[LoadResult]) -> Measured:
    before = sum(cpu_seconds(pid) for pid in pids)
    result = await run
    used = sum(cpu_seconds(pid) for pid in pids) - before
    return Measured(load=result, cpu_us=used / max(result.sent, 1) * 1e6)


async def load(
    servers: Sequence[Serve], pki: Path, payloads: Payloads, *, concurrency: int, budget: int
) -> Measured:
    skip, limit = payloads.take(budget)
    return await measured(
        [s.pid for s in servers],
        run_load(
            urls_of(servers),
            pki=pki,
            payloads=payloads.path,
            concurrency=concurrency,
            duration_s=scaled(8.0, 3.0),
            skip=skip,
            limit=limit,
        ),
    )


def add_load_rows(table: Table, label: str, base: Measured, gw: Measured) -> None:
    table.add(f"{label} messages/s", base.rate, gw.rate, "/s")
    table.add(f"{label} p50", base.load.p50_ms, gw.load.p50_ms, "ms")
    table.add(f"{label} p99", base.load.p99_ms, gw.load.p99_ms, "ms")
    table.add(f"{label} server CPU per message", base.cpu_us, gw.cpu_us, "us")
    if gw.load.errors or base.load.errors:
        table.notes.append(
            f"{label}: non-202 answers, baseline {base.load.statuses}, gateway {gw.load.statuses}"
        )


@dataclass(frozen=True)
class RawFigures:
    c1: Measured
    c32: Measured


async def raw_figures(pki: Path, payloads: Path) -> RawFigures:
    """The raw server re-uses the same payloads: it checks nothing, so replays are fine."""
    async with raw_server(pki) as raw:
        url = [f"https://127.0.0.1:{raw.info}{MESSAGES_PATH}"]
        duration = scaled(8.0, 3.0)
        c1 = await measured(
            [raw.pid],
            run_load(url, pki=pki, payloads=payloads, concurrency=1, duration_s=duration),
        )
        c32 = await measured(
            [raw.pid],
            run_load(url, pki=pki, payloads=payloads, concurrency=32, duration_s=duration),
        )
    return RawFigures(c1=c1, c32=c32)


async def sqlite_inbound(root: Path) -> tuple[Table, RawFigures]:
    config = prepare(root)
    budget_c1, budget_c32 = int(scaled(8_000, 3_000)), int(scaled(16_000, 6_000))
    payloads = Payloads(
        sign_messages(root, root / "payloads.jsonl", count=budget_c1 + budget_c32),
        budget_c1 + budget_c32,
    )
    raw = await raw_figures(root, payloads.path)
    table = Table("1. HTTPS inbound, SQLite store (raw aiohttp mTLS 202 vs gateway)")
    async with gateways(config) as servers:
        c1 = await load(servers, root, payloads, concurrency=1, budget=budget_c1)
        c32 = await load(servers, root, payloads, concurrency=32, budget=budget_c32)
    add_load_rows(table, "c=1", raw.c1, c1)
    add_load_rows(table, "c=32", raw.c32, c32)
    table.notes.append(
        f"target c=32 rate >= 0.50 of raw: {_verdict(c32.rate / raw.c32.rate >= 0.5)}"
        f" ({c32.rate / raw.c32.rate:.2f})"
    )
    table.notes.append(
        f"target c=1 p99 <= 3x raw p99: {_verdict(c1.load.p99_ms <= 3 * raw.c1.load.p99_ms)}"
        f" ({c1.load.p99_ms / raw.c1.load.p99_ms:.2f}x)"
    )
    return table, raw


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    name = f"c2c_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{PG_SERVER}/{name}"
        finally:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await admin.close()


async def postgres_inbound(root: Path, raw: RawFigures) -> list[Table]:
    budget_c1, budget_c32 = int(scaled(8_000, 3_000)), int(scaled(16_000, 6_000))
    total = budget_c1 + 2 * budget_c32
    async with pg_database() as url:
        config = prepare(root, store_url=url)
        payloads = Payloads(sign_messages(root, root / "payloads.jsonl", count=total), total)
        table = Table("2. HTTPS inbound, PostgreSQL store (raw aiohttp mTLS 202 vs gateway)")
        async with gateways(config) as servers:
            c1 = await load(servers, root, payloads, concurrency=1, budget=budget_c1)
            busy0 = cpu_busy()
            one = await load(servers, root, payloads, concurrency=32, budget=budget_c32)
            busy1 = cpu_busy()
        add_load_rows(table, "c=1", raw.c1, c1)
        add_load_rows(table, "c=32", raw.c32, one)
        table.notes.append("baseline: the raw figures of benchmark 1 (same run)")
        scale = Table("2b. Scale-out: 1 vs 2 gateway processes on one PostgreSQL, c=32")
        async with gateways(config, 2) as pair:
            busy2 = cpu_busy()
            two = await load(pair, root, payloads, concurrency=32, budget=budget_c32)
            busy3 = cpu_busy()
    scale.add("messages/s", one.rate, two.rate, "/s")
    scale.add("p50", one.load.p50_ms, two.load.p50_ms, "ms")
    scale.add("p99", one.load.p99_ms, two.load.p99_ms, "ms")
    scale.add("gateway CPU per message (all processes)", one.cpu_us, two.cpu_us, "us")
    cpu_one = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * 100
    cpu_two = (busy3[0] - busy2[0]) / max(busy3[1] - busy2[1], 1) * 100
    scale.notes.append("baseline column: one process; gateway column: two processes")
    scale.notes.append(
        f"machine CPU busy (both cores, load client + gateways + PostgreSQL): {cpu_one:.0f}% "
        f"with one process, {cpu_two:.0f}% with two"
    )
    scale.notes.append(
        f"target 2 processes >= 1.2x one: {_verdict(two.rate >= 1.2 * one.rate)}"
        f" ({two.rate / one.rate:.2f}x)"
    )
    return [table, scale]


async def memory(root: Path) -> Table:
    first, total = (10_000, 100_000) if not QUICK else (2_000, 20_000)
    config = prepare(root)
    path = sign_messages(root, root / "payloads.jsonl", count=total)
    table = Table(f"5. Memory: RSS after {first:,} and {total:,} messages (c=32)")
    rss: dict[str, list[float]] = {}
    async with raw_server(root) as raw:
        urls = [f"https://127.0.0.1:{raw.info}{MESSAGES_PATH}"]
        rss["raw"] = await _rss_after(raw.pid, urls, root, path, first, total)
    async with gateways(config) as (gw,):
        rss["gateway"] = await _rss_after(gw.pid, urls_of([gw]), root, path, first, total)
    table.add(f"RSS after {first:,}", rss["raw"][0], rss["gateway"][0], "MiB")
    table.add(f"RSS after {total:,}", rss["raw"][1], rss["gateway"][1], "MiB")
    growth = {k: (v[1] / v[0] - 1) * 100 for k, v in rss.items()}
    table.add("growth %", growth["raw"], growth["gateway"], "%")
    table.notes.append(
        f"target gateway RSS growth <= 10%: {_verdict(growth['gateway'] <= 10)}"
        f" ({growth['gateway']:+.1f}%)"
    )
    return table


async def _rss_after(
    pid: int, urls: list[str], pki: Path, path: Path, first: int, total: int
) -> list[float]:
    out = []
    for skip, limit in ((0, first), (first, total - first)):
        result = await run_load(
            urls,
            pki=pki,
            payloads=path,
            concurrency=32,
            duration_s=3600,
            warmup=0,
            skip=skip,
            limit=limit,
        )
        if result.count != limit or result.errors:
            raise RuntimeError(f"memory run: {result.count}/{limit} sent, {result.statuses}")
        # let the relay and the group commit settle before reading RSS
        await asyncio.sleep(1.0)
        out.append(rss_mib(pid))
    return out


def _verdict(met: bool) -> str:
    return "MET" if met else "MISSED"
