"""AMQP poison storm (RELIABILITY-SECURITY T53): the gateway's AMQP partner path draining a
backlog of good messages alone (baseline) vs the same backlog with poison messages spread
evenly through it (one in every ~20), whose processing raises every time.

The gateway runs in a child process (``python -m bench.amqp_poison --config ...``): the gateway
``serve`` builds, with the partner inbox's pipeline given one extra stage in front of the real
``STAGES`` that raises for the poison messages (as tests/integration/test_amqp_poison.py
simulates a bug some input triggers). Both runs have that stage, so only the poison differs.
A poison message is rejected (counted by the quorum queue) until the delivery limit, then
dead-lettered to ``c2c.partner.<id>.in.dead``.

Each run has its own throwaway vhost (removed afterwards) and SQLite store. The rate of the
good messages is measured as in the AMQP inbound benchmark (bench/amqp_inbound.py): by polling
the ``.out`` queue's depth, receipts per second from the first to the last of them. After the
storm the run checks that every poison message is in ``.dead`` and audited, that the gateway
tried it exactly delivery_limit + 1 times, and that every good message was stored and answered
exactly once: if not, the section fails instead of printing a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sqlite3
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import orjson

from bench.amqp_inbound import declare_gateway_topology, drain_measured, publish_backlog, vhost
from bench.common import (
    PARTNER,
    Table,
    cpu_seconds,
    prepare,
    python,
    scaled,
    sign_messages,
)
from gateway.cli.serve import build_gateway, run
from gateway.config import AmqpConfig, load_config
from gateway.inbound.context import InboundContext
from gateway.inbound.pipeline import InboundPipeline
from gateway.inbound.stages import STAGES
from gateway.logging import configure_logging
from gateway.runtime import Gateway
from gateway.transports.amqp import dead_letter_queue, partner_in_queue, partner_out_queue
from gateway.transports.amqp_partner import PartnerInbox

#: one poison message for every this many good ones
POISON_EVERY = 20
#: the log events a poison attempt is expected to produce at level error
EXPECTED_ERRORS = frozenset({"amqp_processing_failed", "inbound_internal_error"})


class PoisonStormFailed(RuntimeError):
    """The gateway did not handle the storm as T53 requires: no figure is printed."""


# ---------------------------------------------------------------------------- child process


def child_main() -> None:
    """``c2c-gateway serve`` with the poison stage; prints READY, and the attempts at exit."""
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_poison")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--poison-ids", type=Path, required=True, help="one message id a line")
    args = parser.parse_args()
    poison = frozenset(args.poison_ids.read_text(encoding="utf-8").split())
    attempts = collections.Counter[str]()

    async def crash_on_poison(ctx: InboundContext) -> None:
        # Stands in for a bug that some input triggers every time.
        message_id = ctx.request.transport_message_id
        if message_id is not None and message_id in poison:
            attempts[message_id] += 1
            raise RuntimeError("bug triggered by this input")

    def build() -> tuple[Gateway, Callable[[], None]]:
        gateway, _api = build_gateway(args.config)
        assert gateway.amqp is not None
        assert gateway.broker is not None
        pipeline = InboundPipeline(gateway.pipeline.env, stages=(crash_on_poison, *STAGES))
        gateway.amqp.inbox = PartnerInbox(
            broker=gateway.broker, pipeline=pipeline, partners=gateway.config.partners.values()
        )
        return gateway, lambda: print("READY", flush=True)

    configure_logging()
    run(build)
    print("ATTEMPTS " + json.dumps(dict(attempts)), flush=True)


@dataclass
class PoisonServe:
    """The child process: started and ready. Its log goes to a file beside its config, counted
    once it has exited, not echoed, except errors a poison attempt does not explain. (Read
    live through a pipe, the storm's log lines cost this harness CPU that the 2 cores owe to
    the gateway and the broker, and the measured rate fell with it.)"""

    config: Path
    poison_ids: Path
    proc: asyncio.subprocess.Process | None = None
    #: (level, event) -> lines, for warning and error
    logged: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    @property
    def log_path(self) -> Path:
        return self.config.parent / "serve.log"

    async def start(self) -> PoisonServe:
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                python(),
                "-m",
                "bench.amqp_poison",
                "--config",
                str(self.config),
                "--poison-ids",
                str(self.poison_ids),
                cwd=str(self.config.parent),
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
        assert self.proc.stdout is not None
        async with asyncio.timeout(60):
            line = await self.proc.stdout.readline()
        if not line.startswith(b"READY"):
            await self._terminate()
            raise RuntimeError(f"bench.amqp_poison {self.config} did not start: {line!r}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> dict[str, int]:
        """SIGTERM, wait; the poison attempts per message id the child counted."""
        rest, code = await self._terminate()
        for line in rest.splitlines():
            if line.startswith("ATTEMPTS "):
                return {str(k): int(v) for k, v in json.loads(line.split(" ", 1)[1]).items()}
        raise PoisonStormFailed(f"the gateway exited ({code}) without its count")

    async def _terminate(self) -> tuple[str, int | None]:
        proc, self.proc = self.proc, None
        if proc is None:
            return "", None
        if proc.returncode is None:
            proc.terminate()
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            rest = await proc.stdout.read()
            await proc.wait()
        self._count()
        return rest.decode(), proc.returncode

    def _count(self) -> None:
        with self.log_path.open("rb") as lines:
            for line in lines:
                try:
                    entry = json.loads(line) if line.startswith(b"{") else None
                except ValueError:
                    entry = None
                if not isinstance(entry, dict):
                    continue
                level, event = str(entry.get("level")), str(entry.get("event"))
                if level in ("warning", "error", "critical"):
                    self.logged[level, event] += 1
                if level in ("error", "critical") and event not in EXPECTED_ERRORS:
                    sys.stderr.write("gateway: " + line.decode(errors="replace"))
        self.log_path.unlink()


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True, kw_only=True)
class RunResult:
    rate: float
    cpu_us: float
    broker_cpu_us: float | None
    #: failed deliveries of poison messages (the stage raised)
    attempts: int
    logged: collections.Counter[tuple[str, str]]


def message_id(line: bytes) -> str:
    header = orjson.loads(orjson.loads(line)["b"])["header"]
    return str(header["message_id"])


def interleave(good: list[bytes], poison: list[bytes]) -> list[bytes]:
    """``poison`` spread evenly through ``good`` (the first after the first stretch)."""
    out: list[bytes] = []
    step = len(good) / (len(poison) + 1)
    marks = [round(step * (i + 1)) for i in range(len(poison))]
    pending = list(zip(marks, poison, strict=True))
    for index, line in enumerate(good):
        while pending and pending[0][0] == index:
            out.append(pending.pop(0)[1])
        out.append(line)
    out.extend(item for _, item in pending)
    return out


async def queue_depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def wait_depth(url: str, queue: str, expected: int, timeout_s: float) -> int:
    """Poll until ``queue`` holds ``expected`` messages or the time is up; its last depth."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        depth = await queue_depth(url, queue)
        if depth >= expected or loop.time() >= deadline:
            return depth
        await asyncio.sleep(0.1)


