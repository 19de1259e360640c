"""Detached compact JWS (RFC 7515 Appendix F) over the exact body bytes, PROTOCOL section 3.

General JOSE libraries accept things PROTOCOL section 3 forbids (a kid that is not the key's,
padded base64url, oversized headers, a carried payload), so the whole compact form is checked
here and only the signature arithmetic is left to ``cryptography``. Doing it by hand is also
about twice as fast as a library decode (PERF-BASELINES section 1).

Every refusal is a ``SignatureInvalid`` or ``UnknownKey`` whose ``reason`` tells a partner's
engineer exactly what is wrong. A refusal of the form of what the sender wrote (the compact
form, base64url, the protected header, its typ, a missing kid, an alg or signature length
that does not fit its key) is also its ``detail``: it tells nothing of our keys, and a JOSE
library's default (``typ: JWT``, the payload kept, an unprotected kid) is then plain in the
NACK. Which key a kid names, and whether the arithmetic holds, keep the minimal default.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.hashes import SHA256

from gateway.crypto.keys import (
    ALGORITHMS,
    Alg,
    KeyRing,
    SigningKey,
    VerificationKey,
    b64url,
    ensure_key_valid,
)
from gateway.errors import SignatureInvalid, UnknownKey

DEFAULT_TYP = "c2c+json"
#: Upper bound on the decoded protected header; ours is about 90 bytes.
MAX_HEADER_BYTES = 1024
_MAX_HEADER_B64 = (MAX_HEADER_BYTES * 4 + 2) // 3
#: Both EdDSA and ES256 signatures are 64 bytes.
SIGNATURE_BYTES = 64
#: Checked before splitting; generous so that the header cap gives the more precise reason.
_MAX_JWS_CHARS = 8192
ALLOWED_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})

# Order of the P-256 group: r and s must lie in [1, n-1].
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ES256 = ec.ECDSA(SHA256())
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_OFFENDING = re.compile(r"[^A-Za-z0-9_-]")


def _quote(value: object, limit: int = 64) -> str:
    """A partner-supplied value made safe for a reason string: escaped and truncated."""
    text = value if isinstance(value, str) else repr(value)
    shown = json.dumps(text[:limit], ensure_ascii=True)
    return shown + ("..." if len(text) > limit else "")


def b64url_decode_strict(segment: str, what: str) -> bytes:
    """Strict, canonical base64url (RFC 7515 section 2): no padding, no ``+/``, no whitespace."""
    if not _B64URL.fullmatch(segment):
        match = _OFFENDING.search(segment)
        assert match is not None
        char = match.group()
        if char == "=":
            why = "padding '=' is not allowed"
        elif char in "+/":
            why = f"{char!r} belongs to standard base64; base64url uses '-' and '_'"
        elif char.isspace():
            why = "whitespace is not allowed"
        else:
            why = f"character {_quote(char)} is not in the base64url alphabet"
        raise SignatureInvalid(
            f"{what} is not canonical base64url: {why} (position {match.start()})"
        )
    if len(segment) % 4 == 1:
        raise SignatureInvalid(f"{what} is not valid base64url: impossible length {len(segment)}")
    try:
        decoded = binascii.a2b_base64(
            (segment + "=" * (-len(segment) % 4)).replace("-", "+").replace("_", "/"),
            strict_mode=True,
        )
    except binascii.Error as exc:
        raise SignatureInvalid(f"{what} is not valid base64url: {exc}") from None
    if b64url(decoded) != segment:
        raise SignatureInvalid(
            f"{what} is not canonical base64url: its last character has non-zero unused bits"
        )
    return decoded


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise SignatureInvalid(f"protected header has duplicate member {_quote(name)}")
        result[name] = value
    return result


def _reject_constant(name: str) -> None:
    raise SignatureInvalid(f"protected header contains the non-JSON constant {name}")


@dataclass(frozen=True, kw_only=True)
class ParsedJws:
    """A detached compact JWS that passed every structural check of PROTOCOL section 3."""

    alg: Alg
    kid: str | None
    typ: str | None
    protected_b64: str
    signature: bytes


def _normalize_typ(typ: str) -> str:
    # RFC 7515 section 4.1.9: media types are case-insensitive and "application/" is implied.
    lowered = typ.lower()
    return lowered.removeprefix("application/")


def _told(reason: str) -> SignatureInvalid:
    """A refusal of the form of the sender's own JWS, told to the sender as it is."""
    return SignatureInvalid(reason, detail=reason)


