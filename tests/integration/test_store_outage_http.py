"""PostgreSQL unreachable under a running ``c2c-gateway serve``: a partner's POST over mutual
TLS gets 503 with a signed NACK UNAVAILABLE and nothing is kept, ``/readyz`` answers 503
naming the store; once the path to the database is back the gateway recovers by itself.

The database sits behind a TCP relay the test cuts and restores; the server is never stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pgdb
import pytest
from outbound_env import client_ssl, gateway_config
from serve_proc import ServeProcess, edit_toml, partner_client_ssl, signed_messages
from tcp_proxy import TcpProxy

from gateway.config import GatewayConfig

pytestmark = pytest.mark.postgres

PATH = "/c2c/v1/messages"


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    relay = TcpProxy(pgdb.PORT, pgdb.HOST)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.cut()


def behind(proxy: TcpProxy, config: GatewayConfig, pg_dsn: str) -> GatewayConfig:
    """``config`` with its store on PostgreSQL through ``proxy``."""
    proxied = pg_dsn.replace(f":{pgdb.PORT}/", f":{proxy.port}/", 1)
    edit_toml(config.source, 'store_url = "sqlite:///c2c.db"', f'store_url = "{proxied}"')
    return config


async def post(
    session: aiohttp.ClientSession, url: str, message: tuple[str, bytes, str]
) -> tuple[int, dict[str, Any]]:
    _, body, signature = message
    headers = {"Content-Type": "application/json", "C2C-Signature": signature}
    async with session.post(url + PATH, data=body, headers=headers) as response:
        assert "C2C-Signature" in response.headers
        if response.status == 503:
            # RFC 9110 10.2.3: when to try again, as the internal API's problems say too
            assert response.headers["Retry-After"] == "5"
        return response.status, orjson.loads(await response.read())


async def readyz(config: GatewayConfig, api_url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(api_url + "/readyz", ssl=client_ssl(config)) as response,
    ):
        return response.status, orjson.loads(await response.read())


async def stored(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT sender, message_id FROM inbound_messages")
    finally:
        await conn.close()
    return sorted(f"{row['sender']}/{row['message_id']}" for row in rows)


async def test_store_outage_is_503_unavailable_and_the_gateway_recovers_by_itself(
    tmp_path: Path, pg_dsn: str, proxy: TcpProxy
) -> None:
    config = behind(proxy, gateway_config(tmp_path, "US-CBP"), pg_dsn)
    pki = tmp_path / "pki"
    before, during, again = signed_messages(
        pki, sender="MX-ANAM", recipient="US-CBP", count=3, message_type="shipment.status"
    )
    gateway = ServeProcess(config.source)
    await gateway.start()
    try:
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(pki))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = gateway.partner_url
            status, receipt = await post(session, url, before)
            assert (status, receipt["payload"]["status"]) == (202, "ACK")
            assert await readyz(config, gateway.api_url) == (
                200,
                {"status": "ready", "checks": {"store": "ok"}},
            )

            await proxy.cut()
            for message in (during, again, before):
                status, receipt = await post(session, url, message)
                assert status == 503
                assert receipt["header"]["in_reply_to"] == message[0]
                assert (receipt["payload"]["status"], receipt["payload"]["code"]) == (
                    "NACK",
                    "UNAVAILABLE",
                )
            status, ready = await readyz(config, gateway.api_url)
            assert (status, ready["status"]) == (503, "unavailable")
            assert ready["checks"]["store"].startswith("unavailable: "), ready

            await proxy.start()
            status, receipt = await post(session, url, during)
            assert (status, receipt["payload"]["status"]) == (202, "ACK")
            assert await readyz(config, gateway.api_url) == (
                200,
                {"status": "ready", "checks": {"store": "ok"}},
            )
            # the ACK given before the outage still stands: an exact re-send gets it again
            status, receipt = await post(session, url, before)
            assert (status, receipt["payload"]["status"]) == (200, "ACK")
    finally:
        assert await gateway.stop() == 0
    # only what was ACKed is kept: nothing from the outage, nothing twice
    assert await stored(pg_dsn) == sorted(f"MX-ANAM/{m[0]}" for m in (before, during))


async def test_a_silent_drop_is_answered_unavailable_within_the_configured_store_timeout(
    tmp_path: Path, pg_dsn: str, proxy: TcpProxy
) -> None:
    """The path to PostgreSQL goes silent (packets dropped, no reset): with ``[limits]
    store_timeout_s = 2`` the partner has its 503 within a few seconds, not the default 30."""
    config = behind(proxy, gateway_config(tmp_path, "US-CBP"), pg_dsn)
    with config.source.open("a", encoding="utf-8") as toml:
        toml.write("\n[limits]\nstore_timeout_s = 2\n")
    pki = tmp_path / "pki"
    before, during = signed_messages(
        pki, sender="MX-ANAM", recipient="US-CBP", count=2, message_type="shipment.status"
    )
    gateway = ServeProcess(config.source)
    await gateway.start()
    try:
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(pki))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = gateway.partner_url
            status, receipt = await post(session, url, before)
            assert (status, receipt["payload"]["status"]) == (202, "ACK")

            proxy.black_hole = True
            # a store that waited out the default 30 s would leave this unanswered
            async with asyncio.timeout(15):
                status, receipt = await post(session, url, during)
            assert (status, receipt["payload"]["code"]) == (503, "UNAVAILABLE")

            proxy.black_hole = False
            await proxy.cut()  # the dropped connections are gone; new ones go through
            await proxy.start()
            # the pool may still hold connections into the black hole: each costs one timeout
            async with asyncio.timeout(30):
                for _ in range(60):
                    status, _ = await post(session, url, during)
                    if status != 503:
                        break
                    await asyncio.sleep(0.5)
            assert status == 202
    finally:
        assert await gateway.stop() == 0
    assert await stored(pg_dsn) == sorted(f"MX-ANAM/{m[0]}" for m in (before, during))