async def dead_lettered_ids(url: str, queue: str) -> list[str]:
    """The message ids in the dead-letter queue (read, not acked: they stay)."""
    connection = await aio_pika.connect(url)
    ids: list[str] = []
    try:
        channel = await connection.channel()
        dead = await channel.get_queue(queue, ensure=False)
        while (message := await dead.get(fail=False, no_ack=False)) is not None:
            ids.append(message.message_id or "")
            deaths = message.headers.get("x-death")
            death = deaths[0] if isinstance(deaths, list) and deaths else None
            reason = death.get("reason") if isinstance(death, dict) else None
            if reason != "delivery_limit":
                raise PoisonStormFailed(f"{queue}: {message.message_id} dead for {reason!r}")
    finally:
        await connection.close()
    return ids


def stored(db: Path) -> tuple[collections.Counter[str], int]:
    """Stored inbound message ids (with their row count) and the poison audit entries."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        ids = collections.Counter(
            str(row[0])
            for row in conn.execute(
                "SELECT message_id FROM inbound_messages WHERE sender = ?", (PARTNER,)
            )
        )
        (poison,) = conn.execute(
            "SELECT count(*) FROM audit_entries WHERE event = 'poison' AND outcome = ?",
            ("dead-lettered",),
        ).fetchone()
    return ids, int(poison)


async def one_run(
    root: Path,
    pki: Path,
    good: list[bytes],
    poison: list[bytes],
    poison_ids: Path,
    *,
    limit: int,
    timeout_s: float,
) -> RunResult:
    """Drain ``good`` (with ``poison`` spread through it) on a fresh vhost and store; checked."""
    good_ids = [message_id(line) for line in good]
    poisoned = {message_id(line) for line in poison}
    inbox, out = partner_in_queue(PARTNER), partner_out_queue(PARTNER)
    async with vhost() as url:
        config = prepare(root, amqp_url=url, pki_dir=pki)
        configured = load_config(config).amqp.delivery_limit
        if configured != limit:
            raise PoisonStormFailed(f"delivery_limit {configured} configured, {limit} expected")
        await declare_gateway_topology(url)
        await publish_backlog(url, interleave(good, poison), exchange=inbox, routing_key="")
        gateway = await PoisonServe(config, poison_ids).start()
        try:
            rate, cpu_us, broker_us = await drain_measured(
                url, out, len(good), timeout_s, gateway.pid
            )
            dead = await wait_depth(url, dead_letter_queue(inbox), len(poison), timeout_s)
        finally:
            attempts = await gateway.stop()
        left = await queue_depth(url, inbox)
        answered = await queue_depth(url, out)
        dead_ids = await dead_lettered_ids(url, dead_letter_queue(inbox))
    ids, audited = stored(root / "c2c.db")
    problems: list[str] = []
    if left:
        problems.append(f"{left} messages still in {inbox}")
    if dead != len(poison) or sorted(dead_ids) != sorted(poisoned):
        problems.append(f"{len(dead_ids)} of {len(poison)} poison messages in {inbox}.dead")
    if audited != len(poison):
        problems.append(f"{audited} poison audit entries for {len(poison)} poison messages")
    wrong = {mid: n for mid, n in attempts.items() if n != limit + 1}
    if set(attempts) != poisoned or wrong:
        problems.append(
            f"{len(attempts)} poison messages tried, {len(wrong)} not exactly {limit + 1} times"
        )
    if answered != len(good):
        problems.append(f"{answered} replies in {out} for {len(good)} good messages")
    missing = set(good_ids) - set(ids)
    extra = set(ids) - set(good_ids)
    twice = [mid for mid, n in ids.items() if n > 1]
    if missing or extra or twice:
        problems.append(
            f"stored: {len(missing)} good messages missing, {len(extra)} others, "
            f"{len(twice)} more than once"
        )
    if problems:
        log = dict(gateway.logged)
        raise PoisonStormFailed(
            f"{root.name}: T53 not met, no figure: {'; '.join(problems)} ({log})"
        )
    return RunResult(
        rate=rate,
        cpu_us=cpu_us,
        broker_cpu_us=broker_us,
        attempts=sum(attempts.values()),
        logged=gateway.logged,
    )


async def poison_only_run(
    root: Path, pki: Path, poison: list[bytes], poison_ids: Path, *, limit: int, timeout_s: float
) -> float:
    """A backlog of poison alone: the gateway's CPU per failed attempt (µs), from its first
    delivery to the last message dead-lettered. The cost of one attempt, free of the good
    messages' batching and of the broker's share of the machine."""
    inbox = partner_in_queue(PARTNER)
    async with vhost() as url:
        config = prepare(root, amqp_url=url, pki_dir=pki)
        await declare_gateway_topology(url)
        await publish_backlog(url, poison, exchange=inbox, routing_key="")
        gateway = await PoisonServe(config, poison_ids).start()
        try:
            before = cpu_seconds(gateway.pid)
            dead = await wait_depth(url, dead_letter_queue(inbox), len(poison), timeout_s)
            spent = cpu_seconds(gateway.pid) - before
        finally:
            attempts = await gateway.stop()
    tried = sum(attempts.values())
    if dead != len(poison) or tried != len(poison) * (limit + 1):
        raise PoisonStormFailed(
            f"{root.name}: {dead} of {len(poison)} dead-lettered after {tried} attempts"
        )
    return spent / tried * 1e6


# ---------------------------------------------------------------------------- the section


async def amqp_poison(root: Path) -> Table:
    count = int(scaled(6_000, 1_500))
    poisons = count // POISON_EVERY
    rounds = int(scaled(3, 1))
    timeout = scaled(300.0, 120.0)
    limit = AmqpConfig().delivery_limit
    if limit != 5:
        raise PoisonStormFailed(f"the default delivery_limit is {limit}, T53 is written for 5")
    pki = root / "pki"
    prepare(root / "setup", pki_dir=pki)
    good = sign_messages(pki, root / "good.jsonl", count=count).read_bytes().splitlines()
    poison = sign_messages(pki, root / "poison.jsonl", count=poisons).read_bytes().splitlines()
    poison_ids = root / "poison-ids.txt"
    poison_ids.write_text("".join(message_id(line) + "\n" for line in poison), encoding="utf-8")

    # Alternated, each run on a fresh vhost and store: drift on a shared machine (other load,
    # the broker's memory) falls on both columns alike; the medians are printed.
    bases: list[RunResult] = []
    storms: list[RunResult] = []
    for n in range(rounds):
        bases.append(
            await one_run(
                root / f"baseline-{n}", pki, good, [], poison_ids, limit=limit, timeout_s=timeout
            )
        )
        storms.append(
            await one_run(
                root / f"storm-{n}", pki, good, poison, poison_ids, limit=limit, timeout_s=timeout
            )
        )

    # the poison alone, as many as in one storm, started after the gateway is up: its
    # first deliveries may be counted before the CPU is read, so this errs low by a few
    alone = [
        await poison_only_run(
            root / f"poison-only-{n}", pki, poison, poison_ids, limit=limit, timeout_s=timeout
        )
        for n in range(rounds)
    ]

    def median(runs: list[RunResult], figure: Callable[[RunResult], float | None]) -> float | None:
        values = [v for v in map(figure, runs) if v is not None]
        return statistics.median(values) if values else None

    base_rate = median(bases, lambda r: r.rate) or 0.0
    storm_rate = median(storms, lambda r: r.rate) or 0.0
    ratio = storm_rate / base_rate if base_rate else 0.0
    table = Table("7. AMQP poison storm (gateway partner path: good messages alone vs with poison)")
    table.add(
        f"good messages/s ({count:,} backlog, +{poisons} poison in the storm)",
        base_rate,
        storm_rate,
        "/s",
    )
    table.add(
        "gateway CPU per good message",
        median(bases, lambda r: r.cpu_us),
        median(storms, lambda r: r.cpu_us),
        "us",
    )
    table.add(
        "broker CPU per good message",
        median(bases, lambda r: r.broker_cpu_us),
        median(storms, lambda r: r.broker_cpu_us),
        "us",
    )
    table.add("failed attempts (poison deliveries)", bases[0].attempts, storms[0].attempts, "")
    table.add(
        "gateway CPU per failed attempt (the poison alone)",
        None,
        statistics.median(alone),
        "us",
    )
    table.notes.append(
        "target other messages during a poison storm >= 0.90 of baseline: "
        f"{'MET' if ratio >= 0.9 else 'MISSED'} ({ratio:.2f})"
    )
    if rounds > 1:
        pairs = ", ".join(
            f"{s.rate / b.rate:.2f}" for b, s in zip(bases, storms, strict=True) if b.rate
        )
        table.notes.append(
            f"medians of {rounds} alternated baseline/storm runs; storm/baseline per round: {pairs}"
        )
    table.notes.append(
        f"baseline column: no poison; gateway column: 1 poison message in every {POISON_EVERY}"
        f" good ones, each raising in the pipeline on every delivery; delivery_limit {limit}"
        f" (AmqpConfig default), so {limit + 1} attempts each, then dead-lettered"
    )
    table.notes.append(
        "good messages/s: receipts on .out per second, first to last, as in section 3"
    )
    table.notes.append(
        f"per failed attempt: the {poisons} poison messages alone, {limit + 1} attempts each,"
        f" gateway CPU from its start to the last dead-lettered, over the attempts"
        f" (median of {rounds}: {', '.join(f'{v:.0f}' for v in alone)} µs)"
    )
    table.notes.append(
        f"checked in every run: all {poisons} poison messages in "
        f"{partner_in_queue(PARTNER)}.dead (reason delivery_limit) and audited, each tried "
        f"{limit + 1} times; every good message stored and answered exactly once"
    )
    logged = sum((r.logged for r in storms), collections.Counter[tuple[str, str]]())
    errors = {event: n for (level, event), n in logged.items() if level != "warning"}
    warnings = {event: n for (level, event), n in logged.items() if level == "warning"}
    table.notes.append(
        f"storm log ({rounds} run{'s' if rounds > 1 else ''}): errors {errors or 'none'}, "
        f"warnings {warnings or 'none'}"
    )
    return table


if __name__ == "__main__":
    child_main()
