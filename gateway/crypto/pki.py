"""Development PKI: a CA, TLS certificates for client and server use, and signing keys.

For development, tests and the conformance sandbox only: production keys and certificates
come from each administration's own PKI. The layout is PROTOCOL.md section 8::

    DIR/ca.pem  DIR/ca.key                       the development CA (ECDSA P-256)
    DIR/P/tls.pem  DIR/P/tls.key                 P's TLS certificate (CN = P, serverAuth +
                                                 clientAuth, SAN = the hosts) and key (P-256)
    DIR/P/sign.key  DIR/P/sign.pub  DIR/P/sign.kid   P's Ed25519 message-signing key pair and
                                                 its RFC 7638 thumbprint
    DIR/P/audit.key  DIR/P/audit.pub             P's audit checkpoint key (Ed25519): signs P's
                                                 checkpoints and cosigns its partners'
    DIR/G/api-token.key  DIR/G/api-token.pub     the gateway party's internal-API token key

Generation is idempotent: a file that exists is kept (and checked against its partner file),
only missing files are made, each written atomically; private keys are mode 0600. One
exception: a TLS certificate made by a development CA is re-issued (for its existing key) when
its subject alternative names do not cover the hosts asked, or when it does not chain to
``ca.pem`` (a new CA was made): kept, it would fail every handshake. A certificate from any
other CA is never replaced: that is an error.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.crypto.keys import Alg, PrivateKey, alg_for_key, jwk_thumbprint, read_private_key
from gateway.errors import ConfigError
from gateway.model import is_party_id

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
TLS_CERT = "tls.pem"
TLS_KEY = "tls.key"
SIGN_KEY = "sign.key"
SIGN_PUB = "sign.pub"
SIGN_KID = "sign.kid"
AUDIT_KEY = "audit.key"
AUDIT_PUB = "audit.pub"
API_TOKEN_KEY = "api-token.key"  # noqa: S105 -- a file name, not a secret
API_TOKEN_PUB = "api-token.pub"  # noqa: S105 -- a file name, not a secret

DEV_ORGANIZATION = "c2c-gateway development PKI (not for production)"
_CA_NAME = "C2C Development CA"
_CA_LIFETIME = timedelta(days=3650)
_LEAF_LIFETIME = timedelta(days=1095)
# Tolerates clocks of the machines in a demo being slightly behind.
_BACKDATE = timedelta(hours=1)


class PkiError(Exception):
    """The directory holds an inconsistent set of files that cannot be completed safely."""


class _Created:
    """What this run wrote, relative to the PKI directory, in order."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self.paths: list[str] = []

    def add(self, path: Path) -> None:
        self.paths.append(path.relative_to(self._root).as_posix())


def _write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    # A crash never leaves a half-written key: write a temporary file, then rename it.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: ec.EllipticCurvePublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: expected an ECDSA P-256 private key")
    return key


def _load_ed25519_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{path}: expected an Ed25519 private key")
    return key


def _ensure_ec_key(path: Path, created: _Created) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return _load_ec_key(path)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_atomic(path, _private_pem(key), private=True)
    created.add(path)
    return key


def _ensure_ed25519_pair(key_path: Path, pub_path: Path, created: _Created) -> Ed25519PublicKey:
    """The key pair at key_path/pub_path; a public key without its private key is an error."""
    if key_path.exists():
        public = _load_ed25519_key(key_path).public_key()
    elif pub_path.exists():
        raise PkiError(f"{pub_path} exists without {key_path.name}; remove it to regenerate both")
    else:
        private = Ed25519PrivateKey.generate()
        _write_atomic(key_path, _private_pem(private), private=True)
        created.add(key_path)
        public = private.public_key()
    expected = _public_pem(public)
    if not pub_path.exists():
        _write_atomic(pub_path, expected, private=False)
        created.add(pub_path)
    elif pub_path.read_bytes().strip() != expected.strip():
        raise PkiError(f"{pub_path} does not match {key_path.name}")
    return public


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class _Ca:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        self.cert = cert
        self.key = key


