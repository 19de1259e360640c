"""What a configuration that ``serve`` accepts should not have in production.

``serve`` refuses what cannot work; it takes the repository's development settings as they
are, so that ``demo`` and ``sandbox`` run with no more than ``pki init``. These checks name
the development settings left in a configuration meant for production, and the settings that
weaken it there: certificates of the development PKI, no revocation check, the API token
signing key on the gateway host, reserved-name audit origins, partner networks beyond a VPN's
(every address, or loopback as in development), passwords written into gateway.toml, private
key files others may read; and what ``serve`` takes without a word though nothing works as
meant: a partner none of whose signing keys is valid now, a broker URL naming no vhost (the
broker's shared default), no partners at all. ``c2c-gateway check`` prints them.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.clock import SystemClock, format_rfc3339
from gateway.config import GatewayConfig, PartnerConfig, open_private_key_files
from gateway.crypto.keys import (
    jwk_thumbprint,
    read_private_key,
    read_public_key,
)
from gateway.crypto.pki import DEV_ORGANIZATION
from gateway.errors import ConfigError

#: RFC 2606 and RFC 6761 names: never a real origin
_RESERVED_SUFFIXES = (".invalid", ".example", ".test", ".localhost")
_RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
#: URL query parameters that carry a password (asyncpg reads both from a store URL)
_PASSWORD_PARAMETERS = frozenset({"password", "sslpassword"})
#: the widest private networks (RFC 1918, RFC 4193): a VPN's is in one of them
_WIDEST_PRIVATE = {4: ipaddress.ip_network("10.0.0.0/8"), 6: ipaddress.ip_network("fc00::/7")}
#: this host: loopback, and the unspecified addresses, which a connection takes to this host
_THIS_HOST = {
    4: (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("0.0.0.0/8")),
    6: (ipaddress.ip_network("::1/128"), ipaddress.ip_network("::/128")),
}
#: what each allowed_networks finding asks for
_NETWORK_ADVICE = "(list only the non-public network the partner is reached over, a VPN's, or none)"
#: link-local: the cloud metadata service (169.254.169.254) among them
_LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}


@dataclass(frozen=True)
class Finding:
    """One setting unfit for production: where it is (its key, as configuration errors name
    it) and why."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def deployment_findings(config: GatewayConfig, *, now: datetime | None = None) -> list[Finding]:
    """What ``config`` (loaded by ``load_config``) should not have in production, at ``now``
    (default: the current time)."""
    raw = tomllib.loads(config.source.read_text(encoding="utf-8"))
    at = SystemClock().now() if now is None else now
    return [
        *_no_partners(config),
        *_revocation(config),
        *_development_pki(config),
        *_token_keys(config),
        *_audit_origins(config),
        *_partner_networks(config),
        *_partner_keys(config, at),
        *_inline_passwords(raw),
        *_amqp_vhost(config, raw),
        *_open_key_files(config),
    ]


def _no_partners(config: GatewayConfig) -> Iterator[Finding]:
    # serve starts without a word: a mistyped or emptied partners_dir is a gateway that
    # refuses every partner's connection and has no one to send to
    if not config.partners:
        yield Finding(
            "partners_dir",
            f"{config.partners_dir} holds no partner (a folder with a partner.toml): the"
            " gateway would exchange with no one; set partners_dir, relative to"
            f" {config.source.name}, to the folder holding the partners' folders",
        )


def _revocation(config: GatewayConfig) -> Iterator[Finding]:
    if not config.tls.crls and not config.tls.ocsp:
        yield Finding(
            "tls.crls, tls.ocsp",
            "no revocation check: a partner certificate its CA revoked is accepted until it"
            " expires (give the partner CAs' CRLs, or ocsp = true)",
        )


def _is_development(cert: x509.Certificate, *, issuer: bool) -> bool:
    """Whether the certificate's issuer (or subject) is the development PKI's CA."""
    try:
        name = cert.issuer if issuer else cert.subject
    except ValueError:  # a name cryptography cannot parse is not one pki init wrote
        return False
    attributes = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(attribute.value == DEV_ORGANIZATION for attribute in attributes)


