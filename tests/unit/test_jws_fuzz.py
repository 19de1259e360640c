"""Hypothesis: junk and mutated JWS strings never raise anything but GatewayError."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.crypto import (
    KeyRing,
    SigningKey,
    alg_for_key,
    jwk_thumbprint,
    sign_detached,
    verify_detached,
)
from gateway.errors import GatewayError, NackCode

BODY = b'{"header":{"sender":"MX-ANAM"},"payload":{}}'
KEYS = [
    SigningKey(
        party="MX-ANAM", kid=jwk_thumbprint(private), alg=alg_for_key(private), private_key=private
    )
    for private in (Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1()))
]
RING = KeyRing([key.verification_key() for key in KEYS])
VALID = [sign_detached(BODY, key) for key in KEYS]
B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(jws: str, body: bytes = BODY) -> NackCode | None:
    try:
        verify_detached(jws, body, keyring=RING, party="MX-ANAM", at=None)
    except GatewayError as exc:
        refused = exc
    else:
        return None
    assert refused.reason
    return refused.code


@st.composite
def mutated(draw: st.DrawFn) -> str:
    jws = draw(st.sampled_from(VALID))
    chars = list(jws)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        position = draw(st.integers(0, max(len(chars) - 1, 0)))
        char = draw(st.sampled_from(B64_CHARS + ".=+/ \n\t\x00é"))
        if op == "replace" and chars:
            chars[position] = char
        elif op == "insert":
            chars.insert(position, char)
        elif chars:
            del chars[position]
    return "".join(chars)


@FUZZ
@given(mutated())
def test_mutated_jws_is_refused_with_a_gateway_error(jws: str) -> None:
    outcome = _outcome(jws)
    if jws not in VALID:
        assert outcome in {NackCode.SIGNATURE_INVALID, NackCode.UNKNOWN_KEY}


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_with_a_gateway_error(jws: str) -> None:
    assert _outcome(jws) in {NackCode.SIGNATURE_INVALID, NackCode.UNKNOWN_KEY}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "jwk", "b64", "x"]), JSON_VALUES, max_size=4
    ),
    st.binary(min_size=0, max_size=80),
)
def test_arbitrary_headers_and_signatures_are_refused(
    header: dict[str, object], sig: bytes
) -> None:
    jws = f"{_b64(json.dumps(header).encode())}..{_b64(sig)}"
    assert _outcome(jws) in {NackCode.SIGNATURE_INVALID, NackCode.UNKNOWN_KEY}


@FUZZ
@given(st.binary(max_size=200))
def test_valid_signature_over_other_bodies_is_signature_invalid(body: bytes) -> None:
    for jws in VALID:
        assert _outcome(jws, body) is (None if body == BODY else NackCode.SIGNATURE_INVALID)
