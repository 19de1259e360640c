"""``sign_with = "ES256"``: two real gateways over mutual TLS, made with the sandbox's
``alg="ES256"``. Everything US-CBP signs toward MX-ANAM (its ACK and NACK receipts, an exact
re-send's original receipt, its messages, a message signed again) is ES256 with US-CBP's P-256
key, and CA-CBSA, set back to EdDSA, still gets EdDSA. Every signature is checked by hand with
``cryptography`` over the JWS signing input, never with the gateway's own JWS code."""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from outbound_env import RETRYING_OUTBOX, Running, free_port, row_until, start_gateway, submit_to

from gateway.config import load_config
from gateway.devenv import prepare_dev_environment
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.outbound.dispatcher import sign_again
from gateway.store.base import OutboundState

US, MX, CA = "US-CBP", "MX-ANAM", "CA-CBSA"
KEY_FILES = {"EdDSA": "sign", "ES256": "sign-es256"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_jws(signature: str, body: bytes, pki: Path, party: str, alg: str) -> dict[str, Any]:
    """The detached JWS verifies over ``body`` with ``party``'s ``alg`` public key; its header."""
    protected, payload, sig = signature.split(".")
    assert payload == ""
    header: dict[str, Any] = json.loads(_unb64(protected))
    stem = KEY_FILES[alg]
    assert header["alg"] == alg
    assert header["kid"] == (pki / party / f"{stem}.kid").read_text().strip()
    public = serialization.load_pem_public_key((pki / party / f"{stem}.pub").read_bytes())
    signing_input = f"{protected}.{_b64(body)}".encode()
    raw = _unb64(sig)
    if alg == "ES256":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert len(raw) == 64  # RFC 7518 section 3.4: r || s, not DER
        der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
        public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, Ed25519PublicKey)
        public.verify(raw, signing_input)
    return header


def sign_as(body: bytes, pki: Path, party: str, alg: str) -> str:
    """A partner's detached JWS, made by hand."""
    stem = KEY_FILES[alg]
    private = serialization.load_pem_private_key(
        (pki / party / f"{stem}.key").read_bytes(), password=None
    )
    kid = (pki / party / f"{stem}.kid").read_text().strip()
    protected = _b64(json.dumps({"alg": alg, "kid": kid, "typ": "c2c+json"}).encode())
    signing_input = f"{protected}.{_b64(body)}".encode()
    if alg == "ES256":
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        raw = r.to_bytes(32) + s.to_bytes(32)
    else:
        assert isinstance(private, Ed25519PrivateKey)
        raw = private.sign(signing_input)
    return f"{protected}..{_b64(raw)}"


@dataclass
class Pair:
    pki: Path
    us: Running
    mx: Running


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    pki = tmp_path / "pki"
    ports = {US: free_port(), MX: free_port()}
    url = {party: f"https://127.0.0.1:{port}" for party, port in ports.items()}
    us_path = prepare_dev_environment(
        tmp_path / US,
        party=US,
        pki_dir=pki,
        peers={MX: url[MX]},
        partner_port=ports[US],
        alg="ES256",
    )
    mx_path = prepare_dev_environment(
        tmp_path / MX,
        party=MX,
        pki_dir=pki,
        peers={US: url[US]},
        partner_port=ports[MX],
        alg="ES256",
    )
    # CA-CBSA: an EdDSA partner as before (its Ed25519 key, our Ed25519 key toward it)
    ca_file = tmp_path / US / "partners" / CA / "partner.toml"
    text = ca_file.read_text()
    for old, new in (
        ('sign_with = "ES256"', 'sign_with = "EdDSA"'),
        ("sign-es256.pub", "sign.pub"),
        ('alg = "ES256"', 'alg = "EdDSA"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    ca_file.write_text(text)
    us_config = dataclasses.replace(load_config(us_path), outbox=RETRYING_OUTBOX)
    assert [key.alg for key in us_config.signing_keys] == ["EdDSA", "ES256"]
    assert us_config.partners[MX].sign_with == "ES256"
    assert us_config.partners[CA].sign_with == "EdDSA"
    us = await start_gateway(us_config)
    try:
        mx = await start_gateway(load_config(mx_path))
        try:
            yield Pair(pki=pki, us=us, mx=mx)
        finally:
            await mx.gateway.stop()
    finally:
        await us.gateway.stop()


def _message(us: Running, sender: str, *, created_at: datetime | None = None) -> bytes:
    created = created_at or datetime.now(UTC)
    header = Header(
        message_id=new_message_id(),
        message_type="shipment.status",
        schema_version="1.0",
        sender=sender,
        recipient=US,
        created_at=created,
        expires_at=created + timedelta(days=1),
    )
    payload = us.gateway.registry.examples("shipment.status", "1.0")[0]
    return encode_envelope(header, payload)


async def _post(pair: Pair, party: str, body: bytes, signature: str) -> tuple[int, bytes, str]:
    context = ssl.create_default_context(cafile=str(pair.pki / "ca.pem"))
    context.load_cert_chain(pair.pki / party / "tls.pem", pair.pki / party / "tls.key")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            pair.us.gateway.partner_url + "/c2c/v1/messages",
            data=body,
            headers={"Content-Type": "application/json", "C2C-Signature": signature},
        ) as response,
    ):
        return response.status, await response.read(), response.headers["C2C-Signature"]


