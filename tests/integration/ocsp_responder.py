"""A real OCSP responder of the dev CA over HTTP on loopback, for the tests of OCSP checks:
answers built and signed by ``cryptography``'s OCSP builder as a CA's responder would."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from https_env import ca_at

NOW = dt.datetime.now(dt.UTC)


def delegate(
    root: Path, *, ocsp_signing: bool = True, impostor: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A responder certificate issued by the partner CA, for OCSP signing or not; or, with
    ``impostor``, one that names the CA as its issuer but is signed by its own key."""
    ca_cert, ca_key = ca_at(root)
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
    #: the parties whose TLS certificates it answers for
    parties: tuple[str, ...]
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
        party = next(p for p in self.parties if self.serial(p) == asked.serial_number)
        self.asked[party] += 1
        if self.down:
            return web.Response(status=503)
        ca_cert, ca_key = ca_at(self.root)
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


@contextlib.asynccontextmanager
async def serving(root: Path, parties: tuple[str, ...]) -> AsyncIterator[Responder]:
    """A responder of the dev PKI under ``root / "pki"``, for the TLS certificates of
    ``parties``, listening on loopback (its ``url``)."""
    server = Responder(root, parties)
    app = web.Application()
    app.router.add_post("/", server.answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        yield server
    finally:
        await runner.cleanup()
