"""Support for the partner-endpoint tests: a dev-PKI gateway environment in a tmp dir, a
running gateway with a MemoryBus subscriber, signed test messages and an mTLS client."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
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
from gateway.store.base import AuditFilter, InboundRecord, Store
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


def issue_cert(
    tmp: Path,
    name: str,
    *,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    not_after: dt.datetime,
) -> tuple[Path, Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate with common name ``name`` valid until ``not_after``, issued by
    ``issuer_cert``/``issuer_key`` (self-signed, a CA, when they are None), written to ``tmp``:
    its path, its key's path, the certificate and its key."""
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


def ca_at(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA of the dev PKI under ``root / "pki"``, which partners' certificates chain to."""
    pki = root / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return ca_cert, ca_key


def dev_ca(env: Env) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The dev PKI's CA, which partners' certificates chain to."""
    return ca_at(env.root)


def client_with(env: Env, cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A client context trusting the dev CA, presenting this certificate."""
    context = env.client_ssl(None)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def write_environment(root: Path, limits: str = "", tls: str = "") -> None:
    """``limits``, ``tls``: extra lines for the ``[limits]`` and ``[tls]`` tables of
    gateway.toml."""
    init_dev_pki(root / "pki", [US, MX, CA, GB])
    text = _GATEWAY_TOML.format(store=root / "gw.db").replace(
        'ca = "pki/ca.pem"\n', 'ca = "pki/ca.pem"\n' + tls
    )
    (root / "gateway.toml").write_text(text + "\n[limits]\n" + limits)
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


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Path,
    limits: str = "",
    *,
    tls: str = "",
    prepare: Callable[[Path], None] | None = None,
) -> AsyncIterator[Env]:
    """A started gateway with its partners; ``prepare(root)`` runs after the PKI and the
    configuration files are written and before they are loaded."""
    write_environment(tmp_path, limits, tls)
    if prepare is not None:
        prepare(tmp_path)
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


async def open_from(
    env: Env, source: str, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the partner endpoint from the local address ``source`` (loopback has
    all of 127.0.0.0/8), over TLS with ``context``, or plain TCP when it is None."""
    url = urlsplit(env.gateway.partner_url)
    return await asyncio.open_connection(
        url.hostname,
        url.port,
        ssl=context,
        server_hostname="127.0.0.1" if context is not None else None,
        local_addr=(source, 0),
    )


def connection_count(env: Env, metric: str, label: str, value: str) -> float:
    """A partner-endpoint connection counter's value (0 when never counted)."""
    sample = env.gateway.metrics.registry.get_sample_value(metric, {label: value})
    return sample or 0.0


async def held_per_source_becomes(
    env: Env, expected: dict[str, int], within_s: float = 5.0
) -> None:
    """Wait until the partner endpoint holds ``expected`` connections per source address."""
    server = env.gateway.partner_server
    async with asyncio.timeout(within_s):
        while server.held_per_source != expected:  # noqa: ASYNC110 (polled state)
            await asyncio.sleep(0.02)


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
    created_at = created_at or dt.datetime.now(dt.UTC)
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version=schema_version,
        sender=sender,
        recipient=recipient,
        created_at=created_at,
        expires_at=created_at + dt.timedelta(days=7),
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
    body: bytes | io.BytesIO | AsyncIterable[bytes],
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


async def post_with_handshake_end(env: Env, body: bytes, *, party: str = MX) -> bytes:
    """POST ``body`` over a TLS client driven by hand, its Finished and the whole request
    in one TCP write; returns the raw HTTP answer."""
    url = urlsplit(env.gateway.partner_url)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = env.client_ssl(party).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    incoming.write(await reader.read(65536))
            head = (
                f"POST /c2c/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"C2C-Signature: {sign_detached(body, env.keys[party])}\r\n\r\n"
            )
            tls.write(head.encode() + body)
            writer.write(outgoing.read())
            answer = b""
            while not _complete(answer):
                incoming.write(await reader.read(65536))
                try:
                    while data := tls.read(65536):
                        answer += data
                except ssl.SSLWantReadError:
                    pass
            return answer
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def kept_alive(
    env: Env, party: str = MX, context: ssl.SSLContext | None = None
) -> AsyncIterator[Callable[[float], Awaitable[int]]]:
    """``send(pause_s)``: a valid message from ``party`` over one kept-alive connection
    (with ``context``, else ``party``'s own), its body sent in two parts ``pause_s`` apart;
    its HTTP status."""
    connector = aiohttp.TCPConnector(ssl=context or env.client_ssl(party), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(pause_s: float = 0.0) -> int:
            _, body = make_message(env, sender=party)
            headers = {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "C2C-Signature": sign_detached(body, env.keys[party]),
            }

            async def parts() -> AsyncIterator[bytes]:
                yield body[:64]
                await asyncio.sleep(pause_s)
                yield body[64:]

            async with (
                asyncio.timeout(10),  # not left waiting on a connection kept open but deaf
                session.post(env.url, data=parts(), headers=headers) as response,
            ):
                await response.read()
                return response.status

        yield send


def retirements() -> int:
    """Connections' retirement timers still to come, inbound or outbound (asyncio's scheduled
    handles)."""
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    return sum(
        1
        for handle in scheduled
        if not handle.cancelled() and getattr(handle._callback, "__name__", "") == "_retire"
    )


async def status_of(env: Env, party: str) -> int | None:
    """The HTTP status of a valid message from ``party``, or None when its connection was
    refused (at the TLS handshake, or closed after it before an answer)."""
    _, body = make_message(env, sender=party)
    try:
        answer = await post(env, body, cert=party, signer=party)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return None
    return answer.status


def _complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole HTTP response with a Content-Length body."""
    head, sep, rest = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return True


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


async def wait_relayed(store: Store) -> None:
    """The relay marks a record after the bus confirmed it: wait for that mark (bounded)."""
    for _ in range(1000):
        if not await store.pending_relay(10):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the relay did not mark the delivered records within 10 s")


async def wait_delivered(env: Env, count: int) -> None:
    async with asyncio.timeout(10):
        while len(env.delivered) < count:
            await env.arrived.wait()
            env.arrived.clear()
