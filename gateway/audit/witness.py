"""Witnessing a partner's log: cosign only append-only growth of what we saw before (T76/T78).

For each origin we keep the last checkpoint we verified (``store.get_witnessed``). A new
checkpoint is cosigned when it is the same tree, or a larger one with a valid consistency
proof from our size. A second root for a size we saw, or a failing proof, is proof that the
partner rewrote its history: both signed notes go into our own audit log as evidence, an
alert is logged, and ``HistoryRewritten`` is raised. A smaller checkpoint, or a proof from a
size other than ours, is only stale (``StaleCheckpoint``): the partner retries from our size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from gateway.audit import merkle
from gateway.audit.checkpoint import cosign, open_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import Clock
from gateway.crypto.notes import NoteSigner, NoteVerifier
from gateway.store.base import Store, WitnessedState

log = structlog.get_logger(__name__)


class HistoryRewritten(Exception):
    """The partner's log contradicts a checkpoint of it we verified before."""

    def __init__(self, origin: str, reason: str, *, previous_note: str, new_note: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason
        self.previous_note = previous_note
        self.new_note = new_note


class StaleCheckpoint(Exception):
    """Not cosigned: the checkpoint is older than, or not proven from, the size we witnessed."""

    def __init__(self, origin: str, witnessed_size: int, reason: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.witnessed_size = witnessed_size
        self.reason = reason


@dataclass(frozen=True, kw_only=True, slots=True)
class Witnessed:
    origin: str
    size: int
    root_hash: bytes
    #: the partner's checkpoint note with our cosignature line appended
    cosigned_note: str


class Witness:
    def __init__(self, store: Store, *, cosigner: NoteSigner, clock: Clock) -> None:
        self._store = store
        self._cosigner = cosigner
        self._clock = clock

    async def witness(
        self,
        checkpoint_note: str,
        partner_key: NoteVerifier,
        origin: str,
        *,
        old_size: int = 0,
        consistency_proof: Sequence[bytes] = (),
        partner: str | None = None,
    ) -> Witnessed:
        """Verify ``checkpoint_note`` of log ``origin`` and cosign it, or raise.

        ``consistency_proof`` proves the new tree extends the one of ``old_size`` leaves; it
        is checked against the root we witnessed for that size. CheckpointError if the note
        is not from ``origin`` or not signed by ``partner_key``.
        """
        body = open_checkpoint(checkpoint_note, partner_key, origin=origin).body
        seen = await self._store.get_witnessed(origin)
        if seen is not None:
            await self._check_against(
                seen,
                body.size,
                body.root_hash,
                checkpoint_note,
                origin,
                old_size,
                consistency_proof,
                partner,
            )
        now = self._clock.now()
        cosigned = cosign(checkpoint_note, self._cosigner, timestamp=int(now.timestamp()))
        event = AuditEvent(
            event=EventKind.CHECKPOINT_WITNESSED,
            at=now,
            sender=partner,
            outcome=f"cosigned size {body.size}",
        )
        await self._store.set_witnessed(
            origin, body.size, body.root_hash, checkpoint_note, events=[event]
        )
        return Witnessed(
            origin=origin, size=body.size, root_hash=body.root_hash, cosigned_note=cosigned
        )

    async def _check_against(
        self,
        seen: WitnessedState,
        size: int,
        root: bytes,
        note: str,
        origin: str,
        old_size: int,
        proof: Sequence[bytes],
        partner: str | None,
    ) -> None:
        if size == seen.size:
            if root != seen.root_hash:
                await self._rewritten(
                    origin, f"second root for tree size {size}", seen, note, partner
                )
            return
        if size < seen.size:
            raise StaleCheckpoint(
                origin,
                seen.size,
                f"checkpoint of size {size} is older than the witnessed size {seen.size}",
            )
        if old_size != seen.size:
            raise StaleCheckpoint(
                origin,
                seen.size,
                f"consistency proof is from size {old_size}, the witnessed size is {seen.size}",
            )
        try:
            merkle.verify_consistency(seen.size, size, seen.root_hash, root, proof)
        except merkle.ProofError as exc:
            await self._rewritten(
                origin,
                f"tree of size {size} is not consistent with the witnessed size {seen.size}: {exc}",
                seen,
                note,
                partner,
            )

    async def _rewritten(
        self, origin: str, reason: str, seen: WitnessedState, note: str, partner: str | None
    ) -> None:
        # both signed notes go into our tamper-evident log: the evidence outlives this call
        event = AuditEvent(
            event=EventKind.HISTORY_INCONSISTENT,
            at=self._clock.now(),
            sender=partner,
            outcome="refused",
            reason=f"{origin}: {reason}; previous checkpoint:\n{seen.note}new checkpoint:\n{note}",
        )
        await self._store.append_audit([event])
        log.error("audit.history_rewritten", origin=origin, partner=partner, reason=reason)
        raise HistoryRewritten(origin, reason, previous_note=seen.note, new_note=note)
