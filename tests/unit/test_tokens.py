"""Internal API bearer tokens: issue and verify, with every refusal the allow-list must catch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli.main import cli
from gateway.crypto import (
    KeyRing,
    SigningKey,
    TokenInvalid,
    alg_for_key,
    issue_token,
    jwk_thumbprint,
    verify_token,
)

NOW = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
ISSUER = "https://c2c.cbp.example/api"
AUDIENCE = "c2c-gateway"


def _key(private: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, **window: Any) -> SigningKey:
    return SigningKey(
        party="US-CBP",
        kid=jwk_thumbprint(private),
        alg=alg_for_key(private),
        private_key=private,
        **window,
    )


ED = _key(Ed25519PrivateKey.generate())
EC = _key(ec.generate_private_key(ec.SECP256R1()))
RING = KeyRing([ED.verification_key(), EC.verification_key()])


def issue(key: SigningKey = ED, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "cbp-targeting",
        "scopes": ["c2c:send", "c2c:query"],
        "ttl_s": 600,
        "now": NOW,
    }
    arguments.update(overrides)
    return issue_token(key, **arguments)


def check(token: str, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "keys": RING,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ("EdDSA", "ES256"),
        "now": NOW,
        "leeway_s": 30,
    }
    arguments.update(overrides)
    return verify_token(token, **arguments)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    issued = int(NOW.timestamp())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "cbp-targeting",
        "iat": issued,
        "nbf": issued,
        "exp": issued + 600,
        "scope": "c2c:send",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


@pytest.mark.parametrize("key", [ED, EC], ids=["EdDSA", "ES256"])
def test_round_trip(key: SigningKey) -> None:
    claims = check(issue(key))
    assert claims.subject == "cbp-targeting"
    assert claims.scopes == frozenset({"c2c:send", "c2c:query"})
    assert claims.expires_at == NOW + timedelta(seconds=600)


def test_token_header_names_the_key() -> None:
    header = jwt.get_unverified_header(issue())
    assert header == {"alg": "EdDSA", "kid": ED.kid, "typ": "JWT"}


def test_accepted_within_leeway_and_refused_beyond() -> None:
    token = issue()
    assert check(token, now=NOW + timedelta(seconds=629)).subject == "cbp-targeting"
    with pytest.raises(TokenInvalid, match="token expired at 2026-11-23T07:10:00"):
        check(token, now=NOW + timedelta(seconds=630))
    assert check(token, now=NOW - timedelta(seconds=30)).subject == "cbp-targeting"
    with pytest.raises(TokenInvalid, match="token not valid before"):
        check(token, now=NOW - timedelta(seconds=31))


def test_wrong_audience_and_issuer_are_refused() -> None:
    with pytest.raises(TokenInvalid, match="Audience doesn't match"):
        check(issue(audience="another-gateway"))
    with pytest.raises(TokenInvalid, match="Invalid issuer"):
        check(issue(issuer=ISSUER[:-3]))
    with pytest.raises(TokenInvalid, match="Invalid issuer"):
        check(issue(issuer=ISSUER + "x"))


def test_alg_none_is_refused() -> None:
    head = _b64(json.dumps({"alg": "none", "kid": ED.kid}).encode())
    token = f"{head}.{_b64(json.dumps(_claims()).encode())}."
    with pytest.raises(TokenInvalid, match="alg 'none' is not allowed"):
        check(token)


def test_hs256_keyed_with_the_public_key_is_refused() -> None:
    pem = ED.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "kid": ED.kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    signature = _b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(TokenInvalid, match="alg 'HS256' is not allowed"):
        check(f"{head}.{body}.{signature}")


def test_unknown_key_and_key_outside_window_are_refused() -> None:
    stranger = _key(Ed25519PrivateKey.generate())
    with pytest.raises(TokenInvalid, match="is not a configured key valid now"):
        check(issue(stranger))
    retired = _key(Ed25519PrivateKey.generate(), not_after=NOW - timedelta(days=1))
    with pytest.raises(TokenInvalid, match="is not a configured key valid now"):
        check(issue(retired), keys=[retired.verification_key()])


def test_bad_signature_is_refused() -> None:
    head, body, signature = issue().split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(TokenInvalid, match="Signature verification failed"):
        check(f"{head}.{body}.{flipped}")
    forged = _b64(json.dumps(_claims(scope="admin")).encode())
    with pytest.raises(TokenInvalid, match="Signature verification failed"):
        check(f"{head}.{forged}.{signature}")


def test_header_alg_other_than_the_keys_is_refused() -> None:
    head = _b64(json.dumps({"alg": "ES256", "kid": ED.kid}).encode())
    body = _b64(json.dumps(_claims()).encode())
    with pytest.raises(
        TokenInvalid, match=f"alg ES256 does not match key {ED.kid}, which is EdDSA"
    ):
        check(f"{head}.{body}.{_b64(b'x' * 64)}")


def test_algorithm_not_in_the_configured_list_is_refused() -> None:
    with pytest.raises(TokenInvalid, match="alg 'ES256' is not allowed"):
        check(issue(EC), algorithms=("EdDSA",))


@pytest.mark.parametrize("missing", ["exp", "nbf", "iat", "iss", "aud", "sub"])
def test_required_claims(missing: str) -> None:
    token = jwt.encode(
        _claims(**{missing: None}), ED.private_key, algorithm="EdDSA", headers={"kid": ED.kid}
    )
    with pytest.raises(TokenInvalid, match=f'Token is missing the "{missing}" claim'):
        check(token)


def test_forbidden_header_members_are_refused() -> None:
    token = jwt.encode(
        _claims(), ED.private_key, algorithm="EdDSA", headers={"kid": ED.kid, "jku": "https://x"}
    )
    with pytest.raises(TokenInvalid, match="crit/jku/jwk/x5u"):
        check(token)


def test_non_numeric_time_claim_is_refused() -> None:
    token = jwt.encode(
        _claims(exp="soon"), ED.private_key, algorithm="EdDSA", headers={"kid": ED.kid}
    )
    with pytest.raises(TokenInvalid, match="claim exp must be a number"):
        check(token)


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "a" * 10_000, "..."])
def test_junk_is_token_invalid(junk: str) -> None:
    with pytest.raises(TokenInvalid):
        check(junk)


def test_algorithm_allow_list_is_validated() -> None:
    with pytest.raises(ValueError, match="non-empty subset"):
        check(issue(), algorithms=("EdDSA", "HS256"))
    with pytest.raises(ValueError, match="non-empty subset"):
        check(issue(), algorithms=())


def test_issue_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        issue(ttl_s=0)
    with pytest.raises(ValueError, match="without whitespace"):
        issue(scopes=["c2c:send admin"])
    for subject in ("", " \t"):
        with pytest.raises(ValueError, match="subject must be a non-empty string"):
            issue(subject=subject)


@pytest.mark.parametrize("subject", ["", "   ", "\t\n"])
def test_an_empty_subject_is_refused(subject: str) -> None:
    # it would be audited as the actor "api:", naming nobody
    token = jwt.encode(
        _claims(sub=subject), ED.private_key, algorithm="EdDSA", headers={"kid": ED.kid}
    )
    with pytest.raises(TokenInvalid) as caught:
        check(token)
    assert caught.value.reason == "claim sub must be a non-empty string"


@pytest.mark.parametrize("subject", ["", "  "])
def test_token_issue_refuses_an_empty_subject(subject: str, tmp_path: Path) -> None:
    # refused as the options are read, before any configuration or key is
    result = CliRunner().invoke(
        cli,
        ["token", "issue", "--config", str(tmp_path / "none.toml"), "--subject", subject],
    )
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.endswith(
        "Error: Invalid value for '--subject': must not be empty: it names the caller in the"
        " audit log\n"
    )


TOKEN = issue()
MUTATED_TOKENS = st.builds(
    lambda cut, tail: TOKEN[:cut] + tail, st.integers(0, len(TOKEN)), st.text(max_size=5)
).filter(lambda token: token != TOKEN)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400) | MUTATED_TOKENS)
def test_arbitrary_tokens_only_raise_token_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid):
        check(token)


def test_non_canonical_base64url_spelling_of_a_valid_token_is_refused() -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(TOKEN[-1])
    with pytest.raises(TokenInvalid, match="non-zero unused bits"):
        check(TOKEN[:-1] + alphabet[last | 1])
    with pytest.raises(TokenInvalid, match="padding"):
        check(TOKEN + "==")
