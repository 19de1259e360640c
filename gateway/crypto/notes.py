"""C2SP signed notes with Ed25519: plain note signatures and timestamped cosignatures.

Formats (c2sp.org/signed-note, c2sp.org/tlog-cosignature):

* a note is UTF-8 text ending in a newline, a blank line, then one or more lines
  ``— <key name> <base64(4-byte key id || signature)>``;
* key id = ``SHA-256(name || 0x0A || type || 32-byte public key)[:4]``, type ``0x01`` for
  Ed25519 note signatures and ``0x04`` for timestamped Ed25519 cosignatures;
* a cosignature signs ``"cosignature/v1\\ntime <ts>\\n" || note text`` and carries
  ``timestamp (u64 big-endian) || signature``.

Verification follows the spec: signatures from unknown keys (name and id not both known)
are ignored, a known key whose signature fails rejects the note, and a note without one
verified known signature is rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.crypto.keys import read_private_key, read_public_key
from gateway.errors import ConfigError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
_SIG_TYPES = (SIG_ED25519, SIG_COSIGNATURE_V1)
_DASH = "\u2014 "
#: the spec asks verifiers to cap signatures and accept at least 16
MAX_SIGNATURES = 64
MAX_NOTE_BYTES = 64 * 1024
_MAX_TIMESTAMP = 2**63 - 1


class NoteError(ValueError):
    """A note is malformed, or its signatures do not verify; the message says exactly why."""


def _check_name(name: str) -> None:
    if not name or any(ch.isspace() for ch in name) or "+" in name:
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")
    if not name.isprintable():
        raise NoteError(f"key name {name!r} contains control characters")


def key_id(name: str, sig_type: int, public_raw: bytes) -> int:
    """The 32-bit key id of signed-note: SHA-256(name || 0x0A || type || key)[:4]."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_raw).digest()
    return int.from_bytes(digest[:4], "big")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, kw_only=True, slots=True)
class NoteVerifier:
    name: str
    sig_type: int
    public_raw: bytes

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.sig_type, self.public_raw)

    def vkey(self) -> str:
        """The verifier key string ``name+hexid+base64(type || key)`` (Go sumdb/note form)."""
        material = base64.b64encode(bytes([self.sig_type]) + self.public_raw).decode()
        return f"{self.name}+{self.key_id:08x}+{material}"


@dataclass(frozen=True, kw_only=True, slots=True)
class NoteSigner:
    name: str
    sig_type: int
    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> NoteVerifier:
        raw = _raw_public(self.private_key.public_key())
        return NoteVerifier(name=self.name, sig_type=self.sig_type, public_raw=raw)

    @property
    def key_id(self) -> int:
        return self.verifier.key_id


def _sig_type(cosignature: bool) -> int:
    return SIG_COSIGNATURE_V1 if cosignature else SIG_ED25519


def note_signer(name: str, key: Ed25519PrivateKey, *, cosignature: bool = False) -> NoteSigner:
    _check_name(name)
    return NoteSigner(name=name, sig_type=_sig_type(cosignature), private_key=key)


def note_verifier(name: str, key: Ed25519PublicKey, *, cosignature: bool = False) -> NoteVerifier:
    _check_name(name)
    return NoteVerifier(name=name, sig_type=_sig_type(cosignature), public_raw=_raw_public(key))


def load_note_signer(path: Path, name: str, *, cosignature: bool = False) -> NoteSigner:
    """An Ed25519 PEM private key file as a note signer; anything else is a ConfigError."""
    key = read_private_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(str(path), "audit key", "must be an Ed25519 key for signed notes")
    try:
        return note_signer(name, key, cosignature=cosignature)
    except NoteError as exc:
        raise ConfigError(str(path), "audit key name", str(exc)) from None


def load_note_verifier(path: Path, name: str, *, cosignature: bool = False) -> NoteVerifier:
    """An Ed25519 PEM public key file (SubjectPublicKeyInfo) as a note verifier."""
    key = read_public_key(path)
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(str(path), "audit public key", "must be an Ed25519 key")
    try:
        return note_verifier(name, key, cosignature=cosignature)
    except NoteError as exc:
        raise ConfigError(str(path), "audit key name", str(exc)) from None


def public_key_pem(signer: NoteSigner) -> bytes:
    """The signer's public key as SubjectPublicKeyInfo PEM (what ``audit verify --key`` reads)."""
    return signer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NoteError(f"{what} is not valid base64") from None


