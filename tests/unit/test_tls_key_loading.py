"""Our own TLS certificate and key as the contexts load them: a passphrase-protected key is
refused at once (OpenSSL never asks for the passphrase, on a terminal or otherwise), every
fault names the file and the gateway.toml key at fault, an expired certificate is refused at
start as on reload, and a reload that fails in any way is refused, audited and counted while
the file watcher goes on."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.audit.events import AuditEvent
from gateway.clock import Clock, ManualClock, SystemClock
from gateway.config import GatewayConfig, TlsConfig, load_config
from gateway.crypto.pki import init_dev_pki
from gateway.crypto.x509 import cert_fingerprint
from gateway.errors import ConfigError
from gateway.transports.tls import client_context, server_context
from gateway.transports.tls_identity import REFUSED, RELOADED, TlsIdentity

ENCRYPTED = "is encrypted; the gateway takes an unencrypted PKCS#8 or traditional PEM key"


@pytest.fixture
def config(tree: Path) -> GatewayConfig:
    return load_config(tree / "gateway.toml")


def encrypted(key: Path, form: str) -> bytes:
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8
        if form == "pkcs8"
        else serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret"),
    )


def leaf(tls: TlsConfig) -> x509.Certificate:
    return x509.load_pem_x509_certificate(tls.cert.read_bytes())


def contexts(config: GatewayConfig) -> None:
    """Build every context that loads our pair: the partner endpoint's and an outbound one."""
    server_context(config.tls, config.partners.values())
    client_context(config.tls)


@pytest.mark.parametrize("form", ["pkcs8", "traditional"])
@pytest.mark.parametrize("side", ["server", "client"])
def test_an_encrypted_key_is_refused_without_asking(
    config: GatewayConfig, form: str, side: str
) -> None:
    tls = config.tls
    tls.key.write_bytes(encrypted(tls.key, form))
    builds: dict[str, Callable[[], ssl.SSLContext]] = {
        "server": lambda: server_context(tls, config.partners.values()),
        "client": lambda: client_context(tls),
    }
    with pytest.raises(ConfigError) as caught:
        builds[side]()
    assert (caught.value.file, caught.value.key) == (str(tls.key), "tls.key")
    assert caught.value.reason.startswith(ENCRYPTED), caught.value.reason


def test_a_key_file_that_holds_no_key_is_named(config: GatewayConfig) -> None:
    tls = config.tls
    for content in (tls.cert.read_bytes(), b"", b"not a key\n"):
        tls.key.write_bytes(content)
        with pytest.raises(ConfigError) as caught:
            contexts(config)
        assert (caught.value.file, caught.value.key) == (str(tls.key), "tls.key")
        assert caught.value.reason.startswith("holds no usable PEM private key"), caught.value


def test_an_unreadable_key_file_is_named(config: GatewayConfig) -> None:
    tls = config.tls
    tls.key.unlink()
    with pytest.raises(ConfigError) as caught:
        contexts(config)
    assert str(caught.value) == f"{tls.key}: tls.key: cannot read file: No such file or directory"
    tls.key.mkdir()
    with pytest.raises(ConfigError) as caught:
        contexts(config)
    assert str(caught.value) == f"{tls.key}: tls.key: cannot read file: Is a directory"


def test_a_certificate_file_that_holds_no_certificate_is_named(config: GatewayConfig) -> None:
    tls = config.tls
    tls.cert.write_bytes(tls.key.read_bytes())
    with pytest.raises(ConfigError) as caught:
        contexts(config)
    assert (caught.value.file, caught.value.key) == (str(tls.cert), "tls.cert")
    assert caught.value.reason.startswith("holds no PEM certificate")


def test_a_key_of_another_certificate_names_both_files(config: GatewayConfig) -> None:
    tls = config.tls
    other = tls.cert.parent.parent / "MX-ANAM" / "tls.key"
    tls.key.write_bytes(other.read_bytes())
    with pytest.raises(ConfigError) as caught:
        contexts(config)
    assert (caught.value.file, caught.value.key) == (str(tls.cert), "tls.cert")
    assert caught.value.reason == (
        f"is not the certificate of the key in {tls.key} (tls.key): the two are not a usable"
        " pair (KEY_VALUES_MISMATCH)"
    )


def test_a_bad_trust_anchor_is_named_by_its_own_key(config: GatewayConfig) -> None:
    garbage = config.tls.ca.parent / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    tls = dataclasses.replace(config.tls, ca=garbage)
    builds: list[Callable[[], ssl.SSLContext]] = [
        lambda: server_context(tls, []),
        lambda: client_context(tls),
    ]
    for build in builds:
        with pytest.raises(ConfigError) as caught:
            build()
        assert (caught.value.file, caught.value.key) == (str(garbage), "tls.ca")
    partner = config.partners["MX-ANAM"]
    theirs = dataclasses.replace(partner, https=dataclasses.replace(partner.https, ca=garbage))
    with pytest.raises(ConfigError) as caught:
        server_context(config.tls, [theirs])
    assert (caught.value.file, caught.value.key) == (str(garbage), "MX-ANAM: https.ca")
    with pytest.raises(ConfigError) as caught:
        client_context(config.tls, garbage)
    assert (caught.value.file, caught.value.key) == (str(garbage), "https.ca")


