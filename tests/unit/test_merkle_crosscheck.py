"""The stored-subtree proof machinery against a naive, recursive transcription of RFC 9162.

The naive functions below are written straight from the RFC's recursive definitions
(MTH, PATH, SUBPROOF) over the leaf data, sharing nothing with gateway.audit.merkle except
the two hash primitives, which the vector tests pin separately.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import merkle


def _h(prefix: bytes, *parts: bytes) -> bytes:
    return hashlib.sha256(prefix + b"".join(parts)).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(data: list[bytes]) -> bytes:
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return _h(b"\x00", data[0])
    k = _k(n)
    return _h(b"\x01", naive_mth(data[:k]), naive_mth(data[k:]))


def naive_path(m: int, data: list[bytes]) -> list[bytes]:
    n = len(data)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*naive_path(m, data[:k]), naive_mth(data[k:])]
    return [*naive_path(m - k, data[k:]), naive_mth(data[:k])]


def naive_subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if complete else [naive_mth(data)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, data[:k], complete), naive_mth(data[k:])]
    return [*naive_subproof(m - k, data[k:], False), naive_mth(data[:k])]


def _data(n: int) -> list[bytes]:
    return [f"entry-{i}".encode() for i in range(n)]


@pytest.mark.parametrize("n", range(0, 34))
def test_root_and_every_proof_match_naive(n: int) -> None:
    data = _data(n)
    leaves = [merkle.leaf_hash(d) for d in data]
    nodes = merkle.subtree_hashes(leaves)
    assert merkle.root(leaves) == naive_mth(data)
    for i in range(n):
        proof = merkle.inclusion_proof(i, n, nodes)
        assert proof == naive_path(i, data)
        merkle.verify_inclusion(i, n, leaves[i], proof, naive_mth(data))
    for m in range(1, n):
        proof = merkle.consistency_proof(m, n, nodes)
        assert proof == naive_subproof(m, data, True)
        merkle.verify_consistency(m, n, naive_mth(data[:m]), naive_mth(data), proof)


@pytest.mark.parametrize("n", range(1, 70))
def test_append_nodes_rebuilds_every_perfect_subtree(n: int) -> None:
    leaves = [merkle.leaf_hash(d) for d in _data(n)]
    acc: dict[merkle.NodeKey, bytes] = {}
    size = 0
    # appending in uneven batches must give the same nodes as building at once
    for batch in (1, 2, 3, 5, 8):
        chunk = leaves[size : size + batch]
        acc.update(merkle.append_nodes(size, acc, chunk))
        size += len(chunk)
    acc.update(merkle.append_nodes(size, acc, leaves[size:]))
    assert acc == merkle.subtree_hashes(leaves)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=1 << 40), st.data())
def test_plans_stay_logarithmic_at_any_size(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    old = data.draw(st.integers(min_value=1, max_value=size))
    bound = 2 * size.bit_length() + 2
    assert len(merkle.inclusion_plan(index, size).node_keys()) <= bound
    assert len(merkle.consistency_plan(old, size).node_keys()) <= bound
    assert len(merkle.root_plan(size).node_keys()) <= size.bit_length()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=80), st.data())
def test_random_trees_match_naive(data: list[bytes], draw: st.DataObject) -> None:
    n = len(data)
    leaves = [merkle.leaf_hash(d) for d in data]
    nodes = merkle.subtree_hashes(leaves)
    i = draw.draw(st.integers(min_value=0, max_value=n - 1))
    m = draw.draw(st.integers(min_value=1, max_value=n))
    assert merkle.inclusion_proof(i, n, nodes) == naive_path(i, data)
    assert merkle.consistency_proof(m, n, nodes) == naive_subproof(m, data, True)
    assert merkle.root_from_nodes(m, nodes) == naive_mth(data[:m])


def test_missing_subtree_hash_is_named() -> None:
    with pytest.raises(merkle.ProofError, match=r"missing subtree hash \(0, 2\)"):
        merkle.inclusion_proof(3, 4, {(1, 0): b"\x00" * 32})
