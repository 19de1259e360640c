"""The audit console's in-browser checks (gateway/api/console/verify.js) against the Python ones.

Node.js runs the page's own module on cases made here: every inclusion and consistency proof
of small trees with mutations of each, RFC 8785 edge cases, real audit entries, and signed
checkpoints. The JavaScript verdict must equal gateway.audit.merkle's on every case, so a
proof the gateway's own verifier refuses can never show as verified in a browser.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nodejs import run_script

from gateway.audit import merkle
from gateway.audit.checkpoint import (
    CheckpointBody,
    CheckpointError,
    cosign,
    sign_checkpoint,
    verify_cosignature,
)
from gateway.audit.events import AuditEvent, EventKind
from gateway.crypto.notes import (
    NoteError,
    NoteSigner,
    note_in_file,
    note_signer,
    parse_note,
    public_key_pem,
    verify_note,
)

ORIGIN = "dev.c2c-gateway.invalid/US-CBP"
LEAVES = [merkle.leaf_hash(b"entry %d" % i) for i in range(34)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def flipped(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


async def run(tmp_path: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    results: list[dict[str, Any]] = await run_script("vectors.mjs", str(path))
    assert len(results) == len(cases)
    return results


def python_verdict(check: Any, *args: Any) -> bool:
    try:
        check(*args)
    except merkle.ProofError:
        return False
    return True


def inclusion_case(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> Any:
    return {
        "kind": "inclusion",
        "index": index,
        "size": size,
        "leaf": b64(leaf),
        "proof": [b64(p) for p in proof],
        "root": b64(root),
        "expect": python_verdict(merkle.verify_inclusion, index, size, leaf, proof, root),
    }


def consistency_case(old: int, size: int, old_root: bytes, root: bytes, proof: list[bytes]) -> Any:
    return {
        "kind": "consistency",
        "old_size": old,
        "size": size,
        "old_root": b64(old_root),
        "root": b64(root),
        "proof": [b64(p) for p in proof],
        "expect": python_verdict(merkle.verify_consistency, old, size, old_root, root, proof),
    }


def inclusion_cases() -> list[dict[str, Any]]:
    cases = []
    for size in range(1, len(LEAVES) + 1):
        nodes = merkle.subtree_hashes(LEAVES[:size])
        root = merkle.root(LEAVES[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, nodes)
            leaf = LEAVES[index]
            cases.append(inclusion_case(index, size, leaf, proof, root))
            if size > 12 and index % 3:
                continue  # mutations of every proof in small trees, of a third in larger ones
            for at in range(len(proof)):
                bad = [flipped(p) if i == at else p for i, p in enumerate(proof)]
                cases.append(inclusion_case(index, size, leaf, bad, root))
            cases.append(inclusion_case(index, size, flipped(leaf), proof, root))
            cases.append(inclusion_case(index, size, leaf, proof, flipped(root, 31)))
            cases.append(inclusion_case(index, size, leaf, proof[:-1], root))
            cases.append(inclusion_case(index, size, leaf, [*proof, root], root))
            cases.append(inclusion_case(index, size + 1, leaf, proof, root))
            cases.append(inclusion_case(index ^ 1, size, leaf, proof, root))
            cases.append(inclusion_case(size, size, leaf, proof, root))
    return cases


def consistency_cases() -> list[dict[str, Any]]:
    cases = []
    for size in range(1, 22):
        nodes = merkle.subtree_hashes(LEAVES[:size])
        root = merkle.root(LEAVES[:size])
        for old in range(size + 1):
            proof = merkle.consistency_proof(old, size, nodes)
            old_root = merkle.root(LEAVES[:old])
            cases.append(consistency_case(old, size, old_root, root, proof))
            for at in range(len(proof)):
                bad = [flipped(p, 7) if i == at else p for i, p in enumerate(proof)]
                cases.append(consistency_case(old, size, old_root, root, bad))
            cases.append(consistency_case(old, size, flipped(old_root), root, proof))
            cases.append(consistency_case(old, size, old_root, flipped(root), proof))
            cases.append(consistency_case(old, size, old_root, root, proof[:-1]))
            cases.append(consistency_case(old, size, old_root, root, [*proof, root]))
            if old:
                cases.append(consistency_case(old - 1, size, old_root, root, proof))
            cases.append(consistency_case(old, size + 1, old_root, root, proof))
            cases.append(consistency_case(size, old, root, old_root, proof))
    return cases


async def test_every_proof_verdict_matches_the_python_verifier(tmp_path: Path) -> None:
    cases = inclusion_cases() + consistency_cases()
    results = await run(tmp_path, cases)
    wrong = [
        (case, result)
        for case, result in zip(cases, results, strict=True)
        if result["ok"] != case["expect"]
    ]
    assert not wrong, wrong[:3]
    valid = sum(case["expect"] for case in cases)
    # both verdicts occur in numbers: the mutations are refused, the real proofs accepted
    assert valid > 1000
    assert len(cases) - valid > 3000


async def test_a_refused_proof_says_why(tmp_path: Path) -> None:
    nodes = merkle.subtree_hashes(LEAVES[:5])
    root = merkle.root(LEAVES[:5])
    proof = merkle.inclusion_proof(2, 5, nodes)
    results = await run(
        tmp_path,
        [
            inclusion_case(2, 5, LEAVES[2], [flipped(proof[0]), *proof[1:]], root),
            inclusion_case(2, 5, LEAVES[2], proof[:-1], root),
            consistency_case(3, 5, merkle.root(LEAVES[:3]), root, []),
        ],
    )
    assert [r["error"] for r in results] == [
        "VerifyError: inclusion proof of leaf 2 in tree size 5 leads to another root",
        "VerifyError: inclusion proof of leaf 2 is too short",
        "VerifyError: empty consistency proof from size 3 to size 5",
    ]


CANONICAL_VALUES: list[Any] = [
    {"b": 1, "a": "x", "c": [True, False, None]},
    # RFC 8785 section 3.2.3's sorting example: UTF-16 code units, not code points
    {
        "\u20ac": "Euro",
        "\r": "CR",
        "\ufb33": "Hebrew",
        "1": "One",
        "\U0001f600": "Emoji",
        "\u0080": "Control",
        "\u00f6": "Latin",
    },
    '\u0000\u001f"\\/\b\f\n\r\t\u007f\u2028 é € 😀',
    [0, -0.0, 1, -1, 1e21, 1e-7, 0.1, 123456789012345, 2.5e-324, 1.7976931348623157e308, 333333.5],
    {"nested": {"z": [], "y": {}, "x": [{"b": 2, "a": 1}]}},
]


async def test_canonical_json_matches_rfc8785(tmp_path: Path) -> None:
    cases = [{"kind": "canonical", "value": value} for value in CANONICAL_VALUES]
    results = await run(tmp_path, cases)
    for value, result in zip(CANONICAL_VALUES, results, strict=True):
        assert result == {"ok": True, "value": rfc8785.dumps(value).decode()}, value


async def test_leaf_hashes_of_real_entries(tmp_path: Path) -> None:
    at = datetime(2026, 12, 4, 17, 30, 1, 250000, tzinfo=UTC)
    events = [
        AuditEvent(
            event=EventKind.ACCEPTED,
            at=at,
            message_id="0193a5b4-0000-7000-8000-000000000001",
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.declaration",
            body_digest="sha256:" + "ab" * 32,
            outcome="ACK",
            transport="https",
        ),
        AuditEvent(
            event=EventKind.REJECTED,
            at=at,
            sender="MX-ANAM",
            reason='payload: "weight" must be > 0\nline two, Zoll & Aduana ½ 税関 😀',
        ),
        AuditEvent(event=EventKind.TLS_REFUSED, at=at, reason="unknown CA", outcome="untrusted"),
    ]
    cases = [{"kind": "leaf", "entry": json.loads(e.entry_bytes())} for e in events]
    results = await run(tmp_path, cases)
    assert [r["value"] for r in results] == [b64(merkle.leaf_hash(e.entry_bytes())) for e in events]


async def test_checkpoint_signatures(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signer = note_signer(ORIGIN, key)
    other = note_signer(ORIGIN, Ed25519PrivateKey.generate())
    witness = note_signer(
        "dev.c2c-gateway.invalid/MX-ANAM", Ed25519PrivateKey.generate(), cosignature=True
    )
    signed_at = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)
    body = CheckpointBody(origin=ORIGIN, size=12, root_hash=LEAVES[3], signed_at=signed_at)
    note = sign_checkpoint(body, signer).note
    pem = public_key_pem(signer).decode()
    vkey = signer.verifier.vkey()
    text, sigline = note.split("\n\n")
    name, blob = sigline.rstrip("\n").split(" ")[1:]
    raw = base64.b64decode(blob)
    tampered_sig = f"{text}\n\n\u2014 {name} {b64(raw[:10] + flipped(raw[10:]))}\n"

    def case(note_text: str, key_text: str = pem, origin: str = ORIGIN) -> dict[str, Any]:
        return {"kind": "checkpoint", "note": note_text, "key": key_text, "origin": origin}

    results = await run(
        tmp_path,
        [
            case(note),
            case(note, vkey, "ignored for a verifier key"),
            case(cosign(note, witness, timestamp=1_800_000_000)),
            case(note.replace("\n12\n", "\n13\n")),
            case(tampered_sig),
            case(note, public_key_pem(other).decode()),
            case(note, other.verifier.vkey()),
            case(note, pem, "another-log"),
            case(note, vkey[: vkey.index("+") + 1] + "00000000" + vkey[vkey.index("+") + 9 :]),
            case(note.replace("\n\n", "\n\nnot a signature\n")),
            {"kind": "vkey", "key": pem, "origin": ORIGIN},
        ],
    )
    good = {
        "origin": ORIGIN,
        "size": 12,
        "root": b64(LEAVES[3]),
        "time": "2026-12-04T17:00:00.000Z",
    }
    assert results[0] == results[1] == results[2] == {"ok": True, "value": good}
    errors = [r.get("error") for r in results[3:10]]
    not_verified = "VerifyError: the log's signature (key {}) on the checkpoint does not verify"
    other_key = (
        f"VerifyError: checkpoint carries no signature by the log key {ORIGIN}"
        f" ({other.key_id:08x}); found: {ORIGIN} ({signer.key_id:08x}): signed by another key,"
        " or forged"
    )
    assert errors == [
        not_verified.format(f"{signer.key_id:08x}"),
        not_verified.format(f"{signer.key_id:08x}"),
        other_key,
        other_key,
        'VerifyError: checkpoint is from log "dev.c2c-gateway.invalid/US-CBP",'
        ' the key is for "another-log"',
        "VerifyError: the verifier key's id does not match its name and key",
        "VerifyError: signature line 1 does not start with an em dash and space",
    ]
    assert results[10] == {"ok": True, "value": vkey}


async def test_a_kept_note_is_read_from_a_text_as_the_cli_reads_its_file(tmp_path: Path) -> None:
    """A note pasted or saved with `jq -r` (one more newline), an editor's blank lines or CRLF
    line endings is the note itself; what is signed is still checked exactly."""
    signer = note_signer(ORIGIN, Ed25519PrivateKey.generate())
    note = sign_checkpoint(CheckpointBody(origin=ORIGIN, size=3, root_hash=LEAVES[0]), signer).note
    texts = [
        note,
        note + "\n",
        note + "\n \n\t\n  ",
        note.replace("\n", "\r\n") + "\r\n",
        note.rstrip("\n"),
        note.replace("\n3\n", "\n4\n") + "\n",
        "",
        " \n\n",
    ]
    results = await run(tmp_path, [{"kind": "note_in_text", "text": t} for t in texts])
    for text, result in zip(texts, results, strict=True):
        try:
            expected = {"ok": True, "value": note_in_file(text)}
        except NoteError as exc:
            expected = {"ok": False, "error": f"VerifyError: {exc}"}
        assert result == expected, repr(text)
    assert [r["value"] for r in results[:4]] == [note] * 4
    verifier = signer.verifier
    verify_note(note_in_file(texts[1]), [verifier])
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(note_in_file(texts[5]), [verifier])
    assert note_in_file(texts[4]) == texts[4]  # no final newline: parse_note names it
    with pytest.raises(NoteError, match="does not end with a newline"):
        parse_note(note_in_file(texts[4]))


async def test_event_list_matches_the_gateway(tmp_path: Path) -> None:
    results = await run(tmp_path, [{"kind": "events"}])
    assert results[0]["value"] == [kind.value for kind in EventKind]


MX_ORIGIN = "dev.c2c-gateway.invalid/MX-ANAM"
SIGNED_AT = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)


def cosigned_note() -> tuple[str, NoteSigner, NoteSigner, NoteSigner, str]:
    """A checkpoint note signed by the log and cosigned by MX-ANAM, with the keys involved."""
    log = note_signer(ORIGIN, Ed25519PrivateKey.generate())
    mx = note_signer(MX_ORIGIN, Ed25519PrivateKey.generate(), cosignature=True)
    ca = note_signer(
        "dev.c2c-gateway.invalid/CA-CBSA", Ed25519PrivateKey.generate(), cosignature=True
    )
    body = CheckpointBody(origin=ORIGIN, size=12, root_hash=LEAVES[3], signed_at=SIGNED_AT)
    note = cosign(sign_checkpoint(body, log).note, mx, timestamp=1_800_000_000)
    return note, log, mx, ca, log.verifier.vkey()


def with_line(note: str, name: str, change: Any) -> str:
    """``note`` with the blob of ``name``'s signature line passed through ``change``."""
    text, block = note.split("\n\n")
    lines = []
    for line in block.rstrip("\n").split("\n"):
        _, line_name, blob = line.split(" ")
        if line_name == name:
            line = f"\u2014 {line_name} {b64(change(base64.b64decode(blob)))}"
        lines.append(line)
    return text + "\n\n" + "\n".join(lines) + "\n"


