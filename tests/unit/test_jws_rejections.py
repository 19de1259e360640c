"""Every refusal of PROTOCOL section 3, each with its exact NACK code and a precise reason.

Forged JWS strings are correctly signed over their own (bad) header wherever possible, so each
case fails for the one reason it tests and not because the signature happens to be wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.crypto import (
    KeyRing,
    SigningKey,
    VerificationKey,
    alg_for_key,
    jwk_thumbprint,
    sign_detached,
    verify_detached,
)
from gateway.crypto.jws import raw_sign
from gateway.errors import GatewayError, NackCode, SignatureInvalid, UnknownKey

BODY = b'{"header":{"sender":"MX-ANAM"},"payload":{"hs_code":"847130"}}'
T0 = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_L = 2**252 + 27742317777372353535851937790883648493


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing(private: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, party: str) -> SigningKey:
    return SigningKey(
        party=party, kid=jwk_thumbprint(private), alg=alg_for_key(private), private_key=private
    )


ED = _signing(Ed25519PrivateKey.generate(), "MX-ANAM")
EC = _signing(ec.generate_private_key(ec.SECP256R1()), "MX-ANAM")
OTHER = _signing(Ed25519PrivateKey.generate(), "CA-CBSA")
RING = KeyRing([ED.verification_key(), EC.verification_key(), OTHER.verification_key()])


def verify(jws: str, body: bytes = BODY, *, party: str | None = "MX-ANAM") -> VerificationKey:
    return verify_detached(jws, body, keyring=RING, party=party, at=T0)


def forge(
    header: dict[str, Any] | bytes,
    *,
    key: SigningKey = ED,
    body: bytes = BODY,
    payload_segment: str = "",
    signature: Callable[[bytes], bytes] | None = None,
) -> str:
    """A detached JWS over ``header`` (dict or raw bytes), validly signed unless overridden."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    protected = b64(raw)
    data = f"{protected}.{b64(body)}".encode()
    sig = signature(data) if signature is not None else raw_sign(key, data)
    return f"{protected}.{payload_segment}.{b64(sig)}"


def std(key: SigningKey = ED, **extra: Any) -> dict[str, Any]:
    return {"alg": key.alg, "kid": key.kid, "typ": "c2c+json", **extra}


def es256_der(data: bytes) -> bytes:
    private = EC.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return private.sign(data, ec.ECDSA(hashes.SHA256()))


def es256_rs(r: int, s: int) -> Callable[[bytes], bytes]:
    return lambda _data: r.to_bytes(32, "big") + s.to_bytes(32, "big")


def hs256_with_public_pem(data: bytes) -> bytes:
    pem = ED.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hmac.new(pem, data, hashlib.sha256).digest()


def _valid_ed() -> str:
    return sign_detached(BODY, ED)


def _replace_signature_segment(jws: str, segment: str) -> str:
    head, middle, _ = jws.split(".")
    return f"{head}.{middle}.{segment}"


def _ed_signature_plus_l(data: bytes) -> bytes:
    signature = raw_sign(ED, data)
    s = int.from_bytes(signature[32:], "little") + ED25519_L
    return signature[:32] + s.to_bytes(32, "little")


