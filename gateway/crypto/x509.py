"""X.509 certificate helpers: load, fingerprint, subject name.

Partners are pinned by certificate fingerprint (SHA-256 of the DER encoding, lowercase hex,
no colons: what ``partner.toml`` holds) or by subject common name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"
# the kinds of CA key a CRL signature can be checked with here
_CRL_ISSUER_KEYS = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


def _parse(data: bytes) -> x509.Certificate:
    if _PEM_MARKER in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_certificate(source: Path | bytes | str) -> x509.Certificate:
    """The first certificate of a PEM or DER file (Path) or of PEM/DER bytes or PEM text.

    A file that is missing or not a certificate raises ``ConfigError(file, "certificate", ...)``;
    bytes or text that are not a certificate raise ``ValueError``.
    """
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ConfigError(
                str(source), "certificate", f"cannot read file: {exc.strerror}"
            ) from None
        try:
            return _parse(data)
        except ValueError:
            raise ConfigError(
                str(source), "certificate", "is not a PEM or DER X.509 certificate"
            ) from None
    return _parse(source.encode("ascii") if isinstance(source, str) else source)


def cert_fingerprint(cert: x509.Certificate | bytes | str) -> str:
    """SHA-256 over the DER encoding, lowercase hex without colons."""
    certificate = cert if isinstance(cert, x509.Certificate) else load_certificate(cert)
    return certificate.fingerprint(hashes.SHA256()).hex()


def cert_subject_cn(cert: x509.Certificate) -> str | None:
    """The subject's common name, or None when it has none (or more than one)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def ca_identity(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """The CA a certificate stands for: its subject and public key (DER). A CA certificate
    re-issued with both (a renewal) is the same CA, with another fingerprint."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert.subject.public_bytes(), spki


def directly_issued(cert: x509.Certificate, by: Iterable[x509.Certificate]) -> bool:
    """Whether one of ``by`` issued ``cert`` (its subject is the issuer, its key verifies the
    signature); ``cert`` itself does not count."""
    for issuer in by:
        if issuer is cert or cert.issuer != issuer.subject:
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``crl``: its subject is the CRL's issuer and its key verifies
    the CRL's signature."""
    key = ca.public_key()
    if ca.subject != crl.issuer or not isinstance(key, _CRL_ISSUER_KEYS):
        return False
    return crl.is_signature_valid(key)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)
