"""Witnessing payloads (audit.checkpoint / audit.cosignature) and the witness's answers."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit.checkpoint import (
    CheckpointBody,
    CheckpointError,
    sign_checkpoint,
    verify_cosignature,
)
from gateway.audit.witness import Witness
from gateway.audit.witnessing import (
    CheckpointOffer,
    CosignatureAnswer,
    PayloadError,
    PeerKeys,
    answer_checkpoint,
)
from gateway.clock import ManualClock
from gateway.crypto.notes import NoteSigner, note_signer, note_verifier
from gateway.errors import SchemaInvalid
from gateway.schemas.registry import SchemaRegistry
from gateway.store import open_store
from gateway.store.base import AuditFilter, Store

PARTNER = "US-CBP"
ORIGIN = "dev.c2c-gateway.invalid/US-CBP"
WITNESS_ORIGIN = "dev.c2c-gateway.invalid/MX-ANAM"
AT = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
LEAVES = [merkle.leaf_hash(f"entry {i}".encode()) for i in range(40)]
NODES = merkle.subtree_hashes(LEAVES)


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load_builtin()


@pytest.fixture
def log_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def peer(log_key: Ed25519PrivateKey) -> PeerKeys:
    public = log_key.public_key()
    return PeerKeys(
        partner=PARTNER,
        origin=ORIGIN,
        log_key=note_verifier(ORIGIN, public),
        cosigner_key=note_verifier(ORIGIN, public, cosignature=True),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'witness.db'}", clock=ManualClock(AT))
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def witness_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def witness(store: Store, witness_key: Ed25519PrivateKey) -> Witness:
    cosigner = note_signer(WITNESS_ORIGIN, witness_key, cosignature=True)
    return Witness(store, cosigner=cosigner, clock=ManualClock(AT))


def _note(key: Ed25519PrivateKey, leaves: list[bytes]) -> str:
    signer: NoteSigner = note_signer(ORIGIN, key)
    body = CheckpointBody(
        origin=ORIGIN, size=len(leaves), root_hash=merkle.root(leaves), signed_at=AT
    )
    return sign_checkpoint(body, signer).note


def _offer(key: Ed25519PrivateKey, size: int, old_size: int = 0) -> CheckpointOffer:
    proof = merkle.consistency_proof(old_size, size, NODES) if 0 < old_size < size else []
    return CheckpointOffer(
        note=_note(key, LEAVES[:size]), old_size=old_size, consistency_proof=tuple(proof)
    )


def test_checkpoint_payload_round_trips_and_fits_its_schema(
    registry: SchemaRegistry, log_key: Ed25519PrivateKey
) -> None:
    offer = _offer(log_key, 40, old_size=17)
    payload = offer.payload()
    registry.validate("audit.checkpoint", "1.0", payload)
    assert payload["old_size"] == 17
    assert all(len(base64.b64decode(h)) == 32 for h in payload["consistency_proof"])
    # The wire form (JSON) parses back to the same offer.
    assert CheckpointOffer.from_payload(orjson.loads(orjson.dumps(payload))) == offer


def test_checkpoint_payload_with_a_short_hash_is_refused(log_key: Ed25519PrivateKey) -> None:
    payload = _offer(log_key, 40, old_size=17).payload()
    payload["consistency_proof"][2] = base64.b64encode(b"x" * 31).decode()
    with pytest.raises(PayloadError, match=r"^/consistency_proof/2: not a 32-byte hash$"):
        CheckpointOffer.from_payload(payload)


def test_checkpoint_note_that_is_not_a_checkpoint_fails_the_schema(
    registry: SchemaRegistry, log_key: Ed25519PrivateKey
) -> None:
    payload: dict[str, Any] = _offer(log_key, 5).payload()
    payload["checkpoint"] = payload["checkpoint"].replace("\n5\n", "\n05\n", 1)
    with pytest.raises(SchemaInvalid) as info:
        registry.validate("audit.checkpoint", "1.0", payload)
    assert info.value.pointer == "/checkpoint"


async def test_first_checkpoint_is_cosigned_and_the_cosignature_verifies(
    registry: SchemaRegistry,
    witness: Witness,
    peer: PeerKeys,
    log_key: Ed25519PrivateKey,
    witness_key: Ed25519PrivateKey,
) -> None:
    answer = await answer_checkpoint(witness, _offer(log_key, 17), peer)
    assert (answer.status, answer.size, answer.witnessed_size) == ("cosigned", 17, 17)
    assert answer.root_hash == merkle.root(LEAVES[:17])
    assert answer.cosignature is not None
    cosigner = note_verifier(WITNESS_ORIGIN, witness_key.public_key(), cosignature=True)
    assert verify_cosignature(answer.cosignature, cosigner) == int(AT.timestamp())
    payload = answer.payload()
    registry.validate("audit.cosignature", "1.0", payload)
    assert CosignatureAnswer.from_payload(payload) == answer


async def test_growth_with_a_valid_proof_is_cosigned(
    witness: Witness, peer: PeerKeys, log_key: Ed25519PrivateKey
) -> None:
    await answer_checkpoint(witness, _offer(log_key, 17), peer)
    answer = await answer_checkpoint(witness, _offer(log_key, 40, old_size=17), peer)
    assert (answer.status, answer.size) == ("cosigned", 40)


async def test_proof_from_another_size_is_stale_and_names_the_witnessed_size(
    registry: SchemaRegistry, witness: Witness, peer: PeerKeys, log_key: Ed25519PrivateKey
) -> None:
    await answer_checkpoint(witness, _offer(log_key, 17), peer)
    answer = await answer_checkpoint(witness, _offer(log_key, 40, old_size=0), peer)
    assert (answer.status, answer.witnessed_size, answer.cosignature) == ("stale", 17, None)
    assert answer.detail == "consistency proof is from size 0, the witnessed size is 17"
    registry.validate("audit.cosignature", "1.0", answer.payload())


async def test_rewritten_history_is_inconsistent_and_recorded_with_both_notes(
    registry: SchemaRegistry,
    store: Store,
    witness: Witness,
    peer: PeerKeys,
    log_key: Ed25519PrivateKey,
) -> None:
    honest = _offer(log_key, 17)
    await answer_checkpoint(witness, honest, peer)
    forged_leaves = [merkle.leaf_hash(b"forged"), *LEAVES[1:20]]
    forged_nodes = merkle.subtree_hashes(forged_leaves)
    forged = CheckpointOffer(
        note=_note(log_key, forged_leaves),
        old_size=17,
        consistency_proof=tuple(merkle.consistency_proof(17, 20, forged_nodes)),
    )
    answer = await answer_checkpoint(witness, forged, peer)
    assert (answer.status, answer.size, answer.witnessed_size) == ("inconsistent", 20, 17)
    assert answer.cosignature is None
    registry.validate("audit.cosignature", "1.0", answer.payload())
    (row,) = await store.audit_entries(AuditFilter(event="history_inconsistent"))
    reason = orjson.loads(row.entry)["reason"]
    assert honest.note in reason
    assert forged.note in reason
    seen = await store.get_witnessed(ORIGIN)
    assert seen is not None
    assert seen.size == 17


async def test_checkpoint_signed_by_another_key_is_not_answered(
    witness: Witness, peer: PeerKeys
) -> None:
    with pytest.raises(CheckpointError):
        await answer_checkpoint(witness, _offer(Ed25519PrivateKey.generate(), 17), peer)


def test_cosignature_naming_another_checkpoint_is_refused(registry: SchemaRegistry) -> None:
    example = registry.examples("audit.cosignature", "1.0")[0]
    example["size"] = 1235
    with pytest.raises(PayloadError, match="names another checkpoint"):
        CosignatureAnswer.from_payload(example)


def test_detail_is_cut_to_the_schema_limit(registry: SchemaRegistry) -> None:
    answer = CosignatureAnswer(
        status="stale",
        origin=ORIGIN,
        size=3,
        root_hash=merkle.root(LEAVES[:3]),
        witnessed_size=2,
        detail="x" * 2000,
    )
    payload = answer.payload()
    assert len(payload["detail"]) == 512
    registry.validate("audit.cosignature", "1.0", payload)
