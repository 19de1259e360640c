"""What a configuration that ``serve`` accepts should not have in production.

``serve`` refuses what cannot work; it takes the repository's development settings as they
are, so that ``demo`` and ``sandbox`` run with no more than ``pki init``. These checks name
the development settings left in a configuration meant for production, and the settings that
weaken it there: certificates of the development PKI, no revocation check, the API token
signing key on the gateway host, a reserved-name audit origin, passwords written into
gateway.toml, and private key files others may read. ``c2c-gateway check`` prints them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.config import GatewayConfig, open_private_key_files
from gateway.crypto.pki import DEV_ORGANIZATION

#: RFC 2606 and RFC 6761 names: never a real origin
_RESERVED_SUFFIXES = (".invalid", ".example", ".test", ".localhost")


@dataclass(frozen=True)
class Finding:
    """One setting unfit for production: where it is (``[table] key``) and why."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def deployment_findings(config: GatewayConfig) -> list[Finding]:
    """What ``config`` (loaded by ``load_config``) should not have in production."""
    raw = tomllib.loads(config.source.read_text(encoding="utf-8"))
    return [
        *_revocation(config),
        *_development_pki(config),
        *_token_signing_key(config),
        *_audit_origin(config),
        *_inline_passwords(raw),
        *_open_key_files(config),
    ]


def _revocation(config: GatewayConfig) -> Iterator[Finding]:
    if not config.tls.crls and not config.tls.ocsp:
        yield Finding(
            "[tls] crls, ocsp",
            "no revocation check: a partner certificate its CA revoked is accepted until it"
            " expires (give the partner CAs' CRLs, or ocsp = true)",
        )


def _is_development(name: x509.Name) -> bool:
    return any(
        attribute.value == DEV_ORGANIZATION
        for attribute in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    )


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []  # serve names a file it cannot read or parse


def _development_pki(config: GatewayConfig) -> Iterator[Finding]:
    if any(_is_development(cert.issuer) for cert in _certificates(config.tls.cert)):
        yield Finding(
            "[tls] cert",
            f"{config.tls.cert} is issued by the development PKI (c2c-gateway pki init),"
            " whose CA key pki init left on disk, unencrypted",
        )
    anchors = [("[tls] ca", config.tls.ca)]
    anchors += [
        (f"{_shown(config, partner.directory / 'partner.toml')} [https] ca", partner.https.ca)
        for partner in config.partners.values()
        if partner.https.ca is not None
    ]
    for where, path in anchors:
        if any(_is_development(cert.subject) for cert in _certificates(path)):
            yield Finding(
                where,
                f"{path} holds the development CA: whoever has its key (left on disk,"
                " unencrypted, by pki init) can make a certificate this gateway trusts",
            )


def _shown(config: GatewayConfig, path: Path) -> Path:
    """``path`` relative to gateway.toml's directory, where it is under it."""
    try:
        return path.relative_to(config.source.parent)
    except ValueError:
        return path


def _token_signing_key(config: GatewayConfig) -> Iterator[Finding]:
    if config.api_auth.signing_key is not None:
        yield Finding(
            "[api_auth] signing_key",
            "the key that signs internal API tokens is on the gateway host (for"
            " c2c-gateway token issue, development only): whoever reads it can issue"
            " tokens of any scope; tokens should come from the identity provider, and"
            " public_keys alone verify them",
        )


def _audit_origin(config: GatewayConfig) -> Iterator[Finding]:
    host = config.audit.origin.split("/", 1)[0].lower()
    if host.endswith(_RESERVED_SUFFIXES) or f".{host}" in _RESERVED_SUFFIXES:
        yield Finding(
            "[audit] origin",
            f"{config.audit.origin!r} is a reserved name (the development origin): the"
            " checkpoints our partners witness name our log by it",
        )


def _password(url: Any) -> bool:
    return isinstance(url, str) and bool(urlsplit(url).password)


def _inline_passwords(raw: dict[str, Any]) -> Iterator[Finding]:
    if _password(raw.get("store_url")):
        yield Finding(
            "store_url",
            "holds a password: give store_url_env, the name of an environment variable"
            " holding the URL, so the password is not in gateway.toml",
        )
    amqp = raw.get("amqp")
    if isinstance(amqp, dict) and _password(amqp.get("url")):
        yield Finding(
            "[amqp] url",
            "holds a password: give url_env, the name of an environment variable holding"
            " the URL, so the password is not in gateway.toml",
        )


def _open_key_files(config: GatewayConfig) -> Iterator[Finding]:
    for key, path, mode in open_private_key_files(config):
        yield Finding(
            key, f"{path} is mode {mode:04o}: its group or others may read it (chmod 600)"
        )