@pytest.mark.parametrize(("party", "alg"), [(MX, "ES256"), (CA, "EdDSA")])
async def test_receipts_are_signed_with_the_partners_algorithm(
    pair: Pair, party: str, alg: str
) -> None:
    body = _message(pair.us, party)
    signature = sign_as(body, pair.pki, party, alg)
    status, receipt, receipt_jws = await _post(pair, party, body, signature)
    assert status == 202, receipt
    check_jws(receipt_jws, receipt, pair.pki, US, alg)
    assert json.loads(receipt)["payload"]["status"] == "ACK"

    # an exact re-send: the original receipt, byte for byte
    again = await _post(pair, party, body, signature)
    assert again == (200, receipt, receipt_jws)

    # a NACK (the signature covers other bytes) is signed the same way
    tampered = body.replace(b'"shipment.status"', b'"shipment.status" ', 1)
    status, nack, nack_jws = await _post(pair, party, tampered, signature)
    assert status == 401
    check_jws(nack_jws, nack, pair.pki, US, alg)
    assert json.loads(nack)["payload"]["code"] == "SIGNATURE_INVALID"

    # a STALE NACK too (signed correctly, too old)
    old = _message(pair.us, party, created_at=datetime.now(UTC) - timedelta(hours=1))
    status, stale, stale_jws = await _post(pair, party, old, sign_as(old, pair.pki, party, alg))
    assert status == 422
    check_jws(stale_jws, stale, pair.pki, US, alg)


async def test_messages_to_an_es256_partner_are_signed_es256(pair: Pair) -> None:
    record = await submit_to(pair.us, MX)
    check_jws(record.signature, record.body or b"", pair.pki, US, "ES256")
    assert record.kid == (pair.pki / US / "sign-es256.kid").read_text().strip()
    done = await row_until(
        pair.us.gateway.store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
    )
    # MX-ANAM's gateway holds only US-CBP's P-256 key: its ACK is the proof it verified;
    # and its own receipt toward US-CBP (sign_with ES256 there too) is ES256
    assert done.receipt_body is not None
    assert done.receipt_signature is not None
    check_jws(done.receipt_signature, done.receipt_body, pair.pki, MX, "ES256")
    stored = await pair.mx.gateway.store.get_inbound(US, record.message_id)
    assert stored is not None
    assert stored.body == record.body

    # signed again (a partner's STALE answer, an operator's retry of an expired message)
    config = pair.us.config
    now = datetime.now(UTC) + timedelta(minutes=30)
    for partner, alg in ((MX, "ES256"), (CA, "EdDSA")):
        resigned = sign_again(
            record.body or b"",
            partner=config.partners[partner],
            signing_keys=pair.us.gateway.signing_keys,
            now=now,
            renew_expiry=True,
        )
        assert resigned is not None
        check_jws(resigned.signature, resigned.body, pair.pki, US, alg)


async def test_messages_to_an_eddsa_partner_stay_eddsa(pair: Pair) -> None:
    record = await submit_to(pair.us, CA)
    check_jws(record.signature, record.body or b"", pair.pki, US, "EdDSA")


async def test_the_jwks_publishes_both_keys(pair: Pair) -> None:
    context = ssl.create_default_context(cafile=str(pair.pki / "ca.pem"))
    context.load_cert_chain(pair.pki / MX / "tls.pem", pair.pki / MX / "tls.key")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.get(pair.us.gateway.partner_url + "/c2c/v1/keys") as response,
    ):
        keys = (await response.json())["keys"]
    published = {(key["alg"], key["kid"]) for key in keys}
    assert published == {
        (alg, (pair.pki / US / f"{stem}.kid").read_text().strip())
        for alg, stem in KEY_FILES.items()
    }
