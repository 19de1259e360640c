"""No-leak canary (T79) through a real ``c2c-gateway serve``: secrets never reach a log, an
audit entry or an HTTP error body.

Canaries: lines of the private keys the gateway loads (message signing, TLS, audit), the API
token it accepts and forged tokens in Authorization headers, message bodies (accepted and
rejected, partner and API side, with control characters and fake JSON log fragments), the
partner's detached signatures. Traffic includes NACKs, 401s, 400s and an accepted message.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from outbound_env import gateway_config, token
from serve_proc import ServeProcess, partner_client_ssl

from gateway.clock import SystemClock
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import load_signing_key
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.schemas.registry import SchemaRegistry
from gateway.store import open_store
from gateway.store.base import AuditFilter
from gateway.transports.https_server import MESSAGES_PATH

BODY_CANARY = "CANARYBODY7f3a9c"
TOKEN_CANARY = "eyJhbGciOiJFZERTQSJ9.eyJDQU5BUllUT0tFTiI6MX0.Q0FOQVJZU0lHTkFUVVJFQ0FOQVJZ"
INJECTION = f'{BODY_CANARY}\n{{"level":"info","event":"approved"}}\x1b[31m\u202e'


def _pem_lines(path: Path) -> list[str]:
    """Two base64 lines from inside a private key PEM: enough to identify the key."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("-----")]
    return [ln[:40] for ln in lines[:2] if len(ln) >= 20]


def _message(pki: Path, payload: dict[str, Any], message_type: str) -> tuple[bytes, str]:
    key = load_signing_key(pki / "MX-ANAM" / "sign.key", party="MX-ANAM", alg="EdDSA")
    header = Header(
        message_id=new_message_id(),
        message_type=message_type,
        schema_version="1.0",
        sender="MX-ANAM",
        recipient="US-CBP",
        created_at=dt.datetime.now(dt.UTC),
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=7),
        legal_basis="CMAA US-MX art. 3",
    )
    body = encode_envelope(header, payload)
    return body, sign_detached(body, key)


async def test_canaries_never_leak(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    pki = tmp_path / "pki"
    secret_files = [
        config.audit.key,
        *(k.path for k in config.signing_keys),
        config.tls.key,
        pki / "MX-ANAM" / "sign.key",
    ]
    canaries = [BODY_CANARY, TOKEN_CANARY]
    for path in secret_files:
        canaries += _pem_lines(path)
    good_token = token(config, ("c2c:send", "audit:read", "admin"))
    canaries.append(good_token.rsplit(".", 1)[1])

    server = ServeProcess(config.source)
    await server.start()
    answers: list[bytes] = []
    signatures: list[str] = []
    try:
        registry = SchemaRegistry.load_builtin()
        payload = registry.examples("shipment.advance_data", "1.0")[0]
        # a string field of the example carries the canary (accepted), and bad ones (rejected)
        marked = example_with(payload, INJECTION)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=partner_client_ssl(pki))
        ) as partner:
            for body_payload, tamper in (
                (payload, False),
                (marked, False),
                ({"cargo": INJECTION}, False),
                (payload | {"extra": INJECTION}, False),
                (payload, True),
            ):
                body, signature = _message(pki, body_payload, "shipment.advance_data")
                if tamper:
                    body = body.replace(b"}", f',"x":"{BODY_CANARY}"}}'.encode(), 1)
                signatures.append(signature.split(".")[-1])
                for sig in (signature, f"{signature}{BODY_CANARY}", TOKEN_CANARY):
                    async with partner.post(
                        server.partner_url + MESSAGES_PATH,
                        data=body,
                        headers={"Content-Type": "application/json", "C2C-Signature": sig},
                    ) as response:
                        answers.append(await response.read())
            async with partner.post(
                server.partner_url + MESSAGES_PATH,
                data=INJECTION.encode() * 20,
                headers={"Content-Type": "application/json", "C2C-Signature": TOKEN_CANARY},
            ) as response:
                answers.append(await response.read())

        api_ssl = ssl.create_default_context(cafile=str(config.tls.ca))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=api_ssl)) as api:
            submission = {
                "recipient": "MX-ANAM",
                "message_type": "shipment.status",
                "payload": example_with(registry.examples("shipment.status", "1.0")[0], INJECTION),
            }
            plain = submission | {"payload": registry.examples("shipment.status", "1.0")[0]}
            for bearer in (good_token, TOKEN_CANARY, f"{good_token}{BODY_CANARY}"):
                for document in (plain, submission, submission | {"payload": {"x": INJECTION}}):
                    async with api.post(
                        f"{server.api_url}/api/v1/messages",
                        json=document,
                        headers={"Authorization": f"Bearer {bearer}"},
                    ) as response:
                        answers.append(await response.read())
            async with api.get(
                f"{server.api_url}/api/v1/audit/entries?outcome={BODY_CANARY}x",
                headers={"Authorization": f"Basic {TOKEN_CANARY}"},
            ) as response:
                answers.append(await response.read())
            async with api.get(
                f"{server.api_url}/api/v1/audit/entries?limit=1000",
                headers={"Authorization": f"Bearer {good_token}"},
            ) as response:
                assert response.status == 200
                listed = await response.read()
    finally:
        assert await server.stop() == 0
    canaries += [s[:40] for s in signatures]

    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        entries = [r.entry for r in await store.audit_entries(AuditFilter(), limit=100_000)]
    finally:
        await store.close()
    events = [orjson.loads(e)["event"] for e in entries]
    assert events.count("accepted") >= 1, events
    assert "rejected" in events
    assert "submitted" in events

    log = bytes(server.stderr_log)
    # the rejections were logged (with their escaped reasons), so the grep below has material
    assert log.count(b'"event": "inbound_rejected"') >= 5
    sinks = {
        "stderr": log,
        "audit": b"\n".join(entries),
        "http": b"\n".join(answers),
        "api listing": listed,
    }
    leaks = [
        f"{canary[:12]}... in {sink}"
        for canary in canaries
        for sink, data in sinks.items()
        if canary.encode() in data
    ]
    assert leaks == []
    # nothing partner-controlled forges a line or smuggles terminal escapes
    for line in log.splitlines():
        assert b"\x1b" not in line
        assert json.loads(line)["event"] != "approved"


def example_with(payload: dict[str, Any], text: str) -> dict[str, Any]:
    out = dict(payload)
    for name, value in out.items():
        if isinstance(value, str):
            out[name] = value[:1] + text
            break
    return out
