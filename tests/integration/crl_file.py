"""CRLs signed by a test PKI's CA (``gateway.crypto.pki.init_dev_pki``)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: when the tests were collected: a test writing a CRL of thisUpdate NOW supersedes one
#: written with the default, however long after collection it runs
NOW = dt.datetime.now(dt.UTC)


def write_crl(
    root: Path,
    revoked: Sequence[str] = (),
    *,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
    issuer_dir: str = "pki",
) -> Path:
    """A CRL signed by the CA in ``root/issuer_dir``, revoking those parties' TLS
    certificates, written to ``root/pki/ca.crl`` (its mtime moved on, as a new file's)."""
    pki = root / issuer_dir
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    this_update = this_update or NOW - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update or this_update + dt.timedelta(days=7))
    )
    for party in revoked:
        cert = x509.load_pem_x509_certificate((root / "pki" / party / "tls.pem").read_bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(this_update)
            .build()
        )
    path = root / "pki" / "ca.crl"
    old_mtime = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    mtime = max(path.stat().st_mtime_ns, old_mtime + 1_000_000)
    os.utime(path, ns=(mtime, mtime))
    return path
