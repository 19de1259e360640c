"""C2SP signed notes and cosignatures: published vectors, round trips, every rejection."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.crypto import notes
from gateway.errors import ConfigError

# golang.org/x/mod/sumdb/note note_test.go (also the Go package's documented example)
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZS"
    "NXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
# transparency-dev/formats note/note_cosigv1_test.go
COSIG_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
COSIG_SIG = (
    "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWW"
    "OworDcFiEBYJXORmnFBOBA=="
)


def test_sign_reproduces_the_go_note_byte_for_byte() -> None:
    signer = notes.parse_skey(GO_SKEY)
    assert notes.sign_note(GO_TEXT, [signer]) == GO_NOTE
    assert signer.verifier.vkey() == GO_VKEY


def test_open_the_go_note() -> None:
    verified = notes.verify_note(GO_NOTE, [notes.parse_vkey(GO_VKEY)])
    assert [(v.name, v.key_id, v.timestamp) for v in verified] == [
        ("PeterNeumann", 0xC74F20A3, None)
    ]
    with pytest.raises(notes.NoteError, match="does not verify"):
        notes.verify_note(
            GO_NOTE.replace("cryptography", "cryptographY"), [notes.parse_vkey(GO_VKEY)]
        )


def test_cosignature_key_id_and_timestamp_vectors() -> None:
    verifier = notes.parse_vkey(COSIG_VKEY)
    assert verifier.sig_type == notes.SIG_COSIGNATURE_V1
    assert verifier.key_id == 0xDA77ADE7
    sig = notes.parse_note("x\n\n\u2014 w " + COSIG_SIG + "\n").signatures[0]
    assert notes.cosignature_timestamp(sig) == 1727964367


@pytest.mark.parametrize(
    "vkey",
    [
        GO_VKEY.replace("c74f20a3", "c74f20a4"),
        GO_VKEY[:-2],
        "PeterNeumann+c74f20a3",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+AxpC2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_bad_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(notes.NoteError):
        notes.parse_vkey(vkey)


def _pair(name: str, *, cosignature: bool = False) -> tuple[notes.NoteSigner, notes.NoteVerifier]:
    signer = notes.note_signer(name, Ed25519PrivateKey.generate(), cosignature=cosignature)
    return signer, signer.verifier


def test_cosignature_round_trip_and_domain_separation() -> None:
    log_signer, log_key = _pair("log.example/a")
    witness, witness_key = _pair("witness.example/w", cosignature=True)
    text = "log.example/a\n5\n" + base64.b64encode(b"\x01" * 32).decode() + "\n"
    note = notes.sign_note(text, [log_signer])
    cosigned = notes.add_signature(note, witness, timestamp=1_700_000_000)
    assert cosigned.startswith(note)
    got = notes.verify_note(cosigned, [log_key, witness_key])
    assert [(v.name, v.timestamp) for v in got] == [
        ("log.example/a", None),
        ("witness.example/w", 1_700_000_000),
    ]
    # the same key used as a plain note key has another key id: the cosignature is ignored
    plain = notes.NoteVerifier(
        name=witness_key.name, sig_type=notes.SIG_ED25519, public_raw=witness_key.public_raw
    )
    with pytest.raises(notes.NoteError, match="no signature by a known key"):
        notes.verify_note(cosigned, [plain])
    # a changed timestamp breaks the cosignature
    sig = notes.parse_note(cosigned).signatures[1]
    moved = sig.signature[:7] + bytes([sig.signature[7] ^ 1]) + sig.signature[8:]
    forged = notes.Note(
        text=text,
        signatures=(
            notes.parse_note(cosigned).signatures[0],
            notes.NoteSignature(name=sig.name, key_id=sig.key_id, signature=moved),
        ),
    ).encode()
    with pytest.raises(notes.NoteError, match=re.escape("witness.example/w")):
        notes.verify_note(forged, [witness_key])


def test_unknown_signatures_are_ignored_but_known_bad_ones_reject() -> None:
    signer, key = _pair("log.example/a")
    other, other_key = _pair("log.example/a")
    note = notes.sign_note("hello\n", [signer, other])
    assert len(notes.verify_note(note, [key])) == 1
    assert len(notes.verify_note(note, [key, other_key])) == 2
    with pytest.raises(notes.NoteError, match="no signature by a known key"):
        notes.verify_note(note, [_pair("log.example/a")[1]])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("hello\n", "no blank line"),
        ("hello\n\n", "no signature lines"),
        ("hello\n\n\u2014 a AAAA\n", "too short"),
        ("hello\n\n- a AAAAAAAA\n", "em dash"),
        ("hello\n\n\u2014 a b c\n", "not '\u2014 <name> <base64>'"),
        ("hello\n\n\u2014 a !!!!\n", "not valid base64"),
        ("hel\tlo\n\n\u2014 a AAAAAAAA\n", "control character"),
        ("hello\n\n\u2014 a AAAAAAAA", "does not end with a newline"),
        (b"hello\xff\n\n\xe2\x80\x94 a AAAAAAAA\n", "not valid UTF-8"),
        ("hello\n\n\u2014 a+b AAAAAAAA\n", "without spaces or '+'"),
    ],
)
def test_malformed_notes_are_named(data: str | bytes, reason: str) -> None:
    with pytest.raises(notes.NoteError, match=re.escape(reason)):
        notes.parse_note(data)


def test_too_many_signatures() -> None:
    signer, _ = _pair("a")
    line = notes.parse_note(notes.sign_note("t\n", [signer])).signatures[0].line()
    with pytest.raises(notes.NoteError, match="more than 64"):
        notes.parse_note("t\n\n" + line * 65)


def test_text_must_end_with_newline_and_cosignatures_need_time() -> None:
    signer, _ = _pair("a")
    cosigner, _ = _pair("w", cosignature=True)
    with pytest.raises(notes.NoteError, match="end with a newline"):
        notes.sign_note("no newline", [signer])
    with pytest.raises(notes.NoteError, match="timestamp"):
        notes.sign_note("t\n", [cosigner])


def test_pem_files_load_and_non_ed25519_is_a_config_error(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    priv = tmp_path / "audit.key"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer = notes.load_note_signer(priv, "log.example/a")
    pub = tmp_path / "audit.pub"
    pub.write_bytes(notes.public_key_pem(signer))
    verifier = notes.load_note_verifier(pub, "log.example/a")
    assert verifier == signer.verifier
    with pytest.raises(ConfigError, match="audit key name"):
        notes.load_note_signer(priv, "has space")
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("not a key")
    with pytest.raises(ConfigError, match=re.escape("bogus.pub")):
        notes.load_note_verifier(bogus, "log.example/a")
