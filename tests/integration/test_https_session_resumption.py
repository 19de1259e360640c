"""Every connection to the partner endpoint is verified in full: no TLS session is resumed.

A resumed session skips the client certificate's verification (chain, validity, CRL), so a
partner holding a session ticket from before its certificate expired would still get in for
the ticket's lifetime (two hours by OpenSSL's default). Over real mutual TLS on loopback,
with blocking ``ssl`` clients, which offer a saved session the way many partners' clients do.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import structlog
import uvloop
from https_env import (
    MX,
    Env,
    client_with,
    dev_ca,
    issue_cert,
    kept_alive,
    retirements,
    running_gateway,
    wait_delivered,
)


def get_keys(
    env: Env, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """GET /c2c/v1/keys on a new connection: the status line, the session (its tickets come
    after the handshake, so it is read after the answer) and whether it was resumed."""
    url = urlsplit(env.gateway.partner_url)
    assert url.hostname is not None
    assert url.port is not None
    with (
        socket.create_connection((url.hostname, url.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET /c2c/v1/keys HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer.split(b"\r\n", 1)[0], tls.session, tls.session_reused


def short_lived_partner_context(env: Env, seconds: float) -> ssl.SSLContext:
    """MX-ANAM's client context with a certificate of the dev CA that expires in
    ``seconds``."""
    ca_cert, ca_key = dev_ca(env)
    not_after = datetime.now(UTC) + timedelta(seconds=seconds)
    cert_path, key_path, _, _ = issue_cert(
        env.root, MX, issuer_cert=ca_cert, issuer_key=ca_key, not_after=not_after
    )
    return client_with(env, cert_path, key_path)


async def test_no_tls_1_3_session_is_resumed(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        context = env.client_ssl(MX)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        status, session, _ = await asyncio.to_thread(get_keys, env, context)
        assert status == b"HTTP/1.1 200 OK"
        status, _, reused = await asyncio.to_thread(get_keys, env, context, session)
        assert status == b"HTTP/1.1 200 OK"
        assert not reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_a_certificate_that_expired_since_cannot_get_in_with_an_old_session(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    async with running_gateway(tmp_path) as env:
        context = short_lived_partner_context(env, seconds=3)
        context.maximum_version = version
        expires = time.monotonic() + 3
        status, session, _ = await asyncio.to_thread(get_keys, env, context)
        assert status == b"HTTP/1.1 200 OK"
        # TLS 1.2: the session is still resumable (OpenSSL's session cache), and it is
        # resumed while the certificate is valid
        status, session, reused = await asyncio.to_thread(get_keys, env, context, session)
        assert status == b"HTTP/1.1 200 OK"
        assert reused == (version is ssl.TLSVersion.TLSv1_2)
        await asyncio.sleep(expires - time.monotonic() + 1.5)
        with structlog.testing.capture_logs() as logs:
            try:
                status, _, reused = await asyncio.to_thread(get_keys, env, context, session)
            except (ssl.SSLError, ConnectionError):
                status, reused = b"", False
        # refused: closed without an answer, the certificate found expired
        assert status == b"", f"an expired certificate got {status!r} (resumed: {reused})"
        refused = [e for e in logs if e["event"] == "tls_handshake_refused"]
        assert [e["reason"] for e in refused] == ["expired"], logs


async def test_a_kept_alive_connection_takes_no_request_once_its_certificate_expires(
    tmp_path: Path,
) -> None:
    """A partner's connection is served no longer than its client certificate is valid:
    then it closes, and the next handshake is refused as expired."""
    async with running_gateway(tmp_path) as env:
        expires = time.monotonic() + 3
        async with kept_alive(env, MX, short_lived_partner_context(env, seconds=3)) as send:
            assert await send() == 202
            assert await send() == 202  # the same connection
            await asyncio.sleep(expires - time.monotonic() + 1.5)
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                await send()
        await wait_delivered(env, 2)


def test_on_uvloop_a_request_under_way_at_expiry_is_answered_then_the_connection_closes(
    tmp_path: Path,
) -> None:
    """``serve`` runs on uvloop: a message whose body is still coming when the certificate
    expires is taken and answered, then the connection closes, and the next is refused."""

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        async with running_gateway(tmp_path) as env:
            context = short_lived_partner_context(env, seconds=2)
            async with kept_alive(env, MX, context) as send:
                assert await send() == 202
                assert await send(pause_s=2.5) == 202  # expires half-way through its body
                with pytest.raises((aiohttp.ClientError, ConnectionError)):
                    await send()
            await wait_delivered(env, 2)

    uvloop.run(scenario())


async def test_a_closed_connection_leaves_no_timer_behind(tmp_path: Path) -> None:
    """A served connection's end of use is a timer as far off as its certificate's notAfter:
    one that closes before then takes its timer with it."""
    async with running_gateway(tmp_path) as env:
        assert retirements() == 0
        async with kept_alive(env, MX) as send:
            assert await send() == 202
            assert retirements() == 1
        for _ in range(100):  # the client has closed the connection
            if retirements() == 0:
                break
            await asyncio.sleep(0.02)
        assert retirements() == 0
