"""Published JOSE test vectors: RFC 8037 Appendix A, RFC 7515 Appendix A.3, RFC 7638 section 3.1.

The vectors live in the shared folder beside the repository (../shared/testdata/jose-vectors),
where they were cross-checked with three implementations.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.crypto import (
    SigningKey,
    VerificationKey,
    jwk_thumbprint,
    jwk_thumbprint_of,
    load_signing_key,
    load_verification_key,
    parse_detached,
    public_jwk,
)
from gateway.crypto.jws import raw_sign, signing_input, verify_signature
from gateway.errors import SignatureInvalid

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "jose-vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def _b64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _ed25519_private(jwk: dict[str, str]) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_b64(jwk["d"]))


def _p256_public(jwk: dict[str, str]) -> ec.EllipticCurvePublicKey:
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(_b64(jwk["x"]), "big"), int.from_bytes(_b64(jwk["y"]), "big"), ec.SECP256R1()
    )
    return numbers.public_key()


def test_rfc8037_key_and_thumbprint() -> None:
    vector = _load("rfc8037_ed25519.json")
    private = _ed25519_private(vector["private_jwk"])
    assert public_jwk(private) == vector["public_jwk"]
    assert jwk_thumbprint(private.public_key()) == vector["thumbprint"]
    assert jwk_thumbprint_of(vector["public_jwk"]) == vector["thumbprint"]


def test_rfc8037_signature_is_reproduced() -> None:
    vector = _load("rfc8037_ed25519.json")
    private = _ed25519_private(vector["private_jwk"])
    key = SigningKey(party="XX-TEST", kid=vector["thumbprint"], alg="EdDSA", private_key=private)
    jws = vector["jws"]
    payload = bytes.fromhex(jws["payload_hex"])
    assert signing_input(jws["protected_b64u"], payload) == jws["signing_input"].encode()
    signature = raw_sign(key, jws["signing_input"].encode())
    assert base64.urlsafe_b64encode(signature).rstrip(b"=").decode() == jws["signature_b64u"]


def test_rfc8037_detached_form_verifies_and_a_changed_payload_does_not() -> None:
    vector = _load("rfc8037_ed25519.json")
    private = _ed25519_private(vector["private_jwk"])
    key = VerificationKey(
        party="XX-TEST", kid=vector["thumbprint"], alg="EdDSA", public_key=private.public_key()
    )
    jws = vector["jws"]
    parsed = parse_detached(jws["compact_detached"])
    assert parsed.kid is None
    assert parsed.alg == "EdDSA"
    payload = bytes.fromhex(jws["payload_hex"])
    verify_signature(parsed, payload, key)
    with pytest.raises(SignatureInvalid):
        verify_signature(parsed, payload + b" ", key)


def test_rfc8037_derived_pem_files_load_with_the_same_kid(tmp_path: Path) -> None:
    vector = _load("rfc8037_ed25519.json")
    (tmp_path / "sign.key").write_text(vector["derived"]["private_pem_pkcs8"])
    (tmp_path / "sign.pub").write_text(vector["derived"]["public_pem_spki"])
    signing = load_signing_key(tmp_path / "sign.key", party="XX-TEST", alg="EdDSA")
    verifying = load_verification_key(tmp_path / "sign.pub", party="XX-TEST", alg="EdDSA")
    assert signing.kid == verifying.kid == vector["thumbprint"]


def test_rfc7515_a3_es256_verifies() -> None:
    vector = _load("rfc7515_a3_es256.json")
    public = _p256_public(vector["public_jwk"])
    kid = vector["derived"]["thumbprint"]
    assert jwk_thumbprint(public) == kid
    key = VerificationKey(party="XX-TEST", kid=kid, alg="ES256", public_key=public)
    jws = vector["jws"]
    parsed = parse_detached(jws["compact_detached"])
    payload = bytes.fromhex(jws["payload_hex"])
    verify_signature(parsed, payload, key)
    with pytest.raises(SignatureInvalid):
        verify_signature(parsed, payload.replace(b"joe", b"Joe"), key)


def test_rfc7515_a3_derived_pem_loads(tmp_path: Path) -> None:
    vector = _load("rfc7515_a3_es256.json")
    (tmp_path / "sign.pub").write_text(vector["derived"]["public_pem_spki"])
    (tmp_path / "sign.key").write_text(vector["derived"]["private_pem_pkcs8"])
    verifying = load_verification_key(tmp_path / "sign.pub", party="XX-TEST", alg="ES256")
    signing = load_signing_key(tmp_path / "sign.key", party="XX-TEST", alg="ES256")
    assert verifying.kid == signing.kid == vector["derived"]["thumbprint"]
    assert public_jwk(verifying) == vector["public_jwk"]


@pytest.mark.parametrize(
    "case", _load("rfc7638_thumbprint.json")["cases"], ids=lambda case: case["name"]
)
def test_rfc7638_thumbprints(case: dict[str, Any]) -> None:
    assert jwk_thumbprint_of(case["jwk"]) == case["thumbprint"]


def test_rfc7638_official_rsa_example_is_among_the_cases() -> None:
    names = {case["name"] for case in _load("rfc7638_thumbprint.json")["cases"]}
    assert "rfc7638-3.1-rsa" in names


def test_rfc7638_thumbprint_of_a_key_object_matches_the_jwk_form() -> None:
    case = next(
        case
        for case in _load("rfc7638_thumbprint.json")["cases"]
        if case["name"] == "rfc7517-a.1-ec-p256"
    )
    assert jwk_thumbprint(_p256_public(case["jwk"])) == case["thumbprint"]
