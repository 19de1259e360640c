"""Key loading (only Ed25519 and P-256), thumbprints, validity windows and the key ring."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.crypto import (
    KeyRing,
    VerificationKey,
    ensure_key_valid,
    jwk_thumbprint,
    jwk_thumbprint_of,
    load_signing_key,
    load_verification_key,
    public_jwk,
)
from gateway.errors import ConfigError, UnknownKey

T0 = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
NO_ENCRYPTION = serialization.NoEncryption()


def _write_private(path: Path, key: object, fmt: serialization.PrivateFormat) -> Path:
    assert hasattr(key, "private_bytes")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, NO_ENCRYPTION))
    return path


def _write_public(path: Path, key: object) -> Path:
    assert hasattr(key, "public_key")
    public = key.public_key()
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_ed25519_pair_loads_with_the_thumbprint_as_kid(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    key_path = _write_private(tmp_path / "sign.key", private, serialization.PrivateFormat.PKCS8)
    pub_path = _write_public(tmp_path / "sign.pub", private)
    signing = load_signing_key(key_path, party="US-CBP", alg="EdDSA")
    verifying = load_verification_key(pub_path, party="US-CBP", alg="EdDSA")
    assert signing.kid == verifying.kid == jwk_thumbprint(private.public_key())
    assert signing.verification_key() == verifying
    assert public_jwk(signing) == public_jwk(verifying)
    assert public_jwk(verifying)["kty"] == "OKP"


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_p256_private_key_loads_in_pkcs8_and_sec1(
    tmp_path: Path, fmt: serialization.PrivateFormat
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key = load_signing_key(
        _write_private(tmp_path / "k.pem", private, fmt), party="US-CBP", alg="ES256"
    )
    assert key.alg == "ES256"
    assert key.kid == jwk_thumbprint_of(public_jwk(private.public_key()))


def test_validity_window_is_carried(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    key = load_verification_key(
        _write_public(tmp_path / "p.pem", private),
        party="MX-ANAM",
        alg="EdDSA",
        not_before=T0,
        not_after=T0 + timedelta(days=90),
    )
    assert key.valid_at(T0)
    assert key.valid_at(T0 + timedelta(days=90))
    assert not key.valid_at(T0 - timedelta(microseconds=1))
    assert not key.valid_at(T0 + timedelta(days=90, microseconds=1))
    ensure_key_valid(key, T0 + timedelta(days=1))
    with pytest.raises(UnknownKey, match="after its not_after"):
        ensure_key_valid(key, T0 + timedelta(days=91))
    with pytest.raises(UnknownKey, match="before its not_before"):
        ensure_key_valid(key, T0 - timedelta(days=1))


REFUSED_PRIVATE = [
    ("RSA", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "an RSA key"),
    ("P-384", lambda: ec.generate_private_key(ec.SECP384R1()), "an EC key on curve secp384r1"),
    ("secp256k1", lambda: ec.generate_private_key(ec.SECP256K1()), "an EC key on curve secp256k1"),
    ("Ed448", ed448.Ed448PrivateKey.generate, "an Ed448 key"),
    ("X25519", x25519.X25519PrivateKey.generate, "an X25519 (key agreement) key"),
    ("DSA", lambda: dsa.generate_private_key(key_size=2048), "a DSA key"),
]


@pytest.mark.parametrize(
    ("make", "described"), [c[1:] for c in REFUSED_PRIVATE], ids=[c[0] for c in REFUSED_PRIVATE]
)
def test_other_key_types_are_refused_clearly(tmp_path: Path, make: object, described: str) -> None:
    assert callable(make)
    private = make()
    key_path = _write_private(tmp_path / "k.pem", private, serialization.PrivateFormat.PKCS8)
    pub_path = _write_public(tmp_path / "p.pem", private)
    expected = f"is {described}; only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted"
    with pytest.raises(ConfigError) as private_error:
        load_signing_key(key_path, party="US-CBP", alg="EdDSA")
    assert str(private_error.value) == f"{key_path}: private key: {expected}"
    with pytest.raises(ConfigError) as public_error:
        load_verification_key(pub_path, party="US-CBP", alg="EdDSA")
    assert str(public_error.value) == f"{pub_path}: public key: {expected}"


def test_alg_that_does_not_fit_the_key_is_refused(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = _write_public(tmp_path / "p.pem", private)
    with pytest.raises(ConfigError) as caught:
        load_verification_key(path, party="MX-ANAM", alg="ES256")
    assert caught.value.reason == "is an Ed25519 key (EdDSA) but is configured with alg ES256"
    with pytest.raises(ConfigError, match="alg 'HS256' is not accepted"):
        load_verification_key(path, party="MX-ANAM", alg="HS256")


def test_unreadable_garbage_and_encrypted_files_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as caught:
        load_verification_key(missing, party="MX-ANAM", alg="EdDSA")
    assert caught.value.file == str(missing)
    assert caught.value.reason == "cannot read file: No such file or directory"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        load_verification_key(garbage, party="MX-ANAM", alg="EdDSA")
    with pytest.raises(ConfigError, match="is not a PEM private key"):
        load_signing_key(garbage, party="MX-ANAM", alg="EdDSA")
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted"):
        load_signing_key(encrypted, party="MX-ANAM", alg="EdDSA")
    # A public key where a private one is expected, and the reverse.
    public = _write_public(tmp_path / "p.pem", Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="is not a PEM private key"):
        load_signing_key(public, party="MX-ANAM", alg="EdDSA")


def test_bad_windows_are_refused(tmp_path: Path) -> None:
    path = _write_public(tmp_path / "p.pem", Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="not_before must be timezone-aware"):
        load_verification_key(path, party="MX-ANAM", alg="EdDSA", not_before=datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="is before not_before"):
        load_verification_key(
            path, party="MX-ANAM", alg="EdDSA", not_before=T0, not_after=T0 - timedelta(days=1)
        )


def test_verification_key_kid_must_be_the_thumbprint() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError, match="is not the key's RFC 7638 thumbprint"):
        VerificationKey(party="MX-ANAM", kid="my-key-1", alg="EdDSA", public_key=public)
    with pytest.raises(ValueError, match="is an EdDSA key, configured as ES256"):
        VerificationKey(party="MX-ANAM", kid=jwk_thumbprint(public), alg="ES256", public_key=public)


def test_key_ring_is_an_exact_kid_lookup() -> None:
    keys = [
        VerificationKey(party=party, kid=jwk_thumbprint(public), alg="EdDSA", public_key=public)
        for party, public in [
            ("MX-ANAM", Ed25519PrivateKey.generate().public_key()),
            ("CA-CBSA", Ed25519PrivateKey.generate().public_key()),
        ]
    ]
    shared = keys[0].public_key
    also_ca = VerificationKey(party="CA-CBSA", kid=keys[0].kid, alg="EdDSA", public_key=shared)
    ring = KeyRing([*keys, also_ca])
    assert len(ring) == 3
    assert ring.candidates(keys[0].kid) == (keys[0], also_ca)
    assert ring.candidates(keys[0].kid.lower()) == ()
    assert ring.candidates(keys[0].kid[:-1]) == ()
    assert ring.kids("CA-CBSA") == [keys[0].kid, keys[1].kid]
    assert list(ring) == [keys[0], also_ca, keys[1]]


def test_thumbprint_of_refuses_incomplete_or_unknown_jwks() -> None:
    with pytest.raises(ValueError, match="lacks required member"):
        jwk_thumbprint_of({"kty": "EC", "crv": "P-256", "x": "AA"})
    with pytest.raises(ValueError, match="has no RFC 7638 thumbprint definition"):
        jwk_thumbprint_of({"kty": "XYZ"})


ED25519_P = 2**255 - 19
SMALL_ORDER = {
    "identity": (1).to_bytes(32, "little"),
    "order 2": (ED25519_P - 1).to_bytes(32, "little"),
    "order 4": bytes(32),
    "order 8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order 8, other": bytes.fromhex(
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
    ),
}


@pytest.mark.parametrize("raw", SMALL_ORDER.values(), ids=SMALL_ORDER.keys())
def test_small_order_ed25519_keys_are_refused(tmp_path: Path, raw: bytes) -> None:
    public = Ed25519PublicKey.from_public_bytes(raw)
    path = tmp_path / "p.pem"
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_verification_key(path, party="MX-ANAM", alg="EdDSA")
    assert caught.value.reason == (
        "is a small-order Ed25519 point, which would accept forged signatures"
    )
    with pytest.raises(ValueError, match="small-order"):
        VerificationKey(party="MX-ANAM", kid=jwk_thumbprint(public), alg="EdDSA", public_key=public)


def test_non_canonical_ed25519_encoding_is_refused() -> None:
    public = Ed25519PublicKey.from_public_bytes((ED25519_P + 2).to_bytes(32, "little"))
    with pytest.raises(ValueError, match="non-canonical Ed25519 encoding"):
        VerificationKey(party="MX-ANAM", kid=jwk_thumbprint(public), alg="EdDSA", public_key=public)


def test_ordinary_ed25519_keys_are_not_mistaken_for_weak_ones() -> None:
    for _ in range(50):
        public = Ed25519PrivateKey.generate().public_key()
        key = VerificationKey(
            party="MX-ANAM", kid=jwk_thumbprint(public), alg="EdDSA", public_key=public
        )
        assert key.public_key is public
