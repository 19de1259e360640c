"""A second SIGTERM ends ``c2c-gateway serve`` at once (SRE review M1).

The first SIGTERM stops gracefully: requests in flight are waited for (up to 30 s, then
aiohttp's own 30 s). An operator who cannot wait (a host going down, a stop that is stuck)
sends the signal again, as most servers take it: the process exits now, with status 1 and
one log line saying so. Nothing acknowledged is lost (the store commits before any answer;
the crash tests kill -9 at every point), and the request in flight got no answer, so its
sender retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
from outbound_env import gateway_config
from serve_proc import ServeProcess, partner_client_ssl
from test_logging_canary import _message

from gateway.schemas.registry import SchemaRegistry
from gateway.transports.https_server import MESSAGES_PATH


async def _post(server: ServeProcess, pki: Path, body: bytes, signature: str) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=partner_client_ssl(pki))) as s,
        s.post(
            server.partner_url + MESSAGES_PATH,
            data=body,
            headers={"Content-Type": "application/json", "C2C-Signature": signature},
        ) as response,
    ):
        return response.status


async def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    pki = tmp_path / "pki"
    server = ServeProcess(config.source)
    await server.start()
    proc = server.proc
    assert proc is not None
    payload = SchemaRegistry.load_builtin().examples("shipment.advance_data", "1.0")[0]
    body, signature = _message(pki, payload, "shipment.advance_data")
    # another process holds the database's write lock: the request waits for its commit
    lock = sqlite3.connect(config.store_url.removeprefix("sqlite://"))
    lock.isolation_level = None
    lock.execute("BEGIN EXCLUSIVE")
    request = asyncio.create_task(_post(server, pki, body, signature))
    try:
        await asyncio.sleep(1.0)
        assert not request.done()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert proc.returncode is None  # the graceful stop waits for the request
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            code = await proc.wait()
        assert time.monotonic() - began < 3
        assert code == 1
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await request
    await server.wait()
    lines = [orjson.loads(line) for line in server.stderr_log.splitlines() if line[:1] == b"{"]
    # the first signal is said at once, with what the stop waits for
    (stopping,) = [line for line in lines if line["event"] == "gateway_stopping"]
    assert (stopping["level"], stopping["signal"]) == ("info", "SIGTERM")
    assert "a second signal stops at once" in stopping["detail"]
    (forced,) = [line for line in lines if line["event"] == "stop_forced"]
    assert forced["level"] == "warning"
    assert lines.index(stopping) < lines.index(forced)
