"""Batched audit reads on both stores at a moderate size: node lookups, proofs, check, export.

The large-scale paths (many keys per lookup, leaf-hash ranges for dense export pages, the
store check's per-batch node comparison) are checked against an independent recomputation
from the entries themselves.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit.bundle import export_bundle, verify_bundle
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.log import AuditLog
from gateway.clock import ManualClock
from gateway.crypto.notes import note_signer
from gateway.store import Store
from gateway.store.base import AuditFilter

#: not a power of two, so the tree has a ragged right border; > 2 export leaf blocks
SIZE = 3_333
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CASE = "0190f000-0000-7000-8000-00000000ca5e"


def _events(start: int, count: int) -> list[AuditEvent]:
    return [
        AuditEvent(
            event=EventKind.RECEIVED,
            at=T0 + timedelta(seconds=i),
            message_id=f"00000000-0000-7000-8000-{i:012d}",
            sender="MX-ANAM",
            outcome="ACK",
            correlation_id=CASE if i % 50 == 0 else None,
        )
        for i in range(start, start + count)
    ]


@pytest.fixture
async def filled(store: Store) -> list[bytes]:
    """SIZE entries appended in uneven batches; returns the leaf hashes recomputed from data."""
    done = 0
    for batch in (1, 2, 500, 1000, 1500, SIZE - 3003):
        await store.append_audit(_events(done, batch))
        done += batch
    assert await store.audit_size() == SIZE
    leaves: list[bytes] = []
    after = -1
    while rows := await store.audit_entries(AuditFilter(), after_seq=after, limit=1000):
        leaves += [merkle.leaf_hash(r.entry) for r in rows]
        after = rows[-1].seq
    return leaves


async def test_node_lookup_in_one_call_matches_recomputed_subtrees(
    store: Store, filled: list[bytes]
) -> None:
    expected = merkle.subtree_hashes(filled)
    keys = list(expected)
    random.Random(7).shuffle(keys)
    # keys of incomplete subtrees and beyond the tree are absent, not errors
    missing = [(0, SIZE), (1, SIZE // 2 + 1), (12, 0), (40, 0)]
    got = await store.audit_node_hashes([*keys, *missing, keys[0]])
    assert got == expected
    assert await store.audit_leaf_hashes(1000, 1100) == filled[1000:1100]


async def test_proofs_at_every_shape_verify_against_an_independent_root(
    store: Store, filled: list[bytes], store_clock: ManualClock
) -> None:
    audit = AuditLog(
        store,
        signer=note_signer("c2c.test/US-CBP", Ed25519PrivateKey.generate()),
        clock=store_clock,
    )
    rng = random.Random(11)
    sizes = [1, 2, 3, 1024, 1025, 2047, SIZE, *rng.sample(range(1, SIZE), 8)]
    for size in sizes:
        root = merkle.root(filled[:size])
        assert await audit.root(size) == (size, root)
        for index in {0, size - 1, rng.randrange(size)}:
            proof = await audit.inclusion_proof(index, size)
            assert proof.leaf_hash == filled[index]
            merkle.verify_inclusion(index, size, filled[index], proof.hashes, root)
        old = rng.randrange(size + 1)
        merkle.verify_consistency(
            old, size, merkle.root(filled[:old]), root, await audit.consistency_proof(old, size)
        )


async def test_check_and_full_export_over_the_whole_log(
    store: Store, filled: list[bytes], store_clock: ManualClock, tmp_path: Path
) -> None:
    signer = note_signer("c2c.test/US-CBP", Ed25519PrivateKey.generate())
    audit = AuditLog(store, signer=signer, clock=store_clock)
    await audit.checkpoint()
    counted: list[int] = []
    report = await audit.verify_store(batch=700, progress=counted.append)
    assert report.ok, report.problems
    assert (report.checked, sum(counted)) == (SIZE, SIZE)

    out = tmp_path / "all.jsonl"
    summary = await export_bundle(store, audit, signer, out)
    assert (summary.entries, summary.size) == (SIZE, SIZE)
    bundle = verify_bundle(out, lambda origin: signer.verifier)
    assert bundle.ok, bundle.failures[:3]
    assert bundle.entries == SIZE

    # a half-log export starts mid-block; a case export (one entry in fifty) is sparse
    # enough to take the node-lookup path
    half = tmp_path / "half.jsonl"
    await export_bundle(store, audit, signer, half, since=T0 + timedelta(seconds=SIZE // 2))
    partial = verify_bundle(half, lambda origin: signer.verifier)
    assert partial.ok, partial.failures[:3]
    assert partial.entries == SIZE - SIZE // 2
    case = tmp_path / "case.jsonl"
    await export_bundle(store, audit, signer, case, correlation_id=CASE)
    sparse = verify_bundle(case, lambda origin: signer.verifier)
    assert sparse.ok, sparse.failures[:3]
    assert sparse.entries == len(range(0, SIZE, 50))
