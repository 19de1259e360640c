"""Partners' client certificates checked by OCSP after the handshake (T04, T05).

Real TLS on loopback, and a real OCSP responder over HTTP on loopback, answering with
responses built and signed by ``cryptography``'s OCSP builder as a CA's responder would. A good
status is served and kept until its nextUpdate; a revoked certificate, a status the responder
does not know, an answer not signed by the CA or its delegated responder, an answer past its
nextUpdate and an unreachable responder all refuse the connection before any request is read,
counted and audited as a refused handshake (fail closed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from https_env import (
    CA,
    MX,
    Env,
    held_per_source_becomes,
    running_gateway,
    status_of,
    wait_delivered,
    write_environment,
)

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.store.base import AuditFilter

NOW = dt.datetime.now(dt.UTC)


def _ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((root / "pki" / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((root / "pki" / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _delegate(
    root: Path, *, ocsp_signing: bool = True, impostor: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A responder certificate issued by the partner CA, for OCSP signing or not; or, with
    ``impostor``, one that names the CA as its issuer but is signed by its own key."""
    ca_cert, ca_key = _ca(root)
    key = ec.generate_private_key(ec.SECP256R1())
    if impostor:
        ca_key = key
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OCSP responder")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
    )
    if ocsp_signing:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass
class Responder:
    """An OCSP responder of the dev CA: ``status`` by party (default good); ``asked``: how
    often each party's certificate was asked about."""

    root: Path
    status: dict[str, ocsp.OCSPCertStatus] = field(default_factory=dict)
    #: None: the CA signs; else (certificate, key) of the signer put in the answer
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
    this_update: dt.datetime = NOW - dt.timedelta(minutes=1)
    next_update: dt.datetime | None = NOW + dt.timedelta(hours=1)
    #: answer HTTP 503 instead
    down: bool = False
    asked: Counter[str] = field(default_factory=Counter)
    url: str = ""

    def serial(self, party: str) -> int:
        return self._cert(party).serial_number

    async def answer(self, request: web.Request) -> web.Response:
        asked = ocsp.load_der_ocsp_request(await request.read())
        party = next(p for p in (MX, CA) if self.serial(p) == asked.serial_number)
        self.asked[party] += 1
        if self.down:
            return web.Response(status=503)
        ca_cert, ca_key = _ca(self.root)
        subject = self._cert(party)
        status = self.status.get(party, ocsp.OCSPCertStatus.GOOD)
        revoked = status == ocsp.OCSPCertStatus.REVOKED
        signer_cert, signer_key = self.signer or (ca_cert, ca_key)
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=subject,
                issuer=ca_cert,
                algorithm=hashes.SHA1(),
                cert_status=status,
                this_update=self.this_update,
                next_update=self.next_update,
                revocation_time=NOW - dt.timedelta(hours=2) if revoked else None,
                revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        )
        if self.signer is not None:
            builder = builder.certificates([signer_cert])
        der = builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        return web.Response(body=der, content_type="application/ocsp-response")

    def _cert(self, party: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.root / "pki" / party / "tls.pem").read_bytes())


