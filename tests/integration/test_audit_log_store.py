"""The audit log service on both real stores: proofs, checkpoints, tampering, witnessing.

Tampering is done the way an insider would: raw SQL on the database behind the store.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit.bundle import ExportTargetError, export_bundle, verify_bundle
from gateway.audit.checkpoint import CheckpointError, KeptCheckpoint, open_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.log import AuditIntegrityError, AuditLog
from gateway.audit.witness import HistoryRewritten, StaleCheckpoint, Witness
from gateway.clock import ManualClock
from gateway.crypto.notes import NoteSigner, note_signer
from gateway.store import Store, open_store
from gateway.store.base import AuditFilter

ORIGIN = "c2c.test/US-CBP"
PARTNER_ORIGIN = "c2c.test/MX-ANAM"
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _events(n: int, *, start: int = 0, tag: str = "m") -> list[AuditEvent]:
    return [
        AuditEvent(
            event=EventKind.RECEIVED,
            at=T0 + timedelta(seconds=i),
            message_id=f"{tag}-{i}",
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.manifest",
            body_digest=f"sha-256:{i:043d}",
            outcome="ACK",
        )
        for i in range(start, start + n)
    ]


async def _raw(url: str, sql: str, *params: Any) -> None:
    """Run one statement behind the store's back (``?`` placeholders)."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            conn.execute(sql, params)
            conn.commit()
        finally:
            conn.close()
        return
    count = iter(range(1, 100))
    pg_sql = re.sub(r"\?", lambda _: f"${next(count)}", sql)
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(pg_sql, *params)
    finally:
        await pg.close()


@pytest.fixture
def log_signer() -> NoteSigner:
    return note_signer(ORIGIN, Ed25519PrivateKey.generate())


@pytest.fixture
def audit(store: Store, log_signer: NoteSigner, store_clock: ManualClock) -> AuditLog:
    return AuditLog(store, signer=log_signer, clock=store_clock)


async def _all_leaves(store: Store) -> list[bytes]:
    return await store.audit_leaf_hashes(0, await store.audit_size())


async def test_roots_and_proofs_from_stored_nodes(store: Store, audit: AuditLog) -> None:
    for chunk in (1, 2, 5, 13, 16):
        await store.append_audit(_events(chunk, start=await store.audit_size()))
    leaves = await _all_leaves(store)
    n = len(leaves)
    assert n == 37
    for size in (0, 1, 2, 7, 16, 17, 36, 37):
        assert (await audit.root(size))[1] == merkle.root(leaves[:size])
    for size in (1, 5, 16, 37):
        root = merkle.root(leaves[:size])
        for index in range(size):
            proof = await audit.inclusion_proof(index, size)
            assert proof.leaf_hash == leaves[index]
            assert proof.root_hash == root
            merkle.verify_inclusion(index, size, leaves[index], proof.hashes, root)
    for old in range(1, n):
        proof_c = await audit.consistency_proof(old, n)
        merkle.verify_consistency(old, n, merkle.root(leaves[:old]), merkle.root(leaves), proof_c)
    with pytest.raises(merkle.ProofError, match="not between 0 and 37"):
        await audit.inclusion_proof(0, 38)
    with pytest.raises(merkle.ProofError, match="not in a tree of size 5"):
        await audit.inclusion_proof(5, 5)


async def test_checkpoints_are_signed_consistent_and_not_repeated(
    store: Store, audit: AuditLog, log_signer: NoteSigner, store_clock: ManualClock
) -> None:
    await store.append_audit(_events(5))
    first = await audit.checkpoint()
    opened = open_checkpoint(first.note, log_signer.verifier, origin=ORIGIN).body
    assert (opened.size, opened.root_hash, opened.signed_at) == (5, first.root_hash, T0)
    store_clock.advance(timedelta(minutes=1))
    assert (await audit.checkpoint()).note == first.note
    await store.append_audit(_events(4, start=5))
    second = await audit.checkpoint()
    assert second.size == 9
    assert (await audit.latest_checkpoint()) == second
    proof = await audit.consistency_proof(5, 9)
    merkle.verify_consistency(5, 9, first.root_hash, second.root_hash, proof)
    report = await audit.verify_store(trusted=[KeptCheckpoint(label="first", note=first.note)])
    assert report.ok, report.problems
    assert (report.checked, report.checkpoint_size) == (9, 9)