def parse_detached(jws: str) -> ParsedJws:
    """Check the form of a detached compact JWS and decode its protected header and signature.

    Raises ``SignatureInvalid`` naming the first problem found, in its ``detail`` too. ``kid``
    may be absent here (the published test vectors have none); ``verify_detached`` requires it.
    """
    try:
        return _parse_detached(jws)
    except SignatureInvalid as exc:
        raise _told(exc.reason) from None


@lru_cache(maxsize=256)
def _protected_header(protected_b64: str) -> tuple[Alg, str | None, str | None]:
    """``alg``, ``kid`` and ``typ`` of a protected header segment, or SignatureInvalid.

    A function of the segment's text alone, so its answers are kept: a peer sends the same
    few segments (one per key) with every message. Refusals are not kept (they raise).
    """
    header_bytes = b64url_decode_strict(protected_b64, "protected header")
    try:
        header_text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureInvalid("protected header is not UTF-8") from None
    try:
        header = json.loads(
            header_text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError):
        raise SignatureInvalid("protected header is not a JSON object") from None
    if not isinstance(header, dict):
        raise SignatureInvalid(
            f"protected header must be a JSON object, got {type(header).__name__}"
        )
    extra = sorted(set(header) - ALLOWED_HEADER_MEMBERS)
    if extra:
        names = ", ".join(_quote(name) for name in extra)
        raise SignatureInvalid(
            f"protected header member(s) {names} not allowed: only alg, kid and typ may appear "
            "(keys come from configuration, never from jku/jwk/x5u/x5c; crit is not supported)"
        )
    alg = header.get("alg")
    if alg is None:
        raise SignatureInvalid("protected header has no alg")
    if not isinstance(alg, str):
        raise SignatureInvalid("protected header alg must be a string")
    if alg not in ALGORITHMS:
        raise SignatureInvalid(f"alg {_quote(alg)} is not accepted: only EdDSA and ES256")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise SignatureInvalid("protected header kid must be a non-empty string")
    typ = header.get("typ")
    if "typ" in header and not isinstance(typ, str):
        raise SignatureInvalid("protected header typ must be a string")
    return alg, kid, typ


def _parse_detached(jws: str) -> ParsedJws:
    if not isinstance(jws, str):
        raise SignatureInvalid(f"JWS must be text, got {type(jws).__name__}")
    if len(jws) > _MAX_JWS_CHARS:
        raise SignatureInvalid(
            f"JWS is {len(jws)} characters, over the {_MAX_JWS_CHARS}-character limit "
            f"(protected header at most {MAX_HEADER_BYTES} bytes, signature {SIGNATURE_BYTES})"
        )
    dots = jws.count(".")
    if dots != 2:
        raise SignatureInvalid(
            f"compact JWS must have exactly 3 segments separated by '.', found {dots + 1}"
        )
    protected_b64, payload_b64, signature_b64 = jws.split(".")
    if payload_b64:
        raise SignatureInvalid(
            "payload segment must be empty (detached JWS, RFC 7515 Appendix F), "
            f"found {len(payload_b64)} characters: remove the middle part, keep the two dots"
        )
    if not protected_b64:
        raise SignatureInvalid("protected header segment is empty")
    if len(protected_b64) > _MAX_HEADER_B64:
        raise SignatureInvalid(
            f"protected header segment is {len(protected_b64)} characters, "
            f"over the {_MAX_HEADER_B64}-character limit ({MAX_HEADER_BYTES} bytes decoded)"
        )
    alg, kid, typ = _protected_header(protected_b64)
    if not signature_b64:
        raise SignatureInvalid("signature segment is empty")
    signature = b64url_decode_strict(signature_b64, "signature")
    return ParsedJws(
        alg=alg,
        kid=kid,
        typ=typ,
        protected_b64=protected_b64,
        signature=signature,
    )


def signing_input(protected_b64: str, body: bytes) -> bytes:
    """RFC 7515 section 5.1: ``BASE64URL(protected) || '.' || BASE64URL(body)``."""
    return protected_b64.encode("ascii") + b"." + b64url(body).encode("ascii")


def _looks_like_der(signature: bytes) -> bool:
    return len(signature) >= 8 and signature[0] == 0x30 and signature[1] == len(signature) - 2


