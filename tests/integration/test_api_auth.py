"""Internal API bearer tokens over real TLS: every refusal has its exact status and body."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import pytest
import structlog
from outbound_env import Running, auth, client_ssl, example, token

from gateway.crypto.keys import jwk_thumbprint, load_signing_key, read_public_key


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(running: Running, **overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    base = {
        "iss": running.config.api_auth.issuer,
        "aud": running.config.api_auth.audience,
        "sub": "attacker",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "scope": "c2c:send c2c:query audit:read admin",
    }
    base.update(overrides)
    return base


def api_kid(running: Running) -> str:
    return jwk_thumbprint(read_public_key(running.config.api_auth.public_keys[0]))


async def call(
    running: Running, bearer: str | None, *, method: str = "GET", path: str = "/api/v1/messages"
) -> tuple[int, dict[str, Any], str | None]:
    headers = auth(bearer) if bearer is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, running.api_url + path, headers=headers, ssl=client_ssl(running.config)
        ) as response,
    ):
        assert response.content_type == "application/problem+json" or response.status < 400
        return response.status, await response.json(), response.headers.get("WWW-Authenticate")


def unauthorized(detail: str) -> dict[str, Any]:
    return {"type": "about:blank", "title": "Unauthorized", "status": 401, "detail": detail}


async def test_valid_token_is_accepted(us: Running) -> None:
    status, body, _ = await call(us, token(us.config))
    assert status == 200
    assert body == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("path", "cache_control"),
    [
        ("/api/v1/messages?direction=inbound", "no-store"),
        ("/api/v1/audit/entries", "no-store"),
        ("/api/v1/messages/0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e10", "no-store"),  # a 404
        ("/console/", "no-cache"),
    ],
)
async def test_no_answer_is_kept_by_a_cache(us: Running, path: str, cache_control: str) -> None:
    # enforcement data (messages, audit entries, refusals naming them) is never stored by a
    # browser or a proxy; the console's page and scripts are revalidated
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            us.api_url + path, headers=auth(token(us.config)), ssl=client_ssl(us.config)
        ) as response,
    ):
        assert response.headers["Cache-Control"] == cache_control
    async with (
        aiohttp.ClientSession() as session,
        session.get(us.api_url + path, ssl=client_ssl(us.config)) as response,
    ):
        assert response.headers["Cache-Control"] == cache_control


async def test_missing_token(us: Running) -> None:
    status, body, challenge = await call(us, None)
    assert status == 401
    assert body == unauthorized("missing Authorization header (expected: Bearer <JWT>)")
    assert challenge is not None
    assert challenge.startswith('Bearer error="invalid_token"')


async def test_expired_token(us: Running) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    status, body, _ = await call(us, token(us.config, now=issued, ttl_s=60))
    assert status == 401
    expired = (issued + timedelta(seconds=60)).isoformat()
    assert body == unauthorized(f"token expired at {expired}")


async def test_wrong_audience(us: Running) -> None:
    status, body, _ = await call(us, token(us.config, audience="urn:c2c:someone-else"))
    assert status == 401
    assert body == unauthorized("token refused: Audience doesn't match")


async def test_alg_none(us: Running) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": api_kid(us)}
    unsigned = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(us)).encode())}."
    status, body, _ = await call(us, unsigned)
    assert status == 401
    assert body == unauthorized("alg 'none' is not allowed (allowed: EdDSA)")


async def test_hs256_keyed_with_the_public_key(us: Running) -> None:
    # CVE-2022-29217 class: an HMAC whose secret is the server's own public key PEM.
    secret = us.config.api_auth.public_keys[0].read_bytes()
    header = {"alg": "HS256", "typ": "JWT", "kid": api_kid(us)}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(us)).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    status, body, _ = await call(us, f"{signing_input}.{b64(mac)}")
    assert status == 401
    assert body == unauthorized("alg 'HS256' is not allowed (allowed: EdDSA)")


@pytest.mark.parametrize("subject", ["", "  "])
async def test_a_token_naming_no_subject_is_refused(us: Running, subject: str) -> None:
    # Properly signed, but it would be audited as the actor "api:", naming nobody.
    assert us.config.api_auth.signing_key is not None
    key = load_signing_key(us.config.api_auth.signing_key, party="api", alg="EdDSA")
    signed = jwt.encode(
        claims(us, sub=subject),
        key.private_key,
        algorithm="EdDSA",
        headers={"kid": api_kid(us), "typ": "JWT"},
    )
    status, body, challenge = await call(us, signed)
    assert status == 401
    assert body == unauthorized("claim sub must be a non-empty string")
    assert challenge is not None
    assert challenge.startswith('Bearer error="invalid_token"')


async def test_missing_scope_is_403_naming_the_scope(us: Running) -> None:
    status, body, challenge = await call(
        us, token(us.config, scopes=["audit:read"]), method="POST", path="/api/v1/messages"
    )
    assert status == 403
    assert body == {
        "type": "about:blank",
        "title": "Forbidden",
        "status": 403,
        "detail": "this operation needs the scope c2c:send",
    }
    assert challenge == 'Bearer error="insufficient_scope", scope="c2c:send"'


async def test_retry_needs_admin(us: Running) -> None:
    path = "/api/v1/messages/01890000-0000-7000-8000-000000000000/retry"
    status, body, _ = await call(
        us, token(us.config, scopes=["c2c:send"]), method="POST", path=path
    )
    assert status == 403
    assert body["detail"] == "this operation needs the scope admin"


async def test_close_needs_admin(us: Running) -> None:
    """Closing a dead message ends its alert: as a retry, an operator's (admin) alone."""
    path = "/api/v1/messages/01890000-0000-7000-8000-000000000000/close"
    for scopes in (["c2c:send"], ["c2c:query", "c2c:receive", "audit:read"]):
        status, body, challenge = await call(
            us, token(us.config, scopes=scopes), method="POST", path=path
        )
        assert status == 403
        assert body["detail"] == "this operation needs the scope admin"
        assert challenge == 'Bearer error="insufficient_scope", scope="admin"'
    status, body, _ = await call(us, None, method="POST", path=path)
    assert status == 401