async def test_cosignatures_verify_as_the_gateway_does(tmp_path: Path) -> None:
    note, log, mx, ca, log_vkey = cosigned_note()
    mx_pem = public_key_pem(mx).decode()
    forged = with_line(note, MX_ORIGIN, lambda raw: raw[:12] + flipped(raw[12:]))
    restamped = with_line(note, MX_ORIGIN, lambda raw: raw[:11] + flipped(raw[11:]))
    short = with_line(note, MX_ORIGIN, lambda raw: raw[:4] + raw[12:])
    # the log's own key, cosigning under the partner's name: no partner's cosignature
    self_cosigned = cosign(
        sign_checkpoint(
            CheckpointBody(origin=ORIGIN, size=12, root_hash=LEAVES[3], signed_at=SIGNED_AT), log
        ).note,
        note_signer(MX_ORIGIN, log.private_key, cosignature=True),
        timestamp=1_800_000_000,
    )
    renamed = note_signer("dev.c2c-gateway.invalid/XX-OTHER", mx.private_key, cosignature=True)

    def case(note_text: str, key: str) -> dict[str, Any]:
        return {"kind": "cosignature", "note": note_text, "key": key, "log_key": log_vkey}

    cases = [
        case(note, mx.verifier.vkey()),
        case(note, mx_pem),
        # the key as the partner signs its own log's checkpoints with it (type 0x01)
        case(note, note_signer(MX_ORIGIN, mx.private_key).verifier.vkey()),
        case(forged, mx.verifier.vkey()),
        case(forged, mx_pem),
        case(restamped, mx.verifier.vkey()),
        case(short, mx.verifier.vkey()),
        case(note, ca.verifier.vkey()),
        case(note, public_key_pem(ca).decode()),
        case(note, renamed.verifier.vkey()),
        case(self_cosigned, public_key_pem(log).decode()),
        case(note, log_vkey),
    ]
    results = await run(tmp_path, cases)
    good = {"name": MX_ORIGIN, "keyId": f"{mx.key_id:08x}", "timestamp": 1_800_000_000}
    assert results[:3] == [{"ok": True, "value": good}] * 3
    does_not_verify = (
        f"VerifyError: the cosignature by {MX_ORIGIN} (key {mx.key_id:08x}) does not verify"
    )
    assert [r.get("error") for r in results[3:]] == [
        does_not_verify,
        does_not_verify,
        does_not_verify,
        f"VerifyError: the cosignature by {MX_ORIGIN} (key {mx.key_id:08x}) is not"
        " 8 + 64 bytes (timestamp and signature)",
        "VerifyError: the note carries no cosignature by this key"
        " (dev.c2c-gateway.invalid/CA-CBSA)",
        "VerifyError: the note carries no cosignature by this key",
        "VerifyError: the note carries no cosignature by this key"
        " (dev.c2c-gateway.invalid/XX-OTHER)",
        "VerifyError: the partner's key is the log's own key, which cannot witness the log",
        "VerifyError: the partner's key is the log's own key, which cannot witness the log",
    ]
    # the gateway's verifier reaches the same verdicts on the notes it can be given
    assert verify_cosignature(note, mx.verifier) == 1_800_000_000
    for bad in (forged, restamped, short):
        with pytest.raises(CheckpointError):
            verify_cosignature(bad, mx.verifier)


