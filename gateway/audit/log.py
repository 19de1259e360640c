"""The audit log service over a Store: tree heads, proofs, signed checkpoints, the store check.

Every proof or root is computed from the stored perfect-subtree hashes with O(log n) node
reads (``merkle.Plan``), so it stays cheap at millions of entries. ``verify_store`` is the
opposite: it re-reads everything, recomputes every leaf and node and compares them with what
is stored and with the signed checkpoints, naming the first position that does not hold.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from gateway.audit import merkle
from gateway.audit.checkpoint import (
    CheckpointBody,
    CheckpointError,
    KeptCheckpoint,
    open_checkpoint,
    parse_body,
    sign_checkpoint,
    verify_cosignature,
)
from gateway.audit.events import AuditEvent, EventKind, entry_view
from gateway.clock import Clock, format_rfc3339
from gateway.crashpoints import crash_point
from gateway.crypto.notes import NoteError, NoteSigner, NoteVerifier, parse_note
from gateway.store.base import AuditFilter, AuditIndex, Checkpoint, Cosignature, Store

log = structlog.get_logger(__name__)

#: problems listed in a report beyond this are only counted
MAX_LISTED_PROBLEMS = 100
#: tree levels asked for nodes past the head: seqs stay below 2^62 (the stores' 64-bit seq)
_MAX_LEVEL = 63


class AuditIntegrityError(Exception):
    """The stored log contradicts a checkpoint we signed: no new checkpoint is signed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    #: the first leaf index concerned, when one can be named
    position: int | None
    what: str

    def __str__(self) -> str:
        where = f"entry {self.position}" if self.position is not None else "log"
        return f"{where}: {self.what}"