async def _tampered(store_url: str, store: Store, audit: AuditLog) -> None:
    await store.append_audit(_events(40))
    await audit.checkpoint()
    assert (await audit.verify_store()).ok


async def test_one_changed_byte_is_found_at_its_position(
    store_url: str, store: Store, audit: AuditLog
) -> None:
    await _tampered(store_url, store, audit)
    row = await store.audit_entry(17)
    assert row is not None
    changed = row.entry.replace(b"m-17", b"m-18")
    await _raw(store_url, "UPDATE audit_entries SET entry = ? WHERE seq = ?", changed, 17)
    report = await audit.verify_store()
    assert not report.ok
    assert report.first_bad_position == 17
    assert str(report.problems[0]) == "entry 17: entry bytes do not match the stored leaf hash"


async def test_checkpoint_refuses_a_tree_that_does_not_extend_the_last_one(
    store_url: str, store: Store, audit: AuditLog
) -> None:
    await _tampered(store_url, store, audit)
    await store.append_audit(_events(1, start=40))
    await _raw(store_url, "UPDATE audit_nodes SET hash = ? WHERE level = 5 AND idx = 0", b"x" * 32)
    with pytest.raises(AuditIntegrityError, match="not consistent with the checkpoint of size 40"):
        await audit.checkpoint()
    latest = await store.latest_checkpoint()
    assert latest is not None
    assert latest.size == 40


async def test_rewritten_entry_and_leaf_hash_still_found(
    store_url: str, store: Store, audit: AuditLog
) -> None:
    await _tampered(store_url, store, audit)
    row = await store.audit_entry(23)
    assert row is not None
    changed = row.entry.replace(b"ACK", b"NAK")
    await _raw(
        store_url,
        "UPDATE audit_entries SET entry = ?, leaf_hash = ? WHERE seq = ?",
        changed,
        merkle.leaf_hash(changed),
        23,
    )
    report = await audit.verify_store()
    assert report.first_bad_position == 23
    problems = [str(p) for p in report.problems]
    assert any("leaf hash differs" in p for p in problems), problems
    # and the outcome column beside it still says what the entry said
    assert "entry 23: column outcome differs from the entry's outcome" in problems


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("message_id", "m-0"),
        ("event", "submitted"),
        ("sender", None),
        ("outcome", "NACK"),
        ("at", "a day later"),
    ],
)
async def test_a_changed_filter_column_is_found(
    store_url: str, store: Store, audit: AuditLog, column: str, value: object
) -> None:
    # The columns the audit filters read are not hashed: one changed behind the gateway's
    # back would hide the entry from every filtered view (audit query, the console's message
    # trail, a case export) while every hash still held.
    await _tampered(store_url, store, audit)
    if value == "a day later":
        later = 86_400_000_000 if store_url.startswith("sqlite:") else timedelta(days=1)
        await _raw(store_url, "UPDATE audit_entries SET at = at + ? WHERE seq = ?", later, 5)
    else:
        await _raw(store_url, f"UPDATE audit_entries SET {column} = ? WHERE seq = ?", value, 5)
    report = await audit.verify_store()
    assert [str(p) for p in report.problems] == [
        f"entry 5: column {column} differs from the entry's {column}"
    ]


async def test_deleted_entry_is_found(store_url: str, store: Store, audit: AuditLog) -> None:
    await _tampered(store_url, store, audit)
    await _raw(store_url, "DELETE FROM audit_entries WHERE seq = ?", 9)
    report = await audit.verify_store()
    assert report.first_bad_position == 9
    assert str(report.problems[0]) == "entry 9: entry is missing (the next stored entry is 10)"


async def test_swapped_entries_are_found(store_url: str, store: Store, audit: AuditLog) -> None:
    await _tampered(store_url, store, audit)
    a, b = await store.audit_entry(6), await store.audit_entry(31)
    assert a is not None
    assert b is not None
    for seq, row in ((6, b), (31, a)):
        await _raw(
            store_url,
            "UPDATE audit_entries SET entry = ?, leaf_hash = ? WHERE seq = ?",
            row.entry,
            row.leaf_hash,
            seq,
        )
    report = await audit.verify_store()
    assert report.first_bad_position == 6
    assert {p.position for p in report.problems} >= {6, 31}