def _ensure_ca(root: Path, created: _Created) -> _Ca:
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise PkiError(f"{cert_path}: not a PEM certificate") from None
        key = _load_ec_key(key_path) if key_path.exists() else None
        if key is not None and cert.public_key() != key.public_key():
            raise PkiError(f"{cert_path} does not match {key_path.name}")
        return _Ca(cert, key)
    key = _ensure_ec_key(key_path, created)
    now = datetime.now(UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(_CA_NAME))
        .issuer_name(_name(_CA_NAME))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    created.add(cert_path)
    return _Ca(cert, key)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue_tls_cert(
    ca: _Ca, party: str, key: ec.EllipticCurvePrivateKey, hosts: Sequence[str]
) -> x509.Certificate:
    if ca.key is None:
        raise PkiError(f"{CA_CERT} exists without {CA_KEY}: cannot issue a certificate for {party}")
    now = datetime.now(UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(party))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + _LEAF_LIFETIME, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def _uncovered(cert: x509.Certificate, hosts: Sequence[str]) -> list[str]:
    """The hosts that ``cert``'s subject alternative names do not name."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return list(hosts)
    ips = set(san.get_values_for_type(x509.IPAddress))
    dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    missing = []
    for host in hosts:
        try:
            covered = ipaddress.ip_address(host) in ips
        except ValueError:
            covered = host.lower() in dns
        if not covered:
            missing.append(host)
    return missing


def _issued_by(cert: x509.Certificate, ca: _Ca) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ensure_tls(
    ca: _Ca, party_dir: Path, party: str, hosts: Sequence[str], created: _Created
) -> None:
    cert_path, key_path = party_dir / TLS_CERT, party_dir / TLS_KEY
    if cert_path.exists():
        if not key_path.exists():
            raise PkiError(f"{cert_path} exists without {TLS_KEY}; remove it to regenerate both")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise PkiError(f"{cert_path}: not a PEM certificate") from None
        problems = []
        if not _issued_by(cert, ca):
            problems.append(f"is not issued by {CA_CERT}")
        missing = _uncovered(cert, hosts)
        if missing:
            problems.append(f"does not cover {', '.join(missing)}")
        if not problems:
            return
        why = f"{cert_path} {' and '.join(problems)}"
        if cert.issuer != _name(_CA_NAME):
            raise PkiError(
                f"{why}, and no development CA issued it: replace it, or remove it and "
                f"{TLS_KEY} to have the development PKI issue both"
            )
        if ca.key is None:
            raise PkiError(f"{why}, and {CA_CERT} exists without {CA_KEY}: cannot re-issue it")
        key = _load_ec_key(key_path)
        cert = _issue_tls_cert(ca, party, key, hosts)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        created.add(cert_path)
        return
    key = _ensure_ec_key(key_path, created)
    cert = _issue_tls_cert(ca, party, key, hosts)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    created.add(cert_path)


def _ensure_signing(party_dir: Path, created: _Created) -> None:
    public = _ensure_ed25519_pair(party_dir / SIGN_KEY, party_dir / SIGN_PUB, created)
    kid_path = party_dir / SIGN_KID
    kid = jwk_thumbprint(public)
    if not kid_path.exists():
        _write_atomic(kid_path, f"{kid}\n".encode("ascii"), private=False)
        created.add(kid_path)
    elif kid_path.read_text(encoding="ascii", errors="replace").strip() != kid:
        raise PkiError(f"{kid_path} is not the thumbprint of {SIGN_PUB}")


def init_dev_pki(
    dir: Path,
    parties: Sequence[str],
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    gateway_party: str | None = None,
) -> list[str]:
    """Create what is missing of the development PKI for ``parties`` in ``dir``.

    Every party gets an audit checkpoint key; ``gateway_party`` (default: the first of
    ``parties``) also gets its API-token key. A development TLS certificate that does not
    cover ``hosts`` or does not chain to the CA is re-issued for its key. Returns the files
    written (made, or certificates re-issued), relative to ``dir``; empty when nothing was
    missing.
    Raises ValueError for a bad party id or host, PkiError for an inconsistent directory.
    """
    for party in parties:
        if not is_party_id(party):
            raise ValueError(f"not a party id: {party!r}")
    if gateway_party is None and parties:
        gateway_party = parties[0]
    if gateway_party is not None and not is_party_id(gateway_party):
        raise ValueError(f"not a party id: {gateway_party!r}")
    if not hosts or any(not host or not host.isascii() or host != host.strip() for host in hosts):
        raise ValueError(f"hosts must be non-empty ASCII names or addresses: {list(hosts)!r}")
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    created = _Created(root)
    ca = _ensure_ca(root, created)
    every = list(dict.fromkeys([*parties, *([gateway_party] if gateway_party else [])]))
    for party in every:
        party_dir = root / party
        party_dir.mkdir(exist_ok=True)
        _ensure_tls(ca, party_dir, party, hosts, created)
        _ensure_signing(party_dir, created)
        # Every administration runs a gateway that signs checkpoints its partners witness.
        _ensure_ed25519_pair(party_dir / AUDIT_KEY, party_dir / AUDIT_PUB, created)
        if party == gateway_party:
            _ensure_ed25519_pair(party_dir / API_TOKEN_KEY, party_dir / API_TOKEN_PUB, created)
    return created.paths


def _write_new(path: Path, data: bytes, *, private: bool) -> None:
    # Complete before it appears, and never replaces a file: link() fails if the name exists.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_signing_key(path: Path, alg: str = "EdDSA") -> tuple[Path, str]:
    """A new message-signing key of ``alg`` (Ed25519, or P-256 for ES256): private PEM at
    ``path`` (mode 0600), public PEM next to it with the suffix ``.pub``. Returns (public key
    path, kid = RFC 7638 thumbprint).

    Never overwrites: if either file exists, raises PkiError and writes nothing.
    """
    pub_path = path.with_suffix(".pub")
    for existing in (path, pub_path):
        if existing.exists():
            raise PkiError(f"{existing} already exists; a new key never replaces a file")
    private: ec.EllipticCurvePrivateKey | Ed25519PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else Ed25519PrivateKey.generate()
    )
    _write_new(path, _private_pem(private), private=True)
    try:
        _write_new(pub_path, _public_pem(private.public_key()), private=False)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return pub_path, jwk_thumbprint(private.public_key())


#: The development key files of a party's signing key of each algorithm, in its PKI folder:
#: the Ed25519 ones are PROTOCOL section 8's.
SIGNING_KEY_FILES: dict[Alg, tuple[str, str, str]] = {
    "EdDSA": ("sign.key", "sign.pub", "sign.kid"),
    "ES256": ("sign-es256.key", "sign-es256.pub", "sign-es256.kid"),
}


def ensure_signing_key_files(party_dir: Path, alg: Alg) -> list[Path]:
    """A development signing key of ``alg`` in ``party_dir`` (``SIGNING_KEY_FILES``): made if
    absent, else checked (the private key of ``alg``, the public key and kid its own).
    Returns the files written. ValueError names a file that does not fit."""
    key_name, pub_name, kid_name = SIGNING_KEY_FILES[alg]
    key_path, pub_path, kid_path = party_dir / key_name, party_dir / pub_name, party_dir / kid_name
    written: list[Path] = []
    private: PrivateKey
    if key_path.exists():
        try:
            private = read_private_key(key_path)
        except ConfigError as exc:
            raise ValueError(f"{key_path}: {exc.reason}") from None
        actual = alg_for_key(private)
        if actual != alg:
            raise ValueError(f"{key_path}: an {actual} key, expected an {alg} key")
    elif pub_path.exists() or kid_path.exists():
        raise ValueError(
            f"{key_path} is missing beside {pub_name}; remove {pub_name} and {kid_name}"
        )
    else:
        private = (
            ec.generate_private_key(ec.SECP256R1())
            if alg == "ES256"
            else Ed25519PrivateKey.generate()
        )
        party_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(key_path, _private_pem(private), private=True)
        written.append(key_path)
    public = private.public_key()
    kid = jwk_thumbprint(public)
    for path, data in ((pub_path, _public_pem(public)), (kid_path, f"{kid}\n".encode("ascii"))):
        if not path.exists():
            _write_atomic(path, data, private=False)
            written.append(path)
        elif path.read_bytes().strip() != data.strip():
            raise ValueError(f"{path} does not match {key_name}")
    return written
