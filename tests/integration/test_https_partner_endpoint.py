"""The partner endpoint over real mutual TLS on loopback, with the dev PKI in a tmp dir.

Covers PROTOCOL.md sections 4 and 5: client-certificate identity, every NACK code with its
HTTP status and a signed receipt (signature and ref_digest verified here), idempotent
re-send, conflicts, rate limiting, store outage, one audit entry per refusal, delivery of
accepted messages to a bus subscriber, and the schema/key endpoints.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import KeyRing, SigningKey, load_signing_key
from gateway.crypto.pki import init_dev_pki
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import NackCode
from gateway.model import Header
from gateway.receipts import Receipt, verify_receipt
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter, InboundRecord
from gateway.transports.bus import MemoryBus

US = "US-CBP"
MX = "MX-ANAM"
CA = "CA-CBSA"
GB = "GB-HMRC"
LEGAL_BASIS = "US-MX CMAA (Mexico City, 1976)"
URL_PATH = "/c2c/v1/messages"

_GATEWAY_TOML = """\
party = "US-CBP"
partners_dir = "partners"
store_url = "sqlite:///{store}"

[partner_listen]
host = "127.0.0.1"
port = 0

[api_listen]
host = "127.0.0.1"
port = 0

[tls]
cert = "pki/US-CBP/tls.pem"
key = "pki/US-CBP/tls.key"
ca = "pki/ca.pem"

[[signing_keys]]
path = "pki/US-CBP/sign.key"
alg = "EdDSA"

[api_auth]
issuer = "urn:test"
audience = "urn:test:api"
public_keys = ["pki/US-CBP/api-token.pub"]

[audit]
key = "pki/US-CBP/audit.key"
origin = "test.invalid/US-CBP"
"""

_PARTNER_TOML = """\
id = "{pid}"
name = "{pid} test partner"
max_body_bytes = {max_body}
inbound_types = ["shipment.advance_data", "enforcement.risk_alert", "receipt"]
outbound_types = ["shipment.advance_data"]
{legal}

[[keys]]
path = "../../pki/{pid}/sign.pub"
alg = "EdDSA"

[rate]
per_second = {rate}
burst = {burst}