def _nonzero_trailing_bits() -> str:
    jws = _valid_ed()
    segment = jws.split(".")[2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 86 characters carry 64 bytes + 4 unused bits: the last character's low 4 bits must be 0.
    last = alphabet.index(segment[-1])
    return _replace_signature_segment(jws, segment[:-1] + alphabet[last | 1])


CASES: list[tuple[str, Callable[[], str], NackCode, str]] = [
    # alg allow-list
    (
        "alg none",
        lambda: forge({"alg": "none", "kid": ED.kid}, signature=lambda _d: b"x" * 64),
        NackCode.SIGNATURE_INVALID,
        'alg "none" is not accepted',
    ),
    (
        "alg none, empty signature",
        lambda: forge({"alg": "none", "kid": ED.kid}, signature=lambda _d: b""),
        NackCode.SIGNATURE_INVALID,
        'alg "none" is not accepted',
    ),
    (
        "HS256 keyed with the public key",
        lambda: forge(std(alg="HS256"), signature=hs256_with_public_pem),
        NackCode.SIGNATURE_INVALID,
        'alg "HS256" is not accepted',
    ),
    (
        "HS384",
        lambda: forge(std(alg="HS384"), signature=lambda d: hmac.new(b"k", d, "sha384").digest()),
        NackCode.SIGNATURE_INVALID,
        'alg "HS384" is not accepted',
    ),
    (
        "HS512",
        lambda: forge(std(alg="HS512"), signature=lambda d: hmac.new(b"k", d, "sha512").digest()),
        NackCode.SIGNATURE_INVALID,
        'alg "HS512" is not accepted',
    ),
    (
        "RS256",
        lambda: forge(std(alg="RS256")),
        NackCode.SIGNATURE_INVALID,
        'alg "RS256" is not accepted',
    ),
    (
        "alg missing",
        lambda: forge({"kid": ED.kid}),
        NackCode.SIGNATURE_INVALID,
        "protected header has no alg",
    ),
    (
        "alg not a string",
        lambda: forge({"alg": 1, "kid": ED.kid}),
        NackCode.SIGNATURE_INVALID,
        "alg must be a string",
    ),
    (
        "ES256 header on an Ed25519 key",
        lambda: forge(std(ED, alg="ES256"), key=EC),
        NackCode.SIGNATURE_INVALID,
        f"protected header names alg ES256 but key {ED.kid} is EdDSA",
    ),
    (
        "EdDSA header on a P-256 key",
        lambda: forge(std(EC, alg="EdDSA"), key=ED),
        NackCode.SIGNATURE_INVALID,
        f"protected header names alg EdDSA but key {EC.kid} is ES256",
    ),
    # header members
    *[
        (
            f"{name} present",
            (lambda name=name, value=value: forge(std(**{name: value}))),
            NackCode.SIGNATURE_INVALID,
            f'member(s) "{name}" not allowed',
        )
        for name, value in [
            ("jku", "https://attacker.example/jwks.json"),
            (
                "jwk",
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                },
            ),
            ("x5u", "https://attacker.example/cert.pem"),
            ("x5c", ["MIIB"]),
            ("crit", ["exp"]),
            ("b64", False),
            ("cty", "json"),
            ("x-custom", 1),
        ]
    ],
    (
        "crit empty list",
        lambda: forge(std(crit=[])),
        NackCode.SIGNATURE_INVALID,
        'member(s) "crit" not allowed',
    ),
    (
        "typ not expected",
        lambda: forge(std(typ="c2c+xml")),
        NackCode.SIGNATURE_INVALID,
        'typ "c2c+xml" is not accepted here (expected c2c+json)',
    ),
    (
        "typ not a string",
        lambda: forge(std(typ=7)),
        NackCode.SIGNATURE_INVALID,
        "typ must be a string",
    ),
    (
        # RFC 7515 section 4.1.9: typ is a string; null is not "absent"
        "typ null",
        lambda: forge(std(typ=None)),
        NackCode.SIGNATURE_INVALID,
        "typ must be a string",
    ),
    (
        "kid missing",
        lambda: forge({"alg": "EdDSA", "typ": "c2c+json"}),
        NackCode.SIGNATURE_INVALID,
        "protected header has no kid",
    ),
    (
        "kid not a string",
        lambda: forge(std(kid=["a"])),
        NackCode.SIGNATURE_INVALID,
        "kid must be a non-empty string",
    ),
    # keys
    (
        "unknown kid",
        lambda: forge(std(kid="../../../../etc/passwd")),
        NackCode.UNKNOWN_KEY,
        'kid "../../../../etc/passwd" names no key configured for MX-ANAM',
    ),
    (
        "kid injection, long",
        lambda: forge(std(kid="' OR '1'='1" * 50)),
        NackCode.UNKNOWN_KEY,
        "names no key configured",
    ),
    (
        "kid of another party's key",
        lambda: forge(std(OTHER), key=OTHER),
        NackCode.UNKNOWN_KEY,
        f"kid {OTHER.kid} belongs to CA-CBSA, not to the sender MX-ANAM",
    ),
    # ECDSA signature forms
    (
        "ES256 DER signature",
        lambda: forge(std(EC), signature=es256_der),
        NackCode.SIGNATURE_INVALID,
        "it looks DER-encoded",
    ),
    (
        "ES256 63 bytes",
        lambda: forge(std(EC), key=EC, signature=lambda d: raw_sign(EC, d)[:63]),
        NackCode.SIGNATURE_INVALID,
        "ES256 signature must be 64 bytes, got 63",
    ),
    (
        "ES256 65 bytes",
        lambda: forge(std(EC), key=EC, signature=lambda d: raw_sign(EC, d) + b"\0"),
        NackCode.SIGNATURE_INVALID,
        "ES256 signature must be 64 bytes, got 65",
    ),
    (
        "ES256 r=s=0 (psychic signature)",
        lambda: forge(std(EC), signature=es256_rs(0, 0)),
        NackCode.SIGNATURE_INVALID,
        "r or s is out of range",
    ),
    (
        "ES256 r = n",
        lambda: forge(std(EC), signature=es256_rs(P256_N, 1)),
        NackCode.SIGNATURE_INVALID,
        "r or s is out of range",
    ),
    (
        "ES256 s = n",
        lambda: forge(std(EC), signature=es256_rs(1, P256_N)),
        NackCode.SIGNATURE_INVALID,
        "r or s is out of range",
    ),
    (
        "ES256 r, s in range but wrong",
        lambda: forge(std(EC), signature=es256_rs(1, 1)),
        NackCode.SIGNATURE_INVALID,
        "signature does not verify",
    ),
    (
        "EdDSA 63 bytes",
        lambda: forge(std(), signature=lambda d: raw_sign(ED, d)[:63]),
        NackCode.SIGNATURE_INVALID,
        "EdDSA signature must be 64 bytes, got 63",
    ),
    (
        "Ed25519 S >= L (non-canonical)",
        lambda: forge(std(), signature=_ed_signature_plus_l),
        NackCode.SIGNATURE_INVALID,
        "signature does not verify",
    ),
    (
        "signature empty",
        lambda: forge(std(), signature=lambda _d: b""),
        NackCode.SIGNATURE_INVALID,
        "signature segment is empty",
    ),
    # base64url canonical form
    (
        "padded signature",
        lambda: _valid_ed() + "==",
        NackCode.SIGNATURE_INVALID,
        "padding '=' is not allowed",
    ),
    (
        "padded header",
        lambda: forge(b'{"alg":"EdDSA","kid":"' + ED.kid.encode() + b'"}').replace(".", "=.", 1),
        NackCode.SIGNATURE_INVALID,
        "protected header is not canonical base64url: padding",
    ),
    (
        "standard base64 alphabet",
        lambda: _replace_signature_segment(
            _valid_ed(), _valid_ed().split(".")[2].replace("-", "+").replace("_", "/") + "+"
        ),
        NackCode.SIGNATURE_INVALID,
        "base64url uses '-' and '_'",
    ),
    (
        "non-zero trailing bits",
        _nonzero_trailing_bits,
        NackCode.SIGNATURE_INVALID,
        "non-zero unused bits",
    ),
    (
        "whitespace inside",
        lambda: _valid_ed()[:40] + "\n" + _valid_ed()[40:],
        NackCode.SIGNATURE_INVALID,
        "whitespace is not allowed",
    ),
    (
        "trailing newline",
        lambda: _valid_ed() + "\n",
        NackCode.SIGNATURE_INVALID,
        "whitespace is not allowed",
    ),
    (
        "leading space",
        lambda: " " + _valid_ed(),
        NackCode.SIGNATURE_INVALID,
        "whitespace is not allowed",
    ),
    (
        "impossible base64 length",
        lambda: _valid_ed() + "AAA",
        NackCode.SIGNATURE_INVALID,
        "impossible length 89",
    ),
    # compact structure
    (
        "attached payload",
        lambda: forge(std(), payload_segment=b64(BODY)),
        NackCode.SIGNATURE_INVALID,
        "payload segment must be empty",
    ),
    (
        "payload of another body",
        lambda: forge(std(), payload_segment=b64(b"{}")),
        NackCode.SIGNATURE_INVALID,
        "payload segment must be empty",
    ),
    (
        "two segments",
        lambda: _valid_ed().replace("..", "."),
        NackCode.SIGNATURE_INVALID,
        "exactly 3 segments separated by '.', found 2",
    ),
    (
        "four segments",
        lambda: _valid_ed() + ".",
        NackCode.SIGNATURE_INVALID,
        "exactly 3 segments separated by '.', found 4",
    ),
    ("JWE-like five segments", lambda: "a.b.c.d.e", NackCode.SIGNATURE_INVALID, "found 5"),
    ("empty string", lambda: "", NackCode.SIGNATURE_INVALID, "found 1"),
    (
        "empty header segment",
        lambda: ".." + _valid_ed().split(".")[2],
        NackCode.SIGNATURE_INVALID,
        "protected header segment is empty",
    ),
    (
        "oversized header",
        lambda: forge(std(typ="c2c+json" + "x" * 1100)),
        NackCode.SIGNATURE_INVALID,
        "over the 1366-character limit",
    ),
    (
        "huge JWS",
        lambda: "a" * 100_000 + ".." + "b" * 86,
        NackCode.SIGNATURE_INVALID,
        "JWS is 100088 characters, over the 8192-character limit",
    ),
    (
        "header not JSON",
        lambda: forge(b"alg=EdDSA"),
        NackCode.SIGNATURE_INVALID,
        "protected header is not a JSON object",
    ),
    (
        "header a JSON array",
        lambda: forge(b'["alg","EdDSA"]'),
        NackCode.SIGNATURE_INVALID,
        "must be a JSON object, got list",
    ),
    (
        "header duplicate member",
        lambda: forge(b'{"alg":"EdDSA","kid":"' + ED.kid.encode() + b'","alg":"EdDSA"}'),
        NackCode.SIGNATURE_INVALID,
        'duplicate member "alg"',
    ),
    (
        "header duplicate kid",
        lambda: forge(
            b'{"alg":"EdDSA","kid":"' + OTHER.kid.encode() + b'","kid":"' + ED.kid.encode() + b'"}'
        ),
        NackCode.SIGNATURE_INVALID,
        'duplicate member "kid"',
    ),
    (
        "header not UTF-8",
        lambda: forge(b'{"alg":"EdDSA","typ":"\xff"}'),
        NackCode.SIGNATURE_INVALID,
        "protected header is not UTF-8",
    ),
    (
        "header with NaN",
        lambda: forge(b'{"alg":"EdDSA","typ":NaN}'),
        NackCode.SIGNATURE_INVALID,
        "non-JSON constant NaN",
    ),
    (
        "header with BOM",
        lambda: forge(b"\xef\xbb\xbf" + json.dumps(std()).encode()),
        NackCode.SIGNATURE_INVALID,
        "protected header is not a JSON object",
    ),
]


