"""Receipts: what we sign verifies and binds exactly one message; what does not bind is refused."""

from __future__ import annotations

import dataclasses
import datetime as dt

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.clock import ManualClock
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import KeyRing, SigningKey, jwk_thumbprint
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import (
    GatewayError,
    Malformed,
    NackCode,
    SenderMismatch,
    SignatureInvalid,
    UnknownKey,
)
from gateway.model import Header
from gateway.receipts import ReceiptSigner, verify_receipt
from gateway.schemas.registry import SchemaRegistry

NOW = dt.datetime(2026, 11, 23, 7, 0, tzinfo=dt.UTC)


def _key(party: str, **window: dt.datetime) -> SigningKey:
    private = Ed25519PrivateKey.generate()
    return SigningKey(
        party=party, kid=jwk_thumbprint(private), alg="EdDSA", private_key=private, **window
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def key() -> SigningKey:
    return _key("US-CBP")


def _sign(
    signer: ReceiptSigner, message_id: str, body: bytes, **extra: object
) -> tuple[bytes, str]:
    receipt = signer.sign(
        recipient="MX-ANAM",
        ref_message_id=message_id,
        ref_digest=body_digest(body),
        received_at=NOW,
        status="ACK",
        **extra,  # type: ignore[arg-type]
    )
    return receipt.body, receipt.signature


def test_ack_roundtrip_binds_message_and_digest(clock: ManualClock, key: SigningKey) -> None:
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id, body = new_message_id(), b'{"any":"bytes"}'
    receipt_body, signature = _sign(signer, message_id, body, correlation_id=message_id)
    receipt = verify_receipt(
        receipt_body,
        signature,
        KeyRing([key.verification_key()]),
        "US-CBP",
        message_id,
        body_digest(body),
    )
    assert receipt.status == "ACK"
    assert receipt.code is None
    assert receipt.kid == key.kid
    header = receipt.envelope.header
    assert (header.message_type, header.schema_version) == ("receipt", "1.0")
    assert (header.sender, header.recipient, header.in_reply_to) == (
        "US-CBP",
        "MX-ANAM",
        message_id,
    )
    assert header.correlation_id == message_id
    # every header member PROTOCOL.md section 2 does not call optional, expires_at included
    assert header.created_at == clock.now()
    assert header.expires_at == clock.now() + dt.timedelta(days=7)
    assert list(orjson.loads(receipt_body)["header"]) == [
        "message_id",
        "message_type",
        "schema_version",
        "sender",
        "recipient",
        "created_at",
        "expires_at",
        "correlation_id",
        "in_reply_to",
    ]
    assert receipt.received_at == "2026-11-23T07:00:00.000Z"
    SchemaRegistry.load_builtin().validate("receipt", "1.0", receipt.envelope.payload)


def test_nack_carries_code_and_detail(clock: ManualClock, key: SigningKey) -> None:
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id = new_message_id()
    signed = signer.sign(
        recipient="MX-ANAM",
        ref_message_id=message_id,
        ref_digest=body_digest(b"x"),
        received_at=NOW,
        status="NACK",
        code=NackCode.STALE,
        detail="message is outside the replay window or expired",
    )
    receipt = verify_receipt(
        signed.body,
        signed.signature,
        KeyRing([key.verification_key()]),
        "US-CBP",
        message_id,
        body_digest(b"x"),
    )
    assert receipt.status == "NACK"
    assert receipt.code == NackCode.STALE
    assert receipt.detail == "message is outside the replay window or expired"
    SchemaRegistry.load_builtin().validate("receipt", "1.0", receipt.envelope.payload)


@pytest.mark.parametrize(
    ("other_id", "other_body", "error"),
    [
        (True, False, Malformed),
        (False, True, Malformed),
    ],
)
def test_receipt_for_another_message_or_body_is_refused(
    clock: ManualClock, key: SigningKey, other_id: bool, other_body: bool, error: type[GatewayError]
) -> None:
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id, body = new_message_id(), b"body"
    receipt_body, signature = _sign(signer, message_id, body)
    with pytest.raises(error):
        verify_receipt(
            receipt_body,
            signature,
            KeyRing([key.verification_key()]),
            "US-CBP",
            new_message_id() if other_id else message_id,
            body_digest(b"other") if other_body else body_digest(body),
        )


def test_receipt_naming_our_id_in_upper_case_is_ours(clock: ManualClock, key: SigningKey) -> None:
    """RFC 9562 section 4: UUIDs are case-insensitive on input. A partner that echoes our
    message id in upper case answers our message, not another one."""
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id, body = new_message_id(), b"body"
    receipt_body, signature = _sign(signer, message_id.upper(), body)
    receipt = verify_receipt(
        receipt_body,
        signature,
        KeyRing([key.verification_key()]),
        "US-CBP",
        message_id,
        body_digest(body),
    )
    assert receipt.status == "ACK"
    assert receipt.ref_message_id == message_id


def test_tampered_receipt_is_refused(clock: ManualClock, key: SigningKey) -> None:
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id = new_message_id()
    receipt_body, signature = _sign(signer, message_id, b"body")
    tampered = receipt_body.replace(b'"ACK"', b'"NACK"')
    with pytest.raises(SignatureInvalid):
        verify_receipt(
            tampered,
            signature,
            KeyRing([key.verification_key()]),
            "US-CBP",
            message_id,
            body_digest(b"body"),
        )


def test_receipt_signed_by_another_party_is_refused(clock: ManualClock, key: SigningKey) -> None:
    impostor = _key("CA-CBSA")
    signer = ReceiptSigner(party="US-CBP", keys=[impostor], clock=clock)
    message_id = new_message_id()
    receipt_body, signature = _sign(signer, message_id, b"body")
    ring = KeyRing([key.verification_key(), impostor.verification_key()])
    with pytest.raises(UnknownKey):
        verify_receipt(receipt_body, signature, ring, "US-CBP", message_id, body_digest(b"body"))


def test_receipt_signed_with_a_key_listed_twice_verifies_in_its_second_window(
    clock: ManualClock, key: SigningKey
) -> None:
    # A partner's key listed again with a new window (an operator re-admitting it) verifies
    # receipts in either window, as it verifies the partner's messages; the first entry
    # listed is the one whose window has passed.
    signer = ReceiptSigner(party="US-CBP", keys=[key], clock=clock)
    message_id, body = new_message_id(), b"{}"
    receipt_body, signature = _sign(signer, message_id, body)
    verification = key.verification_key()
    past = dataclasses.replace(verification, not_after=NOW - dt.timedelta(days=300))
    current = dataclasses.replace(verification, not_before=NOW - dt.timedelta(days=299))
    receipt = verify_receipt(
        receipt_body, signature, KeyRing([past, current]), "US-CBP", message_id, body_digest(body)
    )
    assert receipt.status == "ACK"
    with pytest.raises(UnknownKey):
        verify_receipt(
            receipt_body, signature, KeyRing([past]), "US-CBP", message_id, body_digest(body)
        )


def test_receipt_naming_another_sender_is_refused(clock: ManualClock, key: SigningKey) -> None:
    # Signed with US-CBP's key but claiming to come from CA-CBSA.
    message_id = new_message_id()
    header = Header(
        message_id=new_message_id(),
        message_type="receipt",
        schema_version="1.0",
        sender="CA-CBSA",
        recipient="MX-ANAM",
        created_at=NOW,
        expires_at=NOW + dt.timedelta(days=7),
        in_reply_to=message_id,
    )
    body = encode_envelope(
        header,
        {
            "status": "ACK",
            "ref_message_id": message_id,
            "ref_digest": body_digest(b"body"),
            "received_at": "2026-11-23T07:00:00.000Z",
            "code": None,
            "detail": None,
        },
    )
    with pytest.raises(SenderMismatch):
        verify_receipt(
            body,
            sign_detached(body, key),
            KeyRing([key.verification_key()]),
            "US-CBP",
            message_id,
            body_digest(b"body"),
        )


def test_signer_uses_newest_valid_key_during_rotation(clock: ManualClock) -> None:
    old = _key("US-CBP", not_after=NOW + dt.timedelta(days=1))
    new = _key("US-CBP", not_before=NOW - dt.timedelta(hours=1))
    future = _key("US-CBP", not_before=NOW + dt.timedelta(days=30))
    signer = ReceiptSigner(party="US-CBP", keys=[old, new, future], clock=clock)
    assert signer.current_key() is new
    clock.advance(dt.timedelta(days=31))
    assert signer.current_key() is future


def test_signer_without_a_valid_key_refuses_to_sign(clock: ManualClock) -> None:
    expired = _key("US-CBP", not_after=NOW - dt.timedelta(seconds=1))
    signer = ReceiptSigner(party="US-CBP", keys=[expired], clock=clock)
    with pytest.raises(RuntimeError, match="no signing key of US-CBP is valid"):
        signer.current_key()
