"""Slow, idle and too many clients, graceful shutdown with a request in flight, and metrics,
over real mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from https_env import MX, Env, make_message, post, running_gateway

LIMITS = "header_timeout_s = 1.0\nrequest_timeout_s = 1.0\nmax_connections = 3\n"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path, LIMITS) as running:
        yield running


async def _connect(env: Env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(env.gateway.partner_url)
    return await asyncio.open_connection(
        url.hostname, url.port, ssl=env.client_ssl(MX), server_hostname="127.0.0.1"
    )


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    async with asyncio.timeout(seconds):
        return await reader.read()


async def test_idle_connection_is_closed_after_the_header_deadline(env: Env) -> None:
    reader, writer = await _connect(env)
    started = time.monotonic()
    assert await _closed_within(reader, 5) == b""
    assert time.monotonic() - started >= 0.5
    writer.close()


async def test_trickled_headers_are_cut_off(env: Env) -> None:
    reader, writer = await _connect(env)
    writer.write(b"POST /c2c/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    assert await _closed_within(reader, 5) == b""
    writer.close()


async def test_clients_that_never_read_give_their_slots_back_at_the_deadline(env: Env) -> None:
    """claims finding (T37): a slowloris client that never reads never answers the TLS
    close at the header deadline. Closed politely, its connection held its slot for the
    30 s of the TLS shutdown and could not be evicted either: three of them kept a partner out
    of a cap of three. Aborted, the slots come back at the deadline."""
    held = []
    for _ in range(3):
        _, writer = await _connect(env)
        writer.write(b"POST /c2c/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
        await writer.drain()
        writer.transport.pause_reading()  # never reads: the server's close_notify is unread
        held.append(writer)
    await asyncio.sleep(2.5)  # past the 1 s header deadline
    _, message = make_message(env)
    async with asyncio.timeout(10):
        answer = await post(env, message)
    assert answer.status == 202
    for writer in held:
        writer.transport.abort()


async def test_slow_body_gets_408(env: Env) -> None:
    reader, writer = await _connect(env)
    writer.write(
        b"POST /c2c/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"header":'
    )
    await writer.drain()
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    writer.close()


async def test_connections_over_the_cap_are_closed(env: Env) -> None:
    held = [await _connect(env) for _ in range(3)]
    # Let the server register the three (it does so once their handshakes finished).
    await asyncio.sleep(0.1)
    # Closed before its TLS handshake: the server spends no crypto on it.
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await _connect(env)
    for _, held_writer in held:
        held_writer.close()


async def test_connections_in_their_handshake_count_towards_the_cap(env: Env) -> None:
    url = urlsplit(env.gateway.partner_url)
    # Three connections that never send a ClientHello fill the cap of three.
    silent = [await asyncio.open_connection(url.hostname, url.port) for _ in range(3)]
    await asyncio.sleep(0.1)
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await _connect(env)
    for _, writer in silent:
        writer.close()
    # Once they are gone, a partner gets in again.
    await asyncio.sleep(0.1)
    _, writer = await _connect(env)
    writer.close()


async def test_in_flight_request_finishes_during_graceful_stop(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        await _finish_during_stop(env)


async def _finish_during_stop(env: Env) -> None:
    message_id, body = make_message(env)
    # Another process holds the database's write lock: the request is received, verified and
    # waiting for its commit when the shutdown begins.
    lock = sqlite3.connect(env.root / "gw.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        request = asyncio.create_task(post(env, body))
        await asyncio.sleep(0.5)
        stopping = asyncio.create_task(env.gateway.stop())
        await asyncio.sleep(0.3)
        assert not request.done()
        assert not stopping.done()
        # No new connection is accepted once stopping began.
        with pytest.raises((aiohttp.ClientError, OSError)):
            await post(env, body)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    answer = await request
    assert answer.status == 202
    await stopping
    # Acknowledged means committed: the row is there after the store reopens.
    await env.gateway.store.open()
    try:
        stored = await env.gateway.store.get_inbound(MX, message_id)
        assert stored is not None
        assert stored.receipt_body == answer.body
    finally:
        await env.gateway.store.close()


async def test_metrics_count_received_accepted_rejected(env: Env) -> None:
    _, body = make_message(env)
    assert (await post(env, body)).status == 202
    assert (await post(env, body)).status == 200
    _, other = make_message(env)
    assert (await post(env, other, signer=None)).status == 401
    text = env.gateway.metrics.render().decode()
    assert 'c2c_inbound_received_total{partner="MX-ANAM",transport="https"} 3.0' in text
    assert (
        'c2c_inbound_accepted_total{message_type="shipment.advance_data",partner="MX-ANAM"} 1.0'
        in text
    )
    assert 'c2c_inbound_duplicates_total{partner="MX-ANAM"} 1.0' in text
    assert 'c2c_inbound_rejected_total{code="SIGNATURE_INVALID",partner="MX-ANAM"} 1.0' in text
    assert 'c2c_inbound_latency_seconds_count{outcome="ack",transport="https"} 1.0' in text


async def test_stopping_ends_handshakes_under_way(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        url = urlsplit(env.gateway.partner_url)
        # A TCP connection that never sends its ClientHello: its handshake is under way.
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await env.gateway.stop()
        # Closed by the stop, long before the handshake deadline would have closed it.
        assert await _closed_within(reader, 2.0) == b""
        assert time.monotonic() - started < 2.0
        writer.close()