[https]
ca = "../../pki/ca.pem"
client_cert_subjects = ["{pid}"]
"""


@dataclass
class Env:
    root: Path
    gateway: Gateway
    delivered: list[InboundRecord]
    arrived: asyncio.Event
    keys: dict[str, SigningKey]
    our_keys: KeyRing

    @property
    def url(self) -> str:
        return self.gateway.partner_url + URL_PATH

    def client_ssl(self, party: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.pem"))
        if party is not None:
            context.load_cert_chain(
                str(self.root / "pki" / party / "tls.pem"),
                str(self.root / "pki" / party / "tls.key"),
            )
        return context


def write_environment(root: Path) -> None:
    init_dev_pki(root / "pki", [US, MX, CA, GB])
    (root / "gateway.toml").write_text(_GATEWAY_TOML.format(store=root / "gw.db"))
    partners = {
        MX: {"legal": f'legal_basis = "{LEGAL_BASIS}"', "rate": 1000.0, "burst": 1000},
        CA: {"legal": "", "rate": 1000.0, "burst": 1000},
        # A partner that hardly refills: two requests, then 429.
        GB: {"legal": "", "rate": 0.01, "burst": 2},
    }
    for pid, extra in partners.items():
        folder = root / "partners" / pid
        folder.mkdir(parents=True)
        (folder / "partner.toml").write_text(
            _PARTNER_TOML.format(pid=pid, max_body=4096 if pid == CA else 1_048_576, **extra)
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    write_environment(tmp_path)
    config = load_config(tmp_path / "gateway.toml")
    bus = MemoryBus()
    delivered: list[InboundRecord] = []
    arrived = asyncio.Event()

    async def consume(record: InboundRecord) -> None:
        delivered.append(record)
        arrived.set()

    bus.subscribe(consume)
    gateway = Gateway(config, bus=bus)
    await gateway.start()
    keys = {
        pid: load_signing_key(tmp_path / "pki" / pid / "sign.key", party=pid, alg="EdDSA")
        for pid in (MX, CA, GB)
    }
    our_keys = KeyRing(key.verification_key() for key in gateway.signing_keys)
    try:
        yield Env(tmp_path, gateway, delivered, arrived, keys, our_keys)
    finally:
        await gateway.stop()


def make_message(
    env: Env,
    *,
    sender: str = MX,
    message_type: str = "shipment.advance_data",
    recipient: str = US,
    created_at: dt.datetime | None = None,
    legal_basis: str | None = LEGAL_BASIS,
    payload: dict[str, Any] | None = None,
    message_id: str | None = None,
    schema_version: str = "1.0",
) -> tuple[str, bytes]:
    registry = env.gateway.registry
    if payload is None:
        payload = registry.examples(message_type, "1.0")[0]
    message_id = message_id or new_message_id()
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version=schema_version,
        sender=sender,
        recipient=recipient,
        created_at=created_at or dt.datetime.now(dt.UTC),
        legal_basis=legal_basis,
        in_reply_to=new_message_id()
        if registry.requires_in_reply_to(message_type, "1.0")
        else None,
    )
    return message_id, encode_envelope(header, payload)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    env: Env,
    body: bytes | io.BytesIO,
    *,
    cert: str | None = MX,
    signer: str | None = MX,
    signature: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    all_headers = {"Content-Type": "application/json"}
    if signature is None and signer is not None:
        assert isinstance(body, bytes)
        signature = sign_detached(body, env.keys[signer])
    if signature is not None:
        all_headers["C2C-Signature"] = signature
    all_headers.update(headers or {})
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(cert))
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
        session.post(env.url, data=body, headers=all_headers) as response,
    ):
        return Answer(response.status, await response.read(), dict(response.headers))


def check_receipt(
    env: Env, answer: Answer, *, message_id: str, body: bytes, recipient: str = MX
) -> Receipt:
    receipt = verify_receipt(
        answer.body,
        answer.headers["C2C-Signature"],
        env.our_keys,
        US,
        message_id,
        body_digest(body),
    )
    assert receipt.envelope.header.message_type == "receipt"
    assert receipt.envelope.header.schema_version == "1.0"
    assert receipt.envelope.header.recipient == recipient
    assert receipt.envelope.header.in_reply_to == message_id
    env.gateway.registry.validate("receipt", "1.0", receipt.envelope.payload)
    return receipt


async def rejections(env: Env, code: NackCode) -> list[dict[str, Any]]:
    rows = await env.gateway.store.audit_entries(AuditFilter(event="rejected", outcome=code.value))
    return [json.loads(row.entry) for row in rows]


async def assert_nack(
    env: Env,
    answer: Answer,
    code: NackCode,
    status: int,
    *,
    message_id: str,
    body: bytes,
    reason_contains: str,
) -> None:
    assert answer.status == status, answer.body
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.status == "NACK"
    assert receipt.code == code
    entries = await rejections(env, code)
    assert len(entries) == 1, entries
    assert reason_contains in entries[0]["reason"]
    assert entries[0]["message_id"] == message_id
    assert entries[0]["body_digest"] == body_digest(body)
    assert await env.gateway.store.get_inbound(MX, message_id) is None


async def wait_delivered(env: Env, count: int) -> None:
    async with asyncio.timeout(10):
        while len(env.delivered) < count:
            await env.arrived.wait()
            env.arrived.clear()


# --- accepted, duplicates, delivery -------------------------------------------------------


async def test_accepted_message_gets_signed_ack_and_reaches_bus(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body)
    assert answer.status == 202
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.status == "ACK"
    assert receipt.code is None
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == body
    assert stored.receipt_body == answer.body
    await wait_delivered(env, 1)
    assert [(r.sender, r.message_id) for r in env.delivered] == [(MX, message_id)]


async def test_exact_resend_returns_original_receipt_bytes(env: Env) -> None:
    _, body = make_message(env)
    first = await post(env, body)
    # A different (fresh) signature over the same bytes is still the same message.
    second = await post(env, body)
    assert first.status == 202
    assert second.status == 200
    assert second.body == first.body
    assert second.headers["C2C-Signature"] == first.headers["C2C-Signature"]
    await wait_delivered(env, 1)
    assert await env.gateway.store.pending_relay(10) == []
    assert len(env.delivered) == 1


async def test_same_id_different_bytes_is_conflict(env: Env) -> None:
    message_id, body = make_message(env)
    assert (await post(env, body)).status == 202
    _, other = make_message(env, message_id=message_id, payload=None, legal_basis=LEGAL_BASIS)
    assert other != body
    answer = await post(env, other)
    assert answer.status == 409
    receipt = check_receipt(env, answer, message_id=message_id, body=other)
    assert receipt.code == NackCode.DUPLICATE_CONFLICT
    entries = await rejections(env, NackCode.DUPLICATE_CONFLICT)
    assert len(entries) == 1
    assert "with digest" in entries[0]["reason"]
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == body


# --- every NACK code ----------------------------------------------------------------------


async def test_signature_invalid(env: Env) -> None:
    message_id, body = make_message(env)
    signature = sign_detached(body, env.keys[MX])
    tampered = body.replace(b'"US-CBP"', b'"US-CBP" ', 1)
    answer = await post(env, tampered, signature=signature)
    await assert_nack(
        env,
        answer,
        NackCode.SIGNATURE_INVALID,
        401,
        message_id=message_id,
        body=tampered,
        reason_contains="signature",
    )


async def test_missing_signature(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body, signer=None)
    await assert_nack(
        env,
        answer,
        NackCode.SIGNATURE_INVALID,
        401,
        message_id=message_id,
        body=body,
        reason_contains="no detached JWS",
    )


async def test_unknown_key(env: Env) -> None:
    # Signed with CA-CBSA's key while the TLS identity is MX-ANAM: not one of MX-ANAM's keys.
    message_id, body = make_message(env)
    answer = await post(env, body, signer=CA)
    await assert_nack(
        env,
        answer,
        NackCode.UNKNOWN_KEY,
        401,
        message_id=message_id,
        body=body,
        reason_contains=env.keys[CA].kid,
    )


async def test_partner_a_certificate_claiming_sender_b(env: Env) -> None:
    message_id, body = make_message(env, sender=CA, legal_basis=None)
    answer = await post(env, body, cert=MX, signer=MX)
    await assert_nack(
        env,
        answer,
        NackCode.SENDER_MISMATCH,
        403,
        message_id=message_id,
        body=body,
        reason_contains="header.sender CA-CBSA differs",
    )


async def test_wrong_recipient(env: Env) -> None:
    message_id, body = make_message(env, recipient="GB-HMRC")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.SENDER_MISMATCH,
        403,
        message_id=message_id,
        body=body,
        reason_contains="recipient GB-HMRC is not this gateway",
    )


async def test_not_authorized_type(env: Env) -> None:
    message_id, body = make_message(env, message_type="enforcement.seizure_report")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.NOT_AUTHORIZED,
        403,
        message_id=message_id,
        body=body,
        reason_contains="may not send enforcement.seizure_report",
    )


async def test_missing_legal_basis(env: Env) -> None:
    message_id, body = make_message(env, legal_basis=None)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.NOT_AUTHORIZED,
        403,
        message_id=message_id,
        body=body,
        reason_contains="legal_basis None",
    )


async def test_schema_invalid(env: Env) -> None:
    payload = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
    payload.pop(next(iter(payload)))
    message_id, body = make_message(env, payload=payload)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.SCHEMA_INVALID,
        400,
        message_id=message_id,
        body=body,
        reason_contains="",
    )


async def test_unsupported_type(env: Env) -> None:
    message_id, body = make_message(env, schema_version="9.9")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.UNSUPPORTED_TYPE,
        400,
        message_id=message_id,
        body=body,
        reason_contains="9.9",
    )


async def test_malformed_envelope_with_readable_id(env: Env) -> None:
    message_id, body = make_message(env)
    document = json.loads(body)
    document["extra"] = 1
    bad = json.dumps(document).encode()
    answer = await post(env, bad)
    await assert_nack(
        env,
        answer,
        NackCode.MALFORMED,
        400,
        message_id=message_id,
        body=bad,
        reason_contains="unknown member 'extra'",
    )


async def test_malformed_json_gets_problem_document(env: Env) -> None:
    body = b'{"header": {"message_id": 1,'
    answer = await post(env, body)
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["code"] == "MALFORMED"
    assert problem["status"] == 400
    entries = await rejections(env, NackCode.MALFORMED)
    assert len(entries) == 1
    assert entries[0]["sender"] == MX
    assert "message_id" not in entries[0]


async def test_content_encoding_refused(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body, headers={"Content-Encoding": "gzip"})
    await assert_nack(
        env,
        answer,
        NackCode.MALFORMED,
        400,
        message_id=message_id,
        body=body,
        reason_contains="Content-Encoding 'gzip' refused",
    )


async def test_stale(env: Env) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    message_id, body = make_message(env, created_at=old)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.STALE,
        422,
        message_id=message_id,
        body=body,
        reason_contains="beyond the replay window",
    )


async def test_too_large_for_partner(env: Env) -> None:
    # CA-CBSA's limit is 4096 bytes; the body is signed and otherwise fine.
    _, body = make_message(env, sender=CA, legal_basis=None)
    body = body[:-2] + b',"pad":"' + b"x" * 5000 + b'"}}'
    answer = await post(env, body, cert=CA, signer=CA)
    assert answer.status == 413
    problem = answer.json()
    assert problem["code"] == "TOO_LARGE"
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert "over CA-CBSA's limit of 4096" in entries[0]["reason"]


async def test_too_large_for_endpoint_is_cut_off(env: Env) -> None:
    answer = await post(env, io.BytesIO(b"x" * (1_048_576 + 10)), signer=None)
    assert answer.status == 413
    assert answer.json()["code"] == "TOO_LARGE"
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert "cut off while reading" in entries[0]["reason"]


async def test_rate_limited(env: Env) -> None:
    answers = []
    ids = []
    for _ in range(3):
        message_id, body = make_message(env, sender=GB, legal_basis=None)
        ids.append(message_id)
        answers.append((await post(env, body, cert=GB, signer=GB), body))
    assert [a.status for a, _ in answers] == [202, 202, 429]
    limited, body = answers[2]
    assert int(limited.headers["Retry-After"]) >= 1
    receipt = check_receipt(env, limited, message_id=ids[2], body=body, recipient=GB)
    assert receipt.code == NackCode.RATE_LIMITED
    entries = await rejections(env, NackCode.RATE_LIMITED)
    assert len(entries) == 1
    assert "over its rate" in entries[0]["reason"]
    assert await env.gateway.store.get_inbound(GB, ids[2]) is None


async def test_store_unavailable_acknowledges_nothing(env: Env) -> None:
    message_id, body = make_message(env)
    await env.gateway.store.close()
    try:
        answer = await post(env, body)
    finally:
        await env.gateway.store.open()
    assert answer.status == 503
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.status == "NACK"
    assert receipt.code == NackCode.UNAVAILABLE
    assert await env.gateway.store.get_inbound(MX, message_id) is None
    # The partner retries once the store is back, and gets its ACK.
    retried = await post(env, body)
    assert retried.status == 202


# --- client certificates ------------------------------------------------------------------


async def _handshake_refused(env: Env, context: ssl.SSLContext) -> None:
    _, body = make_message(env)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with session.post(env.url, data=body) as response:
                await response.read()


async def test_no_client_certificate_refused(env: Env) -> None:
    await _handshake_refused(env, env.client_ssl(None))


def _cert(
    tmp: Path,
    name: str,
    *,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    not_after: dt.datetime,
) -> tuple[Path, Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=issuer_cert is None, path_length=None), True)
    )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}-{id(cert)}.pem", tmp / f"{name}-{id(cert)}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert, key


def _client_with(env: Env, cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = env.client_ssl(None)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


async def test_certificate_from_another_ca_refused(env: Env, tmp_path: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    _, _, other_ca, other_key = _cert(
        tmp_path, "Other CA", issuer_cert=None, issuer_key=None, not_after=later
    )
    cert_path, key_path, _, _ = _cert(
        tmp_path, MX, issuer_cert=other_ca, issuer_key=other_key, not_after=later
    )
    await _handshake_refused(env, _client_with(env, cert_path, key_path))


async def test_expired_certificate_refused(env: Env, tmp_path: Path) -> None:
    pki = env.root / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert_path, key_path, _, _ = _cert(
        tmp_path, MX, issuer_cert=ca_cert, issuer_key=ca_key, not_after=expired
    )
    await _handshake_refused(env, _client_with(env, cert_path, key_path))


async def test_valid_certificate_of_no_partner_gets_403_problem(env: Env) -> None:
    # US-CBP's own certificate chains to the CA but identifies no partner.
    _, body = make_message(env)
    answer = await post(env, body, cert=US)
    assert answer.status == 403
    assert answer.json()["code"] == "SENDER_MISMATCH"


# --- schemas and keys ---------------------------------------------------------------------


async def _get(env: Env, path: str) -> Answer:
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(MX))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(env.gateway.partner_url + path) as response,
    ):
        return Answer(response.status, await response.read(), dict(response.headers))


async def test_schema_and_key_endpoints(env: Env) -> None:
    index = (await _get(env, "/c2c/v1/schemas")).json()["schemas"]
    assert {"receipt", "shipment.advance_data"} <= {entry["message_type"] for entry in index}
    schema = await _get(env, "/c2c/v1/schemas/receipt/1.0")
    assert schema.status == 200
    assert schema.json()["title"]
    assert (await _get(env, "/c2c/v1/schemas/receipt/9.9")).status == 404
    jwks = (await _get(env, "/c2c/v1/keys")).json()
    assert [key["kid"] for key in jwks["keys"]] == [k.kid for k in env.gateway.signing_keys]
    assert all("d" not in key for key in jwks["keys"])
