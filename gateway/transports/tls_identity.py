"""Our own TLS certificate and key, taken in again while serving (renewal without a restart).

``serve`` reloads them on SIGHUP, and when the files change (checked every
``tls.cert_check_interval_s``). The new pair is read once and checked on a context of its own:
the key must match the certificate, and the certificate must be inside its validity period.
Only then is it loaded into every live context that presents our identity (the partner
endpoint, the internal API, the outbound clients). New handshakes use it; open connections
keep the one they started with. A bad pair is refused with its reason, logged and audited,
and the pair in force stays. Each outcome is an audited operator action.

A key is never decrypted: OpenSSL would ask for its passphrase on the terminal, inside the
event loop, and the gateway would stop answering. A passphrase-protected key is refused, at
start (``load_own_pair``, exit 2) as on reload.

The expiry of the certificate in force is exported as
``c2c_tls_certificate_expiry_timestamp_seconds``, so an alert can fire before it lapses.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from cryptography import x509

from gateway.audit.events import AuditEvent, EventKind, record_or_log
from gateway.clock import Clock, format_rfc3339
from gateway.config import TlsConfig
from gateway.crypto.x509 import cert_fingerprint, cert_subject_cn
from gateway.errors import ConfigError
from gateway.periodic import Periodic

log = structlog.get_logger(__name__)

ContextSource = Callable[[], Iterable[ssl.SSLContext]]
#: the outcomes of a reload (audit entries and ``c2c_tls_reloads_total{outcome}``)
RELOADED = "tls_reloaded"
REFUSED = "tls_reload_refused"
#: a certificate this close to its end is reported at start
EXPIRY_WARNING = timedelta(days=14)


#: why a key that needs a passphrase is refused, and what to do
ENCRYPTED_KEY = (
    "is encrypted; the gateway takes an unencrypted PKCS#8 or traditional PEM key and never"
    " asks for a passphrase (decrypt it into a file only the gateway's user can read:"
    " openssl pkey -in <encrypted> -out <key>)"
)
#: OpenSSL's reasons for a key that is not the certificate's (another value, another type)
_MISMATCH = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})
#: OpenSSL's reasons for a certificate its security level refuses (a key or digest too weak)
_WEAK_CERTIFICATE = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


class IdentityError(ValueError):
    """The certificate and key files cannot become our TLS identity: the file at fault, its
    gateway.toml key, and why."""

    def __init__(self, file: Path, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason

    def config_error(self) -> ConfigError:
        return ConfigError(str(self.file), self.key, self.reason)


class _PassphraseAsked(Exception):
    """OpenSSL asked for the key's passphrase."""


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL asks on the terminal, or fails with EINVAL where there is none.
    raise _PassphraseAsked


