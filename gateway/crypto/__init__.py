"""Signatures, keys and tokens: the only package importing ``jwt`` or ``cryptography.hazmat``."""

from gateway.crypto.jws import (
    DEFAULT_TYP,
    ParsedJws,
    parse_detached,
    sign_detached,
    verify_detached,
)
from gateway.crypto.keys import (
    ALGORITHMS,
    Alg,
    KeyRing,
    SigningKey,
    VerificationKey,
    alg_for_key,
    ensure_key_valid,
    jwk_thumbprint,
    jwk_thumbprint_of,
    load_signing_key,
    load_verification_key,
    public_jwk,
)
from gateway.crypto.tokens import TokenClaims, TokenInvalid, issue_token, verify_token

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TYP",
    "Alg",
    "KeyRing",
    "ParsedJws",
    "SigningKey",
    "TokenClaims",
    "TokenInvalid",
    "VerificationKey",
    "alg_for_key",
    "ensure_key_valid",
    "issue_token",
    "jwk_thumbprint",
    "jwk_thumbprint_of",
    "load_signing_key",
    "load_verification_key",
    "parse_detached",
    "public_jwk",
    "sign_detached",
    "verify_detached",
    "verify_token",
]
