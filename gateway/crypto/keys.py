"""Signing and verification keys: loading, RFC 7638 thumbprints, validity windows, the key ring.

Only Ed25519 (``EdDSA``) and P-256 (``ES256``) keys exist here: any other key type or curve is
refused when loaded, so nothing downstream ever has to ask which kind of key it holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import ConfigError, UnknownKey

Alg = Literal["EdDSA", "ES256"]
ALGORITHMS: tuple[Alg, ...] = ("EdDSA", "ES256")

PublicKey: TypeAlias = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey: TypeAlias = Ed25519PrivateKey | ec.EllipticCurvePrivateKey

# Names for the key types people actually send us by mistake, for the refusal message.
_KEY_KIND_NAMES: tuple[tuple[str, str], ...] = (
    ("RSA", "an RSA key"),
    ("DSA", "a DSA key"),
    ("Ed448", "an Ed448 key"),
    ("X25519", "an X25519 (key agreement) key"),
    ("X448", "an X448 (key agreement) key"),
    ("DH", "a Diffie-Hellman key"),
)


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _describe(key: object) -> str:
    if isinstance(key, Ed25519PublicKey | Ed25519PrivateKey):
        return "an Ed25519 key"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    name = type(key).__name__
    for marker, description in _KEY_KIND_NAMES:
        if name.startswith(f"_{marker}") or name.startswith(marker):
            return description
    return f"a {name}"


def alg_for_key(key: PublicKey | PrivateKey) -> Alg:
    """The one JWS algorithm a key may be used with."""
    if isinstance(key, Ed25519PublicKey | Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ES256"
    raise ValueError(f"{_describe(key)} is not accepted: only Ed25519 (EdDSA) and P-256 (ES256)")


def public_jwk(key: PublicKey | PrivateKey | VerificationKey | SigningKey) -> dict[str, str]:
    """The public JWK (RFC 7517) of a key: only the members RFC 7638 hashes, plus nothing else."""
    if isinstance(key, VerificationKey):
        key = key.public_key
    elif isinstance(key, SigningKey):
        key = key.private_key
    if isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    alg = alg_for_key(key)
    if alg == "EdDSA":
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    assert isinstance(key, ec.EllipticCurvePublicKey)
    numbers = key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


# RFC 7638 section 3.2: the required members per key type, the only ones hashed.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
    "oct": ("k", "kty"),
}


def jwk_thumbprint_of(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a JWK given as a mapping (any key type), base64url."""
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _THUMBPRINT_MEMBERS:
        raise ValueError(f"JWK kty {kty!r} has no RFC 7638 thumbprint definition")
    members = _THUMBPRINT_MEMBERS[kty]
    missing = [name for name in members if not isinstance(jwk.get(name), str)]
    if missing:
        raise ValueError(f"JWK of kty {kty} lacks required member(s) {', '.join(missing)}")
    canonical = json.dumps(
        {name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def jwk_thumbprint(public_key: PublicKey | PrivateKey) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url) of an Ed25519 or P-256 key: its ``kid``."""
    return jwk_thumbprint_of(public_jwk(public_key))


# Edwards25519 (RFC 8032 section 5.1): field prime and curve constant.
_ED_P = 2**255 - 19
_ED_D = -121665 * pow(121666, _ED_P - 2, _ED_P) % _ED_P


def _ed25519_weakness(raw: bytes) -> str | None:
    """Why an encoded Ed25519 public key must not be configured, or None.

    A small-order point (8P = identity) lets one signature verify for many messages, and a
    non-canonical encoding gives one key two kids (RFC 8032 section 5.1.3; T20).
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _ED_P:
        return "is a non-canonical Ed25519 encoding (y >= p)"
    u = (y * y - 1) % _ED_P
    v = (_ED_D * y * y + 1) % _ED_P
    x = u * pow(v, 3, _ED_P) * pow(u * pow(v, 7, _ED_P), (_ED_P - 5) // 8, _ED_P) % _ED_P
    if (v * x * x - u) % _ED_P != 0:
        x = x * pow(2, (_ED_P - 1) // 4, _ED_P) % _ED_P
    if (v * x * x - u) % _ED_P != 0:
        return "is not a point on Ed25519"
    for _ in range(3):
        xx, yy = x * x % _ED_P, y * y % _ED_P
        t = _ED_D * xx * yy % _ED_P
        x, y = (
            2 * x * y * pow(1 + t, _ED_P - 2, _ED_P) % _ED_P,
            (yy + xx) * pow(1 - t, _ED_P - 2, _ED_P) % _ED_P,
        )
    if x == 0 and y == 1:
        return "is a small-order Ed25519 point, which would accept forged signatures"
    return None


def _check_window(not_before: datetime | None, not_after: datetime | None) -> None:
    for name, moment in (("not_before", not_before), ("not_after", not_after)):
        if moment is not None and moment.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware")
    if not_before is not None and not_after is not None and not_after < not_before:
        raise ValueError(f"not_after {not_after.isoformat()} is before not_before")


@dataclass(frozen=True, kw_only=True)
class VerificationKey:
    """A party's public key, bound to one algorithm and a validity window (both ends inclusive).

    ``kid`` must be the key's RFC 7638 thumbprint: a ring can then never hold a kid that
    names some other key.
    """

    party: str
    kid: str
    alg: Alg
    public_key: PublicKey
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        actual = alg_for_key(self.public_key)
        if actual != self.alg:
            raise ValueError(f"key {self.kid} is an {actual} key, configured as {self.alg}")
        if isinstance(self.public_key, Ed25519PublicKey):
            weakness = _ed25519_weakness(
                self.public_key.public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
            )
            if weakness is not None:
                raise ValueError(f"public key {weakness}")
        thumbprint = jwk_thumbprint(self.public_key)
        if self.kid != thumbprint:
            raise ValueError(f"kid {self.kid!r} is not the key's RFC 7638 thumbprint {thumbprint}")
        _check_window(self.not_before, self.not_after)

    def valid_at(self, at: datetime) -> bool:
        if self.not_before is not None and at < self.not_before:
            return False
        return self.not_after is None or at <= self.not_after


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    """One of our own private keys, bound to one algorithm and a validity window.

    ``kid`` is normally the thumbprint; it is not enforced so that test tooling can reproduce
    a partner's mislabelled signatures.
    """

    party: str
    kid: str
    alg: Alg
    private_key: PrivateKey
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        actual = alg_for_key(self.private_key)
        if actual != self.alg:
            raise ValueError(f"key {self.kid} is an {actual} key, configured as {self.alg}")
        _check_window(self.not_before, self.not_after)

    def verification_key(self) -> VerificationKey:
        """The matching public key, as a partner would configure it."""
        public = self.private_key.public_key()
        return VerificationKey(
            party=self.party,
            kid=jwk_thumbprint(public),
            alg=self.alg,
            public_key=public,
            not_before=self.not_before,
            not_after=self.not_after,
        )


def current_key(
    keys: Iterable[SigningKey], at: datetime, alg: Alg | None = None
) -> SigningKey | None:
    """The key to sign with at ``at``: of those valid then (of ``alg``, when given), the one
    with the latest ``not_before`` (a rotation's new key), the first listed on a tie; None
    when none is valid."""
    valid = [
        key
        for key in keys
        if (alg is None or key.alg == alg)
        and (key.not_before is None or key.not_before <= at)
        and (key.not_after is None or at <= key.not_after)
    ]
    if not valid:
        return None
    return max(valid, key=lambda key: key.not_before or datetime.min.replace(tzinfo=at.tzinfo))


def ensure_key_valid(key: VerificationKey, at: datetime) -> None:
    """Raise ``UnknownKey`` when ``at`` lies outside the key's validity window."""
    if key.valid_at(at):
        return
    window = (
        f"{key.not_before.isoformat() if key.not_before else '-'}"
        f" .. {key.not_after.isoformat() if key.not_after else '-'}"
    )
    when = (
        "before its not_before" if key.not_before and at < key.not_before else "after its not_after"
    )
    raise UnknownKey(
        f"key {key.kid} of {key.party} is not valid at {at.isoformat()} ({when}; valid {window})"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), what, f"cannot read file: {exc.strerror or exc}") from None


def _accepted(path: Path, what: str, key: object) -> Alg:
    if isinstance(key, Ed25519PublicKey | Ed25519PrivateKey) or (
        isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return alg_for_key(key)
    raise ConfigError(
        str(path),
        what,
        f"is {_describe(key)}; only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted",
    )


def read_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key (PKCS#8 or traditional); Ed25519 or P-256 only."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            str(path), "private key", "is encrypted; an unencrypted PEM is needed"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(str(path), "private key", "is not a PEM private key") from None
    _accepted(path, "private key", key)
    assert isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return key


def read_public_key(path: Path) -> PublicKey:
    """Load a PEM SubjectPublicKeyInfo public key; Ed25519 or P-256 only."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            str(path), "public key", "is not a PEM public key (SubjectPublicKeyInfo)"
        ) from None
    _accepted(path, "public key", key)
    assert isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey)
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        weakness = _ed25519_weakness(raw)
        if weakness is not None:
            raise ConfigError(str(path), "public key", weakness)
    return key


def _configured_alg(path: Path, what: str, key: PublicKey | PrivateKey, alg: str) -> Alg:
    actual = alg_for_key(key)
    if alg not in ALGORITHMS:
        raise ConfigError(str(path), what, f"alg {alg!r} is not accepted: use EdDSA or ES256")
    if actual != alg:
        raise ConfigError(
            str(path), what, f"is {_describe(key)} ({actual}) but is configured with alg {alg}"
        )
    return actual


def _checked_window(
    path: Path, what: str, not_before: datetime | None, not_after: datetime | None
) -> None:
    try:
        _check_window(not_before, not_after)
    except ValueError as exc:
        raise ConfigError(str(path), what, str(exc)) from None


def load_signing_key(
    path: Path,
    *,
    party: str,
    alg: str,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> SigningKey:
    """Our own private key from a PEM file; bad file -> ``ConfigError(file, key, reason)``."""
    private_key = read_private_key(path)
    checked = _configured_alg(path, "private key", private_key, alg)
    _checked_window(path, "private key", not_before, not_after)
    return SigningKey(
        party=party,
        kid=jwk_thumbprint(private_key),
        alg=checked,
        private_key=private_key,
        not_before=not_before,
        not_after=not_after,
    )


def load_verification_key(
    path: Path,
    *,
    party: str,
    alg: str,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> VerificationKey:
    """A party's public key from a PEM file; bad file -> ``ConfigError(file, key, reason)``."""
    public_key = read_public_key(path)
    checked = _configured_alg(path, "public key", public_key, alg)
    _checked_window(path, "public key", not_before, not_after)
    return VerificationKey(
        party=party,
        kid=jwk_thumbprint(public_key),
        alg=checked,
        public_key=public_key,
        not_before=not_before,
        not_after=not_after,
    )


class KeyRing:
    """Configured verification keys, looked up by exact ``kid`` (never by path or query)."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.replace(keys)

    def replace(self, keys: Iterable[VerificationKey]) -> None:
        """Hold ``keys`` from now on (one assignment: a lookup sees the old or the new set)."""
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in keys:
            by_kid.setdefault(key.kid, []).append(key)
        self._by_kid = {kid: tuple(found) for kid, found in by_kid.items()}

    def __len__(self) -> int:
        return sum(len(found) for found in self._by_kid.values())

    def __iter__(self) -> Iterator[VerificationKey]:
        for found in self._by_kid.values():
            yield from found

    def candidates(self, kid: str) -> tuple[VerificationKey, ...]:
        """Every configured key with this kid (one key may be configured for two parties)."""
        return self._by_kid.get(kid, ())

    def valid_entry(self, key: VerificationKey, at: datetime) -> VerificationKey:
        """``key``, or another entry of the same key and party valid at ``at`` (one key may
        be listed twice with different windows); ``UnknownKey`` when none is."""
        if key.valid_at(at):
            return key
        for entry in self.candidates(key.kid):
            if entry.party == key.party and entry.valid_at(at):
                return entry
        ensure_key_valid(key, at)
        raise AssertionError("ensure_key_valid accepted a key valid_at refused")

    def kids(self, party: str | None = None) -> list[str]:
        return [key.kid for key in self if party is None or key.party == party]
