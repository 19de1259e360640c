"""Interop with independent JOSE implementations (jwcrypto, joserfc), both directions.

PROTOCOL section 3 tells partners: sign the body with a normal compact JWS, then remove the
middle part. These tests do exactly that with two other libraries, and check that what we sign
verifies there once the payload is re-attached.
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey, OKPKey
from jwcrypto import jwk as jwcrypto_jwk  # type: ignore[import-untyped]
from jwcrypto import jws as jwcrypto_jws

from gateway.crypto import (
    KeyRing,
    SigningKey,
    alg_for_key,
    jwk_thumbprint,
    public_jwk,
    sign_detached,
    verify_detached,
)
from gateway.errors import SignatureInvalid

BODY = '{"header":{"sender":"MX-ANAM","note":"señal ✓"},"payload":{"hs":"847130"}}'.encode()


def _key(kind: str) -> SigningKey:
    private = (
        Ed25519PrivateKey.generate() if kind == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    )
    return SigningKey(
        party="MX-ANAM", kid=jwk_thumbprint(private), alg=alg_for_key(private), private_key=private
    )


def _pem(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _attach(detached: str, body: bytes) -> str:
    head, middle, signature = detached.split(".")
    assert middle == ""
    payload = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
    return f"{head}.{payload}.{signature}"


def _detach(compact: str) -> str:
    head, _, signature = compact.split(".")
    return f"{head}..{signature}"


ALGS = ["EdDSA", "ES256"]
# joserfc warns that RFC 9864 deprecates the polymorphic "EdDSA" name in favour of "Ed25519";
# PROTOCOL section 3 names EdDSA, so that is what partners send.
EDDSA_DEPRECATION = pytest.mark.filterwarnings("ignore:EdDSA is deprecated via RFC 9864")


@pytest.mark.parametrize("alg", ALGS)
def test_ours_verifies_with_jwcrypto(alg: str) -> None:
    key = _key(alg)
    token = jwcrypto_jws.JWS()
    token.deserialize(_attach(sign_detached(BODY, key), BODY))
    token.verify(jwcrypto_jwk.JWK.from_pem(_pem(key)), alg=alg)
    assert token.payload == BODY
    assert token.jose_header == {"alg": alg, "kid": key.kid, "typ": "c2c+json"}


@pytest.mark.parametrize("alg", ALGS)
def test_jwcrypto_signature_verifies_with_ours(alg: str) -> None:
    key = _key(alg)
    private = jwcrypto_jwk.JWK.from_pem(_pem(key))
    assert private.thumbprint() == key.kid
    token = jwcrypto_jws.JWS(BODY)
    token.add_signature(
        private,
        alg=alg,
        protected=json.dumps({"alg": alg, "kid": private.thumbprint(), "typ": "c2c+json"}),
    )
    detached = _detach(token.serialize(compact=True))
    ring = KeyRing([key.verification_key()])
    assert verify_detached(detached, BODY, keyring=ring, party="MX-ANAM", at=None).kid == key.kid


def _joserfc_key(key: SigningKey) -> OKPKey | ECKey:
    if key.alg == "EdDSA":
        return OKPKey.import_key(_pem(key))
    return ECKey.import_key(_pem(key))


@EDDSA_DEPRECATION
@pytest.mark.parametrize("alg", ALGS)
def test_ours_verifies_with_joserfc(alg: str) -> None:
    key = _key(alg)
    compact = _attach(sign_detached(BODY, key), BODY)
    result = joserfc_jws.deserialize_compact(compact, _joserfc_key(key), algorithms=[alg])
    assert result.payload == BODY
    assert result.protected["kid"] == key.kid


@EDDSA_DEPRECATION
@pytest.mark.parametrize("alg", ALGS)
def test_joserfc_signature_verifies_with_ours(alg: str) -> None:
    key = _key(alg)
    imported = _joserfc_key(key)
    assert imported.thumbprint() == key.kid
    assert {name: imported.as_dict()[name] for name in public_jwk(key)} == public_jwk(key)
    compact = joserfc_jws.serialize_compact(
        {"alg": alg, "kid": imported.thumbprint()}, BODY, imported, algorithms=[alg]
    )
    ring = KeyRing([key.verification_key()])
    assert (
        verify_detached(_detach(compact), BODY, keyring=ring, party="MX-ANAM", at=None).kid
        == key.kid
    )


def test_detached_signature_of_another_library_still_fails_on_other_bytes() -> None:
    key = _key("EdDSA")
    private = jwcrypto_jwk.JWK.from_pem(_pem(key))
    token = jwcrypto_jws.JWS(BODY)
    token.add_signature(
        private, alg="EdDSA", protected=json.dumps({"alg": "EdDSA", "kid": key.kid})
    )
    detached = _detach(token.serialize(compact=True))
    ring = KeyRing([key.verification_key()])
    with pytest.raises(SignatureInvalid, match="signature does not verify"):
        verify_detached(detached, BODY + b" ", keyring=ring, party="MX-ANAM", at=None)
