"""Bearer JWTs for the internal API (DESIGN "Internal API"): issue and verify with pyjwt.

The algorithm list is an explicit allow-list of asymmetric algorithms and the verification key
is chosen by exact ``kid`` from configuration, so neither ``none`` nor an HMAC keyed with a
public key (CVE-2022-29217 class) can get through. Time claims are checked here against an
injected ``now`` because pyjwt reads the system clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from gateway.crypto.jws import b64url_decode_strict
from gateway.crypto.keys import ALGORITHMS, KeyRing, SigningKey, VerificationKey
from gateway.errors import SignatureInvalid

REQUIRED_CLAIMS = ("exp", "nbf", "iat", "iss", "aud", "sub")
#: Upper bound on a token's length, checked before anything is decoded.
MAX_TOKEN_CHARS = 8192


class TokenInvalid(Exception):
    """A bearer token is refused; ``reason`` is exact (for the log), never a secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class TokenClaims:
    subject: str
    scopes: frozenset[str]
    expires_at: datetime


def issue_token(
    key: SigningKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    scopes: Iterable[str],
    ttl_s: int,
    now: datetime,
) -> str:
    """A signed JWT with ``iss aud sub iat nbf exp jti`` and the space-separated ``scope``."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if not subject_ok(subject):
        raise ValueError(
            "subject must be a non-empty string (it names the caller in the audit log)"
        )
    scope_list = sorted(set(scopes))
    for scope in scope_list:
        if not scope or any(char.isspace() for char in scope):
            raise ValueError(f"scope {scope!r} must be non-empty without whitespace")
    issued = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_s,
        "jti": str(uuid.uuid4()),
        "scope": " ".join(scope_list),
    }
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
    )


def subject_ok(subject: object) -> bool:
    """A ``sub`` names the caller (the audit actor ``api:<sub>``): it must say something."""
    return isinstance(subject, str) and bool(subject.strip())


def _int_claim(claims: dict[str, Any], name: str) -> int:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid(f"claim {name} must be a number")
    return int(value)


def _check_times(claims: dict[str, Any], now: datetime, leeway_s: int) -> datetime:
    moment = now.timestamp()
    exp = _int_claim(claims, "exp")
    nbf = _int_claim(claims, "nbf")
    iat = _int_claim(claims, "iat")
    if exp <= moment - leeway_s:
        raise TokenInvalid(f"token expired at {datetime.fromtimestamp(exp, UTC).isoformat()}")
    if nbf > moment + leeway_s:
        raise TokenInvalid(f"token not valid before {datetime.fromtimestamp(nbf, UTC).isoformat()}")
    if iat > moment + leeway_s:
        raise TokenInvalid("token issued in the future (iat)")
    return datetime.fromtimestamp(exp, UTC)


def verify_token(
    token: str,
    *,
    keys: KeyRing | Iterable[VerificationKey],
    issuer: str,
    audience: str,
    algorithms: Collection[str],
    now: datetime,
    leeway_s: int = 30,
) -> TokenClaims:
    """Verify a bearer JWT; raise ``TokenInvalid`` with the exact reason."""
    allowed = set(algorithms)
    if not allowed or not allowed <= set(ALGORITHMS):
        raise ValueError(f"algorithms must be a non-empty subset of {ALGORITHMS}")
    ring = keys if isinstance(keys, KeyRing) else KeyRing(keys)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenInvalid("token is not a string of acceptable length")
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenInvalid(f"token must have 3 segments, found {len(segments)}")
    try:
        # pyjwt tolerates padding and non-zero trailing bits: one token, many spellings.
        for segment, what in zip(segments, ("header", "claims", "signature"), strict=True):
            b64url_decode_strict(segment, f"token {what}")
    except SignatureInvalid as exc:
        raise TokenInvalid(exc.reason) from None
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"token is not a JWS: {exc}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise TokenInvalid(f"alg {alg!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
    if "crit" in header or "jku" in header or "jwk" in header or "x5u" in header:
        raise TokenInvalid("token header names crit/jku/jwk/x5u, which are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise TokenInvalid("token header has no kid")
    candidates = [key for key in ring.candidates(kid) if key.valid_at(now)]
    if not candidates:
        raise TokenInvalid(f"kid {kid[:64]!r} is not a configured key valid now")
    key = candidates[0]
    if key.alg != alg:
        raise TokenInvalid(f"alg {alg} does not match key {kid}, which is {key.alg}")
    try:
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            audience=audience,
            issuer=[issuer],
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"token refused: {exc}") from None
    expires_at = _check_times(claims, now, leeway_s)
    subject = claims["sub"]
    if not subject_ok(subject):
        raise TokenInvalid("claim sub must be a non-empty string")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise TokenInvalid("claim scope must be a space-separated string")
    return TokenClaims(subject=subject, scopes=frozenset(scope.split()), expires_at=expires_at)


__all__ = [
    "REQUIRED_CLAIMS",
    "TokenClaims",
    "TokenInvalid",
    "issue_token",
    "subject_ok",
    "verify_token",
]