async def test_partners_keys_are_read_from_one_text(tmp_path: Path) -> None:
    mx = note_signer(MX_ORIGIN, Ed25519PrivateKey.generate(), cosignature=True)
    ca = note_signer(
        "dev.c2c-gateway.invalid/CA-CBSA", Ed25519PrivateKey.generate(), cosignature=True
    )
    ca_pem = public_key_pem(ca).decode()
    text = f"MX-ANAM {mx.verifier.vkey()}\n\nCA-CBSA\n{ca_pem}"
    results = await run(
        tmp_path,
        [
            {"kind": "witness_keys", "text": text},
            {"kind": "witness_keys", "text": f"MX-ANAM={mx.verifier.vkey()}"},
            {"kind": "witness_keys", "text": "  \n"},
            {"kind": "witness_keys", "text": "MX-ANAM"},
            {"kind": "witness_keys", "text": f"{mx.verifier.vkey()}"},
            {"kind": "witness_keys", "text": f"MX-ANAM {ca_pem}\nMX-ANAM {mx.verifier.vkey()}"},
            {"kind": "witness_keys", "text": "MX-ANAM MX-ANAM+00000000+AAAA"},
        ],
    )
    assert results[0] == {
        "ok": True,
        "value": [["MX-ANAM", MX_ORIGIN], ["CA-CBSA", None]],
    }
    assert results[1] == {"ok": True, "value": [["MX-ANAM", MX_ORIGIN]]}
    assert results[2] == {"ok": True, "value": []}
    assert [r.get("error") for r in results[3:]] == [
        "VerifyError: partners' keys: 'MX-ANAM' is not '<partner id> <key>'",
        f"VerifyError: partners' keys: {mx.verifier.vkey()[:40]!r} is not '<partner id> <key>'",
        "VerifyError: partners' keys: MX-ANAM is given twice",
        "VerifyError: partners' keys: MX-ANAM: the verifier key is not an Ed25519 key of type"
        " 0x01 or 0x04",
    ]


