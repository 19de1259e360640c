"""Outbound: messages per second from internal-API submission to the partner's ACK.

Two ``serve`` processes on loopback: US-CBP takes ``POST /api/v1/messages`` submissions (a
separate load process, 16 keep-alive connections), signs, stores and dispatches them over
mutual TLS to MX-ANAM, whose full inbound path stores each one and answers with its signed
ACK; US-CBP verifies the receipt and records ``acknowledged``. The rate is counted from the
first submission until US-CBP's ``c2c_outbox_depth{state="acknowledged"}`` reaches the total.
The baseline is the raw mutual-TLS POST of the same run (one hop, no work at either end).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import orjson

from bench.common import (
    HOME,
    MESSAGE_TYPE,
    PARTNER,
    LoadResult,
    Serve,
    Table,
    prepare,
    run_load,
    scaled,
    sign_messages,
)
from bench.https_inbound import MESSAGES_PATH, raw_server
from gateway.api.auth import ALL_SCOPES
from gateway.config import load_config
from gateway.crypto.keys import load_signing_key
from gateway.crypto.tokens import issue_token
from gateway.schemas.registry import SchemaRegistry

_ACKED = re.compile(rb'^c2c_outbox_depth\{state="acknowledged"\} (\S+)$', re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def api_token(config_path: Path) -> str:
    config = load_config(config_path)
    assert config.api_auth.signing_key is not None
    key = load_signing_key(config.api_auth.signing_key, party="api", alg="EdDSA")
    return issue_token(
        key,
        issuer=config.api_auth.issuer,
        audience=config.api_auth.audience,
        subject="bench",
        scopes=ALL_SCOPES,
        ttl_s=3600,
        now=dt.datetime.now(dt.UTC),
    )


def submissions(path: Path, count: int) -> Path:
    payload = SchemaRegistry.load_builtin().examples(MESSAGE_TYPE, "1.0")[0]
    line = orjson.dumps(
        {
            "b": orjson.dumps(
                {"recipient": PARTNER, "message_type": MESSAGE_TYPE, "payload": payload}
            ).decode()
        }
    )
    path.write_bytes((line + b"\n") * count)
    return path


async def acknowledged(session: aiohttp.ClientSession, api_url: str) -> int:
    async with session.get(api_url + "/metrics") as response:
        text = await response.read()
    match = _ACKED.search(text)
    return int(float(match.group(1))) if match else 0


async def wait_acknowledged(api_url: str, ca: Path, expected: int, timeout_s: float) -> float:
    """Seconds until ``expected`` messages are acknowledged (polled every 100 ms)."""
    context = ssl.create_default_context(cafile=str(ca))
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() - started < timeout_s:
            if await acknowledged(session, api_url) >= expected:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise RuntimeError(f"fewer than {expected} messages acknowledged within {timeout_s} s")


async def outbound(root: Path) -> Table:
    count = int(scaled(4_000, 1_000))
    pki = root / "pki"
    us_port, mx_port = free_port(), free_port()
    us = prepare(
        root / "us",
        party=HOME,
        peers={PARTNER: f"https://127.0.0.1:{mx_port}"},
        partner_port=us_port,
        pki_dir=pki,
    )
    mx = prepare(
        root / "mx",
        party=PARTNER,
        peers={HOME: f"https://127.0.0.1:{us_port}"},
        partner_port=mx_port,
        pki_dir=pki,
    )
    payloads = submissions(root / "submissions.jsonl", count)
    token = api_token(us)
    sender, receiver = Serve(us), Serve(mx)
    await receiver.start()
    try:
        await sender.start()
        try:
            watch = asyncio.create_task(
                wait_acknowledged(sender.api_url, pki / "ca.pem", count, scaled(600.0, 120.0))
            )
            submitted = await run_load(
                [sender.api_url + "/api/v1/messages"],
                pki=pki,
                payloads=payloads,
                concurrency=16,
                duration_s=3600,
                warmup=0,
                bearer=token,
            )
            elapsed = await watch
        finally:
            await sender.stop()
    finally:
        await receiver.stop()
    if submitted.errors:
        raise RuntimeError(f"submissions refused: {submitted.statuses}")
    raw = await _raw_rate(pki, root)
    table = Table("4. Outbound: API submission to partner ACK, two gateways")
    table.add(f"messages/s ({count:,} submitted, acknowledged)", raw.rate, count / elapsed, "/s")
    table.add("API submission only, messages/s (c=16)", None, submitted.rate, "/s")
    table.add("API submission p50", None, submitted.p50_ms, "ms")
    table.add("API submission p99", None, submitted.p99_ms, "ms")
    table.notes.append(
        "baseline: raw aiohttp mTLS POST of a 2 KB body answered 202, c=16, same run (one hop"
        " with no signing, storing or verifying at either end)"
    )
    return table


async def _raw_rate(pki: Path, root: Path) -> LoadResult:
    payloads = sign_messages(pki, root / "raw.jsonl", count=int(scaled(20_000, 6_000)))
    async with raw_server(pki) as raw:
        return await run_load(
            [f"https://127.0.0.1:{raw.info}{MESSAGES_PATH}"],
            pki=pki,
            payloads=payloads,
            concurrency=16,
            duration_s=scaled(8.0, 3.0),
        )