@pytest.mark.parametrize(
    ("make", "code", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rejection_code_and_reason(make: Callable[[], str], code: NackCode, reason: str) -> None:
    with pytest.raises(GatewayError) as caught:
        verify(make())
    assert caught.value.code is code
    assert reason in caught.value.reason
    # The form of what the sender wrote is told as it is (josepeer finding F2: a library's
    # default was invisible in the NACK); which key a kid names, and whether the signature
    # holds, stay the minimal default.
    told = caught.value.detail == caught.value.reason
    minimal = caught.value.detail in {
        "signature missing or invalid",
        "signing key not configured for the sender or not valid",
    }
    assert told is not minimal
    assert minimal is (
        code is NackCode.UNKNOWN_KEY or caught.value.reason.startswith("signature does not verify")
    ), caught.value


def test_alg_mismatch_reason_is_exact() -> None:
    with pytest.raises(SignatureInvalid) as caught:
        verify(forge(std(ED, alg="ES256"), key=EC))
    assert caught.value.reason == f"protected header names alg ES256 but key {ED.kid} is EdDSA"


def test_long_kid_is_truncated_and_escaped_in_the_reason() -> None:
    with pytest.raises(UnknownKey) as caught:
        verify(forge(std(kid="\u202e" + "k" * 500)))
    assert len(caught.value.reason) < 200
    assert "\\u202e" in caught.value.reason


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_valid_signature_verifies_and_names_its_key(key: SigningKey) -> None:
    assert verify(sign_detached(BODY, key)) == key.verification_key()


@pytest.mark.parametrize("typ", [None, "c2c+json", "application/c2c+json", "C2C+JSON"])
def test_typ_absent_or_equivalent_media_type_is_accepted(typ: str | None) -> None:
    assert verify(sign_detached(BODY, ED, typ=typ)).kid == ED.kid


def test_native_typ_accepted_when_configured() -> None:
    jws = sign_detached(BODY, ED, typ="c2c+xml")
    key = verify_detached(
        jws, BODY, keyring=RING, party="MX-ANAM", at=T0, accepted_typs=("c2c+xml",)
    )
    assert key.kid == ED.kid


def test_party_none_skips_the_owner_check() -> None:
    assert verify(sign_detached(BODY, OTHER), party=None).party == "CA-CBSA"


@pytest.mark.parametrize(
    "changed",
    [BODY + b"\n", BODY.replace(b"{", b"{ ", 1), BODY.replace(b":", b": "), b"", BODY[:-1]],
    ids=["appended newline", "whitespace", "spacing", "empty", "truncated"],
)
def test_signature_over_other_bytes_is_invalid(changed: bytes) -> None:
    with pytest.raises(SignatureInvalid, match="signature does not verify"):
        verify(sign_detached(BODY, ED), changed)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_every_single_bit_flip_is_signature_invalid(key: SigningKey) -> None:
    jws = sign_detached(BODY, key)
    head, _, sig = jws.split(".")
    header = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    signature = base64.urlsafe_b64decode(sig + "==")
    codes: list[NackCode] = []
    for bit in range(len(BODY) * 8):
        with pytest.raises(GatewayError) as caught:
            verify(jws, _flip(BODY, bit))
        codes.append(caught.value.code)
    for bit in range(len(signature) * 8):
        with pytest.raises(GatewayError) as caught:
            verify(f"{head}..{b64(_flip(signature, bit))}")
        codes.append(caught.value.code)
    header_codes: list[NackCode] = []
    for bit in range(len(header) * 8):
        with pytest.raises(GatewayError) as caught:
            verify(f"{b64(_flip(header, bit))}..{sig}")
        header_codes.append(caught.value.code)
    assert set(codes) == {NackCode.SIGNATURE_INVALID}
    # A flip inside the kid names another (unknown) key; everything else is a bad signature.
    assert set(header_codes) == {NackCode.SIGNATURE_INVALID, NackCode.UNKNOWN_KEY}
    kid_start = header.index(key.kid.encode())
    for bit, code in enumerate(header_codes):
        if code is NackCode.UNKNOWN_KEY:
            assert kid_start <= bit // 8 < kid_start + len(key.kid)


def test_not_a_string_is_signature_invalid() -> None:
    with pytest.raises(SignatureInvalid, match="JWS must be text"):
        verify(sign_detached(BODY, ED).encode())  # type: ignore[arg-type]


# Key rotation (T22b): K1 valid T0-1d .. T0+1d, K2 valid T0 .. T0+30d.
K1 = _signing(Ed25519PrivateKey.generate(), "MX-ANAM")
K2 = _signing(ec.generate_private_key(ec.SECP256R1()), "MX-ANAM")
ROTATION = KeyRing(
    [
        VerificationKey(
            party="MX-ANAM",
            kid=K1.kid,
            alg="EdDSA",
            public_key=K1.private_key.public_key(),
            not_before=T0 - timedelta(days=1),
            not_after=T0 + timedelta(days=1),
        ),
        VerificationKey(
            party="MX-ANAM",
            kid=K2.kid,
            alg="ES256",
            public_key=K2.private_key.public_key(),
            not_before=T0,
            not_after=T0 + timedelta(days=30),
        ),
    ]
)


def _rotated(key: SigningKey, at: datetime) -> VerificationKey:
    return verify_detached(sign_detached(BODY, key), BODY, keyring=ROTATION, party="MX-ANAM", at=at)


def test_rotation_both_keys_verify_in_the_overlap() -> None:
    for at in (T0, T0 + timedelta(hours=12), T0 + timedelta(days=1)):
        assert _rotated(K1, at).kid == K1.kid
        assert _rotated(K2, at).kid == K2.kid


def test_rotation_old_key_is_unknown_after_its_not_after() -> None:
    after = T0 + timedelta(days=1, seconds=1)
    assert _rotated(K2, after).kid == K2.kid
    with pytest.raises(UnknownKey) as caught:
        _rotated(K1, after)
    assert caught.value.reason.startswith(f"key {K1.kid} of MX-ANAM is not valid at ")
    assert "after its not_after" in caught.value.reason


def test_rotation_new_key_is_unknown_before_its_not_before() -> None:
    before = T0 - timedelta(seconds=1)
    assert _rotated(K1, before).kid == K1.kid
    with pytest.raises(UnknownKey, match="before its not_before"):
        _rotated(K2, before)


def test_at_none_skips_the_window_check() -> None:
    key = verify_detached(sign_detached(BODY, K1), BODY, keyring=ROTATION, party="MX-ANAM", at=None)
    assert key.kid == K1.kid


def test_hs256_signature_really_is_an_hmac_with_the_public_key() -> None:
    # Guard for the confusion case above: the forged token is a well-formed HS256 JWS.
    jws = forge(std(alg="HS256"), signature=hs256_with_public_pem)
    head, _, sig = jws.split(".")
    expected = hs256_with_public_pem(f"{head}.{b64(BODY)}".encode())
    assert base64.urlsafe_b64decode(sig + "==") == expected


def test_der_case_is_a_real_der_signature_of_the_right_bytes() -> None:
    # Guard: the DER rejection is about the encoding, not about a wrong signature.
    jws = forge(std(EC), signature=es256_der)
    head, _, sig = jws.split(".")
    r, s = decode_dss_signature(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    data = f"{head}.{b64(BODY)}".encode()
    public = EC.private_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
        data,
        ec.ECDSA(hashes.SHA256()),
    )
    assert 0 < r < P256_N
    assert 0 < s < P256_N
