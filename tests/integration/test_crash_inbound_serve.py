"""Inbound crash safety with real processes: ``c2c-gateway serve`` (SQLite) takes 2,000 signed
messages from 24 concurrent mTLS clients while it is SIGKILLed four times and restarted.

Clients retry each message until they hold a receipt. Afterwards every acknowledged message is
stored once, was handed to the internal bus (the relay's durable ``delivered`` audit entry and
the row's relayed mark, both written only after the bus confirmed), and re-sending it returns
200 with the byte-identical receipt and signature it got the first time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
from outbound_env import free_port, gateway_config
from serve_proc import (
    ServeProcess,
    partner_client_ssl,
    raise_rate_limit,
    send_until_receipt,
    signed_messages,
)

from gateway.clock import SystemClock
from gateway.store import open_store
from gateway.store.base import AuditFilter

MESSAGES = 2000
CLIENTS = 24
KILLS = 4
PATH = "/c2c/v1/messages"


async def test_sigkilled_serve_loses_no_acknowledged_message(tmp_path: Path) -> None:
    port = free_port()
    config = gateway_config(tmp_path, "US-CBP", partner_port=port)
    raise_rate_limit(config, "MX-ANAM")
    pki = tmp_path / "pki"
    messages = signed_messages(
        pki,
        sender="MX-ANAM",
        recipient="US-CBP",
        count=MESSAGES,
        message_type="shipment.advance_data",
    )
    url = f"https://127.0.0.1:{port}{PATH}"
    server = ServeProcess(config.source)
    await server.start()
    receipts: dict[str, tuple[bytes, str]] = {}
    queue: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue()
    for item in messages:
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(ssl=partner_client_ssl(pki), limit=CLIENTS)
    progressed = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            message_id, body, signature = queue.get_nowait()
            _, receipt, receipt_sig = await send_until_receipt(
                session, url, body, signature, retried=(429, 503)
            )
            receipts[message_id] = (receipt, receipt_sig)
            progressed.set()

    async def killer() -> None:
        for kill in range(KILLS):
            target = (kill + 1) * MESSAGES // (KILLS + 2)
            while len(receipts) < target:
                await progressed.wait()
                progressed.clear()
            await server.kill()
            await server.start()

    async with aiohttp.ClientSession(connector=connector) as session:
        async with asyncio.timeout(180):
            await asyncio.gather(killer(), *(client(session) for _ in range(CLIENTS)))
        assert len(receipts) == MESSAGES
        # every acknowledged message answers a re-send with its original receipt, byte for byte
        resent = await asyncio.gather(
            *(
                send_until_receipt(session, url, body, sig, retried=(429, 503))
                for _, body, sig in messages
            )
        )
        for (message_id, _, _), (status, receipt, receipt_sig) in zip(
            messages, resent, strict=True
        ):
            assert status == 200, message_id
            assert (receipt, receipt_sig) == receipts[message_id], message_id

    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        # the relay of the last process hands over what was stored before its predecessor died
        for _ in range(600):
            if not await store.pending_relay(1):
                break
            await asyncio.sleep(0.1)
        delivered = await store.audit_entries(AuditFilter(event="delivered"), limit=10**6)
        delivered_ids = {json.loads(row.entry)["message_id"] for row in delivered}
        for message_id, body, _ in messages:
            record = await store.get_inbound("MX-ANAM", message_id)
            assert record is not None, message_id
            assert record.body == body
            assert record.relayed
            assert (record.receipt_body, record.receipt_signature) == receipts[message_id]
            assert message_id in delivered_ids
    finally:
        await store.close()
    assert await server.stop() == 0
    database = config.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        rows, keys = db.execute(
            "SELECT count(*), count(DISTINCT sender || ' ' || message_id) FROM inbound_messages"
        ).fetchone()
    assert rows == keys == MESSAGES
