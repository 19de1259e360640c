"""Kept-alive partner connections over real mutual TLS on loopback: every request on a
connection is tied to that connection's partner (remembered per connection only while its
certificate cannot change), a certificate of no partner is refused on every request, and
bodies are read whole whether they arrived before the handler ran or trickle in after."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from https_env import (
    CA,
    LEGAL_BASIS,
    MX,
    US,
    Env,
    make_message,
    rejections,
    running_gateway,
)

from gateway.crypto.jws import sign_detached
from gateway.errors import NackCode
from gateway.transports.https_server import PartnerHttpsServer
from gateway.transports.tls import PartnerIdentifier, server_context

Response = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def connection(
    url: str, env: Env, party: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, ssl=env.client_ssl(party), server_hostname="127.0.0.1"
    )
    try:
        yield reader, writer
    finally:
        writer.close()


def request_head(body: bytes, signature: str | None) -> bytes:
    lines = [
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if signature is not None:
        lines.append(b"C2C-Signature: " + signature.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> Response:
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *header_lines = head.rstrip("\r\n").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def send(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, env: Env, body: bytes, signer: str
) -> Response:
    writer.write(request_head(body, sign_detached(body, env.keys[signer])) + body)
    await writer.drain()
    return await read_response(reader)


@contextlib.asynccontextmanager
async def extra_server(
    env: Env, *, context: ssl.SSLContext | None = None, max_body_bytes: int = 1_048_576
) -> AsyncIterator[PartnerHttpsServer]:
    """A second partner endpoint in front of the running gateway's pipeline."""
    config = env.gateway.config
    server = PartnerHttpsServer(
        pipeline=env.gateway.pipeline,
        registry=env.gateway.registry,
        jwks={"keys": []},
        identifier=PartnerIdentifier(config.tls, config.partners),
        ssl_context=context or server_context(config.tls, config.partners.values()),
        limits=config.limits,
        max_body_bytes=max_body_bytes,
        host="127.0.0.1",
        port=0,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_each_kept_alive_connection_stays_tied_to_its_own_partner(env: Env) -> None:
    url = env.gateway.partner_url
    sent: list[tuple[str, str]] = []
    async with connection(url, env, MX) as mx, connection(url, env, CA) as ca:
        for _ in range(3):
            for (reader, writer), party in ((mx, MX), (ca, CA)):
                legal_basis = LEGAL_BASIS if party == MX else None
                message_id, body = make_message(env, sender=party, legal_basis=legal_basis)
                status, headers, _ = await send(reader, writer, env, body, party)
                assert status == 202
                assert "c2c-signature" in headers
                sent.append((party, message_id))
        # On MX's connection, a message (signed with MX's key) claiming CA as sender.
        _, body = make_message(env, sender=CA, legal_basis=None)
        status, _, _ = await send(*mx, env, body, MX)
        assert status == 403
    for party, message_id in sent:
        stored = await env.gateway.store.get_inbound(party, message_id)
        assert stored is not None
    assert len(await rejections(env, NackCode.SENDER_MISMATCH)) == 1


async def test_certificate_of_no_partner_is_refused_on_every_request(env: Env) -> None:
    async with connection(env.gateway.partner_url, env, US) as (reader, writer):
        for _ in range(2):
            _, body = make_message(env)
            status, headers, answer = await send(reader, writer, env, body, MX)
            assert status == 403
            assert headers["content-type"] == "application/problem+json"
            assert json.loads(answer)["code"] == "SENDER_MISMATCH"
    entries = await rejections(env, NackCode.SENDER_MISMATCH)
    assert len(entries) == 2
    assert all("identifies no configured partner" in entry["reason"] for entry in entries)


async def test_body_trickling_in_after_the_headers_is_read_whole(env: Env) -> None:
    message_id, body = make_message(env)
    signature = sign_detached(body, env.keys[MX])
    async with connection(env.gateway.partner_url, env, MX) as (reader, writer):
        writer.write(request_head(body, signature) + body[:100])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[100:])
        await writer.drain()
        status, _, _ = await read_response(reader)
    assert status == 202
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == body


async def test_endpoint_limit_holds_for_a_body_that_arrived_whole(env: Env) -> None:
    async with (
        extra_server(env, max_body_bytes=64) as server,
        connection(server.url, env, MX) as (reader, writer),
    ):
        # chunked, all in one write: no length declared, the body arrives whole
        chunked = request_head(b"", None).replace(
            b"Content-Length: 0", b"Transfer-Encoding: chunked"
        )
        writer.write(chunked + b"c8\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n")
        await writer.drain()
        status, _, answer = await read_response(reader)
        assert status == 413
        assert json.loads(answer)["code"] == "TOO_LARGE"
        # One byte over the endpoint limit goes on to the pipeline (its own checks answer).
        status, _, _ = await send(reader, writer, env, b"x" * 65, MX)
        assert status == 400
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert "over the endpoint limit of 64 bytes" in entries[0]["reason"]


async def test_a_declared_length_over_the_endpoint_limit_is_refused_before_its_body(
    env: Env,
) -> None:
    """T36: the head alone decides; the gateway neither waits for nor reads the body (here it
    never comes: reading would end in the body deadline's 408, not a 413)."""
    async with (
        extra_server(env, max_body_bytes=64) as server,
        connection(server.url, env, MX) as (reader, writer),
    ):
        head = request_head(b"x" * 100_000_000, None)
        writer.write(head + b"x" * 1000)
        await writer.drain()
        async with asyncio.timeout(5):
            status, headers, answer = await read_response(reader)
            assert await reader.read() == b""
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(answer)["code"] == "TOO_LARGE"
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert entries[0]["reason"] == (
        "declared Content-Length 100000000 over the endpoint limit of 64 bytes (not read)"
    )


async def _remembered_after_two_requests(env: Env, context: ssl.SSLContext | None) -> int:
    async with (
        extra_server(env, context=context) as server,
        connection(server.url, env, MX) as (reader, writer),
    ):
        for _ in range(2):
            _, body = make_message(env)
            status, _, _ = await send(reader, writer, env, body, MX)
            assert status == 202
        return len(server._peers)


async def test_partner_is_remembered_per_connection_only_without_renegotiation(
    env: Env,
) -> None:
    config = env.gateway.config
    assert await _remembered_after_two_requests(env, None) == 1
    # TLS 1.2 with renegotiation allowed: the certificate could change, identify every time.
    renegotiable = server_context(config.tls, config.partners.values())
    renegotiable.options &= ~ssl.OP_NO_RENEGOTIATION
    renegotiable.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await _remembered_after_two_requests(env, renegotiable) == 0
