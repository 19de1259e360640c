"""RFC 6962 / RFC 9162 Merkle tree hashing and proofs, as pure functions.

The store keeps the hash of every *perfect* subtree: node ``(level, idx)`` covers leaves
``[idx * 2**level, (idx + 1) * 2**level)``; level 0 holds the leaf hashes. Any tree head or
proof element is a fold of at most ``log2(n)`` such nodes, so producing a proof is a
two-step affair that never walks the whole log: a ``Plan`` names the perfect-subtree keys it
needs (O(log n) of them), the caller fetches them from wherever they live (the store is
async, this module is not), and ``Plan.assemble`` folds them into hashes.

Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 to the letter, with the
transparency-dev/merkle conventions for the edge cases RFC 9162 leaves open (equal sizes,
an empty first tree).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: MTH({}) = SHA-256 of the empty string (RFC 9162 section 2.1.1)
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: ``(level, idx)``: the perfect subtree over leaves ``[idx << level, (idx + 1) << level)``
NodeKey = tuple[int, int]


class ProofError(ValueError):
    """A proof, a root or a request for one does not hold; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 9162: the largest power of two strictly smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect_nodes(start: int, end: int) -> list[NodeKey]:
    """The maximal perfect subtrees that tile ``[start, end)``, left to right.

    For the ranges Merkle trees are made of (``start`` aligned to a power of two at least as
    large as the range), this is the binary expansion of ``end - start``, largest first.
    """
    if not 0 <= start <= end:
        raise ProofError(f"invalid leaf range [{start}, {end})")
    keys: list[NodeKey] = []
    pos = start
    while pos < end:
        # the largest aligned block starting at pos that fits before end
        level = (pos & -pos).bit_length() - 1 if pos else (end - pos).bit_length() - 1
        while pos + (1 << level) > end:
            level -= 1
        keys.append((level, pos >> level))
        pos += 1 << level
    return keys


def _fold(keys: Sequence[NodeKey], hashes: Mapping[NodeKey, bytes]) -> bytes:
    """MTH of a range from its perfect-subtree tiling: the right border folds right to left."""
    try:
        acc = hashes[keys[-1]]
        for key in reversed(keys[:-1]):
            acc = node_hash(hashes[key], acc)
    except KeyError as exc:
        raise ProofError(f"missing subtree hash {exc.args[0]!r}") from None
    return acc


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The leaf ranges whose MTHs make up a tree head or a proof, in proof order."""

    ranges: tuple[tuple[int, int], ...]

    def node_keys(self) -> list[NodeKey]:
        """Every perfect-subtree hash ``assemble`` needs (deduplicated, stable order)."""
        seen: dict[NodeKey, None] = {}
        for start, end in self.ranges:
            for key in perfect_nodes(start, end):
                seen[key] = None
        return list(seen)

    def assemble(self, hashes: Mapping[NodeKey, bytes]) -> list[bytes]:
        return [_fold(perfect_nodes(start, end), hashes) for start, end in self.ranges]


def root_plan(size: int) -> Plan:
    """The tree head of ``size`` leaves (size 0 has no subtrees: its root is ``EMPTY_ROOT``)."""
    if size < 0:
        raise ProofError(f"negative tree size {size}")
    return Plan(ranges=((0, size),) if size else ())


def root_from_nodes(size: int, hashes: Mapping[NodeKey, bytes]) -> bytes:
    """MTH of the first ``size`` leaves from stored perfect-subtree hashes."""
    if size == 0:
        return EMPTY_ROOT
    return root_plan(size).assemble(hashes)[0]


def inclusion_plan(index: int, size: int) -> Plan:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1, as leaf ranges."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    start, end, m = 0, size, index
    # descend from the root; each level contributes the sibling subtree's range
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if m < k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            m -= k
    ranges.reverse()
    return Plan(ranges=tuple(ranges))


def consistency_plan(old_size: int, new_size: int) -> Plan:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1, as leaf ranges (empty if m in {0, n})."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return Plan(ranges=())
    ranges: list[tuple[int, int]] = []
    start, end, m, complete = 0, new_size, old_size, True
    while m != end - start:
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            m -= k
            complete = False
    if not complete:
        ranges.append((start, end))
    ranges.reverse()
    return Plan(ranges=tuple(ranges))


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over a list of leaf hashes (RFC 9162 section 2.1.1), iteratively."""
    if not leaf_hashes:
        return EMPTY_ROOT
    return root_from_nodes(len(leaf_hashes), subtree_hashes(leaf_hashes))


