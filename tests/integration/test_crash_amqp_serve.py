"""Crash safety of the AMQP ingress with real processes (RELIABILITY-SECURITY T68): ``c2c-gateway
serve`` (SQLite) drains a backlog of signed messages from the partner's quorum queue while it is
SIGKILLed three times and restarted.

A delivery is acked only after its row is committed and its receipt is confirmed on ``.out``, so
a kill loses nothing: what was in hand goes back to the queue and comes again. Afterwards every
message is stored once and relayed, nothing is left in the queue or dead-lettered, every message
got at least one ACK receipt on ``.out``, and a message answered more than once (stored before a
kill, delivered again after it) got the byte-identical receipt and signature each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path

import aio_pika
import pytest
from amqp_env import ADVANCE_DATA, AMQP_PARTNER, partner_messages, write_config
from amqp_peer import IN_EXCHANGE, ack_receipts, bind_sink, preload, queue_depth
from rabbit import RabbitVhost
from serve_proc import ServeProcess

from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.store import open_store
from gateway.store.base import AuditFilter

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

MESSAGES = 2400
KILLS = 3
PREFETCH = 32


def stored_rows(database: Path, *, unrelayed: bool = False) -> int:
    """Inbound rows committed so far (or those not yet relayed), read beside the running
    writer (WAL)."""
    where = " WHERE relayed = 0" if unrelayed else ""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        (count,) = db.execute(f"SELECT count(*) FROM inbound_messages{where}").fetchone()
    return int(count)


async def stored_at_least(database: Path, count: int) -> int:
    """Wait until ``count`` rows are committed; returns how many there are then."""
    while True:
        if (stored := stored_rows(database)) >= count:
            return stored
        await asyncio.sleep(0.01)


async def depth_at_most(vhost: RabbitVhost, queue: str, count: int) -> None:
    while True:
        if await queue_depth(vhost, queue) <= count:
            return
        await asyncio.sleep(0.1)


async def all_relayed(database: Path) -> None:
    while True:
        if not stored_rows(database, unrelayed=True):
            return
        await asyncio.sleep(0.1)


async def test_sigkilled_serve_loses_no_amqp_delivery(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    # a delivery in hand at each kill is returned and counted; the limit must outlast the kills
    source = write_config(
        tmp_path, amqp_url=rabbit_vhost.url(), prefetch=PREFETCH, delivery_limit=KILLS + 2
    )
    config = load_config(source)
    database = tmp_path / "c2c.db"
    messages = partner_messages(tmp_path, MESSAGES)
    sent = {message_id: body for message_id, body, _ in messages}
    serve = ServeProcess(source)
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        channel = await connection.channel()
        sink = await bind_sink(channel)
        # a first start declares the partner's queues; the backlog waits there
        await serve.start()
        assert await serve.stop() == 0
        await preload(rabbit_vhost, messages, message_type=ADVANCE_DATA)
        assert await queue_depth(rabbit_vhost, IN_EXCHANGE) == MESSAGES

        await serve.start()
        kills_at: list[int] = []
        async with asyncio.timeout(180):
            for kill in range(KILLS):
                target = (kill + 1) * MESSAGES // (KILLS + 2)
                kills_at.append(await stored_at_least(database, target))
                await serve.kill()
                await serve.start()
            # the last process drains the queue (what it holds in hand is not counted there)
            await depth_at_most(rabbit_vhost, IN_EXCHANGE, 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stored_at_least(database, MESSAGES), 15)
        lost = MESSAGES - stored_rows(database)
        assert not lost, f"{lost} messages lost (kills at {kills_at} rows stored)"
        # and hands every stored row to c2c.inbound (marked relayed once the bus confirmed)
        await asyncio.wait_for(all_relayed(database), 60)
        assert await serve.stop() == 0
        assert kills_at[-1] < MESSAGES, f"the backlog drained before the last kill: {kills_at}"

        assert await queue_depth(rabbit_vhost, f"{IN_EXCHANGE}.dead") == 0
        # every message answered with an ACK; an answer given twice is the same bytes
        receipts = await ack_receipts(channel)
        assert set(receipts) == set(sent)
        differing = {mid: len(answers) for mid, answers in receipts.items() if len(answers) > 1}
        assert not differing, differing
        # at least once to the CBP side: every message, each with the partner's own bytes
        relayed: set[str] = set()
        while (message := await sink.get(no_ack=True, fail=False)) is not None:
            assert message.message_id is not None
            assert message.body == sent[message.message_id]
            relayed.add(message.message_id)
        assert relayed == set(sent)
    finally:
        await serve.stop()
        await connection.close()

    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        for message_id, body in sent.items():
            record = await store.get_inbound(AMQP_PARTNER, message_id)
            assert record is not None, message_id
            assert record.body == body
            assert record.relayed, message_id
            ((receipt_body, receipt_signature),) = receipts[message_id]
            assert (record.receipt_body, record.receipt_signature) == (
                receipt_body,
                receipt_signature,
            )
        accepted = await store.audit_entries(AuditFilter(event="accepted"), limit=10**6)
        assert len(accepted) == MESSAGES
    finally:
        await store.close()
    # the whole audit log recomputed by the auditors' command: one tree, no gap
    check = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "c2c-gateway"),
        *("audit", "check", "--config", str(source)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(check.communicate(), 120)
    assert (check.returncode, stderr) == (0, b""), stderr
    assert stdout.startswith(b"OK "), stdout
    with sqlite3.connect(database) as db:
        rows, keys = db.execute(
            "SELECT count(*), count(DISTINCT sender || ' ' || message_id) FROM inbound_messages"
        ).fetchone()
    assert rows == keys == MESSAGES
