"""Outbound crash safety with real processes: 500 messages queued at US-CBP (``serve``,
SQLite) drain to MX-ANAM (``serve``) while US-CBP is SIGKILLed three times mid-run and
restarted. Every message ends acknowledged and MX-ANAM stores each exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from outbound_env import auth, client_ssl, free_port, gateway_config, token
from serve_proc import ServeProcess, raise_rate_limit

from gateway.config import GatewayConfig
from gateway.schemas.registry import SchemaRegistry

MESSAGES = 500
KILLS = 3
OUTBOX = """
[outbox]
max_attempts = 1000
base_delay_s = 0.5
max_delay_s = 1.0
breaker_failures = 1000
breaker_reset_s = 1.0
send_timeout_s = 2.0
poll_interval_s = 0.05
"""


def count(database: str, sql: str) -> list[Any]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def sqlite_path(config: GatewayConfig) -> str:
    return config.store_url.removeprefix("sqlite:///")


async def submit_all(config: GatewayConfig, api_url: str) -> list[str]:
    payload = SchemaRegistry.load_builtin().examples("shipment.status", "1.0")[0]
    submission = {"recipient": "MX-ANAM", "message_type": "shipment.status", "payload": payload}
    headers = auth(token(config))
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one() -> str:
            async with (
                sem,
                session.post(
                    api_url + "/api/v1/messages",
                    json=submission,
                    headers=headers,
                    ssl=client_ssl(config),
                ) as response,
            ):
                assert response.status == 202, await response.text()
                return str((await response.json())["message_id"])

        return await asyncio.gather(*(one() for _ in range(MESSAGES)))


async def test_sigkilled_dispatcher_ends_every_message_acknowledged_once(tmp_path: Path) -> None:
    us_port, mx_port = free_port(), free_port()
    us = gateway_config(
        tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{mx_port}"}, partner_port=us_port
    )
    mx = gateway_config(
        tmp_path, "MX-ANAM", peers={"US-CBP": f"https://127.0.0.1:{us_port}"}, partner_port=mx_port
    )
    raise_rate_limit(mx, "US-CBP")
    with us.source.open("a", encoding="utf-8") as handle:
        handle.write(OUTBOX)
    receiver, sender = ServeProcess(mx.source), ServeProcess(us.source)
    # MX-ANAM starts down: the whole outbox is queued (and retrying) before anything drains.
    # 500 rows retrying every second pass breaker_failures within seconds, so the breaker is
    # open when MX-ANAM comes up; a short reset keeps the test from idling through the
    # default 30 s before the half-open probe.
    await sender.start()
    try:
        ids = await submit_all(us, sender.api_url)
        await receiver.start()
        mx_db, us_db = sqlite_path(mx), sqlite_path(us)
        async with asyncio.timeout(120):
            for kill in range(KILLS):
                target = (kill + 1) * MESSAGES // (KILLS + 2)
                for _ in range(2000):
                    if count(mx_db, "SELECT count(*) FROM inbound_messages")[0][0] >= target:
                        break
                    await asyncio.sleep(0.02)
                await sender.kill()
                await sender.start()
            for _ in range(3000):
                states = dict(
                    count(us_db, "SELECT state, count(*) FROM outbound_messages GROUP BY state")
                )
                if states == {"acknowledged": MESSAGES}:
                    break
                await asyncio.sleep(0.05)
        assert states == {"acknowledged": MESSAGES}
        received = count(mx_db, "SELECT sender, message_id FROM inbound_messages")
        assert sorted(m for _, m in received) == sorted(ids)
        assert {s for s, _ in received} == {"US-CBP"}
        # every message US-CBP holds as acknowledged carries MX-ANAM's receipt
        assert count(
            us_db, "SELECT count(*) FROM outbound_messages WHERE receipt_body IS NULL"
        ) == [(0,)]
    finally:
        assert await sender.stop() == 0
        assert await receiver.stop() == 0