def subtree_hashes(leaf_hashes: Sequence[bytes], *, offset: int = 0) -> dict[NodeKey, bytes]:
    """Every perfect-subtree hash over ``leaf_hashes`` (which start at leaf ``offset``).

    ``offset`` must be a multiple of a power of two at least ``len(leaf_hashes)`` wide for
    the upper levels to line up; the tests use it for whole trees (``offset=0``).
    """
    level_hashes = list(leaf_hashes)
    out: dict[NodeKey, bytes] = {}
    level, base = 0, offset
    while level_hashes:
        for i, h in enumerate(level_hashes):
            out[(level, base + i)] = h
        level_hashes = [
            node_hash(level_hashes[i], level_hashes[i + 1])
            for i in range(0, len(level_hashes) - 1, 2)
        ]
        level += 1
        base >>= 1
    return out


def frontier(size: int) -> list[NodeKey]:
    """The perfect subtrees on the right border of a tree of ``size`` leaves (compact range)."""
    return perfect_nodes(0, size)


def append_nodes(
    size: int, frontier_hashes: Mapping[NodeKey, bytes], new_leaf_hashes: Iterable[bytes]
) -> dict[NodeKey, bytes]:
    """The perfect-subtree hashes completed by appending leaves to a tree of ``size`` leaves.

    ``frontier_hashes`` holds (at least) ``frontier(size)``; the result holds every new node,
    level 0 included. Each appended leaf costs O(log n) hashes and no reads beyond the frontier.
    """
    known: dict[NodeKey, bytes] = {key: frontier_hashes[key] for key in frontier(size)}
    new: dict[NodeKey, bytes] = {}
    index = size
    for h in new_leaf_hashes:
        key: NodeKey = (0, index)
        new[key] = known[key] = h
        level, idx = 0, index
        # a right child completes its parent; climb while that keeps happening
        while idx & 1:
            parent = node_hash(known[(level, idx - 1)], known[(level, idx)])
            level, idx = level + 1, idx >> 1
            new[(level, idx)] = known[(level, idx)] = parent
        index += 1
    return new


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 section 2.1.3.2 steps 1-5)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    _check_hash(leaf, "leaf hash")
    fn, sn = index, size - 1
    r = leaf
    for pos, p in enumerate(proof):
        _check_hash(p, f"inclusion proof element {pos}")
        if sn == 0:
            raise ProofError(
                f"inclusion proof has {len(proof)} elements, too many for tree size {size}"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof has {len(proof)} elements, too few for tree size {size}")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes
) -> None:
    """Raise ``ProofError`` unless ``leaf`` is leaf ``index`` of tree ``(size, expected_root)``."""
    _check_hash(expected_root, "root hash")
    computed = root_from_inclusion_proof(index, size, leaf, proof)
    if computed != expected_root:
        raise ProofError(
            f"inclusion proof of leaf {index} in tree size {size} leads to another root"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ``ProofError`` unless ``(old_size, old_root)`` is a prefix of ``(new_size, new_root)``.

    RFC 9162 section 2.1.4.2; equal sizes need an empty proof and equal roots, and anything is
    consistent with the empty tree (as in transparency-dev/merkle).
    """
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    if not 0 <= old_size <= new_size:
        raise ProofError(f"tree size {old_size} cannot be a prefix of tree size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for tree size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError(f"empty consistency proof from size {old_size} to size {new_size}")
    for pos, p in enumerate(proof):
        _check_hash(p, f"consistency proof element {pos}")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(
                f"consistency proof from size {old_size} to {new_size} has too many elements"
            )
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(
            f"consistency proof from size {old_size} to {new_size} has too few elements"
        )
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the old root of size {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the new root of size {new_size}")


def inclusion_proof(index: int, size: int, hashes: Mapping[NodeKey, bytes]) -> list[bytes]:
    """PATH(index, D[size]) from the hashes of ``inclusion_plan(index, size).node_keys()``."""
    return inclusion_plan(index, size).assemble(hashes)


def consistency_proof(old_size: int, new_size: int, hashes: Mapping[NodeKey, bytes]) -> list[bytes]:
    """PROOF(old_size, D[new_size]) from perfect-subtree hashes."""
    return consistency_plan(old_size, new_size).assemble(hashes)