class Recorder:
    """What a TlsIdentity reports: its audit entries and its outcomes (the metric's labels)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.outcomes: list[str] = []

    async def audit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def identity(self, tls: TlsConfig, clock: Clock) -> TlsIdentity:
        return TlsIdentity(tls, clock=clock, audit=self.audit, on_outcome=self.outcomes.append)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"not within {timeout_s} s: {what}")


def rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def test_an_expired_certificate_is_refused_at_start(config: GatewayConfig) -> None:
    tls = config.tls
    end = leaf(tls).not_valid_after_utc
    tls_identity = Recorder().identity(tls, ManualClock(end + dt.timedelta(seconds=1)))
    with pytest.raises(ConfigError) as caught:
        await tls_identity.start()
    assert str(caught.value) == f"{tls.cert}: tls.cert: expired at {rfc3339(end)}"


async def test_a_certificate_not_valid_yet_is_refused_at_start(config: GatewayConfig) -> None:
    tls = config.tls
    begin = leaf(tls).not_valid_before_utc
    tls_identity = Recorder().identity(tls, ManualClock(begin - dt.timedelta(seconds=1)))
    with pytest.raises(ConfigError) as caught:
        await tls_identity.start()
    assert str(caught.value) == f"{tls.cert}: tls.cert: is not valid before {rfc3339(begin)}"


async def test_an_encrypted_key_on_reload_is_refused_audited_and_counted(
    config: GatewayConfig,
) -> None:
    tls = config.tls
    recorder = Recorder()
    tls_identity = recorder.identity(tls, SystemClock())
    await tls_identity.start()
    try:
        before = tls_identity.current
        tls.key.write_bytes(encrypted(tls.key, "pkcs8"))
        assert await tls_identity.reload(actor="signal:SIGHUP") is None
        assert tls_identity.current == before
    finally:
        await tls_identity.stop()
    [event] = recorder.events
    assert (event.outcome, event.actor) == (REFUSED, "signal:SIGHUP")
    assert event.reason is not None
    assert event.reason.startswith(f"{tls.key}: tls.key: {ENCRYPTED}"), event.reason
    assert recorder.outcomes == [REFUSED]


async def test_the_watcher_goes_on_after_a_refused_key(config: GatewayConfig) -> None:
    tls = dataclasses.replace(config.tls, cert_check_interval_s=0.02)
    good_key = tls.key.read_bytes()
    recorder = Recorder()
    tls_identity = recorder.identity(tls, SystemClock())
    await tls_identity.start()
    try:
        tls.key.write_bytes(encrypted(tls.key, "traditional"))
        await until(lambda: recorder.outcomes == [REFUSED], "the encrypted key refused")
        # the operator puts the key back and renews the certificate
        tls.key.write_bytes(good_key)
        tls.cert.unlink()
        init_dev_pki(tls.ca.parent, [config.party])
        renewed = cert_fingerprint(leaf(tls))

        def taken_in() -> bool:
            current = tls_identity.current
            return current is not None and current.fingerprint == renewed

        await until(taken_in, "the renewed certificate taken in")
    finally:
        await tls_identity.stop()
    assert ENCRYPTED in str(recorder.events[0].reason)
    assert set(recorder.outcomes[1:]) == {RELOADED}


def test_a_refused_key_leaves_no_copy_behind(
    config: GatewayConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private folder the pair is copied to for OpenSSL is removed, refused or not."""
    tls = config.tls
    tls.key.write_bytes(encrypted(tls.key, "pkcs8"))
    # a temporary directory of this test's own: other tests, in this process or another
    # (make test runs two), make and remove such folders in the system's at any time
    copies = tmp_path / "tmp"
    copies.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(copies))
    with pytest.raises(ConfigError):
        contexts(config)
    assert list(copies.iterdir()) == []


async def test_start_checks_the_pair_as_a_reload_does(config: GatewayConfig) -> None:
    """The contexts were made from the files earlier (the store opens in between); at start
    the files must still be a pair, and that pair is what the contexts present."""
    tls = config.tls
    context = server_context(tls, config.partners.values())
    identity = Recorder().identity(tls, SystemClock())
    identity.track(lambda: [context])
    tls.key.write_bytes((tls.key.parent.parent / "MX-ANAM" / "tls.key").read_bytes())
    with pytest.raises(ConfigError) as caught:
        await identity.start()
    assert (caught.value.file, caught.value.key) == (str(tls.cert), "tls.cert")
    assert "is not the certificate of the key in" in caught.value.reason
    assert identity.current is None


def test_a_certificate_too_weak_for_openssl_is_named_not_its_key(config: GatewayConfig) -> None:
    tls = config.tls
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, config.party)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(weak.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(weak, hashes.SHA256())
    )
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        weak.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError) as caught:
        server_context(tls, config.partners.values())
    assert (caught.value.file, caught.value.key) == (str(tls.cert), "tls.cert")
    assert caught.value.reason.startswith(
        "is refused by OpenSSL's security level (EE_KEY_TOO_SMALL)"
    )
