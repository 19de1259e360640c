"""SIGKILL during group commits: nothing acknowledged is lost, nothing partial is left."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from gateway.audit.merkle import frontier, root, root_from_nodes
from gateway.clock import SystemClock
from gateway.store.base import AuditFilter
from gateway.store.sqlite import SqliteStore

WRITER = r"""
import asyncio, sys
from datetime import UTC, datetime
from pathlib import Path

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.store.base import InboundRecord
from gateway.store.sqlite import SqliteStore


async def main(path: str, start: int) -> None:
    store = SqliteStore(Path(path), clock=SystemClock())
    await store.open()

    async def one(i: int) -> None:
        mid = f"m-{i}"
        body = b"x" * 2000 + mid.encode()
        record = InboundRecord(
            sender="MX-SAT", message_id=mid, recipient="US-CBP",
            message_type="t", schema_version="1.0", correlation_id=None, in_reply_to=None,
            body=body, body_digest="sha-256:" + mid, signature="s", kid="k",
            transport="https", received_at=datetime.now(UTC), created_at=datetime.now(UTC),
            receipt_body=b"r", receipt_signature="rs",
        )
        event = AuditEvent(event=EventKind.ACCEPTED, at=datetime.now(UTC), message_id=mid)
        await store.store_inbound(record, [event])
        sys.stdout.write(mid + "\n")
        sys.stdout.flush()

    i = start
    while True:
        await asyncio.gather(*(one(i + k) for k in range(16)))
        i += 16


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _run_and_kill(path: Path, start: int, acks_before_kill: int) -> set[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(path),
        str(start),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    acked: set[str] = set()
    while len(acked) < acks_before_kill:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert line, (await proc.stderr.read()).decode() if proc.stderr else "writer exited"
        if line.startswith(b"m-"):  # an ack; the store may log on stdout too
            acked.add(line.decode().strip())
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = await proc.communicate()
    acked |= {ln for ln in rest.decode().splitlines() if ln.startswith("m-")}
    return acked


async def test_sigkill_mid_commit_loses_no_ack_and_leaves_nothing_partial(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    acked: set[str] = set()
    for round_no in range(3):
        acked |= await _run_and_kill(path, round_no * 100_000, 300)
    store = SqliteStore(path, clock=SystemClock())
    await store.open()
    try:
        assert await store.integrity_check() == "ok"
        stored = {r.message_id for r in await store.pending_relay(1_000_000)}
        assert acked <= stored
        # every stored row came with its audit entry and nothing else did
        size = await store.audit_size()
        entries = await store.audit_entries(AuditFilter(), limit=1_000_000)
        assert [e.seq for e in entries] == list(range(size))
        assert size == len(stored)
        leaves = await store.audit_leaf_hashes(0, size)
        nodes = await store.audit_node_hashes(frontier(size))
        assert root_from_nodes(size, nodes) == root(leaves)
    finally:
        await store.close()
