"""Our own TLS certificate renewed while serving: taken in on reload (SIGHUP with `serve`, or
a change of the files), presented by the partner endpoint, the internal API and the outbound
client; a bad pair is refused with its reason and the pair in force stays."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from outbound_env import Running, client_ssl, gateway_config, start_gateway
from serve_proc import ServeProcess, edit_toml
from structlog.testing import capture_logs
from test_api_audit import submit

from gateway.audit.events import EventKind
from gateway.config import GatewayConfig
from gateway.crypto.pki import init_dev_pki
from gateway.crypto.x509 import cert_fingerprint
from gateway.store.base import AuditFilter


def pki_of(config: GatewayConfig) -> Path:
    return config.tls.cert.parent.parent


def file_fingerprint(path: Path) -> str:
    return cert_fingerprint(x509.load_pem_x509_certificate(path.read_bytes()))


def renew(config: GatewayConfig) -> str:
    """A new certificate for the same party and key, as a renewal leaves it on disk."""
    config.tls.cert.unlink()
    init_dev_pki(pki_of(config), [config.party])
    return file_fingerprint(config.tls.cert)


def _presented(url: str, ca: Path, client: tuple[Path, Path] | None) -> str:
    host, port = url.removeprefix("https://").split("/")[0].rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return cert_fingerprint(der)


async def presented(url: str, config: GatewayConfig, *, as_partner: bool = False) -> str:
    """The fingerprint of the certificate a new TLS connection to ``url`` is shown."""
    pki = pki_of(config)
    client = (pki / "MX-ANAM" / "tls.pem", pki / "MX-ANAM" / "tls.key") if as_partner else None
    return await asyncio.to_thread(_presented, url, config.tls.ca, client)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {timeout_s} s: {what}")


async def reload_entries(running: Running) -> list[dict[str, str]]:
    rows = await running.gateway.store.audit_entries(
        AuditFilter(event=EventKind.OPERATOR_ACTION.value), after_seq=-1, limit=100
    )
    entries = [json.loads(row.entry) for row in rows]
    return [e for e in entries if e["outcome"].startswith("tls_reload")]


def entries_are(running: Running, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await reload_entries(running)) >= count

    return check


async def test_a_renewed_certificate_is_presented_after_reload(us: Running) -> None:
    config = us.config
    old = file_fingerprint(config.tls.cert)
    partner_url = us.gateway.partner_url
    assert await presented(partner_url, config, as_partner=True) == old
    assert await presented(us.api_url, config) == old
    async with aiohttp.ClientSession() as session:
        ssl_context = client_ssl(config)
        async with session.get(us.api_url + "/healthz", ssl=ssl_context) as response:
            assert response.status == 200
        new = renew(config)
        assert new != old
        # nothing changes until the reload
        assert await presented(partner_url, config, as_partner=True) == old
        identity = await us.gateway.tls_identity.reload(actor="cli:operator")
        assert identity is not None
        assert identity.fingerprint == new
        assert await presented(partner_url, config, as_partner=True) == new
        assert await presented(us.api_url, config) == new
        # a connection opened before the reload goes on
        async with session.get(us.api_url + "/healthz", ssl=ssl_context) as response:
            assert response.status == 200
        async with session.get(us.api_url + "/metrics", ssl=ssl_context) as response:
            metrics = await response.text()
    [entry] = await reload_entries(us)
    assert (entry["outcome"], entry["actor"]) == ("tls_reloaded", "cli:operator")
    assert entry["reason"].startswith(f"certificate sha256 {new} (CN 'US-CBP'), valid until ")
    assert entry["reason"].endswith(f"; was {old}")
    assert 'c2c_tls_reloads_total{outcome="tls_reloaded"} 1.0' in metrics
    not_after = x509.load_pem_x509_certificate(config.tls.cert.read_bytes()).not_valid_after_utc
    [expiry] = [
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("c2c_tls_certificate_expiry_timestamp_seconds ")
    ]
    assert expiry == not_after.timestamp()


async def test_a_key_file_open_to_others_is_named_at_a_sighup(us: Running) -> None:
    """As at start: a renewal that wrote the new key with a loose umask is said at once."""
    config = us.config
    renew(config)
    config.tls.key.chmod(0o644)
    with capture_logs() as logs:
        await us.gateway.reload(actor="signal:SIGHUP")
    [warning] = [entry for entry in logs if entry["event"] == "key_file_open_to_others"]
    assert (warning["key"], warning["file"], warning["mode"]) == (
        "tls.key",
        str(config.tls.key),
        "0644",
    )
    config.tls.key.chmod(0o600)
    with capture_logs() as logs:
        await us.gateway.reload(actor="signal:SIGHUP")
    assert [entry for entry in logs if entry["event"] == "key_file_open_to_others"] == []


def expired_certificate(config: GatewayConfig) -> bytes:
    """Our key, certified by the dev CA, for a period that ended yesterday."""
    pki = pki_of(config)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = serialization.load_pem_private_key(config.tls.key.read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, config.party)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_a_bad_pair_is_refused_and_the_pair_in_force_stays(us: Running) -> None:
    config = us.config
    old = file_fingerprint(config.tls.cert)
    original = config.tls.cert.read_bytes()
    cases = [
        # another party's certificate beside our key
        ((pki_of(config) / "MX-ANAM" / "tls.pem").read_bytes(), "are not a usable pair"),
        (expired_certificate(config), "expired at"),
        (b"not a certificate\n", "holds no PEM certificate"),
    ]
    for pem, _ in cases:
        config.tls.cert.write_bytes(pem)
        assert await us.gateway.tls_identity.reload(actor="signal:SIGHUP") is None
        assert await presented(us.gateway.partner_url, config, as_partner=True) == old
        assert await presented(us.api_url, config) == old
    entries = await reload_entries(us)
    assert [e["outcome"] for e in entries] == ["tls_reload_refused"] * 3
    for entry, (_, reason) in zip(entries, cases, strict=True):
        assert reason in entry["reason"], entry
        assert entry["reason"].startswith(str(config.tls.cert))
    config.tls.cert.write_bytes(original)
    assert await us.gateway.tls_identity.reload(actor="signal:SIGHUP") is not None


async def test_a_changed_file_is_taken_in_without_a_signal(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    config = dataclasses.replace(
        config, tls=dataclasses.replace(config.tls, cert_check_interval_s=0.05)
    )
    running = await start_gateway(config)
    try:
        new = renew(config)

        async def renewed() -> bool:
            return await presented(running.gateway.partner_url, config, as_partner=True) == new

        await until(renewed, "the endpoint presents the renewed certificate")
        # the new pair is in force before its audit entry is committed: wait for the entry
        await until(entries_are(running, 1), "the reload is audited")
        [entry] = await reload_entries(running)
        assert (entry["outcome"], entry["actor"]) == ("tls_reloaded", "watch:file-change")
        # a bad version is reported once, not at every check
        config.tls.cert.write_bytes(b"garbage\n")
        await until(entries_are(running, 2), "the bad version is audited")
        await asyncio.sleep(0.5)  # ten more checks of the file, none of them reported
        entries = await reload_entries(running)
        assert [e["outcome"] for e in entries] == ["tls_reloaded", "tls_reload_refused"]
        assert await presented(running.gateway.partner_url, config, as_partner=True) == new
    finally:
        await running.gateway.stop()


@contextlib.asynccontextmanager
async def sending_to_a_recording_partner(
    tmp_path: Path,
) -> AsyncIterator[tuple[Running, GatewayConfig, list[str]]]:
    """A started gateway whose partner MX-ANAM is an endpoint (MX-ANAM's certificate) that
    takes each TLS handshake and notes the fingerprint of the client certificate it was
    shown; the gateway, its configuration and that list."""
    pki = tmp_path / "pki"
    gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})  # the PKI
    seen: list[str] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(str(pki / "MX-ANAM" / "tls.pem"), str(pki / "MX-ANAM" / "tls.key"))

    async def handshake_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(cert_fingerprint(der))
        writer.close()

    server = await asyncio.start_server(handshake_only, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{port}"})
        running = await start_gateway(config)
        try:
            yield running, config, seen
        finally:
            await running.gateway.stop()
    finally:
        server.close()
        await server.wait_closed()


async def test_outbound_connections_present_the_renewed_certificate(tmp_path: Path) -> None:
    async with sending_to_a_recording_partner(tmp_path) as (running, config, seen):
        old = file_fingerprint(config.tls.cert)
        await submit(running)
        await until(lambda: asyncio.sleep(0, bool(seen)), "a first handshake")
        assert set(seen) == {old}
        new = renew(config)
        assert await running.gateway.tls_identity.reload(actor="cli:operator") is not None
        await submit(running)
        await until(lambda: asyncio.sleep(0, new in seen), "a handshake with the new certificate")


async def test_an_outbound_connection_made_after_a_refused_pair_presents_the_pair_in_force(
    tmp_path: Path,
) -> None:
    """A partner's client context is made at its first send (and again after a CRL change):
    from the pair in force, not from the files as they are, which may be a pair refused."""
    async with sending_to_a_recording_partner(tmp_path) as (running, config, seen):
        in_force = file_fingerprint(config.tls.cert)
        config.tls.cert.write_bytes(expired_certificate(config))
        assert await running.gateway.tls_identity.reload(actor="signal:SIGHUP") is None
        await submit(running)  # the first message to MX-ANAM: its context is made now
        await until(lambda: asyncio.sleep(0, bool(seen)), "a first handshake")
        assert set(seen) == {in_force}


@pytest.mark.slow
async def test_serve_reloads_on_sighup(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    process = ServeProcess(config.source)
    await process.start()
    try:
        old = await presented(process.partner_url, config, as_partner=True)
        assert old == file_fingerprint(config.tls.cert)
        new = renew(config)
        # the same signal takes in partners' signing keys (test_partner_keys_reload), before
        # the certificate that the loop below waits for
        edit_toml(
            config.source.parent / "partners" / "MX-ANAM" / "partner.toml",
            'alg = "EdDSA"\n',
            'alg = "EdDSA"\nnot_after = 2020-01-01T00:00:00Z\n',
        )
        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)

        async def renewed() -> bool:
            return await presented(process.partner_url, config, as_partner=True) == new

        await until(renewed, "serve presents the renewed certificate", timeout_s=20)
        assert await presented(process.api_url, config) == new
    finally:
        assert await process.stop() == 0
    lines = [json.loads(line) for line in process.stderr_log.splitlines() if line.startswith(b"{")]
    reloaded = [line for line in lines if line.get("event") == "tls_reloaded"]
    assert [(line["fingerprint"], line["actor"]) for line in reloaded] == [(new, "signal:SIGHUP")]
    [keys] = [line for line in lines if line.get("event") == "partner_keys_reloaded"]
    assert keys["actor"] == "signal:SIGHUP"
    assert keys["changes"][0].endswith("now valid - to 2020-01-01T00:00:00.000Z (was valid - to -)")
