"""The per-source connection cap of the partner endpoint (RELIABILITY-SECURITY T37), over
real mutual TLS on loopback: one address's connections cannot keep another partner out, and
every connection gives its slot back however it ends.

Loopback has the whole of 127.0.0.0/8, so each test's flooding source is its own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from https_env import (
    MX,
    Env,
    connection_count,
    held_per_source_becomes,
    make_message,
    open_from,
    post,
    running_gateway,
)

PER_SOURCE = 2
LIMITS = (
    "header_timeout_s = 1.0\nrequest_timeout_s = 1.0\n"
    f"max_connections = 16\nmax_connections_per_source = {PER_SOURCE}\n"
)
FLOODER = "127.0.0.2"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path, LIMITS) as running:
        yield running


async def _get_keys(env: Env, source: str) -> int:
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(MX), local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(env.gateway.partner_url + "/c2c/v1/keys") as response,
    ):
        await response.read()
        return response.status


def _refused(env: Env, limit: str) -> float:
    return connection_count(env, "c2c_https_connections_refused_total", "limit", limit)


async def test_one_source_cannot_keep_another_partner_out(env: Env) -> None:
    # Connections that never send a ClientHello fill the flooder's slots ...
    silent = [await open_from(env, FLOODER, None) for _ in range(PER_SOURCE)]
    await held_per_source_becomes(env, {FLOODER: PER_SOURCE})
    # ... its next one is closed before any TLS work, a partner's mTLS client included ...
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await open_from(env, FLOODER, env.client_ssl(MX))
    assert _refused(env, "per_source") == 1
    assert _refused(env, "total") == 0
    # ... while another address is served as usual, below the total cap.
    _, body = make_message(env)
    assert (await post(env, body)).status == 202
    for _, writer in silent:
        writer.close()
    await held_per_source_becomes(env, {})
    # The slots came back: the flooder's address is served again.
    assert await _get_keys(env, FLOODER) == 200


async def test_every_way_a_connection_ends_gives_its_slot_back(env: Env) -> None:
    source = "127.0.0.3"
    # A handshake refused: no client certificate.
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        reader, writer = await open_from(env, source, env.client_ssl(None))
        await reader.read()
        writer.close()
    # Not TLS at all.
    reader, writer = await open_from(env, source, None)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await reader.read() == b""
    writer.close()
    # A silent connection closed by the header deadline.
    reader, writer = await open_from(env, source, None)
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    # A peer that resets in the middle of its handshake.
    _, writer = await open_from(env, source, None)
    writer.transport.abort()
    # A served connection that the client closes, and one the server closes (idle after the
    # header deadline of a handshaken connection).
    assert await _get_keys(env, source) == 200
    reader, writer = await open_from(env, source, env.client_ssl(MX))
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await held_per_source_becomes(env, {})
    # Nothing leaked: the address still has all its slots.
    held = [await open_from(env, source, env.client_ssl(MX)) for _ in range(PER_SOURCE)]
    await held_per_source_becomes(env, {source: PER_SOURCE})
    assert _refused(env, "per_source") == 0
    for _, writer in held:
        writer.close()
    await held_per_source_becomes(env, {})
