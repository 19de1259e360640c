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

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from https_env import MX, Env, running_gateway


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
    ``seconds`` (its subject is MX-ANAM's)."""
    pki = env.root / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    partner = x509.load_pem_x509_certificate((pki / MX / "tls.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(partner.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(seconds=seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = env.root / "short.pem", env.root / "short.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


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
