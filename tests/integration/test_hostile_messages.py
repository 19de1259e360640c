"""Hostile messages at the partner endpoint over real mutual TLS (RELIABILITY-SECURITY.md T13
kid injection, T19 ECDSA malleability, T45 concurrent duplicates, T46 cross-partner ids, T73
receipt-signing key unavailable)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from https_env import (
    GB,
    MX,
    Env,
    check_receipt,
    make_message,
    post,
    rejections,
    running_gateway,
    wait_delivered,
    wait_relayed,
    write_environment,
)

from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.crypto.jws import raw_sign, sign_detached, signing_input
from gateway.crypto.keys import KeyRing, b64url, load_signing_key
from gateway.envelope import body_digest
from gateway.errors import NackCode
from gateway.runtime import Gateway
from gateway.store.base import InboundRecord
from gateway.transports.bus import MemoryBus

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@contextlib.asynccontextmanager
async def started_gateway(root: Path, clock: ManualClock | None = None) -> AsyncIterator[Env]:
    """The gateway of the environment written in ``root``, with a MemoryBus subscriber."""
    bus = MemoryBus()
    delivered: list[InboundRecord] = []
    arrived = asyncio.Event()

    async def consume(record: InboundRecord) -> None:
        delivered.append(record)
        arrived.set()

    bus.subscribe(consume)
    gateway = Gateway(load_config(root / "gateway.toml"), clock=clock, bus=bus)
    await gateway.start()
    keys = {
        pid: load_signing_key(root / "pki" / pid / "sign.key", party=pid, alg="EdDSA")
        for pid in (MX, GB)
    }
    our_keys = KeyRing(key.verification_key() for key in gateway.signing_keys)
    try:
        yield Env(root, gateway, delivered, arrived, keys, our_keys)
    finally:
        await gateway.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path) as running:
        yield running


# --- T13: kid injection --------------------------------------------------------------------


def forged_kid_jws(env: Env, body: bytes, kid: str) -> str:
    """A well-formed JWS really signed by MX's key, whose header names ``kid``."""
    protected = b64url(json.dumps({"alg": "EdDSA", "kid": kid, "typ": "c2c+json"}).encode("utf-8"))
    return f"{protected}..{b64url(raw_sign(env.keys[MX], signing_input(protected, body)))}"


HOSTILE_KIDS = {
    "path": "../../../../etc/passwd",
    "sql": "' OR '1'='1'; DROP TABLE inbound; --",
    "log forging": 'x\n{"event":"approved","level":"info"}\r\x1b[2J\u202e',
    "long": "k" * 700,
}


@pytest.mark.parametrize("kid", list(HOSTILE_KIDS), ids=list(HOSTILE_KIDS))
async def test_hostile_kid_is_unknown_key_and_logged_escaped_and_truncated(
    env: Env, kid: str
) -> None:
    message_id, body = make_message(env)
    value = HOSTILE_KIDS[kid]
    with structlog.testing.capture_logs() as logs:
        answer = await post(env, body, signature=forged_kid_jws(env, body, value))
    assert answer.status == 401
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.code == NackCode.UNKNOWN_KEY
    assert value not in answer.body.decode("utf-8", "replace")
    [entry] = await rejections(env, NackCode.UNKNOWN_KEY)
    logged = [e for e in logs if e["event"] == "inbound_rejected"]
    assert len(logged) == 1
    for reason in (entry["reason"], logged[0]["reason"]):
        assert "names no key configured for MX-ANAM" in reason
        assert len(reason) < 200
        assert not any(ord(char) < 0x20 or char in "\x7f\u202e" for char in reason)
        assert value not in reason or len(value) <= 64
    assert await env.gateway.store.get_inbound(MX, message_id) is None


async def test_five_kilobyte_kid_is_refused_before_any_lookup(env: Env) -> None:
    message_id, body = make_message(env)
    kid = "A" * 5_000
    with structlog.testing.capture_logs() as logs:
        answer = await post(env, body, signature=forged_kid_jws(env, body, kid))
    assert answer.status == 401
    assert check_receipt(env, answer, message_id=message_id, body=body).code == (
        NackCode.SIGNATURE_INVALID
    )
    [entry] = await rejections(env, NackCode.SIGNATURE_INVALID)
    assert "over the 1366-character limit" in entry["reason"]
    assert kid[:100] not in entry["reason"]
    assert all(kid[:100] not in str(event) for event in logs)