def verify_signature(parsed: ParsedJws, body: bytes, key: VerificationKey) -> None:
    """Check the signature arithmetic with the algorithm of the key's configuration."""
    if parsed.alg != key.alg:
        raise _told(f"protected header names alg {parsed.alg} but key {key.kid} is {key.alg}")
    signature = parsed.signature
    if len(signature) != SIGNATURE_BYTES:
        hint = ""
        if key.alg == "ES256" and _looks_like_der(signature):
            hint = "; it looks DER-encoded: ES256 needs the raw r||s form (RFC 7518 section 3.4)"
        raise _told(
            f"{key.alg} signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}{hint}"
        )
    data = signing_input(parsed.protected_b64, body)
    try:
        if isinstance(key.public_key, Ed25519PublicKey):
            key.public_key.verify(signature, data)
        else:
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            if not (0 < r < _P256_N and 0 < s < _P256_N):
                raise _told("ES256 signature r or s is out of range (each must be in 1..n-1)")
            key.public_key.verify(encode_dss_signature(r, s), data, _ES256)
    except InvalidSignature:
        raise SignatureInvalid(
            f"signature does not verify with key {key.kid} ({key.alg}) over the "
            f"{len(body)}-byte body: the body, the header or the signature was changed, "
            "or it was signed with another key"
        ) from None


def _select_key(
    keyring: KeyRing, kid: str, party: str | None, at: datetime | None, *, any_party: bool
) -> VerificationKey:
    candidates = keyring.candidates(kid)
    if not candidates:
        owner = f" for {party}" if party is not None else ""
        raise UnknownKey(f"kid {_quote(kid)} names no key configured{owner}")
    if party is not None:
        owned = [key for key in candidates if key.party == party]
        if owned:
            candidates = tuple(owned)
        elif not any_party:
            owners = ", ".join(sorted({key.party for key in candidates}))
            raise UnknownKey(f"kid {kid} belongs to {owners}, not to the sender {party}")
    if at is None:
        return candidates[0]
    for key in candidates:
        if key.valid_at(at):
            return key
    ensure_key_valid(candidates[0], at)
    raise AssertionError("ensure_key_valid accepted a key valid_at refused")


def verify_detached(
    jws: str,
    body: bytes,
    *,
    keyring: KeyRing,
    party: str | None,
    at: datetime | None,
    accepted_typs: Collection[str] = (DEFAULT_TYP,),
    any_party: bool = False,
) -> VerificationKey:
    """Verify a detached JWS over ``body``; return the key that verified it.

    ``party`` is the sender the key must belong to (None skips that check); ``at`` is the
    moment the key must be valid at (the message's created_at; None skips the window check).
    With ``any_party``, a kid of another party's key is verified with that key and the key
    returned: the caller tells what such a message is once it has read who it claims to be
    from (another partner's genuine message replayed, or a message signed with the wrong key).
    """
    parsed = parse_detached(jws)
    if parsed.typ is not None:
        accepted = {_normalize_typ(typ) for typ in accepted_typs}
        if _normalize_typ(parsed.typ) not in accepted:
            expected = ", ".join(sorted(accepted_typs))
            raise _told(f"typ {_quote(parsed.typ)} is not accepted here (expected {expected})")
    if parsed.kid is None:
        raise _told(
            "protected header has no kid: set it to the RFC 7638 thumbprint of the signing key"
        )
    key = _select_key(keyring, parsed.kid, party, at, any_party=any_party)
    try:
        verify_signature(parsed, body, key)
    except SignatureInvalid:
        if party is not None and key.party != party:
            # Not that party's genuine message either: the sender named a kid that is not one
            # of its own keys (PROTOCOL section 4: UNKNOWN_KEY, not a signature problem).
            raise UnknownKey(
                f"kid {parsed.kid} belongs to {key.party}, not to the sender {party}, and the"
                " signature does not verify with that key"
            ) from None
        raise
    return key


@lru_cache(maxsize=64)
def _protected_b64(alg: str, kid: str, typ: str | None) -> str:
    header = {"alg": alg, "kid": kid} if typ is None else {"alg": alg, "kid": kid, "typ": typ}
    return b64url(json.dumps(header, separators=(",", ":")).encode("utf-8"))


def raw_sign(key: SigningKey, data: bytes) -> bytes:
    """The 64-byte JWS signature (Ed25519, or ES256 as r||s) of ``data``."""
    private_key = key.private_key
    if isinstance(private_key, Ed25519PrivateKey):
        return private_key.sign(data)
    r, s = decode_dss_signature(private_key.sign(data, _ES256))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_detached(body: bytes, key: SigningKey, *, typ: str | None = DEFAULT_TYP) -> str:
    """A detached compact JWS (``header..signature``) over the exact bytes of ``body``."""
    protected = _protected_b64(key.alg, key.kid, typ)
    signature = raw_sign(key, signing_input(protected, body))
    return f"{protected}..{b64url(signature)}"
