"""TLS contexts and client-certificate identity.

Server: TLS 1.2+, client certificate required and verified against the trust anchors of the
configured partners; the verified certificate is then tied to exactly one partner by its
configured SHA-256 fingerprint(s) or subject CN, issued directly by that partner's own CA.
Client (outbound): verifies the partner's server certificate and hostname, presents ours.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.config import PartnerConfig, TlsConfig
from gateway.crypto.x509 import cert_fingerprint, cert_subject_cn, directly_issued
from gateway.errors import ConfigError
from gateway.transports.tls_identity import load_own_pair

#: loads our certificate and key into a context (``TlsIdentity.load_into``: the pair in force)
LoadPair = Callable[[ssl.SSLContext], None]


def _load_pair(context: ssl.SSLContext, tls: TlsConfig, load_pair: LoadPair | None) -> None:
    if load_pair is None:
        load_own_pair(context, tls)
    else:
        load_pair(context)


def _load_ca(context: ssl.SSLContext, ca: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(str(ca), key, f"cannot load trust anchor: {exc}") from None


def partner_trust_anchors(tls: TlsConfig, partners: Iterable[PartnerConfig]) -> dict[Path, str]:
    """Every CA file a partner's client certificate may chain to, with the key that names it
    first (no duplicates, stable order)."""
    anchors = {tls.ca: "tls.ca"}
    for partner in partners:
        if partner.https.ca is not None:
            anchors.setdefault(partner.https.ca, f"{partner.id}: https.ca")
    return anchors


def server_context(
    tls: TlsConfig, partners: Iterable[PartnerConfig], *, load_pair: LoadPair | None = None
) -> ssl.SSLContext:
    """Partner-facing server: TLS 1.2+, client certificate required and chain-verified; our
    certificate is the one ``load_pair`` loads, or the files as they are (``load_own_pair``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No session is resumed: a resumed one skips the client certificate's verification, and a
    # certificate that expired since would get in for the ticket's lifetime (2 hours).
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    _load_pair(context, tls, load_pair)
    for anchor, key in partner_trust_anchors(tls, partners).items():
        _load_ca(context, anchor, key)
    return context


def client_context(
    tls: TlsConfig, ca: Path | None = None, *, load_pair: LoadPair | None = None
) -> ssl.SSLContext:
    """Outbound client: verifies the server against ``ca`` (default: ours), presents our cert:
    the one ``load_pair`` loads, or the files as they are (``load_own_pair``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.options |= ssl.OP_NO_COMPRESSION
    if ca is None:
        _load_ca(context, tls.ca, "tls.ca")
    else:
        _load_ca(context, ca, "https.ca")
    _load_pair(context, tls, load_pair)
    return context


def read_ca_certs(path: Path, key: str = "https.ca") -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), key, f"cannot read CA certificates: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class _PartnerIdentity:
    partner: str
    anchors: tuple[x509.Certificate, ...]
    fingerprints: frozenset[str]
    subjects: frozenset[str]


class PartnerIdentifier:
    """Ties a verified client certificate to the one partner it identifies, or to none.

    A partner with neither fingerprints nor subjects configured cannot use HTTPS: identity
    is never guessed from the certificate alone.
    """

    def __init__(self, tls: TlsConfig, partners: Mapping[str, PartnerConfig]) -> None:
        by_file: dict[Path, tuple[x509.Certificate, ...]] = {}
        identities = []
        for partner in partners.values():
            fingerprints = frozenset(
                f.lower().replace(":", "") for f in partner.https.client_cert_fingerprints
            )
            subjects = frozenset(partner.https.client_cert_subjects)
            if not fingerprints and not subjects:
                continue
            ca, key = (
                (tls.ca, "tls.ca")
                if partner.https.ca is None
                else (partner.https.ca, f"{partner.id}: https.ca")
            )
            if ca not in by_file:
                by_file[ca] = read_ca_certs(ca, key)
            identities.append(
                _PartnerIdentity(
                    partner=partner.id,
                    anchors=by_file[ca],
                    fingerprints=fingerprints,
                    subjects=subjects,
                )
            )
        self._identities = tuple(identities)

    def identify(self, der: bytes) -> str | None:
        """The partner id for this (already chain-verified) certificate, or None."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        found = {i.partner for i in self._claiming(cert) if directly_issued(cert, i.anchors)}
        # Two partners claiming one certificate is a configuration error: refuse both.
        return found.pop() if len(found) == 1 else None

    def _claiming(self, cert: x509.Certificate) -> list[_PartnerIdentity]:
        """The partners whose configured fingerprints or subjects name this certificate."""
        fingerprint = cert_fingerprint(cert)
        name = cert_subject_cn(cert)
        return [
            identity
            for identity in self._identities
            if fingerprint in identity.fingerprints or name in identity.subjects
        ]

    def explain(self, der: bytes | None) -> str:
        """Why this (chain-verified) certificate identifies no partner, for the audit log."""
        if not der:
            return "no client certificate on the connection"
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return "client certificate is not parseable"
        described = (
            f"client certificate sha256 {cert_fingerprint(cert)} (CN {cert_subject_cn(cert)!r})"
        )
        claimed = self._claiming(cert)
        issued = sorted({i.partner for i in claimed if directly_issued(cert, i.anchors)})
        if len(issued) > 1:
            return f"{described} is claimed by partners {', '.join(issued)}: refused for all"
        if claimed and not issued:
            partners = ", ".join(sorted({i.partner for i in claimed}))
            issuer = cert.issuer.rfc4514_string()
            return (
                f"{described} matches partner {partners}, but its issuer {issuer!r} is not in"
                " that partner's https.ca file (list an issuing intermediate CA there)"
            )
        return f"{described} identifies no configured partner"
