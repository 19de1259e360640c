"""HTTP-layer abuse of the partner endpoint (RELIABILITY-SECURITY.md T33, T35, T36, T38, T39)
with raw bytes over real mutual TLS on loopback: compressed bodies are refused without being
inflated, smuggling probes and oversized heads get a 4xx and a closed connection, a
pipelining flood stays bounded, other methods get 405, traversal gets 404, and no route serves
files."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from https_env import MX, Env, make_message, post, rejections, running_gateway

from gateway.crypto.jws import sign_detached
from gateway.envelope import body_digest
from gateway.errors import NackCode
from gateway.logging import _BAD_REQUESTS, _OneLineBadRequests

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path) as running:
        yield running


async def exchange(env: Env, data: bytes, *, deadline_s: float = 10.0) -> tuple[list[int], bytes]:
    """Send raw bytes on one mTLS connection, read until the server closes it; return every
    response status seen and the raw answer."""
    url = urlsplit(env.gateway.partner_url)
    reader, writer = await asyncio.open_connection(
        url.hostname, url.port, ssl=env.client_ssl(MX), server_hostname="127.0.0.1"
    )
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(deadline_s):
            answer = await reader.read(-1)
    finally:
        writer.close()
    return [int(code) for code in _STATUS.findall(answer)], answer


def head(request_line: bytes, *headers: bytes) -> bytes:
    return request_line + b"\r\nHost: 127.0.0.1\r\n" + b"".join(h + b"\r\n" for h in headers)


async def assert_still_serving(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body)
    assert answer.status == 202, answer.body
    assert await env.gateway.store.get_inbound(MX, message_id) is not None


# --- T33: content encoding ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "GZIP", "identity, gzip"])
async def test_compressed_body_is_refused_without_inflating_it(env: Env, encoding: str) -> None:
    # 16 MiB of zeros in about 16 KiB: inflating it would be visible as a digest of the
    # inflated bytes (and as memory); the audit must record the digest of what was sent.
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
    answer = await post(
        env,
        bomb,
        signature=sign_detached(bomb, env.keys[MX]),
        headers={"Content-Encoding": encoding},
    )
    assert answer.status == 400
    assert answer.json()["code"] == "MALFORMED"
    entries = await rejections(env, NackCode.MALFORMED)
    assert len(entries) == 1
    assert entries[0]["body_digest"] == body_digest(bomb)
    assert "Content-Encoding" in entries[0]["reason"]
    assert await env.gateway.store.pending_relay(10) == []


# --- T35: request smuggling ---------------------------------------------------------------

_SMUGGLED_GET = b"GET /c2c/v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

SMUGGLING = {
    "CL and TE": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Content-Type: application/json",
        b"Content-Length: 5",
        b"Transfer-Encoding: chunked",
    )
    + b"\r\n0\r\n\r\n"
    + _SMUGGLED_GET,
    "TE chunked, identity": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Content-Type: application/json",
        b"Transfer-Encoding: chunked, identity",
    )
    + b"\r\n0\r\n\r\n"
    + _SMUGGLED_GET,
    "two CL": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Content-Type: application/json",
        b"Content-Length: 0",
        b"Content-Length: 47",
    )
    + b"\r\n"
    + _SMUGGLED_GET,
    "LF in chunk extension": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Content-Type: application/json",
        b"Transfer-Encoding: chunked",
    )
    + b"\r\n2;a\nb\r\n{}\r\n0\r\n\r\n"
    + _SMUGGLED_GET,
    "bare CR in a header": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"X-Probe: a\rTransfer-Encoding: chunked",
        b"Content-Length: 0",
    )
    + b"\r\n"
    + _SMUGGLED_GET,
    "space before colon": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Transfer-Encoding : chunked",
        b"Content-Length: 0",
    )
    + b"\r\n"
    + _SMUGGLED_GET,
    "non-ASCII method": head("PÖST /c2c/v1/messages HTTP/1.1".encode()) + b"\r\n",
    "bad version": head(b"POST /c2c/v1/messages HTTP/1.1x") + b"\r\n",
    "obsolete line folding": head(
        b"POST /c2c/v1/messages HTTP/1.1",
        b"Content-Length: 0",
        b" Transfer-Encoding: chunked",
    )
    + b"\r\n"
    + _SMUGGLED_GET,
}


@pytest.mark.parametrize("probe", list(SMUGGLING), ids=list(SMUGGLING))
async def test_smuggling_probe_gets_400_and_a_closed_connection(env: Env, probe: str) -> None:
    statuses, answer = await exchange(env, SMUGGLING[probe])
    # One refusal, then the server hangs up: the smuggled GET is never answered.
    assert statuses == [400], answer[:300]
    assert b'"keys"' not in answer
    assert await rejections(env, NackCode.MALFORMED) == []
    assert env.gateway.store is not None
    assert await env.gateway.store.pending_relay(10) == []


async def test_websocket_upgrade_on_ingest_is_not_switched(env: Env) -> None:
    statuses, answer = await exchange(
        env,
        head(
            b"GET /c2c/v1/messages HTTP/1.1",
            b"Connection: Upgrade, close",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        )
        + b"\r\n",
    )
    assert statuses == [405], answer[:300]


# --- T36: header floods --------------------------------------------------------------------

FLOODS = {
    "10,000 headers": head(
        b"POST /c2c/v1/messages HTTP/1.1", *(b"X-H%d: v" % i for i in range(10_000))
    )
    + b"\r\n",
    "one 100 KB header line": head(b"POST /c2c/v1/messages HTTP/1.1", b"X-Big: " + b"a" * 102_400)
    + b"\r\n",
    "64 KB request line": head(b"POST /c2c/v1/messages?" + b"a" * 65_536 + b" HTTP/1.1") + b"\r\n",
    "100 KB header name": head(b"POST /c2c/v1/messages HTTP/1.1", b"X" * 102_400 + b": v")
    + b"\r\n",
}


@pytest.mark.parametrize("flood", list(FLOODS), ids=list(FLOODS))
async def test_header_flood_is_refused_and_closed(env: Env, flood: str) -> None:
    statuses, answer = await exchange(env, FLOODS[flood])
    assert len(statuses) == 1, answer[:300]
    assert statuses[0] in {400, 414, 431}, answer[:300]
    await assert_still_serving(env)


# --- T38: pipelining -----------------------------------------------------------------------


async def test_pipelined_flood_is_answered_in_order_or_cut_and_stays_bounded(env: Env) -> None:
    count = 2_000
    requests = b"GET /c2c/v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * (count - 1)
    requests += b"GET /c2c/v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    statuses, _ = await exchange(env, requests, deadline_s=30.0)
    # Either every request is answered (reading paused while the queue was full) or the
    # server cut the connection; never a 5xx, never an answer to a request not sent.
    assert 0 < len(statuses) <= count, len(statuses)
    assert set(statuses) == {200}
    assert len(asyncio.all_tasks()) < 100
    await assert_still_serving(env)


async def test_pipelined_posts_all_get_their_own_receipts(env: Env) -> None:
    bodies = [make_message(env) for _ in range(40)]
    data = b""
    for _, body in bodies:
        data += head(
            b"POST /c2c/v1/messages HTTP/1.1",
            b"Content-Type: application/json",
            b"C2C-Signature: " + sign_detached(body, env.keys[MX]).encode(),
            b"Content-Length: %d" % len(body),
        )
        data += b"\r\n" + body
    data += head(b"GET /c2c/v1/keys HTTP/1.1", b"Connection: close") + b"\r\n"
    statuses, _ = await exchange(env, data, deadline_s=30.0)
    assert statuses == [202] * len(bodies) + [200]
    for message_id, body in bodies:
        stored = await env.gateway.store.get_inbound(MX, message_id)
        assert stored is not None
        assert stored.body == body


# --- T39: methods and paths ----------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"])
async def test_other_methods_on_ingest_get_405(env: Env, method: bytes) -> None:
    statuses, answer = await exchange(
        env,
        head(method + b" /c2c/v1/messages HTTP/1.1", b"Connection: close", b"Content-Length: 0")
        + b"\r\n",
    )
    assert statuses == [405], answer[:300]
    assert b"Allow: POST" in answer


TRAVERSALS = [
    b"/c2c/v1/schemas/..%2f..%2f..%2fetc%2fpasswd/1.0",
    b"/c2c/v1/schemas/%2e%2e/%2e%2e/etc/passwd",
    b"/c2c/v1/schemas/%252e%252e%252f%252e%252e/passwd",
    b"/c2c/v1/../../../etc/passwd",
    b"/partners/..%2f..%2fetc%2fpasswd/messages",
    b"/c2c/v1/messages/../../../../etc/passwd",
    b"/etc/passwd",
    b"/static/../pyproject.toml",
    b"/gateway.toml",
    b"/c2c/v1/schemas/shipment.advance_data/..%2f..%2f..%2fconfig",
    b"/" + b"a/" * 3000,
]


@pytest.mark.parametrize("path", TRAVERSALS, ids=[p[:40].decode() for p in TRAVERSALS])
async def test_traversal_and_unknown_paths_get_404(env: Env, path: bytes) -> None:
    statuses, answer = await exchange(
        env, head(b"GET " + path + b" HTTP/1.1", b"Connection: close") + b"\r\n"
    )
    assert statuses == [404], answer[:300]
    assert b"root:" not in answer
    assert b"[tls]" not in answer


def test_no_static_websocket_or_catch_all_routes(env: Env) -> None:
    app = env.gateway.partner_server.make_app()
    routes = sorted(
        (route.method, route.resource.canonical if route.resource else "")
        for route in app.router.routes()
    )
    assert routes == [
        ("GET", "/c2c/v1/keys"),
        ("GET", "/c2c/v1/schemas"),
        ("GET", "/c2c/v1/schemas/{message_type}/{schema_version}"),
        ("POST", "/c2c/v1/messages"),
    ]
    assert not any(isinstance(r, web.StaticResource) for r in app.router.resources())


async def test_schema_route_does_not_read_files_by_path(env: Env) -> None:
    statuses, answer = await exchange(
        env,
        head(b"GET /c2c/v1/schemas/_shared/customs.defs HTTP/1.1", b"Connection: close") + b"\r\n",
    )
    assert statuses == [404], answer[:300]
    problem = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert problem["status"] == 404


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
async def test_other_media_types_on_ingest_are_malformed(env: Env, content_type: str) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body, headers={"Content-Type": content_type})
    assert answer.status == 400
    entries = await rejections(env, NackCode.MALFORMED)
    assert len(entries) == 1
    assert f"Content-Type '{content_type}' is not MX-ANAM's" in entries[0]["reason"]
    assert await env.gateway.store.get_inbound(MX, message_id) is None


@pytest.fixture
def bad_request_log() -> Iterator[list[float]]:
    """The aiohttp.server filter swapped for a fresh one on a clock the test moves (the
    process-wide one remembers what earlier tests refused); yields that clock."""
    server = logging.getLogger("aiohttp.server")
    clock = [1_000.0]
    fresh = _OneLineBadRequests(monotonic=lambda: clock[0])
    had = _BAD_REQUESTS in server.filters
    server.removeFilter(_BAD_REQUESTS)
    server.addFilter(fresh)
    try:
        yield clock
    finally:
        server.removeFilter(fresh)
        if had:
            server.addFilter(_BAD_REQUESTS)


async def test_a_refused_request_is_logged_as_one_line(
    env: Env, caplog: pytest.LogCaptureFixture, bad_request_log: list[float]
) -> None:
    """aiohttp would log each unparseable request with a traceback: kilobytes of log per
    request, for any connected peer to make."""
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        statuses, _ = await exchange(env, SMUGGLING["two CL"])
    assert statuses == [400]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.exc_text is None
    assert "Error handling request" in record.getMessage()
    assert "BadHttpMessage" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert "unlogged_since" not in record.getMessage()


async def test_a_flood_of_refused_requests_is_one_line_per_kind_a_minute(
    env: Env, caplog: pytest.LogCaptureFixture, bad_request_log: list[float]
) -> None:
    """T79: a peer sending bad requests in a loop cannot make the gateway write a line for
    each; what went unlogged is counted on the next line of its kind."""
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        for _ in range(5):
            assert (await exchange(env, SMUGGLING["two CL"]))[0] == [400]
        for _ in range(3):
            assert len((await exchange(env, FLOODS["one 100 KB header line"]))[0]) == 1
        first = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
        bad_request_log[0] += 59.0
        assert (await exchange(env, SMUGGLING["two CL"]))[0] == [400]
        bad_request_log[0] += 1.0
        assert (await exchange(env, SMUGGLING["two CL"]))[0] == [400]
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert len(first) == 2, first
    assert "BadHttpMessage" in first[0], first
    assert "LineTooLong" in first[1], first
    assert len(lines) == 3, lines
    assert "BadHttpMessage" in lines[2], lines
    assert lines[2].endswith("(unlogged_since=5)"), lines
    await assert_still_serving(env)