async def test_truncation_is_found_and_not_signed_over(
    store_url: str, store: Store, audit: AuditLog
) -> None:
    await _tampered(store_url, store, audit)
    await _raw(store_url, "DELETE FROM audit_entries WHERE seq >= ?", 34)
    await _raw(store_url, "DELETE FROM audit_nodes WHERE ((idx + 1) << level) > ?", 34)
    await _raw(store_url, "UPDATE audit_head SET size = ? WHERE id = 1", 34)
    report = await audit.verify_store()
    assert report.first_bad_position == 34
    assert any("covers 40 entries but only 34 are stored" in p.what for p in report.problems)
    with pytest.raises(AuditIntegrityError, match="entries from 34 are missing"):
        await audit.checkpoint()


async def test_values_changed_to_text_are_changed_bytes(
    tmp_path: Path, log_signer: NoteSigner, store_clock: ManualClock
) -> None:
    """SQLite keeps the type a raw UPDATE gives: replace() on a BLOB stores TEXT, which may not
    even be UTF-8. The store reads every BLOB column as bytes, so such a value is changed bytes
    like any other: found by the check and refused by the export, never an exception."""
    url = f"sqlite:///{tmp_path / 'text.db'}"
    store = open_store(url, clock=store_clock)
    await store.open()
    try:
        audit = AuditLog(store, signer=log_signer, clock=store_clock)
        await _tampered(url, store, audit)
        await _raw(
            url, "UPDATE audit_entries SET entry = replace(entry, 'm-9', 'm-8') WHERE seq = 9"
        )
        await _raw(
            url, "UPDATE audit_entries SET entry = CAST(x'ff' || entry AS TEXT) WHERE seq = 5"
        )
        report = await audit.verify_store()
        assert report.first_bad_position == 5
        assert [str(p) for p in report.problems[:2]] == [
            "entry 5: entry bytes do not match the stored leaf hash",
            "entry 9: entry bytes do not match the stored leaf hash",
        ]
        # the export would carry the changed bytes, which fail offline: it writes no bundle
        out = tmp_path / "bundle.jsonl"
        with pytest.raises(AuditIntegrityError, match=r"^entry 5 is not in the tree of the "):
            await export_bundle(store, audit, log_signer, out)
        assert not out.exists()
        assert not out.with_name("bundle.jsonl.partial").exists()
        # hashes changed to text: found, and the log is not signed over
        await _raw(url, "UPDATE audit_entries SET leaf_hash = 'no hash' WHERE seq = 12")
        await _raw(url, "UPDATE audit_nodes SET hash = 'no hash' WHERE level = 3 AND idx = 4")
        problems = [str(p) for p in (await audit.verify_store()).problems]
        assert "entry 12: entry bytes do not match the stored leaf hash" in problems
        node = "entry 32: stored tree node over entries [32, 40) differs from the recomputed one"
        assert node in problems
        await store.append_audit(_events(1, start=40))
        with pytest.raises(AuditIntegrityError):
            await audit.checkpoint()
    finally:
        await store.close()


