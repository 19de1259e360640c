"""PostgreSQL store write throughput: ``store_inbound`` per second at a given concurrency.

Self-contained: creates a throwaway database on the server named by ``--admin-dsn`` (default
the local test server), runs the store there, prints one JSON line, and drops the database.

    .venv/bin/python bench/store_write.py --messages 4000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.envelope import body_digest
from gateway.store.base import InboundRecord
from gateway.store.postgres import PostgresStore


def record(index: int) -> tuple[InboundRecord, list[AuditEvent]]:
    body = json.dumps({"n": index, "pad": "x" * 900}).encode()
    now = datetime.now(UTC)
    message_id = str(uuid.uuid4())
    rec = InboundRecord(
        sender="MX-ANAM",
        message_id=message_id,
        recipient="US-CBP",
        message_type="shipment.status",
        schema_version="1.0",
        correlation_id=None,
        in_reply_to=None,
        body=body,
        body_digest=body_digest(body),
        signature="eyJhbGciOiJFZERTQSJ9..sig",
        kid="kid-1",
        transport="https",
        received_at=now,
        receipt_body=b'{"receipt": true, "pad": "' + b"r" * 400 + b'"}',
        receipt_signature="eyJhbGciOiJFZERTQSJ9..rsig",
    )
    # one ``accepted`` event per message, as the inbound pipeline writes
    events = [
        AuditEvent(
            event=kind,
            at=now,
            message_id=message_id,
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.status",
            body_digest=rec.body_digest,
            outcome=outcome,
        )
        for kind, outcome in ((EventKind.ACCEPTED, "ACK"),)
    ]
    return rec, events


async def run(admin_dsn: str, messages: int, concurrency: int) -> dict[str, float]:
    name = f"c2c_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(admin_dsn)
        store = PostgresStore(urlunsplit(parts._replace(path=f"/{name}")), clock=SystemClock())
        await store.open()
        try:
            work = [record(i) for i in range(messages)]
            queue: asyncio.Queue[tuple[InboundRecord, list[AuditEvent]]] = asyncio.Queue()
            for item in work:
                queue.put_nowait(item)

            async def client() -> None:
                while not queue.empty():
                    rec, events = queue.get_nowait()
                    outcome = await store.store_inbound(rec, events)
                    assert outcome.status == "stored"

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            size = await store.audit_size()
            assert size == messages, size
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {
        "messages": messages,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "store_inbound_per_s": round(messages / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.admin_dsn, args.messages, args.concurrency))))


if __name__ == "__main__":
    main()
