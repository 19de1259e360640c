"""Checkpoints in the C2SP tlog-checkpoint format, signed and cosigned as C2SP signed notes.

Body (the note text)::

    <origin>
    <tree size, decimal, no leading zeros>
    <base64 root hash>
    time <RFC 3339 UTC, milliseconds>

The fourth line is an extension line carrying the signing time (DESIGN: a checkpoint signs
size, root and time). Witnesses judge only the first three lines, as tlog-cosignature says.
The log signs with an Ed25519 note signature (type 0x01) under key name = origin; a partner
gateway cosigns with a timestamped Ed25519 cosignature (type 0x04) under its own origin.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.audit.merkle import HASH_SIZE
from gateway.clock import format_rfc3339
from gateway.crypto.notes import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    NoteError,
    NoteSigner,
    NoteVerifier,
    add_signature,
    parse_note,
    sign_note,
    verify_note,
)

_TIME_PREFIX = "time "


class CheckpointError(ValueError):
    """A checkpoint is malformed, from the wrong log, or its signature does not verify."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointBody:
    origin: str
    size: int
    root_hash: bytes
    #: when the log signed it (the ``time`` extension line); None if the line is absent
    signed_at: datetime | None = None

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        if self.signed_at is not None:
            lines.append(_TIME_PREFIX + format_rfc3339(self.signed_at))
        return "\n".join(lines) + "\n"


def parse_body(text: str) -> CheckpointBody:
    """Parse a checkpoint note text strictly (origin, size, root, optional time line)."""
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint text does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("checkpoint has fewer than three lines (origin, size, root hash)")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise CheckpointError("checkpoint origin line is empty")
    if (
        not size_text.isascii()
        or not size_text.isdigit()
        or (size_text != "0" and size_text.startswith("0"))
    ):
        raise CheckpointError(f"checkpoint tree size {size_text!r} is not a canonical decimal")
    try:
        root = base64.b64decode(root_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise CheckpointError("checkpoint root hash is not valid base64") from None
    if len(root) != HASH_SIZE or base64.b64encode(root).decode() != root_text:
        raise CheckpointError(f"checkpoint root hash is not {HASH_SIZE} bytes of base64")
    signed_at = None
    for line in extensions:
        if not line:
            raise CheckpointError("checkpoint has an empty extension line")
        if line.startswith(_TIME_PREFIX) and signed_at is None:
            signed_at = _parse_time(line[len(_TIME_PREFIX) :])
    return CheckpointBody(origin=origin, size=int(size_text), root_hash=root, signed_at=signed_at)


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        raise CheckpointError(f"checkpoint time {value!r} is not RFC 3339 UTC") from None
    if format_rfc3339(moment) != value:
        raise CheckpointError(f"checkpoint time {value!r} is not in millisecond Z form")
    return moment


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedCheckpoint:
    body: CheckpointBody
    #: the whole signed note, exactly as signed (and possibly cosigned)
    note: str


@dataclass(frozen=True, kw_only=True, slots=True)
class KeptCheckpoint:
    """A checkpoint note an auditor kept from earlier (``audit verify --checkpoint``, ``audit
    check --trusted``); ``label`` names it in reports (its file)."""

    label: str
    note: str


def sign_checkpoint(body: CheckpointBody, signer: NoteSigner) -> SignedCheckpoint:
    if signer.sig_type != SIG_ED25519:
        raise CheckpointError("the log signs checkpoints with an Ed25519 note key (type 0x01)")
    if signer.name != body.origin:
        raise CheckpointError(f"log key name {signer.name!r} differs from origin {body.origin!r}")
    return SignedCheckpoint(body=body, note=sign_note(body.text(), [signer]))


def open_checkpoint(note: str, log_key: NoteVerifier, *, origin: str) -> SignedCheckpoint:
    """Verify the log's signature and the origin line; CheckpointError says what failed."""
    try:
        parsed = parse_note(note)
        body = parse_body(parsed.text)
        if body.origin != origin:
            raise CheckpointError(f"checkpoint is from log {body.origin!r}, expected {origin!r}")
        verify_note(parsed, [log_key])
    except NoteError as exc:
        raise CheckpointError(f"checkpoint signature: {exc}") from None
    return SignedCheckpoint(body=body, note=note)


def cosign(note: str, cosigner: NoteSigner, *, timestamp: int) -> str:
    """The checkpoint note with our timestamped cosignature appended."""
    if cosigner.sig_type != SIG_COSIGNATURE_V1:
        raise CheckpointError("cosignatures use a type 0x04 (cosignature/v1) key")
    try:
        return add_signature(note, cosigner, timestamp=timestamp)
    except NoteError as exc:
        raise CheckpointError(f"cannot cosign: {exc}") from None


def verify_cosignature(note: str, cosigner: NoteVerifier) -> int:
    """The timestamp of ``cosigner``'s verified cosignature on ``note``."""
    if cosigner.sig_type != SIG_COSIGNATURE_V1:
        raise CheckpointError("cosignatures are verified with a type 0x04 (cosignature/v1) key")
    try:
        verified = verify_note(note, [cosigner])
    except NoteError as exc:
        raise CheckpointError(f"cosignature: {exc}") from None
    stamp = verified[0].timestamp
    assert stamp is not None
    return stamp
