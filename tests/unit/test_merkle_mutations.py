"""Proof mutation suite (T77): every corruption of a valid proof is rejected.

The mutations are those of transparency-dev/merkle proof/verify_test.go
(corruptInclusionProof / corruptConsistencyProof), applied to every proof of every tree up
to 33 leaves, plus the second-preimage check that keeps leaves and nodes apart.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.audit import merkle

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")

InclusionProbe = tuple[str, int, int, bytes, list[bytes], bytes]
ConsistencyProbe = tuple[str, int, int, bytes, bytes, list[bytes]]


def _flip(proof: list[bytes], i: int, bit: int) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ bit]) + out[i][1:]
    return out


def corrupt_inclusion(
    index: int, size: int, proof: list[bytes], root: bytes, leaf: bytes
) -> Iterator[InclusionProbe]:
    yield "leafIndex - 1", index - 1, size, leaf, proof, root
    yield "leafIndex + 1", index + 1, size, leaf, proof, root
    yield "leafIndex ^ 2", index ^ 2, size, leaf, proof, root
    yield "treeSize * 2", index, size * 2, leaf, proof, root
    yield "treeSize / 2", index, size // 2, leaf, proof, root
    yield "wrong leaf", index, size, b"WrongLeaf", proof, root
    yield "wrong 32-byte leaf", index, size, SOME_HASH, proof, root
    yield "empty root", index, size, leaf, proof, merkle.EMPTY_ROOT
    yield "random root", index, size, leaf, proof, SOME_HASH
    yield "trailing garbage", index, size, leaf, [*proof, b""], root
    yield "trailing root", index, size, leaf, [*proof, root], root
    yield "preceding garbage", index, size, leaf, [b"", *proof], root
    yield "preceding root", index, size, leaf, [root, *proof], root
    for i in range(len(proof)):
        yield f"modified proof[{i}] bit 3", index, size, leaf, _flip(proof, i, 8), root
    if proof:
        yield "removed component", index, size, leaf, proof[:-1], root
    if len(proof) > 1:
        yield "inserted component", index, size, leaf, [proof[0], SOME_HASH, *proof[1:]], root


def corrupt_consistency(
    old: int, new: int, r1: bytes, r2: bytes, proof: list[bytes]
) -> Iterator[ConsistencyProbe]:
    yield "size1 - 1", old - 1, new, r1, r2, proof
    yield "size1 + 1", old + 1, new, r1, r2, proof
    yield "size1 ^ 2", old ^ 2, new, r1, r2, proof
    yield "size2 * 2", old, new * 2, r1, r2, proof
    yield "size2 / 2", old, new // 2, r1, r2, proof
    yield "wrong root1", old, new, b"WrongRoot", r2, proof
    yield "wrong root2", old, new, r1, b"WrongRoot", proof
    yield "wrong 32-byte root1", old, new, SOME_HASH, r2, proof
    yield "swapped roots", old, new, r2, r1, proof
    yield "empty proof", old, new, r1, r2, []
    yield "trailing garbage", old, new, r1, r2, [*proof, b""]
    yield "trailing root1", old, new, r1, r2, [*proof, r1]
    yield "trailing root2", old, new, r1, r2, [*proof, r2]
    yield "preceding garbage", old, new, r1, r2, [b"", *proof]
    yield "preceding root1", old, new, r1, r2, [r1, *proof]
    yield "preceding root2", old, new, r1, r2, [r2, *proof]
    yield "preceding proof[0]", old, new, r1, r2, [proof[0], *proof]
    yield "time travel", new, old, r2, r1, proof
    if proof:
        yield "truncated proof", old, new, r1, r2, proof[:-1]
    for i in range(len(proof)):
        yield f"modified proof[{i}] bit 4", old, new, r1, r2, _flip(proof, i, 16)


def _tree(n: int) -> tuple[list[bytes], dict[merkle.NodeKey, bytes]]:
    leaves = [merkle.leaf_hash(f"leaf {i}".encode()) for i in range(n)]
    return leaves, merkle.subtree_hashes(leaves)


@pytest.mark.parametrize("n", range(1, 34))
def test_every_inclusion_mutation_is_rejected(n: int) -> None:
    leaves, nodes = _tree(n)
    root = merkle.root_from_nodes(n, nodes)
    accepted: list[str] = []
    for i in range(n):
        proof = merkle.inclusion_proof(i, n, nodes)
        merkle.verify_inclusion(i, n, leaves[i], proof, root)
        for desc, index, size, leaf, bad, r in corrupt_inclusion(i, n, proof, root, leaves[i]):
            try:
                merkle.verify_inclusion(index, size, leaf, bad, r)
            except merkle.ProofError:
                continue
            accepted.append(f"leaf {i}: {desc}")
    assert accepted == []


@pytest.mark.parametrize("n", range(2, 34))
def test_every_consistency_mutation_is_rejected(n: int) -> None:
    _, nodes = _tree(n)
    r2 = merkle.root_from_nodes(n, nodes)
    accepted: list[str] = []
    for m in range(1, n):
        r1 = merkle.root_from_nodes(m, nodes)
        proof = merkle.consistency_proof(m, n, nodes)
        merkle.verify_consistency(m, n, r1, r2, proof)
        for desc, old, new, a, b, bad in corrupt_consistency(m, n, r1, r2, proof):
            try:
                merkle.verify_consistency(old, new, a, b, bad)
            except merkle.ProofError:
                continue
            accepted.append(f"{m}->{n}: {desc}")
    assert accepted == []


def test_second_preimage_leaf_cannot_pose_as_node() -> None:
    """A 64-byte leaf equal to two child hashes does not verify where their parent sits."""
    _, nodes = _tree(4)
    root = merkle.root_from_nodes(4, nodes)
    left, right = nodes[(0, 0)], nodes[(0, 1)]
    sibling = nodes[(1, 1)]
    # the parent node itself, in its place in a 2-wide view of the tree, does verify ...
    merkle.verify_inclusion(0, 2, nodes[(1, 0)], [sibling], root)
    # ... but a leaf whose data is left || right hashes with 0x00, not 0x01, and fails
    forged = merkle.leaf_hash(left + right)
    assert forged != merkle.node_hash(left, right)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(0, 2, forged, [sibling], root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(0, 4, forged, merkle.inclusion_proof(0, 4, nodes)[1:], root)
