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

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nodejs import run_script

from gateway.audit import merkle
from gateway.audit.checkpoint import CheckpointBody, cosign, sign_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.crypto.notes import note_signer, public_key_pem

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
    assert errors == [
        "VerifyError: the log's signature (key {}) on the checkpoint does not verify".format(
            f"{signer.key_id:08x}"
        ),
        "VerifyError: the log's signature (key {}) on the checkpoint does not verify".format(
            f"{signer.key_id:08x}"
        ),
        f"VerifyError: checkpoint carries no signature by the log key {ORIGIN}"
        f" ({other.key_id:08x})",
        f"VerifyError: checkpoint carries no signature by the log key {ORIGIN}"
        f" ({other.key_id:08x})",
        'VerifyError: checkpoint is from log "dev.c2c-gateway.invalid/US-CBP",'
        ' the key is for "another-log"',
        "VerifyError: the verifier key's id does not match its name and key",
        "VerifyError: signature line 1 does not start with an em dash and space",
    ]
    assert results[10] == {"ok": True, "value": vkey}


async def test_event_list_matches_the_gateway(tmp_path: Path) -> None:
    results = await run(tmp_path, [{"kind": "events"}])
    assert results[0]["value"] == [kind.value for kind in EventKind]
