"""Checkpoint note format (C2SP tlog-checkpoint): round trip, strict parsing, signatures."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import checkpoint as cp
from gateway.crypto import notes

ORIGIN = "c2c.example/US-CBP"
ROOT = bytes(range(32))
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


def _log_signer(name: str = ORIGIN) -> notes.NoteSigner:
    return notes.note_signer(name, Ed25519PrivateKey.generate())


def test_body_text_is_the_c2sp_layout() -> None:
    body = cp.CheckpointBody(origin=ORIGIN, size=20852163, root_hash=ROOT, signed_at=AT)
    assert body.text() == (
        f"{ORIGIN}\n20852163\n{base64.b64encode(ROOT).decode()}\ntime 2026-03-01T12:00:00.123Z\n"
    )
    assert cp.parse_body(body.text()) == body


def test_parses_a_plain_c2sp_checkpoint() -> None:
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    body = cp.parse_body(text)
    assert (body.origin, body.size, body.signed_at) == (
        "example.com/behind-the-sofa",
        20852163,
        None,
    )
    assert body.text() == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("o\n1\n", "fewer than three lines"),
        ("\n1\nAAAA\n", "origin line is empty"),
        ("o\n01\n" + base64.b64encode(ROOT).decode() + "\n", "canonical decimal"),
        ("o\n-1\n" + base64.b64encode(ROOT).decode() + "\n", "canonical decimal"),
        ("o\n1\n" + base64.b64encode(ROOT[:31]).decode() + "\n", "not 32 bytes"),
        ("o\n1\n%%%%\n", "not valid base64"),
        ("o\n1\n" + base64.b64encode(ROOT).decode() + "\n\n", "empty extension line"),
        ("o\n1\n" + base64.b64encode(ROOT).decode() + "\ntime yesterday\n", "not RFC 3339"),
        ("o\n1\n" + base64.b64encode(ROOT).decode(), "does not end with a newline"),
    ],
)
def test_malformed_bodies_are_named(text: str, reason: str) -> None:
    with pytest.raises(cp.CheckpointError, match=reason):
        cp.parse_body(text)


def test_sign_and_open_round_trip() -> None:
    signer = _log_signer()
    body = cp.CheckpointBody(origin=ORIGIN, size=7, root_hash=ROOT, signed_at=AT)
    signed = cp.sign_checkpoint(body, signer)
    opened = cp.open_checkpoint(signed.note, signer.verifier, origin=ORIGIN)
    assert opened.body == body
    assert signed.note.splitlines()[-1].startswith(f"\u2014 {ORIGIN} ")


def test_open_refuses_other_origin_other_key_and_any_changed_byte() -> None:
    signer = _log_signer()
    body = cp.CheckpointBody(origin=ORIGIN, size=7, root_hash=ROOT, signed_at=AT)
    note = cp.sign_checkpoint(body, signer).note
    with pytest.raises(cp.CheckpointError, match="from log"):
        cp.open_checkpoint(note, signer.verifier, origin="c2c.example/staging")
    with pytest.raises(cp.CheckpointError, match="no signature by a known key"):
        cp.open_checkpoint(note, _log_signer().verifier, origin=ORIGIN)
    raw = note.encode()
    text_len = len(body.text().encode())
    for i in range(text_len):
        mutated = bytearray(raw)
        mutated[i] ^= 0x01
        with pytest.raises(cp.CheckpointError):
            cp.open_checkpoint(mutated.decode("utf-8", "replace"), signer.verifier, origin=ORIGIN)


def test_log_key_name_must_be_the_origin() -> None:
    body = cp.CheckpointBody(origin=ORIGIN, size=1, root_hash=ROOT)
    with pytest.raises(cp.CheckpointError, match="differs from origin"):
        cp.sign_checkpoint(body, _log_signer("other.example/log"))


def test_cosign_and_verify() -> None:
    signer = _log_signer()
    witness = notes.note_signer(
        "c2c.example/MX-ANAM", Ed25519PrivateKey.generate(), cosignature=True
    )
    note = cp.sign_checkpoint(
        cp.CheckpointBody(origin=ORIGIN, size=3, root_hash=ROOT, signed_at=AT), signer
    ).note
    cosigned = cp.cosign(note, witness, timestamp=1_772_366_400)
    assert cp.verify_cosignature(cosigned, witness.verifier) == 1_772_366_400
    assert cp.open_checkpoint(cosigned, signer.verifier, origin=ORIGIN).body.size == 3
    with pytest.raises(cp.CheckpointError, match="type 0x04"):
        cp.cosign(note, signer, timestamp=1)
    with pytest.raises(cp.CheckpointError, match="cosignature"):
        cp.verify_cosignature(note, witness.verifier)