async def test_an_entry_is_checked_against_the_search_it_was_listed_for(tmp_path: Path) -> None:
    entry = {
        "at": "2026-12-07T10:00:00.250Z",
        "event": "sent",
        "message_id": "01a252e2-47cc-77c2-bffe-2aefcaa0f4ea",
        "message_type": "shipment.status",
        "sender": "US-CBP",
        "recipient": "MX-ANAM",
        "outcome": "attempt 1",
    }
    searches: list[tuple[dict[str, str], str | None]] = [
        ({}, None),
        ({"event": " sent ", "partner": "MX-ANAM", "type": "shipment.status"}, None),
        ({"partner": "US-CBP"}, None),
        ({"since": "2026-12-07T10:00:00.250Z", "until": "2026-12-07T10:00:00.251Z"}, None),
        ({"since": "not a time"}, None),
        (
            {"message_id": "01a252e2-0000-7000-8000-000000000000"},
            "its message_id is 01a252e2-47cc-77c2-bffe-2aefcaa0f4ea, not"
            " 01a252e2-0000-7000-8000-000000000000",
        ),
        ({"correlation_id": "c"}, "its correlation_id is absent, not c"),
        ({"partner": "CA-CBSA"}, "neither its sender nor its recipient is CA-CBSA"),
        (
            {"since": "2026-12-07T10:00:01Z"},
            "its time 2026-12-07T10:00:00.250Z is before 2026-12-07T10:00:01Z",
        ),
        (
            {"until": "2026-12-07T10:00:00Z"},
            "its time 2026-12-07T10:00:00.250Z is not before 2026-12-07T10:00:00Z",
        ),
    ]
    cases = [{"kind": "filter_mismatch", "entry": entry, "filters": f} for f, _ in searches]
    results = await run(tmp_path, cases)
    assert [r.get("value") for r in results] == [expected for _, expected in searches]
