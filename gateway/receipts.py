"""Signed receipts (PROTOCOL.md section 4): non-repudiation of receipt, both ways.

A receipt is itself an envelope of type ``receipt`` 1.0, signed with our current signing key
(of the algorithm the partner's ``sign_with`` names, when it names one),
``in_reply_to`` the message it answers and binding that message's id and the SHA-256 digest of
the exact bytes received. ``verify_receipt`` is the dispatcher's check of a partner's receipt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from gateway.adapters.registry import Adapter
from gateway.clock import Clock, format_rfc3339
from gateway.crypto.jws import DEFAULT_TYP, sign_detached, verify_detached
from gateway.crypto.keys import Alg, KeyRing, SigningKey, current_key
from gateway.envelope import encode_envelope, new_message_id, parse_envelope
from gateway.errors import Malformed, NackCode, SenderMismatch
from gateway.model import Envelope, Header

RECEIPT_TYPE = "receipt"
RECEIPT_VERSION = "1.0"
#: A receipt's ``expires_at`` (PROTOCOL.md section 2 gives every envelope one): the time it
#: has to reach the sender, a week as in PROTOCOL's example; its worth as evidence never ends.
RECEIPT_TTL = timedelta(days=7)
#: a receipt is small; anything near this is not one of ours or a partner's
MAX_RECEIPT_BYTES = 64 * 1024

Status = Literal["ACK", "NACK"]


@dataclass(frozen=True, kw_only=True)
class SignedReceipt:
    """A receipt as sent: the exact body bytes and their detached JWS."""

    message_id: str
    body: bytes
    signature: str


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """A verified receipt from a party."""

    envelope: Envelope
    status: Status
    code: NackCode | None
    detail: str | None
    ref_message_id: str
    ref_digest: str
    received_at: str
    kid: str


class ReceiptSigner:
    """Builds and signs our receipts with the signing key valid now (newest first in overlap)."""

    def __init__(self, *, party: str, keys: Sequence[SigningKey], clock: Clock) -> None:
        if not keys:
            raise ValueError("a receipt signer needs at least one signing key")
        self._party = party
        self._keys = tuple(keys)
        self._clock = clock

    @property
    def party(self) -> str:
        return self._party

    def current_key(self, alg: Alg | None = None) -> SigningKey:
        """The key valid now (of ``alg``, when given); RuntimeError when there is none."""
        now = self._clock.now()
        key = current_key(self._keys, now, alg)
        if key is None:
            # Signing with an expired key would produce receipts nobody can verify; the
            # operator must rotate. Falling back silently would hide that.
            of = "" if alg is None else f"{alg} "
            raise RuntimeError(f"no {of}signing key of {self._party} is valid at {now.isoformat()}")
        return key

    def sign(
        self,
        *,
        recipient: str,
        ref_message_id: str,
        ref_digest: str,
        received_at: datetime,
        status: Status,
        code: NackCode | None = None,
        detail: str | None = None,
        correlation_id: str | None = None,
        typ: str = DEFAULT_TYP,
        adapter: Adapter | None = None,
        alg: Alg | None = None,
    ) -> SignedReceipt:
        """``adapter`` (a native-format partner's) maps the receipt to the partner's format,
        and the signature with ``typ`` covers those bytes, as for every message to it; its
        failure raises ``Malformed``. ``alg`` (the partner's ``sign_with``) picks our key of
        that algorithm."""
        key = self.current_key(alg)
        message_id = new_message_id()
        now = self._clock.now()
        header = Header(
            message_id=message_id,
            message_type=RECEIPT_TYPE,
            schema_version=RECEIPT_VERSION,
            sender=self._party,
            recipient=recipient,
            created_at=now,
            expires_at=now + RECEIPT_TTL,
            correlation_id=correlation_id,
            in_reply_to=ref_message_id,
        )
        payload: dict[str, Any] = {
            "status": status,
            "ref_message_id": ref_message_id,
            "ref_digest": ref_digest,
            "received_at": format_rfc3339(received_at),
            "code": code.value if code is not None else None,
            "detail": detail,
        }
        body = encode_envelope(header, payload)
        if adapter is not None:
            body = adapter.from_canonical(body)
        return SignedReceipt(
            message_id=message_id, body=body, signature=sign_detached(body, key, typ=typ)
        )


def _text(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise Malformed(f"receipt payload.{name} is {type(value).__name__}, expected a string")
    return value


def verify_receipt(
    body: bytes,
    signature: str,
    keyring: KeyRing,
    party: str,
    expected_ref_message_id: str,
    expected_digest: str,
    *,
    typ: str = DEFAULT_TYP,
    adapter: Adapter | None = None,
) -> Receipt:
    """Verify ``party``'s receipt for our message; raises ``GatewayError`` with the exact reason.

    Checks, in order: the detached JWS with one of ``party``'s keys, the envelope, the key's
    validity at the receipt's ``created_at``, that it is a receipt from ``party``, and that it
    binds exactly our message id and body digest (a receipt for another message is refused).
    A native-format partner's receipt is signed with its ``typ`` over its native bytes and read
    through its ``adapter`` once the signature verified.
    """
    key = verify_detached(
        signature, body, keyring=keyring, party=party, at=None, accepted_typs=(typ,)
    )
    envelope = parse_envelope(
        body if adapter is None else adapter.to_canonical(body),
        max_bytes=MAX_RECEIPT_BYTES,
        is_known_type=lambda message_type, version: (
            (message_type, version) == (RECEIPT_TYPE, RECEIPT_VERSION)
        ),
    )
    header = envelope.header
    # The entry valid then: one key may be listed twice, with two windows.
    key = keyring.valid_entry(key, header.created_at)
    if header.sender != party:
        raise SenderMismatch(f"receipt sender {header.sender} is not {party}")
    payload = envelope.payload
    status = _text(payload, "status")
    if status not in ("ACK", "NACK"):
        raise Malformed(f"receipt status {status!r} is neither ACK nor NACK")
    # UUIDs are case-insensitive on input (RFC 9562 section 4); the header's are lower-cased
    # by the envelope parser, and this one likewise.
    ref_message_id = _text(payload, "ref_message_id").lower()
    ref_digest = _text(payload, "ref_digest")
    expected_ref_message_id = expected_ref_message_id.lower()
    if ref_message_id != expected_ref_message_id or header.in_reply_to != expected_ref_message_id:
        raise Malformed(
            f"receipt answers message {ref_message_id} (in_reply_to {header.in_reply_to}), "
            f"expected {expected_ref_message_id}"
        )
    if ref_digest != expected_digest:
        raise Malformed(f"receipt ref_digest {ref_digest} is not the sent body's {expected_digest}")
    raw_code = payload.get("code")
    code: NackCode | None = None
    if status == "NACK":
        if not isinstance(raw_code, str) or raw_code not in NackCode.__members__:
            raise Malformed(f"NACK receipt carries unknown code {raw_code!r}")
        code = NackCode(raw_code)
    elif raw_code is not None:
        raise Malformed(f"ACK receipt carries code {raw_code!r}")
    detail = payload.get("detail")
    return Receipt(
        envelope=envelope,
        status="ACK" if status == "ACK" else "NACK",
        code=code,
        detail=detail if isinstance(detail, str) else None,
        ref_message_id=ref_message_id,
        ref_digest=ref_digest,
        received_at=_text(payload, "received_at"),
        kid=key.kid,
    )