def _certificates(where: str, path: Path) -> tuple[list[x509.Certificate], list[Finding]]:
    """The certificates in ``path``, or a finding that it could not be read to check."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes()), []
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except ValueError as exc:
        reason = str(exc)
    return [], [Finding(where, f"{path} could not be read to check it: {reason}")]


def _development_pki(config: GatewayConfig) -> Iterator[Finding]:
    own, unread = _certificates("tls.cert", config.tls.cert)
    yield from unread
    if any(_is_development(cert, issuer=True) for cert in own):
        yield Finding(
            "tls.cert",
            f"{config.tls.cert} is issued by the development PKI (c2c-gateway pki init),"
            " whose CA key pki init left on disk, unencrypted",
        )
    anchors = [("tls.ca", config.tls.ca)]
    anchors += [
        (f"{_shown(config, partner.directory / 'partner.toml')}: https.ca", partner.https.ca)
        for partner in config.partners.values()
        if partner.https.ca is not None
    ]
    for where, path in anchors:
        certificates, unread = _certificates(where, path)
        yield from unread
        if any(_is_development(cert, issuer=False) for cert in certificates):
            yield Finding(
                where,
                f"{path} holds the development CA: whoever has its key (left on disk,"
                " unencrypted, by pki init) can make a certificate that passes this"
                " gateway's TLS handshake",
            )


def _shown(config: GatewayConfig, path: Path) -> Path:
    """``path`` relative to gateway.toml's directory, where it is under it."""
    try:
        return path.relative_to(config.source.parent)
    except ValueError:
        return path


def _token_keys(config: GatewayConfig) -> Iterator[Finding]:
    if config.api_auth.signing_key is not None:
        yield Finding(
            "api_auth.signing_key",
            "the key that signs internal API tokens is on the gateway host (for"
            " c2c-gateway token issue, development only): whoever reads it can issue"
            " tokens of any scope; tokens should come from the identity provider, and"
            " public_keys alone verify them",
        )
    for index, public in enumerate(config.api_auth.public_keys):
        private = public.with_suffix(".key")
        if private != config.api_auth.signing_key and _is_private_of(private, public):
            yield Finding(
                f"api_auth.public_keys[{index}]",
                f"the private key of {public} lies beside it ({private}, as pki init"
                " leaves it): whoever reads it can issue tokens of any scope",
            )


def _is_private_of(private: Path, public: Path) -> bool:
    """Whether ``private`` holds an unencrypted private key whose public key is
    ``public``'s."""
    try:
        return jwk_thumbprint(read_private_key(private)) == jwk_thumbprint(read_public_key(public))
    except ConfigError:  # no such file, not such a key: serve names what it needs
        return False


def _reserved_host(origin: str) -> bool:
    """Whether the host an origin (``host/path``, maybe with a scheme or a port) names is a
    reserved one, which no real log has."""
    host = origin.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host = host.split(":", 1)[0].rstrip(".").lower()
    dotted = f".{host}"
    return dotted.endswith(_RESERVED_SUFFIXES) or any(
        host == domain or host.endswith(f".{domain}") for domain in _RESERVED_DOMAINS
    )


def _audit_origins(config: GatewayConfig) -> Iterator[Finding]:
    if _reserved_host(config.audit.origin):
        yield Finding(
            "audit.origin",
            f"{config.audit.origin!r} names a reserved host (RFC 2606, RFC 6761), as the"
            " development origin does: the checkpoints our partners witness name our log"
            " by it",
        )
    for partner in config.partners.values():
        if partner.audit is not None and _reserved_host(partner.audit.origin):
            yield Finding(
                f"{_shown(config, partner.directory / 'partner.toml')}: audit.origin",
                f"{partner.audit.origin!r} names a reserved host (RFC 2606, RFC 6761), as"
                " the development origins do: no real partner log has it",
            )


def _partner_networks(config: GatewayConfig) -> Iterator[Finding]:
    """``allowed_networks``: the non-public networks a partner's URL may lead the gateway to
    (gateway/netpolicy.py); every other address it connects to is public."""
    for partner in config.partners.values():
        shown = _shown(config, partner.directory / "partner.toml")
        for index, network in enumerate(partner.https.allowed_networks):
            where = f"{shown}: https.allowed_networks[{index}]"
            widest = _WIDEST_PRIVATE[network.version]
            if network.prefixlen < widest.prefixlen:
                what = (
                    f"admits every IPv{network.version} address"
                    if network.prefixlen == 0
                    else f"is wider than any private network ({widest} is the widest)"
                )
                yield Finding(
                    where,
                    f"{network} {what}: the gateway connects wherever the partner's URL leads"
                    " in it, to this host or an internal network too, where it otherwise"
                    f" connects to public addresses only {_NETWORK_ADVICE}",
                )
            elif any(network.overlaps(own) for own in _THIS_HOST[network.version]):
                yield Finding(
                    where,
                    f"{network} admits addresses of this host (loopback, or the unspecified"
                    " address, which leads to it), as the development partner files do (the"
                    " peer gateway on this host): no real partner is there, and the gateway"
                    " connects to this host's own services wherever the partner's URL leads to"
                    f" them {_NETWORK_ADVICE}",
                )
            elif network.overlaps(_LINK_LOCAL[network.version]):
                yield Finding(
                    where,
                    f"{network} admits link-local addresses, the cloud metadata service at"
                    " 169.254.169.254 among them: a partner's URL leading there would have the"
                    f" gateway fetch from it {_NETWORK_ADVICE}",
                )