async def test_export_never_renames_over_a_special_file(
    store: Store, audit: AuditLog, log_signer: NoteSigner, tmp_path: Path
) -> None:
    await store.append_audit(_events(3))
    fifo = tmp_path / "reader.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ExportTargetError, match=r"reader\.fifo is a FIFO"):
        await export_bundle(store, audit, log_signer, fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not (tmp_path / "reader.fifo.partial").exists()
    regular = tmp_path / "bundle.jsonl"
    regular.write_bytes(b"an older bundle\n")
    assert (await export_bundle(store, audit, log_signer, regular)).entries == 3
    assert verify_bundle(regular, lambda _o: log_signer.verifier).ok


async def test_a_bundle_is_readable_by_its_owner_alone(
    store: Store, audit: AuditLog, log_signer: NoteSigner, tmp_path: Path
) -> None:
    # it holds message bodies (the store's are owner-only), whatever the umask, an older
    # bundle's mode or a left-over temporary file's
    await store.append_audit(_events(3))
    out = tmp_path / "bundle.jsonl"
    out.write_bytes(b"an older bundle\n")
    out.chmod(0o644)
    partial = tmp_path / "bundle.jsonl.partial"
    partial.write_bytes(b"")
    partial.chmod(0o666)
    old_umask = os.umask(0o022)
    try:
        await export_bundle(store, audit, log_signer, out)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


async def test_rewrite_after_checkpoint_fails_consistency_and_the_witness(
    store: Store,
    audit: AuditLog,
    log_signer: NoteSigner,
    store_clock: ManualClock,
    tmp_path: Path,
) -> None:
    """The insider holds the log key and rebuilds a different history (T76, T78)."""
    await store.append_audit(_events(20))
    published = await audit.checkpoint()
    witness_store = open_store(f"sqlite:///{tmp_path / 'witness.db'}", clock=store_clock)
    forged_store = open_store(f"sqlite:///{tmp_path / 'forged.db'}", clock=store_clock)
    await witness_store.open()
    await forged_store.open()
    try:
        cosigner = note_signer(PARTNER_ORIGIN, Ed25519PrivateKey.generate(), cosignature=True)
        witness = Witness(witness_store, cosigner=cosigner, clock=store_clock)
        first = await witness.witness(published.note, log_signer.verifier, ORIGIN, partner="US")
        assert first.size == 20

        forged_events = _events(20)
        forged_events[4] = _events(1, start=4, tag="forged")[0]
        await forged_store.append_audit(forged_events)
        forged = AuditLog(forged_store, signer=log_signer, clock=store_clock)
        forged_cp = await forged.checkpoint()
        kept = KeptCheckpoint(label="published.checkpoint", note=published.note)
        report = await forged.verify_store(trusted=[kept])
        assert not report.ok
        assert any(
            "differs from the trusted checkpoint published.checkpoint" in p.what
            for p in report.problems
        )
        with pytest.raises(HistoryRewritten, match="second root for tree size 20"):
            await witness.witness(forged_cp.note, log_signer.verifier, ORIGIN, partner="US")
        evidence = await witness_store.audit_entries(AuditFilter(event="history_inconsistent"))
        assert len(evidence) == 1
        assert published.note.encode() in _json_unescape(evidence[0].entry)
        assert forged_cp.note.encode() in _json_unescape(evidence[0].entry)

        await forged_store.append_audit(_events(5, start=20))
        grown = await forged.checkpoint()
        proof = await forged.consistency_proof(20, 25)
        with pytest.raises(HistoryRewritten, match="not consistent with the witnessed size 20"):
            await witness.witness(
                grown.note, log_signer.verifier, ORIGIN, old_size=20, consistency_proof=proof
            )

        await store.append_audit(_events(5, start=20))
        honest = await audit.checkpoint()
        with pytest.raises(StaleCheckpoint, match="from size 0"):
            await witness.witness(honest.note, log_signer.verifier, ORIGIN)
        cosigned = await witness.witness(
            honest.note,
            log_signer.verifier,
            ORIGIN,
            old_size=20,
            consistency_proof=await audit.consistency_proof(20, 25),
        )
        await audit.accept_cosignature("MX-ANAM", cosigned.cosigned_note, cosigner.verifier)
        stored = await store.cosignatures(25)
        assert [c.partner for c in stored] == ["MX-ANAM"]
        await store.append_audit(_events(3, start=25))
        out = tmp_path / "bundle.jsonl"
        summary = await export_bundle(store, audit, log_signer, out)
        assert (summary.entries, summary.cosignatures) == (29, 1)
        bundle_report = verify_bundle(out, lambda _origin: log_signer.verifier)
        assert bundle_report.ok, bundle_report.failures
        lines = out.read_bytes().splitlines(keepends=True)
        cosig_line = json.loads(lines[-2])
        assert cosig_line["type"] == "cosignature"
        cosig_line["consistency_proof"] = cosig_line["consistency_proof"][1:]
        lines[-2] = bytes(rfc8785.dumps(cosig_line)) + b"\n"
        out.write_bytes(b"".join(lines))
        failures = [str(f) for f in verify_bundle(out, lambda _o: log_signer.verifier).failures]
        assert failures[0].startswith(f"line {len(lines) - 1}: cosignature of MX-ANAM: ")
        with pytest.raises(StaleCheckpoint, match="older than the witnessed size 25"):
            await witness.witness(published.note, log_signer.verifier, ORIGIN)
        with pytest.raises(CheckpointError, match="expected"):
            await witness.witness(honest.note, log_signer.verifier, "c2c.test/other")
    finally:
        await witness_store.close()
        await forged_store.close()


def _json_unescape(entry: bytes) -> bytes:
    reason: str = json.loads(entry)["reason"]
    return reason.encode()
