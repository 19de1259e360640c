"""Revocation of partners' certificates, from CRLs (``[tls] crls``).

With CRLs configured, the partner endpoint checks every client certificate against the CRL
of the CA that issued it during the TLS handshake (OpenSSL ``VERIFY_CRL_CHECK_LEAF``). A
revoked certificate, a CA with no CRL, or a CRL past its nextUpdate all refuse the handshake:
fail closed, like an expired certificate (no HTTP, no receipt). At start every partner CA
must have a CRL it signed, or the configuration is refused. Outbound connections check the
partner's server certificate against the same CRLs (``HttpsTransport``, ``crls``): a revoked
one fails the connection before a byte of the message is sent.

The files are watched: a new version (signed by a partner CA, with a later thisUpdate than
the one in force) is added to the live context's store, where OpenSSL uses the newest valid
CRL of an issuer for the next handshakes. A file that turns bad is refused with an error and
the CRL in force stays; a CRL past its nextUpdate is reported once per version. Superseded CRLs
stay in the store until the next start (OpenSSL cannot remove one from a live context): one
per published CRL, so a CA that publishes large CRLs often wants a periodic restart.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from cryptography import x509

from gateway.clock import Clock, format_rfc3339
from gateway.config import PartnerConfig, TlsConfig
from gateway.crypto.x509 import cert_subject_cn, crl_pem, crl_signed_by
from gateway.errors import ConfigError
from gateway.periodic import Periodic
from gateway.transports.tls import partner_trust_anchors, read_ca_certs

log = structlog.get_logger(__name__)

_KEY = "tls.crls"
_PEM_MARK = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True, kw_only=True)
class CrlFile:
    path: Path
    crl: x509.CertificateRevocationList
    #: the CA certificate that signed it
    issuer: x509.Certificate
    mtime_ns: int

    @property
    def next_update(self) -> datetime | None:
        return self.crl.next_update_utc

    def describe(self) -> str:
        return f"CRL of {cert_subject_cn(self.issuer)!r} ({len(self.crl)} revoked)"


def read_anchors(files: Mapping[Path, str]) -> list[tuple[Path, x509.Certificate]]:
    """Every CA certificate of the partner trust anchor files (each with the key naming it,
    for an error), with its file."""
    return [(path, cert) for path, key in files.items() for cert in read_ca_certs(path, key)]


def read_crl(path: Path, anchors: Sequence[x509.Certificate]) -> CrlFile:
    """Parse ``path`` (PEM) and find the partner CA that signed it, or raise ConfigError."""
    try:
        mtime_ns = path.stat().st_mtime_ns
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), _KEY, f"cannot read: {exc.strerror or exc}") from None
    if data.count(_PEM_MARK) > 1:
        raise ConfigError(str(path), _KEY, "holds more than one CRL: give each its own file")
    if _PEM_MARK not in data:
        raise ConfigError(
            str(path),
            _KEY,
            "not a PEM CRL (no '-----BEGIN X509 CRL-----'); convert a DER one with "
            "'openssl crl -inform DER -outform PEM'",
        )
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise ConfigError(str(path), _KEY, f"not a readable CRL: {exc}") from None
    for anchor in anchors:
        if crl_signed_by(crl, anchor):
            return CrlFile(path=path, crl=crl, issuer=anchor, mtime_ns=mtime_ns)
    raise ConfigError(
        str(path),
        _KEY,
        f"issued by {crl.issuer.rfc4514_string()!r}, which is not a partner CA "
        "(or its signature does not verify with that CA's key)",
    )


def load_crls(
    crls: Sequence[Path], anchor_files: Mapping[Path, str]
) -> tuple[list[CrlFile], list[x509.Certificate]]:
    """Read every configured CRL; every partner CA must have signed one of them."""
    anchors = read_anchors(anchor_files)
    certs = [cert for _, cert in anchors]
    files = [read_crl(path, certs) for path in crls]
    for path, cert in anchors:
        if not any(f.issuer == cert for f in files):
            raise ConfigError(
                str(path),
                _KEY,
                f"no CRL in tls.crls is from this partner CA ({cert_subject_cn(cert)!r}): "
                "with CRLs configured every partner CA needs one, or all of its certificates "
                "are refused",
            )
    return files, certs


def apply_crls(context: ssl.SSLContext, files: Sequence[CrlFile]) -> None:
    """Load the CRLs into ``context`` and check the peer's certificate against them (a
    client's on a server context, the server's on a client context)."""
    for crl_file in files:
        _add(context, crl_file)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def revoked_in(files: Sequence[CrlFile], cert: x509.Certificate) -> CrlFile | None:
    """The CRL of ``files`` that lists ``cert`` as revoked, if one does."""
    for crl_file in files:
        if crl_file.crl.issuer == cert.issuer and (
            crl_file.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        ):
            return crl_file
    return None


def _add(context: ssl.SSLContext, crl_file: CrlFile) -> None:
    # From the bytes that were checked, not from the path again: the file may have changed
    # since (``load_verify_locations`` takes CRLs only from a file).
    pem = crl_pem(crl_file.crl)
    try:
        with tempfile.NamedTemporaryFile(prefix="c2c-crl-", suffix=".pem") as checked:
            checked.write(pem)
            checked.flush()
            context.load_verify_locations(cafile=checked.name)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(str(crl_file.path), _KEY, f"cannot load: {exc}") from None


class CrlWatcher:
    """Re-reads changed CRL files; reports CRLs past nextUpdate.

    A newer CRL goes into a context built afresh with the CRLs in force (``make_context``),
    handed to the endpoint (``publish``) for its next handshakes: superseded CRLs do not pile
    up in a long-running process.
    """

    def __init__(
        self,
        *,
        make_context: Callable[[], ssl.SSLContext],
        publish: Callable[[ssl.SSLContext], None],
        files: Sequence[CrlFile],
        anchors: Sequence[x509.Certificate],
        clock: Clock,
        interval_s: float,
    ) -> None:
        self._make_context = make_context
        self._publish = publish
        self._files = list(files)
        self._anchors = list(anchors)
        self._clock = clock
        # (path, mtime) of a version refused, and CRL versions reported stale: each said once
        self._refused: set[tuple[Path, int]] = set()
        self._stale: set[tuple[Path, datetime | None]] = set()
        self._periodic = Periodic("crl-watcher", interval_s, self._check_async)
        self._listeners: list[Callable[[], None]] = []

    @property
    def files(self) -> list[CrlFile]:
        """The CRLs in force."""
        return list(self._files)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each change of the CRLs in force."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self.check()
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _check_async(self) -> None:
        self.check()

    def check(self) -> None:
        """Take in every changed file that is a valid, not older CRL; report stale ones."""
        for index, current in enumerate(self._files):
            try:
                mtime_ns = current.path.stat().st_mtime_ns
            except OSError as exc:
                self._refuse(current.path, -1, f"cannot read: {exc.strerror or exc}")
                continue
            if mtime_ns == current.mtime_ns:
                continue
            try:
                fresh = read_crl(current.path, self._anchors)
            except ConfigError as exc:
                self._refuse(current.path, mtime_ns, exc.reason)
                continue
            if fresh.crl.last_update_utc <= current.crl.last_update_utc:
                if fresh.crl.tbs_certlist_bytes == current.crl.tbs_certlist_bytes:
                    self._files[index] = fresh  # the same CRL written again
                    continue
                # OpenSSL keeps using the CRL in force unless the new one is more recent
                self._refuse(
                    current.path,
                    fresh.mtime_ns,
                    f"its thisUpdate {format_rfc3339(fresh.crl.last_update_utc)} is not later "
                    f"than the CRL in force ({format_rfc3339(current.crl.last_update_utc)})",
                )
                continue
            files = [*self._files[:index], fresh, *self._files[index + 1 :]]
            try:
                context = self._make_context()
                apply_crls(context, files)
            except ConfigError as exc:
                self._refuse(current.path, fresh.mtime_ns, exc.reason)
                continue
            self._publish(context)
            self._files = files
            for listener in self._listeners:
                listener()
            log.info(
                "crl_reloaded",
                path=str(fresh.path),
                crl=fresh.describe(),
                next_update=_time(fresh.next_update),
            )
        now = self._clock.now()
        for crl_file in self._files:
            next_update = crl_file.next_update
            key = (crl_file.path, next_update)
            if next_update is not None and now >= next_update and key not in self._stale:
                self._stale.add(key)
                log.error(
                    "crl_stale",
                    path=str(crl_file.path),
                    crl=crl_file.describe(),
                    next_update=_time(next_update),
                    effect=f"certificates of {cert_subject_cn(crl_file.issuer)!r} are refused "
                    "at the handshake (partners' clients, and partners' servers we connect to) "
                    "until a fresh CRL is installed",
                )

    def _refuse(self, path: Path, mtime_ns: int, reason: str) -> None:
        if (path, mtime_ns) in self._refused:
            return
        self._refused.add((path, mtime_ns))
        log.error("crl_reload_refused", path=str(path), reason=reason, kept="the CRL in force")


def next_updates(files: Iterable[CrlFile]) -> dict[str, datetime]:
    """Per partner CA (its subject's CN, or its whole subject when it has no single CN), the
    nextUpdate of its newest CRL in force: what OpenSSL checks, past which the CA's
    certificates are refused. A CRL with no nextUpdate never goes stale and is left out."""
    latest: dict[str, datetime] = {}
    for crl_file in files:
        moment = crl_file.next_update
        if moment is None:
            continue
        issuer = cert_subject_cn(crl_file.issuer) or crl_file.issuer.subject.rfc4514_string()
        if issuer not in latest or moment > latest[issuer]:
            latest[issuer] = moment
    return latest


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_rfc3339(moment)


def enable_revocation(
    make_context: Callable[[], ssl.SSLContext],
    tls: TlsConfig,
    partners: Iterable[PartnerConfig],
    clock: Clock,
    publish: Callable[[ssl.SSLContext], None],
) -> tuple[ssl.SSLContext, CrlWatcher]:
    """A context from ``make_context`` that checks partners' client certificates against
    ``tls.crls``, and the watcher (a gateway service) that keeps them current by publishing
    a new context when a CRL changes."""
    partners = list(partners)
    files, anchors = load_crls(tls.crls, partner_trust_anchors(tls, partners))
    context = make_context()
    apply_crls(context, files)
    return context, CrlWatcher(
        make_context=make_context,
        publish=publish,
        files=files,
        anchors=anchors,
        clock=clock,
        interval_s=tls.crl_check_interval_s,
    )