async def test_probes_need_no_token(us: Running) -> None:
    for path in ("/healthz", "/readyz", "/api/v1/openapi.json"):
        status, _, _ = await call(us, None, path=path)
        assert status == 200, path


async def test_token_is_checked_before_the_body(us: Running) -> None:
    # An unauthenticated caller learns nothing about recipients or schemas.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            us.api_url + "/api/v1/messages",
            json={
                "recipient": "MX-ANAM",
                "message_type": "shipment.status",
                "payload": example(us.gateway, "shipment.status"),
            },
            ssl=client_ssl(us.config),
        ) as response,
    ):
        assert response.status == 401


async def test_every_refusal_is_counted_and_logged_once_a_minute(us: Running) -> None:
    """SRE review L4: a CBP system whose token expired, or someone guessing tokens, got 401
    and left nothing on the gateway's side. Every refusal is counted by reason; the first per
    client address and reason in a minute is logged with the exact reason."""

    def refused(reason: str) -> float | None:
        return us.gateway.metrics.registry.get_sample_value(
            "c2c_api_auth_refused_total", {"reason": reason}
        )

    assert refused("expired") == 0.0
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert (await call(us, token(us.config, now=issued, ttl_s=60)))[0] == 401
        assert (await call(us, None))[0] == 401
        assert (await call(us, "not.a.jwt"))[0] == 401
        scoped = token(us.config, scopes=["audit:read"])
        assert (await call(us, scoped, method="POST", path="/api/v1/messages"))[0] == 403
    assert [refused(r) for r in ("expired", "missing", "invalid", "scope")] == [3, 1, 1, 1]
    lines = [line for line in logs if line["event"] == "api_auth_refused"]
    assert [(line["status"], line["reason"][:13]) for line in lines] == [
        (401, "token expired"),
        (401, "missing Autho"),
        (401, "token header "),
        (403, "test-client l"),
    ], lines
    assert all(line["peer"] == "127.0.0.1" for line in lines)
    assert (
        us.gateway.metrics.registry.get_sample_value(
            "c2c_api_auth_refused_total", {"reason": "bogus"}
        )
        is None
    )
