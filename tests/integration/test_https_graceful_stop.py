"""Stopping the partner endpoint (SIGTERM) over real mutual TLS on loopback: a request under
way is read to its end, stored and answered before the connections close (docs/operations.md
"Process"); an idle endpoint stops at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from https_env import MX, URL_PATH, make_message, open_from, running_gateway

from gateway.crypto.jws import sign_detached


async def test_a_body_still_arriving_at_stop_is_read_stored_and_answered(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        server = env.gateway.partner_server
        message_id, body = make_message(env)
        reader, writer = await open_from(env, "127.0.0.1", env.client_ssl(MX))
        head = (
            f"POST {URL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"C2C-Signature: {sign_detached(body, env.keys[MX])}\r\n\r\n"
        ).encode()
        half = len(body) // 2
        writer.write(head + body[:half])
        await writer.drain()
        async with asyncio.timeout(5):
            while not server.requests_in_flight:  # noqa: ASYNC110 (polled state)
                await asyncio.sleep(0.01)
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.5)
        assert not stopping.done()  # waits for the request under way
        writer.write(body[half:])
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # the gateway closes the connection after answering
        assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]
        assert b"Connection: close" in answer
        async with asyncio.timeout(5):
            await stopping
        assert time.monotonic() - started < 5
        assert await env.gateway.store.get_inbound(MX, message_id) is not None
        writer.close()


async def test_an_endpoint_with_only_idle_connections_stops_at_once(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        _, writer = await open_from(env, "127.0.0.1", env.client_ssl(MX))
        started = time.monotonic()
        async with asyncio.timeout(5):
            await env.gateway.partner_server.stop()
        assert time.monotonic() - started < 1.0
        writer.close()