async def test_ten_kilobyte_kid_never_reaches_the_pipeline(env: Env) -> None:
    # The C2C-Signature header line is over aiohttp's 8190-byte field limit: the HTTP
    # parser refuses it, so no stage runs and nothing is stored or audited.
    message_id, body = make_message(env)
    answer = await post(env, body, signature=forged_kid_jws(env, body, "A" * 10_240))
    assert answer.status == 400
    assert len(answer.body) < 400
    assert await env.gateway.store.get_inbound(MX, message_id) is None
    assert await env.gateway.store.audit_size() == 0


# --- T19: ECDSA malleability ---------------------------------------------------------------


@pytest.fixture
async def es256_env(tmp_path: Path) -> AsyncIterator[Env]:
    """MX-ANAM signs with a P-256 key (ES256) instead of its Ed25519 key."""
    write_environment(tmp_path)
    private = ec.generate_private_key(ec.SECP256R1())
    key_dir = tmp_path / "pki" / MX
    (key_dir / "es256.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (key_dir / "es256.pub").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    partner_toml = tmp_path / "partners" / MX / "partner.toml"
    partner_toml.write_text(
        partner_toml.read_text().replace(
            'path = "../../pki/MX-ANAM/sign.pub"\nalg = "EdDSA"',
            'path = "../../pki/MX-ANAM/es256.pub"\nalg = "ES256"',
        )
    )
    async with started_gateway(tmp_path) as running:
        running.keys[MX] = load_signing_key(key_dir / "es256.key", party=MX, alg="ES256")
        yield running


async def test_malleated_ecdsa_signature_is_a_duplicate_not_a_new_message(
    es256_env: Env,
) -> None:
    env = es256_env
    message_id, body = make_message(env)
    signature = sign_detached(body, env.keys[MX])
    protected, _, encoded = signature.split(".")
    raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = f"{protected}..{b64url(r.to_bytes(32, 'big') + (P256_N - s).to_bytes(32, 'big'))}"
    assert twin != signature

    first = await post(env, body, signature=signature)
    second = await post(env, body, signature=twin)
    assert first.status == 202, first.body
    # (r, n-s) verifies too; the id and digest decide, so it is the same message.
    assert second.status == 200, second.body
    assert second.body == first.body
    assert second.headers["C2C-Signature"] == first.headers["C2C-Signature"]
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.signature == signature
    await wait_delivered(env, 1)
    assert len(env.delivered) == 1


# --- T45 / T46: concurrent duplicates and cross-partner ids ---------------------------------


async def test_concurrent_identical_posts_store_once_and_all_get_the_receipt(env: Env) -> None:
    message_id, body = make_message(env)
    answers = await asyncio.gather(*(post(env, body) for _ in range(25)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [200] * 24 + [202], statuses
    assert {answer.body for answer in answers} == {answers[0].body}
    receipt = check_receipt(env, answers[0], message_id=message_id, body=body)
    assert receipt.status == "ACK"
    await wait_delivered(env, 1)
    assert [(r.sender, r.message_id) for r in env.delivered] == [(MX, message_id)]
    await wait_relayed(env.gateway.store)


async def test_same_message_id_from_two_partners_is_two_messages(env: Env) -> None:
    message_id, mx_body = make_message(env)
    _, gb_body = make_message(env, sender=GB, legal_basis=None, message_id=message_id)
    mx_answer = await post(env, mx_body)
    gb_answer = await post(env, gb_body, cert=GB, signer=GB)
    assert (mx_answer.status, gb_answer.status) == (202, 202)
    check_receipt(env, gb_answer, message_id=message_id, body=gb_body, recipient=GB)
    mx_row = await env.gateway.store.get_inbound(MX, message_id)
    gb_row = await env.gateway.store.get_inbound(GB, message_id)
    assert mx_row is not None
    assert gb_row is not None
    assert (mx_row.body, gb_row.body) == (mx_body, gb_body)
    await wait_delivered(env, 2)
    assert sorted((r.sender, r.message_id) for r in env.delivered) == sorted(
        [(MX, message_id), (GB, message_id)]
    )


# --- T73: receipt-signing key unavailable --------------------------------------------------


async def test_no_valid_receipt_key_is_503_and_nothing_acknowledged(tmp_path: Path) -> None:
    """Our only signing key expires while serving: nothing can be ACKed, so nothing is stored;
    once the rotated-in key becomes valid, the partner's retry is accepted exactly once."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    write_environment(tmp_path)
    successor = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "pki" / "US-CBP" / "next.key").write_bytes(
        successor.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    gateway_toml = tmp_path / "gateway.toml"
    gateway_toml.write_text(
        gateway_toml.read_text().replace(
            'path = "pki/US-CBP/sign.key"\nalg = "EdDSA"\n',
            'path = "pki/US-CBP/sign.key"\nalg = "EdDSA"\n'
            f"not_after = {(start + dt.timedelta(hours=1)).isoformat()}\n\n"
            '[[signing_keys]]\npath = "pki/US-CBP/next.key"\nalg = "EdDSA"\n'
            f"not_before = {(start + dt.timedelta(hours=3)).isoformat()}\n",
        )
    )
    clock = ManualClock(start)
    async with started_gateway(tmp_path, clock) as env:
        clock.advance(dt.timedelta(hours=2))
        message_id, body = make_message(env, created_at=clock.now())
        with structlog.testing.capture_logs() as logs:
            answer = await post(env, body)
        assert answer.status == 503, answer.body
        assert "C2C-Signature" not in answer.headers
        assert answer.json()["code"] == "UNAVAILABLE"
        assert await env.gateway.store.get_inbound(MX, message_id) is None
        [entry] = await rejections(env, NackCode.UNAVAILABLE)
        assert entry["reason"].startswith("receipt signing key unavailable: no signing key")
        assert entry["body_digest"] == body_digest(body)
        assert any(e["event"] == "nack_not_signed" for e in logs)
        assert not any(e.get("log_level") == "critical" for e in logs)

        # A refusal for another reason is still answered with its own code, unsigned.
        stale_id, stale = make_message(env, created_at=clock.now() - dt.timedelta(hours=1))
        refused = await post(env, stale)
        assert refused.status == 422
        assert refused.json()["code"] == "STALE"

        clock.advance(dt.timedelta(hours=1, minutes=1))
        retry = await post(env, body, signature=sign_detached(body, env.keys[MX]))
        assert retry.status == 422  # created_at is now outside the replay window
        message_id, body = make_message(env, created_at=clock.now())
        accepted = await post(env, body)
        assert accepted.status == 202, accepted.body
        receipt = check_receipt(env, accepted, message_id=message_id, body=body)
        assert receipt.status == "ACK"
        assert await env.gateway.store.get_inbound(MX, stale_id) is None


async def test_resend_of_an_accepted_message_gets_its_receipt_without_a_signing_key(
    tmp_path: Path,
) -> None:
    """The original receipt is stored; a re-send needs no new signature, so it is answered
    200 with those bytes even while no signing key is valid (nothing new is acknowledged)."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    write_environment(tmp_path)
    gateway_toml = tmp_path / "gateway.toml"
    gateway_toml.write_text(
        gateway_toml.read_text().replace(
            'path = "pki/US-CBP/sign.key"\nalg = "EdDSA"\n',
            'path = "pki/US-CBP/sign.key"\nalg = "EdDSA"\n'
            f"not_after = {(start + dt.timedelta(hours=1)).isoformat()}\n",
        )
    )
    clock = ManualClock(start + dt.timedelta(minutes=59))
    async with started_gateway(tmp_path, clock) as env:
        _, body = make_message(env, created_at=clock.now())
        first = await post(env, body)
        assert first.status == 202, first.body
        clock.advance(dt.timedelta(minutes=2))
        again = await post(env, body, signature=sign_detached(body, env.keys[MX]))
        assert again.status == 200, again.body
        assert again.body == first.body
        assert again.headers["C2C-Signature"] == first.headers["C2C-Signature"]
        other_id, other = make_message(env, created_at=clock.now())
        refused = await post(env, other)
        assert refused.status == 503
        assert await env.gateway.store.get_inbound(MX, other_id) is None