@pytest.fixture
async def responder(tmp_path: Path) -> AsyncIterator[Responder]:
    server = Responder(tmp_path)
    app = web.Application()
    app.router.add_post("/", server.answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/"
    try:
        yield server
    finally:
        await runner.cleanup()


def ocsp_tls(responder: Responder, extra: str = "") -> str:
    return (
        f'ocsp = true\nocsp_url = "{responder.url}"\n'
        f'ocsp_allowed_networks = ["127.0.0.1/32"]\n{extra}'
    )


async def refusals(env: Env, count: int) -> list[dict[str, Any]]:
    """The ``tls_refused`` audit entries, once ``count`` of them are there (appended in the
    background)."""
    store = env.gateway.store
    for _ in range(200):
        rows = await store.audit_entries(AuditFilter(event="tls_refused"))
        if len(rows) >= count:
            break
        await asyncio.sleep(0.02)
    return [json.loads(row.entry) for row in rows]


def refused_count(env: Env, reason: str) -> float | None:
    return env.gateway.metrics.registry.get_sample_value(
        "c2c_tls_handshakes_refused_total", {"reason": reason}
    )


async def test_a_good_status_is_served_and_kept_until_its_next_update(
    tmp_path: Path, responder: Responder
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        for _ in range(3):
            assert await status_of(env, MX) == 202
        assert await status_of(env, CA) == 202
        # one question per certificate: the answer is kept, not asked per connection
        assert responder.asked == {MX: 1, CA: 1}
        assert await refusals(env, 0) == []


async def test_a_revoked_certificate_is_refused_before_any_request_and_audited(
    tmp_path: Path, responder: Responder
) -> None:
    responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        assert await status_of(env, MX) is None
        assert await status_of(env, MX) is None  # the revocation is kept too
        assert await status_of(env, CA) == 202
        assert responder.asked[MX] == 1
        [entry] = await refusals(env, 1)
        assert entry["outcome"] == "revoked"
        serial = f"{responder.serial(MX):x}"
        assert entry["reason"].startswith(f"certificate serial {serial} revoked at ")
        assert f"(OCSP, {responder.url}); from 127.0.0.1:" in entry["reason"]
        assert refused_count(env, "revoked") == 2
        # nothing of MX-ANAM's was taken in
        await wait_delivered(env, 1)
        assert [r.sender for r in env.delivered] == [CA]
        # the connections held for the check, refused or served, gave their slots back
        await held_per_source_becomes(env, {})


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ("down", "HTTP 503"),
        ("unknown", "status of serial"),
        ("stale", "past its nextUpdate"),
        ("foreign signer", "not signed by the issuing CA or its responder"),
        ("delegate without OCSP signing", "not signed by the issuing CA or its responder"),
    ],
)
async def test_no_trustworthy_good_status_fails_closed(
    tmp_path: Path, responder: Responder, fault: str, detail: str
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        if fault == "down":
            responder.down = True
        elif fault == "unknown":
            responder.status[MX] = ocsp.OCSPCertStatus.UNKNOWN
        elif fault == "stale":
            responder.this_update = NOW - dt.timedelta(days=2)
            responder.next_update = NOW - dt.timedelta(days=1)
        elif fault == "foreign signer":
            responder.signer = _delegate(tmp_path, impostor=True)
        else:
            responder.signer = _delegate(tmp_path, ocsp_signing=False)
        assert await status_of(env, MX) is None
        [entry] = await refusals(env, 1)
        assert entry["outcome"] == "revocation_unknown"
        assert detail in entry["reason"], entry["reason"]
        assert refused_count(env, "revocation_unknown") == 1
        assert env.delivered == []


async def test_an_answer_from_the_ca_s_delegated_responder_is_accepted(
    tmp_path: Path, responder: Responder
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        responder.signer = _delegate(tmp_path)
        assert await status_of(env, MX) == 202
        responder.status[CA] = ocsp.OCSPCertStatus.REVOKED
        assert await status_of(env, CA) is None


async def test_a_kept_answer_outlives_a_responder_outage_until_it_expires(
    tmp_path: Path, responder: Responder
) -> None:
    tls = ocsp_tls(responder, "ocsp_max_age_s = 1\n")
    async with running_gateway(tmp_path, tls=tls) as env:
        assert await status_of(env, MX) == 202
        responder.down = True
        assert await status_of(env, MX) == 202  # the kept answer
        await asyncio.sleep(1.1)
        assert await status_of(env, MX) is None  # expired, and the responder is down
        responder.down = False
        assert await status_of(env, MX) == 202
        assert responder.asked[MX] == 3


async def test_a_responder_on_a_private_address_needs_allowed_networks(
    tmp_path: Path, responder: Responder
) -> None:
    tls = f'ocsp = true\nocsp_url = "{responder.url}"\n'
    async with running_gateway(tmp_path, tls=tls) as env:
        assert await status_of(env, MX) is None
        [entry] = await refusals(env, 1)
        assert "ocsp_allowed_networks" in entry["reason"], entry["reason"]
        assert sum(responder.asked.values()) == 0


def test_served_and_refused_on_uvloop(tmp_path: Path) -> None:
    """``serve`` runs on uvloop: the held connection is handed over on its transports too."""

    async def scenario() -> None:
        server = Responder(tmp_path)
        app = web.Application()
        app.router.add_post("/", server.answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        try:
            server.status[CA] = ocsp.OCSPCertStatus.REVOKED
            async with running_gateway(tmp_path, tls=ocsp_tls(server)) as env:
                assert "uvloop" in type(asyncio.get_running_loop()).__module__
                assert await status_of(env, MX) == 202
                assert await status_of(env, CA) is None
        finally:
            await runner.cleanup()

    uvloop.run(scenario())


def test_an_ocsp_url_without_ocsp_is_a_configuration_error(tmp_path: Path) -> None:
    write_environment(tmp_path, tls='ocsp_url = "http://ocsp.example/"\n')
    with pytest.raises(ConfigError, match="set without ocsp = true"):
        load_config(tmp_path / "gateway.toml")
    write_environment(tmp_path / "ftp", tls='ocsp = true\nocsp_url = "ftp://ocsp.example/"\n')
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        load_config(tmp_path / "ftp" / "gateway.toml")