def parse_vkey(vkey: str) -> NoteVerifier:
    """Parse ``name+hexid+base64(type || key)``; the id must match the key."""
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key must be name+id+key")
    name, hex_id, material = parts
    _check_name(name)
    raw = _b64decode(material, "verifier key material")
    if len(raw) != 33 or raw[0] not in _SIG_TYPES:
        raise NoteError("verifier key must be an Ed25519 key of type 0x01 or 0x04")
    verifier = NoteVerifier(name=name, sig_type=raw[0], public_raw=raw[1:])
    if len(hex_id) != 8 or hex_id != f"{verifier.key_id:08x}":
        raise NoteError(f"verifier key id {hex_id!r} does not match its key")
    return verifier


def parse_skey(skey: str) -> NoteSigner:
    """Parse ``PRIVATE+KEY+name+hexid+base64(type || seed)`` (Go sumdb/note signer keys)."""
    parts = skey.split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("signer key must be PRIVATE+KEY+name+id+key")
    name, hex_id, material = parts[2:]
    _check_name(name)
    raw = _b64decode(material, "signer key material")
    if len(raw) != 33 or raw[0] not in _SIG_TYPES:
        raise NoteError("signer key must be an Ed25519 seed of type 0x01 or 0x04")
    signer = NoteSigner(
        name=name, sig_type=raw[0], private_key=Ed25519PrivateKey.from_private_bytes(raw[1:])
    )
    if hex_id != f"{signer.key_id:08x}":
        raise NoteError(f"signer key id {hex_id!r} does not match its key")
    return signer


@dataclass(frozen=True, kw_only=True, slots=True)
class NoteSignature:
    name: str
    key_id: int
    #: the bytes after the key id (for a cosignature: timestamp || signature)
    signature: bytes

    def line(self) -> str:
        blob = base64.b64encode(self.key_id.to_bytes(4, "big") + self.signature).decode()
        return f"{_DASH}{self.name} {blob}\n"


@dataclass(frozen=True, kw_only=True, slots=True)
class Note:
    #: the signed text, final newline included
    text: str
    signatures: tuple[NoteSignature, ...]

    def encode(self) -> str:
        return self.text + "\n" + "".join(s.line() for s in self.signatures)


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedSignature:
    name: str
    key_id: int
    sig_type: int
    #: POSIX seconds, for cosignatures
    timestamp: int | None


def _check_text(text: str, what: str) -> None:
    if any(ord(ch) < 0x20 and ch != "\n" for ch in text):
        raise NoteError(f"{what} contains a control character other than newline")


def parse_note(data: str | bytes) -> Note:
    """Split a signed note into its text and signature lines (no cryptography)."""
    if isinstance(data, bytes):
        if len(data) > MAX_NOTE_BYTES:
            raise NoteError(f"note is larger than {MAX_NOTE_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not valid UTF-8") from None
    elif len(data.encode()) > MAX_NOTE_BYTES:
        raise NoteError(f"note is larger than {MAX_NOTE_BYTES} bytes")
    _check_text(data, "note")
    if not data.endswith("\n"):
        raise NoteError("note does not end with a newline")
    split = data.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, sig_block = data[: split + 1], data[split + 2 :]
    lines = sig_block.split("\n")[:-1]
    if not lines:
        raise NoteError("note has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signatures, more than {MAX_SIGNATURES}")
    signatures = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(_DASH):
            raise NoteError(f"signature line {number} does not start with an em dash and space")
        fields = line[len(_DASH) :].split(" ")
        if len(fields) != 2:
            raise NoteError(f"signature line {number} is not '— <name> <base64>'")
        name, blob_text = fields
        _check_name(name)
        blob = _b64decode(blob_text, f"signature line {number}")
        if len(blob) < 5:
            raise NoteError(f"signature line {number} is too short")
        signatures.append(
            NoteSignature(name=name, key_id=int.from_bytes(blob[:4], "big"), signature=blob[4:])
        )
    return Note(text=text, signatures=tuple(signatures))


