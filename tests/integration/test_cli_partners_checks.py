"""``c2c-gateway partners check`` catches what ``serve`` refuses: a partner's audit key that is
not an Ed25519 public key, a client certificate claimed by two partners, a partner on AMQP with
no broker (the real CLI, in a subprocess, on a copy of the repository's configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from config_files import edit_once
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

G = "gateway.toml"
MX = "partners/MX-ANAM/partner.toml"
CA = "partners/CA-CBSA/partner.toml"
AUDIT_PUB = 'public_key = "../../certs/dev/MX-ANAM/audit.pub"'


def _cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-c", "from gateway.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def _check(tree: Path, partner: str = "MX-ANAM") -> tuple[int, str, str]:
    return _cli("partners", "check", partner, "--config", str(tree / G))


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_samples_audit_key_is_checked(tree: Path) -> None:
    code, out, err = _check(tree)
    assert (code, err) == (0, ""), out
    audit = (tree / "certs" / "dev" / "MX-ANAM" / "audit.pub").resolve()
    assert (
        f"  ok    audit key   {audit} (Ed25519, origin dev.c2c-gateway.invalid/MX-ANAM)"
        in out.splitlines()
    )


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (
            "rsa",
            "public key: is an RSA key; only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted",
        ),
        ("p256", "audit public key: must be an Ed25519 key"),
        ("private", "public key: is not a PEM public key (SubjectPublicKeyInfo)"),
    ],
)
def test_an_audit_key_serve_refuses_fails_the_check(tree: Path, kind: str, reason: str) -> None:
    bad = tree / "certs" / f"audit-{kind}.pem"
    if kind == "rsa":
        bad.write_bytes(_public_pem(rsa.generate_private_key(65537, 2048)))
    elif kind == "p256":
        bad.write_bytes(_public_pem(ec.generate_private_key(ec.SECP256R1())))
    else:
        bad.write_bytes((tree / "certs" / "dev" / "MX-ANAM" / "audit.key").read_bytes())
    edit_once(tree / MX, AUDIT_PUB, f'public_key = "../../certs/audit-{kind}.pem"')
    code, out, err = _check(tree)
    assert (code, err) == (1, ""), out
    assert f"  FAIL  audit key   {bad.resolve()}: {reason}" in out.splitlines()
    assert out.splitlines()[-1] == "MX-ANAM: 7 ok, 1 failed"


def test_a_client_certificate_claimed_by_two_partners_fails_the_check(tree: Path) -> None:
    edit_once(
        tree / CA,
        'client_cert_subjects = ["CA-CBSA"]',
        'client_cert_subjects = ["CA-CBSA", "MX-ANAM"]',
    )
    for partner in ("MX-ANAM", "CA-CBSA"):
        code, out, err = _check(tree, partner)
        assert (code, out) == (2, "")
        assert err.startswith(
            f"error: {tree / MX}: https.client_cert_subjects[0]: 'MX-ANAM' is also accepted"
            f" for CA-CBSA ({tree / CA}: https.client_cert_subjects[1]), and both trust the CA"
        )


def test_a_partner_on_amqp_without_a_broker_fails_the_check(tree: Path) -> None:
    edit_once(tree / MX, "enabled = false", "enabled = true")
    code, out, err = _check(tree)
    assert (code, out) == (2, "")
    assert err == (
        f"error: {tree / MX}: amqp.enabled: true, but {tree / G} has no [amqp] url or url_env:"
        " without the broker nothing serves this partner's queues (what it sends over AMQP"
        " would never be read); set the broker's URL there, or enabled = false\n"
    )