def _windows_missed(partner: PartnerConfig, now: datetime) -> list[str]:
    """Each of the partner's keys, with the end of its window ``now`` is past, when none is
    valid at ``now``; empty when one is, or when one does not load (serve refuses that
    first, naming the file)."""
    windows = []
    for index, key in enumerate(partner.keys):
        try:
            # loaded as serve loads it, so valid now as serve verifies it
            loaded = partner.load_key(key)
        except ConfigError:
            return []
        if loaded.valid_at(now):
            return []
        if loaded.not_before is not None and now < loaded.not_before:
            windows.append(f"keys[{index}] is not valid before {format_rfc3339(loaded.not_before)}")
        elif loaded.not_after is not None:
            windows.append(f"keys[{index}] expired at {format_rfc3339(loaded.not_after)}")
    return windows


def _partner_keys(config: GatewayConfig, now: datetime) -> Iterator[Finding]:
    """A partner none of whose keys is valid now: serve takes in its keys, and every message
    it signs is refused UNKNOWN_KEY (a key is checked at the message's created_at)."""
    for partner in config.partners.values():
        windows = _windows_missed(partner, now)
        if windows:
            yield Finding(
                f"{_shown(config, partner.directory / 'partner.toml')}: keys",
                f"none of {partner.id}'s signing keys is valid now ({format_rfc3339(now)}):"
                f" {', '.join(windows)}; every message it signs now is refused (UNKNOWN_KEY)."
                " Add the key it signs with now (a [[keys]] entry with its not_before), or"
                " correct the window that is wrong, then send serve a SIGHUP",
            )


def _has_password(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        return bool(parts.password) or any(n.lower() in _PASSWORD_PARAMETERS for n in query)
    except ValueError:
        return False  # load_config refused it already, or it is not a URL


def _inline_passwords(raw: dict[str, Any]) -> Iterator[Finding]:
    if _has_password(raw.get("store_url")):
        yield Finding(
            "store_url",
            "holds a password: give store_url_env, the name of an environment variable"
            " holding the URL, so the password is not in gateway.toml",
        )
    amqp = raw.get("amqp")
    if isinstance(amqp, dict) and _has_password(amqp.get("url")):
        yield Finding(
            "amqp.url",
            "holds a password: give url_env, the name of an environment variable holding"
            " the URL, so the password is not in gateway.toml",
        )


def _amqp_vhost(config: GatewayConfig, raw: dict[str, Any]) -> Iterator[Finding]:
    if config.amqp.url is None:
        return
    try:
        path = urlsplit(config.amqp.url).path
    except ValueError:
        return  # load_config refused it already
    # RabbitMQ's URI spec: no path is the default vhost "/" (aiormq takes "/" alone as it
    # too); "/%2F" names it, a deliberate choice
    if path not in ("", "/"):
        return
    amqp = raw.get("amqp")
    where = "amqp.url_env" if isinstance(amqp, dict) and "url_env" in amqp else "amqp.url"
    yield Finding(
        where,
        "names no vhost, so the gateway declares its exchanges and queues in the broker's"
        ' default vhost "/", shared with whatever else uses the broker: name one of its own'
        " at the end of the URL (amqp://user@host/VHOST; c2c-gateway amqp setup makes it),"
        ' or end it with /%2F to choose "/"',
    )


def _open_key_files(config: GatewayConfig) -> Iterator[Finding]:
    for key, path, mode in open_private_key_files(config):
        may = " and ".join(
            verb for verb, bits in (("read", 0o044), ("write", 0o022)) if mode & bits
        )
        yield Finding(
            key, f"{path} is mode {mode:04o}: its group or others may {may} it (chmod 600)"
        )
