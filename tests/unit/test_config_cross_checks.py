"""What the loader checks across files (a client certificate claimed by two partners, a partner
on AMQP with no broker), the bounds of durations, rates and sizes, and the start-up warning for
a private key file others may read."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
import structlog
from config_files import edit_once
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import load_config
from gateway.crypto.pki import init_dev_pki
from gateway.errors import ConfigError
from gateway.runtime import Gateway

G = "gateway.toml"
DEV_CA = "'CN=C2C Development CA,O=c2c-gateway development PKI (not for production)'"
MX = "partners/MX-ANAM/partner.toml"
CA = "partners/CA-CBSA/partner.toml"


def _refusal(tree: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(tree / G, environ={})
    return caught.value


# -- one client certificate identity, two partners


def test_a_subject_claimed_by_two_partners_under_one_ca_is_refused(tree: Path) -> None:
    edit_once(
        tree / CA,
        'client_cert_subjects = ["CA-CBSA"]',
        'client_cert_subjects = ["CA-CBSA", "MX-ANAM"]',
    )
    error = _refusal(tree)
    ca = (tree / "certs" / "dev" / "ca.pem").resolve()
    assert (error.file, error.key) == (str(tree / MX), "https.client_cert_subjects[0]")
    assert error.reason == (
        f"'MX-ANAM' is also accepted for CA-CBSA ({tree / CA}: https.client_cert_subjects[1]),"
        f" and both trust the CA {DEV_CA} ({ca}): a client certificate it issues with that"
        " subject would identify neither partner and be refused for both; accept it for one"
        " partner only"
    )


def test_a_fingerprint_claimed_by_two_partners_under_one_ca_is_refused(tree: Path) -> None:
    pinned = "AB:" * 31 + "CD"
    normalised = pinned.replace(":", "").lower()
    for partner in (MX, CA):
        edit_once(
            tree / partner,
            "client_cert_fingerprints = []",
            f'client_cert_fingerprints = ["{pinned}"]',
        )
    error = _refusal(tree)
    assert (error.file, error.key) == (str(tree / MX), "https.client_cert_fingerprints[0]")
    assert error.reason.startswith(
        f"{normalised!r} is also accepted for CA-CBSA ({tree / CA}:"
        f" https.client_cert_fingerprints[0]), and both trust the CA {DEV_CA}"
    )
    assert "with that fingerprint would identify neither partner" in error.reason


def test_the_same_ca_certificate_in_two_files_is_one_ca(tree: Path) -> None:
    bundle = tree / "certs" / "ca-cbsa-bundle.pem"
    shutil.copy(tree / "certs" / "dev" / "ca.pem", bundle)
    edit_once(tree / CA, 'ca = "../../certs/dev/ca.pem"', 'ca = "../../certs/ca-cbsa-bundle.pem"')
    edit_once(tree / CA, 'client_cert_subjects = ["CA-CBSA"]', 'client_cert_subjects = ["MX-ANAM"]')
    error = _refusal(tree)
    assert error.key == "https.client_cert_subjects[0]"
    ca = (tree / "certs" / "dev" / "ca.pem").resolve()
    assert f"both trust the CA {DEV_CA} ({bundle.resolve()} and {ca})" in error.reason


def test_one_subject_under_two_unrelated_cas_is_no_conflict(tree: Path, tmp_path: Path) -> None:
    """Each partner's CA names its own certificates: the same CN issued by two different CAs
    is two certificates, each tied to its own partner at the handshake."""
    other = tmp_path / "other-pki"
    init_dev_pki(other, ["CA-CBSA"])
    edit_once(tree / CA, 'ca = "../../certs/dev/ca.pem"', f'ca = "{other / "ca.pem"}"')
    edit_once(tree / CA, 'client_cert_subjects = ["CA-CBSA"]', 'client_cert_subjects = ["MX-ANAM"]')
    config = load_config(tree / G, environ={})
    assert config.partners["CA-CBSA"].https.client_cert_subjects == ("MX-ANAM",)


def _ca(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A CA certificate for ``key``: self-signed, or issued by ``issuer``."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def _ca_files(tree: Path, mx: list[x509.Certificate], ca: list[x509.Certificate]) -> None:
    """MX-ANAM and CA-CBSA trust these CA certificates, and accept the same subject."""
    for partner, certificates in ((MX, mx), (CA, ca)):
        path = tree / "certs" / f"{partner.split('/')[1]}-ca.pem"
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
        edit_once(tree / partner, 'ca = "../../certs/dev/ca.pem"', f'ca = "{path}"')
    edit_once(tree / CA, 'client_cert_subjects = ["CA-CBSA"]', 'client_cert_subjects = ["MX-ANAM"]')


def test_one_subject_under_two_intermediates_of_one_root_is_no_conflict(tree: Path) -> None:
    """Each file holds its partner's intermediate and the common root (as docs/operations.md
    asks): a client certificate is tied to a partner by the intermediate that issued it."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("Customs Union Root", root_key)
    first, second = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    _ca_files(
        tree,
        [_ca("MX issuing CA", first, (root, root_key)), root],
        [_ca("CA issuing CA", second, (root, root_key)), root],
    )
    config = load_config(tree / G, environ={})
    assert config.partners["CA-CBSA"].https.client_cert_subjects == ("MX-ANAM",)