@dataclass(frozen=True, kw_only=True)
class Identity:
    fingerprint: str
    subject: str | None
    not_after: datetime
    #: SHA-256 over both files, to notice a change
    digest: bytes

    def describe(self) -> str:
        return (
            f"certificate sha256 {self.fingerprint} (CN {self.subject!r}),"
            f" valid until {format_rfc3339(self.not_after)}"
        )


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(path, key, f"cannot read file: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _Files:
    """The certificate and key files' bytes, read once."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.cert_pem + b"\0" + self.key_pem).digest()


def _read_files(tls: TlsConfig) -> _Files:
    return _Files(cert_pem=_read(tls.cert, "tls.cert"), key_pem=_read(tls.key, "tls.key"))


def files_digest(tls: TlsConfig) -> bytes | None:
    try:
        return _read_files(tls).digest
    except IdentityError:
        return None


def _leaf(tls: TlsConfig, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        raise IdentityError(tls.cert, "tls.cert", f"holds no PEM certificate: {exc}") from None


def _check_validity(tls: TlsConfig, leaf: x509.Certificate, now: datetime) -> None:
    if now < leaf.not_valid_before_utc:
        raise IdentityError(
            tls.cert, "tls.cert", f"is not valid before {format_rfc3339(leaf.not_valid_before_utc)}"
        )
    if now >= leaf.not_valid_after_utc:
        raise IdentityError(
            tls.cert, "tls.cert", f"expired at {format_rfc3339(leaf.not_valid_after_utc)}"
        )


def _identity(leaf: x509.Certificate, digest: bytes) -> Identity:
    return Identity(
        fingerprint=cert_fingerprint(leaf),
        subject=cert_subject_cn(leaf),
        not_after=leaf.not_valid_after_utc,
        digest=digest,
    )


def _openssl_reason(exc: ssl.SSLError) -> str:
    return exc.reason or re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))


class _Pair:
    """The two files' bytes, checked, and copied to a private folder for OpenSSL."""

    def __init__(self, tls: TlsConfig, files: _Files, leaf: x509.Certificate) -> None:
        self._tls = tls
        self.identity = _identity(leaf, files.digest)
        self._dir = tempfile.TemporaryDirectory(prefix="c2c-tls-")
        try:
            self.cert = Path(self._dir.name) / "cert.pem"
            self.key = Path(self._dir.name) / "key.pem"
            self.cert.write_bytes(files.cert_pem)
            self.key.touch(mode=0o600)
            self.key.write_bytes(files.key_pem)
            self.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except BaseException:
            self.close()
            raise

    def load_into(self, context: ssl.SSLContext) -> None:
        tls = self._tls
        try:
            context.load_cert_chain(
                certfile=str(self.cert), keyfile=str(self.key), password=_no_passphrase
            )
        except _PassphraseAsked:
            raise IdentityError(tls.key, "tls.key", ENCRYPTED_KEY) from None
        except ssl.SSLError as exc:
            reason = _openssl_reason(exc)
            if reason in _MISMATCH:
                raise IdentityError(
                    tls.cert,
                    "tls.cert",
                    f"is not the certificate of the key in {tls.key} (tls.key): the two are not"
                    f" a usable pair ({reason})",
                ) from None
            if reason in _WEAK_CERTIFICATE:
                raise IdentityError(
                    tls.cert,
                    "tls.cert",
                    f"is refused by OpenSSL's security level ({reason}): its key or signature"
                    " is too weak; have one issued with a stronger key (RSA 2048 bits or more,"
                    " P-256, Ed25519) and SHA-256 or better",
                ) from None
            # the certificate parsed already: what OpenSSL cannot use is the key
            raise IdentityError(
                tls.key, "tls.key", f"holds no usable PEM private key ({reason})"
            ) from None
        except OSError as exc:
            raise IdentityError(
                tls.cert,
                "tls.cert",
                f"cannot be loaded with the key in {tls.key} (tls.key): {exc.strerror or exc}",
            ) from None

    def close(self) -> None:
        self._dir.cleanup()


def load_own_pair(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load our certificate and key, as they are on disk now, into a context being built;
    the same checks as a reload's but the validity period (``TlsIdentity.start`` checks it).
    A fault is a ``ConfigError`` naming the file and the key at fault."""
    try:
        files = _read_files(tls)
    except IdentityError as exc:
        raise exc.config_error() from None
    _load_files(context, tls, files)


def _load_files(context: ssl.SSLContext, tls: TlsConfig, files: _Files) -> None:
    """Check the pair's bytes and load them into ``context``; a fault is a ``ConfigError``."""
    try:
        pair = _Pair(tls, files, _leaf(tls, files.cert_pem))
    except IdentityError as exc:
        raise exc.config_error() from None
    try:
        pair.load_into(context)
    except IdentityError as exc:
        raise exc.config_error() from None
    finally:
        pair.close()


class TlsIdentity:
    """Reloads our certificate into every context registered with ``track``."""

    def __init__(
        self,
        tls: TlsConfig,
        *,
        clock: Clock,
        audit: Callable[[AuditEvent], Awaitable[object]],
        on_identity: Callable[[Identity], None] = lambda identity: None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._tls = tls
        self._clock = clock
        self._audit = audit
        self._on_identity = on_identity
        self._on_outcome = on_outcome
        self._sources: list[ContextSource] = []
        self._lock = asyncio.Lock()
        self._watch = Periodic("tls-identity-watch", tls.cert_check_interval_s, self._check_files)
        self.current: Identity | None = None
        #: the files' digest last looked at, so a refused pair is reported once, not each check
        self._seen: bytes | None = None
        #: the bytes of the pair in force, for contexts made after it was taken in
        self._in_force: _Files | None = None

    def track(self, source: ContextSource) -> None:
        """``source()`` gives the live contexts that present our identity."""
        self._sources.append(source)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load the pair in force into a context made while serving (an outbound partner's,
        made at its first send): the pair last taken in, not the files as they are now, which
        may hold a pair a reload refused. Before ``start``, the files (``load_own_pair``)."""
        files = self._in_force
        if files is None:
            load_own_pair(context, self._tls)
        else:
            _load_files(context, self._tls, files)

    async def start(self) -> None:
        # The contexts loaded the files when they were built (load_own_pair), maybe a while
        # ago (the store opens in between): the files are read once more and checked as a
        # reload checks them (in their validity period, key and certificate a pair), and that
        # pair is loaded into every context, so what they present is what is in force.
        try:
            files = _read_files(self._tls)
            pair = self._checked_pair(files)
            try:
                self._load_everywhere(pair)
            finally:
                pair.close()
        except IdentityError as exc:
            raise exc.config_error() from None
        identity = pair.identity
        self._take(identity, files)
        self._seen = identity.digest
        left = identity.not_after - self._clock.now()
        if left <= EXPIRY_WARNING:
            log.warning(
                "tls_certificate_expiring",
                fingerprint=identity.fingerprint,
                not_after=format_rfc3339(identity.not_after),
                days_left=round(left.total_seconds() / 86400, 1),
            )
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    async def _check_files(self) -> None:
        digest = files_digest(self._tls)
        if digest is not None and digest != self._seen:
            await self.reload(actor="watch:file-change")

    def _checked_pair(self, files: _Files) -> _Pair:
        """The pair, checked as one (and its certificate in its validity period now)."""
        leaf = _leaf(self._tls, files.cert_pem)
        _check_validity(self._tls, leaf, self._clock.now())
        return _Pair(self._tls, files, leaf)

    def _load_everywhere(self, pair: _Pair) -> None:
        for source in self._sources:
            for context in source():
                pair.load_into(context)

    def _take(self, identity: Identity, files: _Files) -> None:
        self.current = identity
        self._in_force = files
        self._on_identity(identity)

    async def reload(self, *, actor: str) -> Identity | None:
        """Take in the files as they are now; the new identity, or None if refused. Never
        raises: whatever goes wrong refuses the pair (the watcher calling it goes on)."""
        async with self._lock:
            self._seen = None
            try:
                files = _read_files(self._tls)
                self._seen = files.digest
                pair = self._checked_pair(files)
            except Exception as exc:
                # nothing in force is touched yet: any fault (OpenSSL's, the file system's, a
                # file no check foresaw) refuses the pair, as a bad pair is refused
                await self._refuse(actor, self._reason(exc))
                return None
            try:
                self._load_everywhere(pair)
            except Exception as exc:
                # the same files loaded into a context of their own just now: not expected
                await self._refuse(
                    actor,
                    f"{self._reason(exc)}; contexts loaded before this one present the new"
                    " certificate until a reload succeeds",
                )
                return None
            finally:
                pair.close()
            before = self.current
            self._take(pair.identity, files)
            was = f"; was {before.fingerprint}" if before is not None else ""
            await self._report(RELOADED, actor, pair.identity.describe() + was)
            log.info(
                "tls_reloaded",
                fingerprint=pair.identity.fingerprint,
                not_after=format_rfc3339(pair.identity.not_after),
                actor=actor,
            )
            return pair.identity

    def _reason(self, exc: Exception) -> str:
        if isinstance(exc, IdentityError):
            return str(exc)
        tls = self._tls
        return f"{tls.cert} and {tls.key}: cannot be taken in: {type(exc).__name__}: {exc}"

    async def _refuse(self, actor: str, reason: str) -> None:
        log.error("tls_reload_refused", reason=reason, actor=actor)
        await self._report(REFUSED, actor, reason)

    async def _report(self, outcome: str, actor: str, reason: str) -> None:
        self._on_outcome(outcome)
        event = AuditEvent(
            event=EventKind.OPERATOR_ACTION,
            at=self._clock.now(),
            outcome=outcome,
            actor=actor,
            reason=reason,
        )
        await record_or_log(self._audit, event)
