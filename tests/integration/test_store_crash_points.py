"""Store-level crash points on both backends (RELIABILITY-SECURITY T68): a writer process killed
at ``S6-before-commit`` or ``audit-append`` leaves nothing of the write in hand, keeps every
write it was answered for, and the next process appends to one consistent tree.

On PostgreSQL an inbox insert is one autocommit statement, so ``S6-before-commit`` is reached
just before it is sent; ``audit-append`` is reached inside the transaction of a plain append,
after the database appended the entries and before COMMIT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime

import pytest

from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.merkle import frontier, root, root_from_nodes
from gateway.clock import SystemClock
from gateway.store import open_store
from gateway.store.base import AuditFilter, Store

CRASH_AT_HIT = 3

WRITER = r"""
import asyncio, sys
from datetime import UTC, datetime

from gateway import crashpoints
from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.store import open_store
from gateway.store.base import InboundRecord


def record(mid: str) -> InboundRecord:
    return InboundRecord(
        sender="MX-ANAM", message_id=mid, recipient="US-CBP",
        message_type="t", schema_version="1.0", correlation_id=None, in_reply_to=None,
        body=b"body of " + mid.encode(), body_digest="sha-256:" + mid, signature="s", kid="k",
        transport="https", received_at=datetime.now(UTC),
        receipt_body=b"r", receipt_signature="rs",
    )


async def main(url: str, point: str, hit: int) -> None:
    store = open_store(url, clock=SystemClock())
    await store.open()
    crashpoints.arm(point, hit)
    for i in range(10):
        mid = f"m-{i}"
        event = AuditEvent(event=EventKind.ACCEPTED, at=datetime.now(UTC), message_id=mid)
        if point == "audit-append":
            await store.append_audit([event])
        else:
            await store.store_inbound(record(mid), [event])
        print(mid, flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def crash_writer(store_url: str, point: str) -> list[str]:
    """Run the writer armed at ``point``; the writes it was answered for."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        store_url,
        point,
        str(CRASH_AT_HIT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    crash = [json.loads(line) for line in err.splitlines() if b'"crash_point"' in line]
    assert [(c["point"], c["hit"]) for c in crash] == [(point, CRASH_AT_HIT)]
    return out.decode().split()


async def assert_one_tree(store: Store) -> int:
    size = await store.audit_size()
    entries = await store.audit_entries(AuditFilter(), limit=1000)
    assert [e.seq for e in entries] == list(range(size))
    leaves = await store.audit_leaf_hashes(0, size)
    nodes = await store.audit_node_hashes(frontier(size))
    assert root_from_nodes(size, nodes) == root(leaves)
    return size


@pytest.mark.parametrize("point", ["S6-before-commit", "audit-append"])
async def test_a_write_killed_at_the_point_leaves_nothing_and_loses_nothing(
    store_url: str, point: str
) -> None:
    answered = await crash_writer(store_url, point)
    assert answered == [f"m-{i}" for i in range(CRASH_AT_HIT - 1)]
    store = open_store(store_url, clock=SystemClock())
    await store.open()
    try:
        entries = await store.audit_entries(AuditFilter(), limit=1000)
        assert [json.loads(e.entry)["message_id"] for e in entries] == answered
        assert await assert_one_tree(store) == len(answered)
        in_hand = f"m-{CRASH_AT_HIT - 1}"
        if point == "S6-before-commit":
            assert {r.message_id for r in await store.pending_relay(100)} == set(answered)
            assert await store.get_inbound("MX-ANAM", in_hand) is None
        # the next process appends after the last answered write
        event = AuditEvent(event=EventKind.ACCEPTED, at=datetime.now(UTC), message_id=in_hand)
        assert await store.append_audit([event]) == [len(answered)]
        assert await assert_one_tree(store) == len(answered) + 1
    finally:
        await store.close()