@dataclass(kw_only=True, slots=True)
class VerifyReport:
    size: int
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    checkpoint_size: int | None = None

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_bad_position(self) -> int | None:
        positions = [p.position for p in self.problems if p.position is not None]
        return min(positions) if positions else None

    def add(self, position: int | None, what: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(Problem(position=position, what=what))


#: the filter columns beside an entry, each with the entry member it copies
_INDEX_MEMBERS = (
    "event",
    "message_id",
    "sender",
    "recipient",
    "message_type",
    "outcome",
    "correlation_id",
)


def _check_index(report: VerifyReport, seq: int, entry: bytes, index: AuditIndex) -> None:
    """The columns the filters read say what the entry says: one changed behind the
    gateway's back would hide the entry from every filtered view (audit query, the console's
    message trail, a case export), though its bytes are intact."""
    view = entry_view(entry)
    if "unreadable" in view:
        return  # changed bytes: the leaf hash check names the entry already
    at = None if index.at is None else format_rfc3339(index.at)
    if at != view.get("at"):
        report.add(seq, "column at differs from the entry's at")
    for name in _INDEX_MEMBERS:
        if getattr(index, name) != view.get(name):
            report.add(seq, f"column {name} differs from the entry's {name}")


@dataclass(frozen=True, kw_only=True, slots=True)
class InclusionProof:
    index: int
    size: int
    leaf_hash: bytes
    hashes: list[bytes]
    root_hash: bytes


class AuditLog:
    def __init__(self, store: Store, *, signer: NoteSigner, clock: Clock) -> None:
        self._store = store
        self._signer = signer
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def origin(self) -> str:
        return self._signer.name

    @property
    def signer(self) -> NoteSigner:
        return self._signer

    @property
    def verifier(self) -> NoteVerifier:
        return self._signer.verifier

    async def _nodes(self, plan: merkle.Plan) -> dict[merkle.NodeKey, bytes]:
        keys = plan.node_keys()
        return await self._store.audit_node_hashes(keys) if keys else {}

    async def _checked_size(self, size: int | None) -> int:
        current = await self._store.audit_size()
        if size is None:
            return current
        if not 0 <= size <= current:
            raise merkle.ProofError(f"tree size {size} is not between 0 and {current}")
        return size

    async def root(self, size: int | None = None) -> tuple[int, bytes]:
        """``(size, root hash)`` of the tree of ``size`` leaves (default: all)."""
        size = await self._checked_size(size)
        plan = merkle.root_plan(size)
        return size, merkle.root_from_nodes(size, await self._nodes(plan))

    async def inclusion_proof(self, index: int, size: int | None = None) -> InclusionProof:
        size = await self._checked_size(size)
        plan = merkle.inclusion_plan(index, size)
        head = merkle.root_plan(size)
        wanted = merkle.Plan(ranges=(*plan.ranges, *head.ranges, (index, index + 1)))
        nodes = await self._nodes(wanted)
        return InclusionProof(
            index=index,
            size=size,
            leaf_hash=merkle.Plan(ranges=((index, index + 1),)).assemble(nodes)[0],
            hashes=plan.assemble(nodes),
            root_hash=merkle.root_from_nodes(size, nodes),
        )

    async def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        new_size = await self._checked_size(new_size)
        plan = merkle.consistency_plan(old_size, new_size)
        return plan.assemble(await self._nodes(plan))

    async def latest_checkpoint(self) -> Checkpoint | None:
        return await self._store.latest_checkpoint()

    async def checkpoint(self, now: datetime | None = None) -> Checkpoint:
        """Sign and save a checkpoint of the current tree (the latest one if nothing changed).

        Refuses (AuditIntegrityError) when the current tree is not an append-only extension of
        the latest signed checkpoint: a log must never sign two inconsistent views.
        """
        async with self._lock:
            at = now if now is not None else self._clock.now()
            size, root = await self.root()
            latest = await self._store.latest_checkpoint()
            if latest is not None:
                if latest.size == size and latest.root_hash == root:
                    return latest
                await self._check_extends(latest, size, root)
            body = CheckpointBody(origin=self.origin, size=size, root_hash=root, signed_at=at)
            signed = sign_checkpoint(body, self._signer)
            crash_point("checkpoint-sign")
            await self._store.save_checkpoint(size, root, signed.note, at)
            log.info("audit.checkpoint_signed", size=size, root=root.hex())
            saved = await self._store.checkpoint_for_size(size)
            if saved is None or saved.root_hash != root:
                raise AuditIntegrityError(f"checkpoint of size {size} was not stored as signed")
            return saved

    async def _check_extends(self, latest: Checkpoint, size: int, root: bytes) -> None:
        if size < latest.size:
            raise AuditIntegrityError(
                f"log has {size} entries but a checkpoint of size {latest.size} was signed: "
                f"entries from {size} are missing"
            )
        if size == latest.size:
            raise AuditIntegrityError(
                f"tree of size {size} no longer has the root of its signed checkpoint"
            )
        proof = await self.consistency_proof(latest.size, size)
        try:
            merkle.verify_consistency(latest.size, size, latest.root_hash, root, proof)
        except merkle.ProofError as exc:
            raise AuditIntegrityError(
                f"tree of size {size} is not consistent with the checkpoint of size "
                f"{latest.size}: {exc}"
            ) from None

    async def check_cosignature(
        self, partner: str, cosigned_note: str, cosigner: NoteVerifier
    ) -> tuple[CheckpointBody, int]:
        """The checkpoint ``cosigned_note`` cosigns and the cosignature's timestamp, once the
        note is known to be one this log signed, cosigned with ``cosigner``; CheckpointError
        saying why not otherwise."""
        try:
            body = parse_body(parse_note(cosigned_note).text)
        except (NoteError, CheckpointError) as exc:
            raise CheckpointError(f"cosigned checkpoint from {partner}: {exc}") from None
        ours = await self._store.checkpoint_for_size(body.size)
        if body.origin != self.origin or ours is None or ours.root_hash != body.root_hash:
            raise CheckpointError(
                f"{partner} cosigned a checkpoint (size {body.size}) this log never signed"
            )
        open_checkpoint(cosigned_note, self.verifier, origin=self.origin)
        return body, verify_cosignature(cosigned_note, cosigner)

    async def accept_cosignature(
        self, partner: str, cosigned_note: str, cosigner: NoteVerifier
    ) -> int:
        """Store a partner's cosignature of one of our checkpoints; returns its timestamp."""
        body, timestamp = await self.check_cosignature(partner, cosigned_note, cosigner)
        at = self._clock.now()
        event = AuditEvent(
            event=EventKind.COSIGNATURE_RECEIVED,
            at=at,
            sender=partner,
            outcome=f"size {body.size}",
        )
        await self._store.save_cosignature(
            partner, body.size, body.root_hash, cosigned_note, at, events=[event]
        )
        return timestamp

    async def verify_store(
        self,
        *,
        trusted: Sequence[KeptCheckpoint] = (),
        batch: int = 4096,
        progress: Callable[[int], object] | None = None,
    ) -> VerifyReport:
        """Recompute the whole log and compare it with the store and the signed checkpoints.

        ``trusted`` are checkpoint notes an auditor kept from earlier (signed by this log);
        each must still be a prefix of the current tree. A caller that reads them from an
        operator's files checks their signatures first: a bad file is the operator's error,
        not a problem of the log.
        """
        size = await self._store.audit_size()
        report = VerifyReport(size=size)
        #: checkpoints the tree must extend (root and consistency proof) and, below, notes
        #: that need only hold their size's root: the tree check covers the stored nodes
        checkpoints: dict[int, list[tuple[str, bytes]]] = {}
        held: dict[int, list[tuple[str, bytes]]] = {}
        latest = await self._store.latest_checkpoint()
        if latest is not None:
            report.checkpoint_size = latest.size
            body = self._stored_note(report, "latest checkpoint", latest.note, latest)
            if body is not None:
                checkpoints.setdefault(body.size, []).append(("signed checkpoint", body.root_hash))
        # every note a partner cosigned is one we signed: it must hold against the tree too,
        # even when the checkpoint rows themselves are gone
        cosigned_sizes: set[int] = set()
        for cosig in await self._store.cosignatures():
            label = f"checkpoint cosigned by {cosig.partner}"
            body = self._stored_note(report, label, cosig.note, cosig)
            if body is not None:
                held.setdefault(body.size, []).append((label, body.root_hash))
            cosigned_sizes.add(cosig.size)
        for cp_size in sorted(cosigned_sizes):
            row = await self._store.checkpoint_for_size(cp_size)
            if row is not None and row != latest:
                label = f"checkpoint of size {cp_size}"
                body = self._stored_note(report, label, row.note, row)
                if body is not None:
                    held.setdefault(body.size, []).append((label, body.root_hash))
        for kept in trusted:
            label = f"trusted checkpoint {kept.label}"
            try:
                body = open_checkpoint(kept.note, self.verifier, origin=self.origin).body
            except CheckpointError as exc:
                report.add(None, f"{label}: {exc}")
                continue
            checkpoints.setdefault(body.size, []).append((label, body.root_hash))
        roots = await self._recompute(report, set(checkpoints) | set(held), batch, progress)
        await self._check_nodes_beyond_head(report)
        for notes in (checkpoints, held):
            for cp_size in sorted(notes):
                for label, root in notes[cp_size]:
                    self._check_root(report, label, cp_size, root, roots)
        await self._check_trusted_consistency(report, checkpoints, roots)
        return report

    async def _check_nodes_beyond_head(self, report: VerifyReport) -> None:
        """Tree nodes over entries at or past the head: what is left when entries were
        deleted and the head set back (the next append would then collide with them).

        Per level, the node over the head's position is asked for: entries appended past
        the head wrote the leaf node at that position and, at each level, that node once
        they completed it. A truncation is found unless every one of these was deleted too
        (listing every node past the head would need a store read of its own). An append
        since the head was read commits its entry with its nodes, so a node with the entry
        at the head's position stored is no truncation (a live gateway appends meanwhile).
        """
        size = report.size
        keys = [(level, size >> level) for level in range(_MAX_LEVEL)]
        if (
            await self._store.audit_node_hashes(keys)
            and await self._store.audit_entry(size) is None
        ):
            report.add(
                size,
                f"the log holds tree nodes for entries beyond its head {size}: "
                "entries were removed",
            )

    def _stored_note(
        self, report: VerifyReport, label: str, note: str, row: Checkpoint | Cosignature
    ) -> CheckpointBody | None:
        """The body of a stored note of ours; its row's size and root are not signed, so a row
        that says otherwise than its note is a problem too."""
        try:
            body = open_checkpoint(note, self.verifier, origin=self.origin).body
        except CheckpointError as exc:
            report.add(None, f"{label} (size {row.size}): {exc}")
            return None
        if body.size != row.size:
            report.add(
                None, f"{label}: its row says size {row.size} but its note is of size {body.size}"
            )
        elif body.root_hash != row.root_hash:
            report.add(None, f"{label}: its row's root differs from its note's")
        return body

    def _check_root(
        self,
        report: VerifyReport,
        label: str,
        cp_size: int,
        root: bytes,
        roots: dict[int, bytes],
    ) -> None:
        if cp_size > report.checked:
            report.add(
                report.checked,
                f"{label} covers {cp_size} entries but only {report.checked} are stored "
                f"(log truncated from entry {report.checked})",
            )
        elif cp_size in roots and roots[cp_size] != root:
            report.add(
                report.first_bad_position,
                f"recomputed root of the first {cp_size} entries differs from the {label}",
            )

    async def _check_trusted_consistency(
        self,
        report: VerifyReport,
        checkpoints: dict[int, list[tuple[str, bytes]]],
        roots: dict[int, bytes],
    ) -> None:
        if size_root := roots.get(report.size):
            for cp_size in sorted(checkpoints):
                if cp_size > report.size:
                    continue
                for label, root in checkpoints[cp_size]:
                    try:
                        proof = await self.consistency_proof(cp_size, report.size)
                        merkle.verify_consistency(cp_size, report.size, root, size_root, proof)
                    except merkle.ProofError as exc:
                        report.add(
                            report.first_bad_position,
                            f"consistency proof from the {label} (size {cp_size}) fails: {exc}",
                        )

    async def _recompute(
        self,
        report: VerifyReport,
        sizes_of_interest: set[int],
        batch: int,
        progress: Callable[[int], object] | None,
    ) -> dict[int, bytes]:
        """Stream every entry; return recomputed roots for the sizes asked (and the full size)."""
        wanted = sizes_of_interest | {report.size}
        roots: dict[int, bytes] = {}
        if 0 in wanted:
            roots[0] = merkle.EMPTY_ROOT
        frontier: dict[merkle.NodeKey, bytes] = {}
        #: sorted first positions of reported problems in the tree
        flagged: list[int] = []
        count = 0
        tree_ok = True
        after = -1
        while True:
            rows = await self._store.audit_entries(
                AuditFilter(), after_seq=after, limit=batch, with_index=True
            )
            if not rows:
                break
            leaf_hashes: list[bytes] = []
            for row in rows:
                if row.seq != count and tree_ok:
                    report.add(count, f"entry is missing (the next stored entry is {row.seq})")
                    tree_ok = False
                computed = merkle.leaf_hash(row.entry)
                if computed != row.leaf_hash:
                    report.add(row.seq, "entry bytes do not match the stored leaf hash")
                if row.index is not None:
                    _check_index(report, row.seq, row.entry, row.index)
                leaf_hashes.append(computed)
                count += 1
            if tree_ok:
                frontier = await self._compare_nodes(
                    report, count - len(rows), frontier, leaf_hashes, wanted, roots, flagged
                )
            after = rows[-1].seq
            if progress is not None:
                progress(len(rows))
        report.checked = count
        if count < report.size:
            report.add(count, f"log head says {report.size} entries but {count} are stored")
        elif count > report.size:
            report.add(report.size, f"{count - report.size} entries stored beyond the log head")
        return roots

    async def _compare_nodes(
        self,
        report: VerifyReport,
        start: int,
        frontier: dict[merkle.NodeKey, bytes],
        leaf_hashes: list[bytes],
        wanted: set[int],
        roots: dict[int, bytes],
        flagged: list[int],
    ) -> dict[merkle.NodeKey, bytes]:
        computed = merkle.append_nodes(start, frontier, leaf_hashes)
        stored = await self._store.audit_node_hashes(list(computed))
        for (level, idx), value in sorted(computed.items()):
            if stored.get((level, idx)) == value:
                continue
            first, end = idx << level, (idx + 1) << level
            # a node is reported only when no entry below it already was
            below = bisect.bisect_left(flagged, first)
            if below < len(flagged) and flagged[below] < end:
                continue
            bisect.insort(flagged, first)
            what = (
                "leaf hash differs from the one stored in the tree"
                if level == 0
                else f"stored tree node over entries [{first}, {end}) "
                "differs from the recomputed one"
            )
            report.add(first, what)
        known = {**frontier, **computed}
        end = start + len(leaf_hashes)
        for size in sorted(s for s in wanted if start < s <= end):
            roots[size] = merkle.root_from_nodes(
                size, {k: known[k] for k in merkle.frontier(size) if k in known}
            )
        return {key: known[key] for key in merkle.frontier(end)}