def test_a_root_one_partner_issues_from_is_an_anchor_of_the_other(tree: Path) -> None:
    """MX-ANAM's certificates come from the root itself, which CA-CBSA's file also holds
    (beside its intermediate): such a certificate would be CA-CBSA's too."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("Customs Union Root", root_key)
    issuing = _ca("CA issuing CA", ec.generate_private_key(ec.SECP256R1()), (root, root_key))
    _ca_files(tree, [root], [issuing, root])
    error = _refusal(tree)
    assert (error.file, error.key) == (str(tree / MX), "https.client_cert_subjects[0]")
    assert "both trust the CA 'CN=Customs Union Root'" in error.reason


def test_a_ca_certificate_issued_again_is_the_same_ca(tree: Path) -> None:
    """The same CA (subject and key) in a renewed certificate, with another fingerprint: a
    client certificate it issues verifies under both files."""
    key = ec.generate_private_key(ec.SECP256R1())
    before, renewed = _ca("Customs CA", key), _ca("Customs CA", key)
    assert before.fingerprint(hashes.SHA256()) != renewed.fingerprint(hashes.SHA256())
    _ca_files(tree, [before], [renewed])
    error = _refusal(tree)
    assert "both trust the CA 'CN=Customs CA'" in error.reason


# -- a partner on AMQP without a broker


def test_a_partner_on_amqp_only_without_a_broker_url_is_refused(tree: Path) -> None:
    edit_once(tree / MX, "enabled = false", "enabled = true")
    edit_once(tree / MX, 'url = "https://127.0.0.1:9444/c2c/v1/messages"\n', "")
    error = _refusal(tree)
    assert (error.file, error.key) == (str(tree / MX), "amqp.enabled")
    assert error.reason == (
        f"true, but {tree / G} has no [amqp] url or url_env: without the broker nothing serves"
        " this partner's queues (a message to it would be dead at once, and what it sends"
        " never read); set the broker's URL there, or enabled = false"
    )


def test_a_partner_on_amqp_and_https_without_a_broker_url_is_refused(tree: Path) -> None:
    edit_once(tree / MX, "enabled = false", "enabled = true")
    error = _refusal(tree)
    assert (error.file, error.key) == (str(tree / MX), "amqp.enabled")
    assert error.reason == (
        f"true, but {tree / G} has no [amqp] url or url_env: without the broker nothing serves"
        " this partner's queues (what it sends over AMQP would never be read); set the"
        " broker's URL there, or enabled = false"
    )


def test_a_partner_on_amqp_with_a_broker_url_loads(tree: Path) -> None:
    edit_once(tree / MX, "enabled = false", "enabled = true")
    edit_once(tree / G, '# url_env = "C2C_AMQP_URL"', 'url_env = "C2C_AMQP_URL"')
    config = load_config(tree / G, environ={"C2C_AMQP_URL": "amqp://gw@127.0.0.1/c2c"})
    assert config.partners["MX-ANAM"].amqp.enabled


# -- bounds

# (file, old text, new text, dotted key, exact reason)
# fmt: off
OUT_OF_BOUNDS: list[tuple[str, str, str, str, str]] = [
    (G, "checkpoint_interval_s = 60", "checkpoint_interval_s = 1e-9",
     "audit.checkpoint_interval_s", "must be from 0.1 to 86400, got 1e-09"),
    (G, "checkpoint_interval_s = 60", "checkpoint_interval_s = 86401",
     "audit.checkpoint_interval_s", "must be from 0.1 to 86400, got 86401"),
    (G, "# poll_interval_s = 0.5", "poll_interval_s = 1e-9",
     "outbox.poll_interval_s", "must be from 0.05 to 60, got 1e-09"),
    (G, "# poll_interval_s = 0.5", "poll_interval_s = 61",
     "outbox.poll_interval_s", "must be from 0.05 to 60, got 61"),
    (G, "# breaker_reset_s = 30", "breaker_reset_s = 0.01",
     "outbox.breaker_reset_s", "must be from 0.1 to 86400, got 0.01"),
    (G, "# cert_check_interval_s = 60", "cert_check_interval_s = 1e-9",
     "tls.cert_check_interval_s", "must be from 1 to 86400, got 1e-09"),
    (G, "# crl_check_interval_s = 60", "crl_check_interval_s = 0.5",
     "tls.crl_check_interval_s", "must be from 1 to 86400, got 0.5"),
    (G, "# ocsp_timeout_s = 5", "ocsp_timeout_s = 1e300",
     "tls.ocsp_timeout_s", "must be from 0.5 to 300, got 1e+300"),
    (G, "# publish_timeout_s = 10", "publish_timeout_s = 3600",
     "amqp.publish_timeout_s", "must be from 0.5 to 300, got 3600"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nheader_timeout_s = 1e300",
     "limits.header_timeout_s", "must be from 0.5 to 300, got 1e+300"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nheader_timeout_s = 0.001",
     "limits.header_timeout_s", "must be from 0.5 to 300, got 0.001"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nrequest_timeout_s = 0.001",
     "limits.request_timeout_s", "must be from 0.5 to 86400, got 0.001"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nhandshakes_per_second = 1e-9",
     "limits.handshakes_per_second", "must be from 0.1 to 1000000, got 1e-09"),
    (G, "max_body_bytes = 1048576", "max_body_bytes = 9223372036854775807",
     "limits.max_body_bytes", "must be <= 67108864, got 9223372036854775807"),
    (MX, "max_body_bytes = 2097152", "max_body_bytes = 67108865",
     "max_body_bytes", "must be <= 67108864, got 67108865"),
    (MX, "per_second = 200.0", "per_second = 1e-9",
     "rate.per_second", "must be from 0.001 to 1000000, got 1e-09"),
    (MX, "per_second = 200.0", "per_second = 1e300",
     "rate.per_second", "must be from 0.001 to 1000000, got 1e+300"),
]
# fmt: on


@pytest.mark.parametrize(
    ("file", "old", "new", "key", "reason"),
    OUT_OF_BOUNDS,
    ids=[f"{key}={new.split('= ')[-1]}" for _, _, new, key, _ in OUT_OF_BOUNDS],
)
def test_a_value_out_of_its_bounds_is_refused(
    tree: Path, file: str, old: str, new: str, key: str, reason: str
) -> None:
    edit_once(tree / file, old, new)
    error = _refusal(tree)
    assert (error.file, error.key, error.reason) == (str(tree / file), key, reason)


def test_outcomes_without_a_broker_are_refused(tree: Path) -> None:
    """[amqp] outcomes publishes to RabbitMQ: without url the bus would drop them unseen."""
    edit_once(tree / G, "# outcomes = false", "outcomes = true")
    error = _refusal(tree)
    assert (error.file, error.key, error.reason) == (
        str(tree / G),
        "amqp.outcomes",
        "publishes to RabbitMQ: set url (or url_env) too",
    )


def test_the_bounds_themselves_load(tree: Path) -> None:
    edit_once(tree / G, "checkpoint_interval_s = 60", "checkpoint_interval_s = 0.1")
    edit_once(tree / G, "# poll_interval_s = 0.5", "poll_interval_s = 0.05")
    edit_once(tree / G, "# cert_check_interval_s = 60", "cert_check_interval_s = 86400")
    edit_once(tree / G, "max_body_bytes = 1048576", "max_body_bytes = 67108864")
    edit_once(tree / G, "max_skew_s = 120", "max_skew_s = 120\nheader_timeout_s = 300")
    edit_once(tree / MX, "per_second = 200.0", "per_second = 0.001")
    config = load_config(tree / G, environ={})
    assert config.audit.checkpoint_interval_s == 0.1
    assert config.outbox.poll_interval_s == 0.05
    assert config.tls.cert_check_interval_s == 86400
    assert config.limits.max_body_bytes == 67_108_864
    assert config.limits.header_timeout_s == 300
    assert config.partners["MX-ANAM"].rate.per_second == 0.001


# -- private key files others may read


def test_a_private_key_file_others_may_read_is_warned_about_at_start(tree: Path) -> None:
    config = load_config(tree / G, environ={})
    own = (tree / "certs" / "dev" / "US-CBP").resolve()
    for name in ("sign.key", "tls.key", "audit.key", "api-token.key"):
        assert (own / name).stat().st_mode & 0o777 == 0o600
    with structlog.testing.capture_logs() as logs:
        Gateway(config)
    assert [e for e in logs if e["event"] == "key_file_open_to_others"] == []

    os.chmod(own / "sign.key", 0o644)
    os.chmod(own / "tls.key", 0o640)
    os.chmod(own / "audit.key", 0o604)
    os.chmod(own / "api-token.key", 0o660)
    with structlog.testing.capture_logs() as logs:
        Gateway(config)
    assert [e for e in logs if e["event"] == "key_file_open_to_others"] == [
        {
            "event": "key_file_open_to_others",
            "key": key,
            "file": str(own / name),
            "mode": mode,
            "log_level": "warning",
        }
        for key, name, mode in (
            ("signing_keys[0].path", "sign.key", "0644"),
            ("tls.key", "tls.key", "0640"),
            ("audit.key", "audit.key", "0604"),
            ("api_auth.signing_key", "api-token.key", "0660"),
        )
    ]