def note_in_file(text: str) -> str:
    """The signed note a file (or a pasted text) holds, in its C2SP form.

    What a file adds around a note is not the note's: CRLF line endings (a text-mode
    transfer) are read as newlines, and blank or whitespace-only lines after its last line
    are dropped (``jq -r`` adds one newline, editors more). The note returned ends with
    exactly one newline after its last signature line, and its signatures are then checked
    over its text exactly: a changed byte of that still fails. Anything else wrong is left
    for ``parse_note`` to name; a blank file is named here (NoteError).
    """
    text = text.replace("\r\n", "\n")
    end = len(text.rstrip(" \t\r\n"))
    if end == 0:
        raise NoteError("empty or blank: it holds no note")
    newline = text.find("\n", end)
    return text if newline < 0 else text[: newline + 1]


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def _check_signable(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    _check_text(text, "note text")


def signature_for(text: str, signer: NoteSigner, *, timestamp: int | None = None) -> NoteSignature:
    """One signature line's content over ``text``; cosignatures need ``timestamp`` (POSIX s)."""
    _check_signable(text)
    if signer.sig_type == SIG_COSIGNATURE_V1:
        if timestamp is None or not 0 <= timestamp <= _MAX_TIMESTAMP:
            raise NoteError("a cosignature needs a timestamp between 0 and 2^63-1")
        raw = timestamp.to_bytes(8, "big") + signer.private_key.sign(
            _cosigned_message(text, timestamp)
        )
    else:
        raw = signer.private_key.sign(text.encode())
    return NoteSignature(name=signer.name, key_id=signer.key_id, signature=raw)


def sign_note(text: str, signers: Sequence[NoteSigner], *, timestamp: int | None = None) -> str:
    """A new note over ``text`` signed by every signer, in order."""
    if not signers:
        raise NoteError("a note needs at least one signer")
    sigs = tuple(signature_for(text, s, timestamp=timestamp) for s in signers)
    return Note(text=text, signatures=sigs).encode()


def add_signature(note: str, signer: NoteSigner, *, timestamp: int | None = None) -> str:
    """``note`` with one more signature line (a cosignature, typically), others kept."""
    parsed = parse_note(note)
    sig = signature_for(parsed.text, signer, timestamp=timestamp)
    return Note(text=parsed.text, signatures=(*parsed.signatures, sig)).encode()


def _verify_one(text: str, sig: NoteSignature, verifier: NoteVerifier) -> int | None:
    public = Ed25519PublicKey.from_public_bytes(verifier.public_raw)
    if verifier.sig_type == SIG_COSIGNATURE_V1:
        if len(sig.signature) != 72:
            raise NoteError(f"cosignature by {sig.name} is not 8 + 64 bytes")
        timestamp = int.from_bytes(sig.signature[:8], "big")
        if timestamp > _MAX_TIMESTAMP:
            raise NoteError(f"cosignature by {sig.name} has a timestamp beyond 2^63-1")
        message, raw, stamp = _cosigned_message(text, timestamp), sig.signature[8:], timestamp
    else:
        message, raw, stamp = text.encode(), sig.signature, None
    try:
        public.verify(raw, message)
    except InvalidSignature:
        raise NoteError(f"signature by {sig.name} (key {sig.key_id:08x}) does not verify") from None
    return stamp


def verify_note(
    note: Note | str | bytes, verifiers: Sequence[NoteVerifier]
) -> list[VerifiedSignature]:
    """The signatures of known keys, all verified; NoteError if one fails or none is known."""
    parsed = note if isinstance(note, Note) else parse_note(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    verified: list[VerifiedSignature] = []
    for sig in parsed.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        stamp = _verify_one(parsed.text, sig, verifier)
        verified.append(
            VerifiedSignature(
                name=sig.name, key_id=sig.key_id, sig_type=verifier.sig_type, timestamp=stamp
            )
        )
    if not verified:
        names = ", ".join(sorted({f"{v.name} ({v.key_id:08x})" for v in verifiers})) or "none"
        found = ", ".join(dict.fromkeys(f"{s.name} ({s.key_id:08x})" for s in parsed.signatures))
        raise NoteError(
            f"note carries no signature by a known key (known: {names}; found: {found}): "
            "signed by another key, or forged"
        )
    return verified


def cosignature_timestamp(sig: NoteSignature) -> int:
    """The timestamp of a (not yet verified) cosignature line."""
    if len(sig.signature) != 72:
        raise NoteError(f"signature by {sig.name} is not a cosignature (8 + 64 bytes)")
    timestamp = int.from_bytes(sig.signature[:8], "big")
    return timestamp
