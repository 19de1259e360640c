"""Mutual witnessing between administrations: checkpoints and cosignatures over the exchange.

Each gateway sends its latest signed checkpoint to every partner configured with an
``[audit]`` key as an ``audit.checkpoint`` message through the normal outbox (every
``audit.checkpoint_interval_s`` when entries other than this exchange's own were logged, and
on demand), with the consistency proof from the size that partner last cosigned. The
partner's gateway verifies it with ``Witness`` and answers ``audit.cosignature``
(``in_reply_to`` the checkpoint): cosigned, stale (with the size it witnessed, so we prove
from there), or inconsistent (history rewritten: its alert).
A cosignature we receive is taken only as the answer to a checkpoint we offered that partner
(``in_reply_to`` and the echoed origin/size/root), verified with the partner's key and stored
(``AuditLog.accept_cosignature``), so auditors and export bundles show it.

A partner's witnessing message that cannot be taken (a checkpoint not signed by its
configured audit key, a cosignature by another key, an answer to no checkpoint we offered) is
refused before the inbox commit (``check_inbound``, an inbound stage): the partner gets a
NACK naming what is wrong. ``handle`` checks again after the commit, where a message that
passed may still be refused (its checkpoint purged meanwhile): that message was ACKed, and the
refusal is an audit entry (outcome ``refused``).

Inbound messages reach this module through the internal bus after the inbox commit; handling
runs in its own task, so a slow or failing witness never holds up or breaks the relay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog

from gateway.adapters.registry import adapter_for, to_canonical_off_loop
from gateway.audit.checkpoint import CheckpointError, open_checkpoint, parse_body
from gateway.audit.events import AuditEvent, EventKind, entry_view, record_or_log
from gateway.audit.log import AuditIntegrityError, AuditLog
from gateway.audit.merkle import HASH_SIZE
from gateway.audit.witness import HistoryRewritten, StaleCheckpoint, Witness
from gateway.clock import Clock, SystemClock
from gateway.config import GatewayConfig, PartnerConfig
from gateway.crypto.keys import SigningKey
from gateway.crypto.notes import NoteError, NoteVerifier, load_note_signer, load_note_verifier
from gateway.crypto.notes import parse_note as parse_signed_note
from gateway.errors import GatewayError, Malformed, SchemaInvalid
from gateway.metrics import Metrics
from gateway.model import CHECKPOINT_TYPE, COSIGNATURE_TYPE, WITNESSING_TYPES, Envelope
from gateway.outbound.submission import Submission, SubmissionServices, submit
from gateway.runtime import Gateway, load_own_signing_keys
from gateway.schemas.failures import REASON_MAX, clip
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import (
    ACTIVE_STATES,
    AuditFilter,
    InboundRecord,
    OutboundRecord,
    Store,
)

log = structlog.get_logger(__name__)

#: the actor recorded on the outbox rows this module submits
ACTOR = "gateway:witnessing"
_DETAIL_MAX = 512
#: inbound messages remembered as handled, so a relay re-delivery is not answered twice
_HANDLED_MEMORY = 4096
#: entries read per page when looking for growth other than witnessing's own
_SCAN_PAGE = 256

Status = Literal["cosigned", "stale", "inconsistent"]


class PayloadError(ValueError):
    """A witnessing payload that passed its schema but does not hold together.

    ``str()`` is the exact reason (audit log, operator). The partner is told ``what``, at
    ``pointer`` into the payload (``SCHEMA_INVALID``), or, with ``pointer`` None, about its
    ``in_reply_to`` (``MALFORMED``, as an answer to the wrong kind of request is)."""

    def __init__(self, reason: str, *, pointer: str | None, what: str) -> None:
        super().__init__(reason)
        self.pointer = pointer
        self.what = what

    def refusal(self) -> GatewayError:
        if self.pointer is None:
            return Malformed(str(self), detail=self.what)
        detail = clip(f"schema error at /payload{self.pointer}: {self.what}", REASON_MAX)
        return SchemaInvalid(str(self), pointer=self.pointer, detail=detail)


#: what a partner is told of an answer that names no checkpoint we offered it
_NOT_OUR_OFFER = "in_reply_to names no audit.checkpoint sent to this sender"


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _hash(text: str, where: str) -> bytes:
    try:
        value = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise PayloadError(f"{where}: not base64", pointer=where, what="not base64") from None
    if len(value) != HASH_SIZE:
        what = f"not a {HASH_SIZE}-byte hash"
        raise PayloadError(f"{where}: {what}", pointer=where, what=what)
    return value


# ----------------------------------------------------------------------------- payloads


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointOffer:
    """An ``audit.checkpoint`` payload."""

    note: str
    old_size: int
    consistency_proof: tuple[bytes, ...]

    def payload(self) -> dict[str, Any]:
        return {
            "checkpoint": self.note,
            "old_size": self.old_size,
            "consistency_proof": [_b64(h) for h in self.consistency_proof],
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CheckpointOffer:
        proof = tuple(
            _hash(item, f"/consistency_proof/{index}")
            for index, item in enumerate(payload["consistency_proof"])
        )
        return cls(
            note=payload["checkpoint"], old_size=payload["old_size"], consistency_proof=proof
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CosignatureAnswer:
    """An ``audit.cosignature`` payload: the witness's verdict on one checkpoint."""

    status: Status
    origin: str
    size: int
    root_hash: bytes
    #: the checkpoint note with the witness's cosignature appended (status cosigned only)
    cosignature: str | None = None
    witnessed_size: int | None = None
    detail: str | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "origin": self.origin,
            "size": self.size,
            "root_hash": _b64(self.root_hash),
        }
        if self.cosignature is not None:
            out["cosignature"] = self.cosignature
        if self.witnessed_size is not None:
            out["witnessed_size"] = self.witnessed_size
        if self.detail is not None:
            out["detail"] = self.detail[:_DETAIL_MAX]
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CosignatureAnswer:
        answer = cls(
            status=payload["status"],
            origin=payload["origin"],
            size=payload["size"],
            root_hash=_hash(payload["root_hash"], "/root_hash"),
            cosignature=payload.get("cosignature"),
            witnessed_size=payload.get("witnessed_size"),
            detail=payload.get("detail"),
        )
        if answer.cosignature is not None:
            try:
                body = parse_body(parse_signed_note(answer.cosignature).text)
            except (NoteError, CheckpointError) as exc:
                raise PayloadError(
                    f"/cosignature: {exc}", pointer="/cosignature", what="not a checkpoint note"
                ) from None
            if (body.origin, body.size, body.root_hash) != (
                answer.origin,
                answer.size,
                answer.root_hash,
            ):
                what = "names another checkpoint than origin, size and root_hash"
                raise PayloadError(f"/cosignature: {what}", pointer="/cosignature", what=what)
        return answer


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerKeys:
    """A partner's audit log as configured: its checkpoint key and its cosignature key."""

    partner: str
    origin: str
    log_key: NoteVerifier
    cosigner_key: NoteVerifier

    @classmethod
    def load(cls, partner: PartnerConfig) -> PeerKeys:
        assert partner.audit is not None
        path, origin = partner.audit.public_key, partner.audit.origin
        return cls(
            partner=partner.id,
            origin=origin,
            log_key=load_note_verifier(path, origin),
            cosigner_key=load_note_verifier(path, origin, cosignature=True),
        )


async def answer_checkpoint(
    witness: Witness, offer: CheckpointOffer, peer: PeerKeys
) -> CosignatureAnswer:
    """Witness ``offer`` from ``peer``: cosign it, or say why not.

    CheckpointError when the note is not ``peer``'s log (origin) or not signed by its key:
    nothing can be said about a log we cannot authenticate.
    """
    body = open_checkpoint(offer.note, peer.log_key, origin=peer.origin).body
    status: Status = "cosigned"
    cosigned_note: str | None = None
    detail: str | None = None
    try:
        witnessed = await witness.witness(
            offer.note,
            peer.log_key,
            peer.origin,
            old_size=offer.old_size,
            consistency_proof=offer.consistency_proof,
            partner=peer.partner,
        )
    except StaleCheckpoint as exc:
        status, witnessed_size, detail = "stale", exc.witnessed_size, exc.reason
    except HistoryRewritten as exc:
        previous = parse_body(parse_signed_note(exc.previous_note).text)
        status, witnessed_size, detail = "inconsistent", previous.size, exc.reason
    else:
        cosigned_note, witnessed_size = witnessed.cosigned_note, witnessed.size
    return CosignatureAnswer(
        status=status,
        origin=body.origin,
        size=body.size,
        root_hash=body.root_hash,
        cosignature=cosigned_note,
        witnessed_size=witnessed_size,
        detail=detail,
    )


#: entries only witnessing writes; a ``history_inconsistent`` alert is not among them
_WITNESSING_EVENTS = frozenset({EventKind.CHECKPOINT_WITNESSED, EventKind.COSIGNATURE_RECEIVED})
#: the ordinary life of a checkpoint or cosignature message, ours or the partner's; a refusal,
#: a poison message, a failed attempt or a dead message (which a partner, or a forger, can
#: cause) is not the exchange's own: it is for the witnesses to see
_EXCHANGE_LIFE = frozenset(
    {
        EventKind.SUBMITTED,
        EventKind.SENT,
        EventKind.RECEIPT_RECEIVED,
        EventKind.ACKNOWLEDGED,
        EventKind.ACCEPTED,
        EventKind.DUPLICATE,
        EventKind.DELIVERED,
    }
)


def is_witnessing_entry(entry: bytes) -> bool:
    """Whether an audit entry records witnessing's own exchange: the ordinary life of an
    ``audit.checkpoint`` or ``audit.cosignature`` message, a checkpoint witnessed, a
    cosignature received (or a partner's witnessing message refused: in the next checkpoint,
    but not calling for one, or a partner answering with a wrong key would be offered one
    every interval). Other refusals and unreadable bytes are not: they are for the witnesses
    to see."""
    view = entry_view(entry)
    event = view.get("event")
    if event in _WITNESSING_EVENTS:
        return True
    return event in _EXCHANGE_LIFE and view.get("message_type") in WITNESSING_TYPES


def _payload_of(record: InboundRecord, partner: PartnerConfig) -> Mapping[str, Any]:
    """The payload of an accepted (so already verified and schema-valid) inbound message."""
    if record.body is None:
        raise PayloadError("body already purged by retention", pointer="", what="purged")
    envelope = orjson.loads(adapter_for(partner).to_canonical(record.body))
    payload: Mapping[str, Any] = envelope["payload"]
    return payload


def _authentic(offer: CheckpointOffer, peer: PeerKeys) -> None:
    """PayloadError unless ``offer``'s note is a checkpoint of ``peer``'s log signed with its
    audit key: nothing can be said about a log we cannot authenticate."""
    try:
        open_checkpoint(offer.note, peer.log_key, origin=peer.origin)
    except CheckpointError as exc:
        raise PayloadError(
            f"/checkpoint: {exc}",
            pointer="/checkpoint",
            what="not a checkpoint of the sender's log signed with its audit key",
        ) from None


# ----------------------------------------------------------------------------- service


class WitnessingService:
    """Sends our checkpoints to partners and answers theirs; a gateway service.

    ``send_checkpoints`` also serves ``c2c-gateway audit checkpoint --send`` (no running
    gateway: the rows go into the outbox and the serving gateway's dispatcher sends them).
    """

    def __init__(
        self,
        *,
        config: GatewayConfig,
        store: Store,
        clock: Clock,
        registry: SchemaRegistry,
        signing_keys: Sequence[SigningKey],
        metrics: Metrics | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.wake = wake
        origin = config.audit.origin
        self.audit = AuditLog(store, signer=load_note_signer(config.audit.key, origin), clock=clock)
        self.witness = Witness(
            store,
            cosigner=load_note_signer(config.audit.key, origin, cosignature=True),
            clock=clock,
        )
        self.peers: dict[str, PeerKeys] = {
            pid: PeerKeys.load(partner)
            for pid, partner in config.partners.items()
            if partner.audit is not None
        }
        self._submission = SubmissionServices(
            config=config, registry=registry, signing_keys=signing_keys, store=store, clock=clock
        )
        #: per partner: the largest size it cosigned (loaded from the store once)
        self._cosigned: dict[str, int] | None = None
        #: per partner: our last checkpoint message to it and the size it offered
        self._last_sent: dict[str, tuple[str, int]] = {}
        #: per partner: the witnessed size we last re-proved from after a stale answer
        self._reproved: dict[str, int] = {}
        self._handled: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        self._stop.clear()
        self._loop_task = asyncio.create_task(self._run(), name="audit-witnessing")

    async def stop(self) -> None:
        self._stop.set()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            await task
        for pending in list(self._tasks):
            pending.cancel()
        for pending in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await pending

    async def _run(self) -> None:
        interval = self._config.audit.checkpoint_interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            if self._stop.is_set():
                return
            try:
                await self.send_checkpoints()
            except GatewayError as exc:
                log.warning("audit.checkpoint_round_failed", code=exc.code.value, reason=exc.reason)

    # -- sending our checkpoints

    async def _last_cosigned(self, partner: str) -> int:
        if self._cosigned is None:
            cosigned: dict[str, int] = {}
            for row in await self._store.cosignatures():
                cosigned[row.partner] = max(cosigned.get(row.partner, 0), row.size)
            self._cosigned = cosigned
        return self._cosigned.get(partner, 0)

    async def send_checkpoints(self, *, force: bool = False) -> list[OutboundRecord]:
        """Sign a checkpoint of the current tree and offer it to every witnessing partner.

        Without ``force``, a partner is skipped while our previous checkpoint to it is still
        being delivered, or when nothing but witnessing's own exchange was logged since the
        size it last saw or cosigned; when every partner is skipped, nothing is signed either,
        so the latest checkpoint stays the cosigned one rather than one over that exchange.
        """
        size = await self._store.audit_size()
        due = [p for p in sorted(self.peers) if force or await self._due(p, size)]
        if self.peers and not due:
            return []
        try:
            checkpoint = await self.audit.checkpoint()
        except AuditIntegrityError as exc:
            log.error("audit.checkpoint_refused", reason=str(exc))
            return []
        sent = []
        for partner in due:
            record = await self._offer(partner, checkpoint.note, checkpoint.size, None)
            if record is not None:
                sent.append(record)
        if sent and self.wake is not None:
            self.wake()
        return sent

    async def _due(self, partner: str, size: int) -> bool:
        last = self._last_sent.get(partner)
        if last is not None:
            record = await self._store.get_outbound(last[0])
            if record is not None and record.state in ACTIVE_STATES:
                return False
        seen = max(last[1] if last is not None else 0, await self._last_cosigned(partner))
        return await self._other_entries_between(seen, size)

    async def _other_entries_between(self, start: int, end: int) -> bool:
        """Whether entries ``[start, end)`` hold one that witnessing's own exchange did not
        write. The exchange of a checkpoint writes entries after it on both sides; counting
        them as growth would make every round call for the next, forever, on idle logs."""
        after = start - 1
        while after + 1 < end:
            rows = await self._store.audit_entries(AuditFilter(), after_seq=after, limit=_SCAN_PAGE)
            for row in rows:
                if row.seq >= end:
                    return False
                if not is_witnessing_entry(row.entry):
                    return True
            if not rows:
                return False
            after = rows[-1].seq
        return False

    async def _offer(
        self, partner: str, note: str, size: int, old_size: int | None
    ) -> OutboundRecord | None:
        """Queue ``note`` for ``partner`` with the proof from ``old_size`` (default: the size
        it last cosigned)."""
        if old_size is None:
            old_size = await self._last_cosigned(partner)
        if old_size > size:
            # The partner cosigned a larger tree than the one we now sign: our log lost
            # entries. Offer it without a proof; the partner's witness will say so.
            log.error(
                "audit.log_shorter_than_cosigned", partner=partner, size=size, cosigned=old_size
            )
            old_size = 0
        proof = await self.audit.consistency_proof(old_size, size) if 0 < old_size < size else []
        offer = CheckpointOffer(note=note, old_size=old_size, consistency_proof=tuple(proof))
        try:
            record = await submit(
                self._submission,
                Submission(
                    recipient=partner,
                    message_type=CHECKPOINT_TYPE,
                    payload=offer.payload(),
                    actor=ACTOR,
                    by_gateway=True,
                    # A checkpoint older than the partner's replay window is refused as
                    # STALE anyway; a newer one replaces it.
                    ttl_s=self._config.limits.replay_window_s,
                ),
            )
        except GatewayError as exc:
            log.warning(
                "audit.checkpoint_not_sent", partner=partner, code=exc.code.value, reason=exc.reason
            )
            return None
        self._last_sent[partner] = (record.message_id, size)
        log.info("audit.checkpoint_offered", partner=partner, size=size, old_size=old_size)
        return record

    # -- inbound: partners' checkpoints and cosignatures

    async def on_inbound(self, record: InboundRecord) -> None:
        """Bus subscriber: hand witnessing messages to a task of their own and return."""
        if record.message_type not in WITNESSING_TYPES:
            return
        if record.key in self._handled:
            return
        self._handled[record.key] = None
        while len(self._handled) > _HANDLED_MEMORY:
            self._handled.popitem(last=False)
        task = asyncio.create_task(self.handle(record), name=f"witnessing-{record.message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_inbound(self, sender: str, envelope: Envelope) -> None:
        """Inbound stage, before the commit: refuse (SchemaInvalid or Malformed, saying what
        is wrong) a witnessing message that ``handle`` would refuse after it, so the partner
        gets a NACK instead of an ACK and silence. The witness's verdict on an authentic
        checkpoint (cosigned, stale, inconsistent) is an answer, not a refusal: it is made
        after the commit, from the witnessed state."""
        partner = self._config.partners.get(sender)
        peer = self.peers.get(sender)
        if partner is None or peer is None:
            return  # not a witnessing partner: ``handle`` logs it
        try:
            if envelope.header.message_type == CHECKPOINT_TYPE:
                _authentic(CheckpointOffer.from_payload(envelope.payload), peer)
            else:
                answer = CosignatureAnswer.from_payload(envelope.payload)
                await self._check_answer(envelope.header.in_reply_to, partner, peer, answer)
        except PayloadError as exc:
            raise exc.refusal() from None

    async def handle(self, record: InboundRecord) -> None:
        """Handle one accepted witnessing message; every failure is logged, none raised."""
        partner = self._config.partners.get(record.sender)
        peer = self.peers.get(record.sender)
        if partner is None or peer is None:
            log.warning(
                "audit.witnessing_not_configured",
                partner=record.sender,
                message_id=record.message_id,
                message_type=record.message_type,
            )
            return
        try:
            payload = _payload_of(record, partner)
            if record.message_type == CHECKPOINT_TYPE:
                await self._witness(record, peer, CheckpointOffer.from_payload(payload))
            else:
                await self._cosigned_by(record, peer, CosignatureAnswer.from_payload(payload))
        except (PayloadError, CheckpointError) as exc:
            log.error(
                "audit.witnessing_message_refused",
                partner=record.sender,
                message_id=record.message_id,
                message_type=record.message_type,
                reason=str(exc),
            )
            await self._refused(record, str(exc))
        except GatewayError as exc:
            log.warning(
                "audit.witnessing_failed",
                partner=record.sender,
                message_id=record.message_id,
                code=exc.code.value,
                reason=exc.reason,
            )
        except Exception:
            log.exception(
                "audit.witnessing_bug", partner=record.sender, message_id=record.message_id
            )

    async def _witness(self, record: InboundRecord, peer: PeerKeys, offer: CheckpointOffer) -> None:
        answer = await answer_checkpoint(self.witness, offer, peer)
        if self._metrics is not None:
            self._metrics.audit_witnessed.labels(peer.partner, answer.status).inc()
            if answer.status == "inconsistent":
                self._metrics.audit_history_inconsistent.labels(peer.partner, "partner").inc()
        log.info(
            "audit.checkpoint_witnessed",
            partner=peer.partner,
            size=answer.size,
            status=answer.status,
        )
        await submit(
            self._submission,
            Submission(
                recipient=peer.partner,
                message_type=COSIGNATURE_TYPE,
                payload=answer.payload(),
                actor=ACTOR,
                by_gateway=True,
                in_reply_to=record.message_id,
                correlation_id=record.correlation_id,
                ttl_s=self._config.limits.replay_window_s,
            ),
        )
        if self.wake is not None:
            self.wake()

    async def _refused(self, record: InboundRecord, reason: str) -> None:
        """Audit a partner's witnessing message we refused after it was accepted (and ACKed):
        the receipt said nothing of it, so the log is where a failing witness shows."""
        kind = (
            EventKind.CHECKPOINT_WITNESSED
            if record.message_type == CHECKPOINT_TYPE
            else EventKind.COSIGNATURE_RECEIVED
        )
        event = AuditEvent(
            event=kind,
            at=self._clock.now(),
            message_id=record.message_id,
            sender=record.sender,
            message_type=record.message_type,
            correlation_id=record.correlation_id,
            outcome="refused",
            reason=reason,
        )
        await record_or_log(lambda e: self._store.append_audit([e]), event)

    async def _check_offered(
        self, asked_id: str | None, partner: PartnerConfig, answer: CosignatureAnswer
    ) -> None:
        """PayloadError unless the answer (``in_reply_to`` ``asked_id``) answers an
        ``audit.checkpoint`` we sent ``partner`` and echoes the checkpoint that message
        offered: an answer to anything else says nothing about our log (no alarm, no new
        offer). The partner is not told which of these it is: whether an id is one of ours,
        sent to another partner, is not its business."""
        if asked_id is None:  # the schema requires it
            raise PayloadError(
                "no in_reply_to: answers none of our audit.checkpoint messages",
                pointer=None,
                what=_NOT_OUR_OFFER,
            )
        asked = await self._store.get_outbound(asked_id)
        if asked is None:
            raise PayloadError(
                f"in_reply_to {asked_id} names no message of ours",
                pointer=None,
                what=_NOT_OUR_OFFER,
            )
        if asked.recipient != partner.id or asked.message_type != CHECKPOINT_TYPE:
            raise PayloadError(
                f"in_reply_to {asked_id} names our {asked.message_type} to {asked.recipient},"
                f" not an {CHECKPOINT_TYPE} to {partner.id}",
                pointer=None,
                what=_NOT_OUR_OFFER,
            )
        if asked.body is None:
            raise PayloadError(
                f"the {CHECKPOINT_TYPE} {asked_id} it answers was purged by retention:"
                " nothing to hold the answer against",
                pointer=None,
                what=f"the {CHECKPOINT_TYPE} named in in_reply_to is no longer kept",
            )
        try:
            canonical = await to_canonical_off_loop(adapter_for(partner), asked.body)
            envelope = orjson.loads(canonical)
            offered = parse_body(parse_signed_note(envelope["payload"]["checkpoint"]).text)
        except (GatewayError, ValueError, LookupError, TypeError, NoteError, CheckpointError):
            raise PayloadError(
                f"our {CHECKPOINT_TYPE} {asked_id} no longer reads: nothing to hold the answer"
                " against",
                pointer=None,
                what=f"the {CHECKPOINT_TYPE} named in in_reply_to can no longer be read",
            ) from None
        if (answer.origin, answer.size, answer.root_hash) != (
            offered.origin,
            offered.size,
            offered.root_hash,
        ):
            raise PayloadError(
                f"answers a checkpoint ({answer.origin} size {answer.size} root"
                f" {_b64(answer.root_hash)}) other than the one our {CHECKPOINT_TYPE}"
                f" {asked_id} offered ({offered.origin} size {offered.size} root"
                f" {_b64(offered.root_hash)})",
                pointer="",
                what=f"does not echo the checkpoint of the {CHECKPOINT_TYPE} named in in_reply_to",
            )

    async def _check_answer(
        self,
        asked_id: str | None,
        partner: PartnerConfig,
        peer: PeerKeys,
        answer: CosignatureAnswer,
    ) -> None:
        """PayloadError unless ``answer`` can be taken: it answers a checkpoint of ours we
        offered ``partner`` and, when cosigned, its cosignature verifies with its key."""
        if answer.origin != self.audit.origin:
            raise PayloadError(
                f"answers a checkpoint of {answer.origin!r}, not of our log",
                pointer="/origin",
                what="names another log than the recipient's",
            )
        await self._check_offered(asked_id, partner, answer)
        if answer.status != "cosigned":
            return
        assert answer.cosignature is not None  # the schema requires it
        try:
            await self.audit.check_cosignature(peer.partner, answer.cosignature, peer.cosigner_key)
        except CheckpointError as exc:
            raise PayloadError(
                str(exc),
                pointer="/cosignature",
                what="not the recipient's checkpoint cosigned with the sender's audit key",
            ) from None

    async def _cosigned_by(
        self, record: InboundRecord, peer: PeerKeys, answer: CosignatureAnswer
    ) -> None:
        partner = self._config.partners[peer.partner]
        await self._check_answer(record.in_reply_to, partner, peer, answer)
        if answer.status == "cosigned":
            assert answer.cosignature is not None
            await self.audit.accept_cosignature(peer.partner, answer.cosignature, peer.cosigner_key)
            if self._cosigned is not None:
                self._cosigned[peer.partner] = max(self._cosigned.get(peer.partner, 0), answer.size)
            if self._metrics is not None:
                self._metrics.audit_cosignatures.labels(peer.partner).inc()
            log.info("audit.cosignature_stored", partner=peer.partner, size=answer.size)
        elif answer.status == "stale":
            await self._reprove(peer.partner, answer)
        else:
            await self._reported_inconsistent(record, peer.partner, answer)

    async def _reprove(self, partner: str, answer: CosignatureAnswer) -> None:
        """Offer our latest checkpoint again, proven from the size the partner witnessed."""
        witnessed = answer.witnessed_size
        assert witnessed is not None
        latest = await self.audit.latest_checkpoint()
        if latest is None or witnessed > latest.size:
            await self._reported_inconsistent(None, partner, answer)
            return
        if self._reproved.get(partner) == witnessed:
            log.warning("audit.checkpoint_still_stale", partner=partner, witnessed=witnessed)
            return
        self._reproved[partner] = witnessed
        offered = await self._offer(partner, latest.note, latest.size, witnessed)
        if offered is not None and self.wake is not None:
            self.wake()

    async def _reported_inconsistent(
        self, record: InboundRecord | None, partner: str, answer: CosignatureAnswer
    ) -> None:
        """A partner says our log contradicts what it witnessed: the alert on our side."""
        reason = (
            f"{partner} refuses to cosign our checkpoint of size {answer.size} "
            f"(it witnessed size {answer.witnessed_size}): {answer.detail or answer.status}"
        )
        await self._store.append_audit(
            [
                AuditEvent(
                    event=EventKind.HISTORY_INCONSISTENT,
                    at=self._clock.now(),
                    message_id=record.message_id if record is not None else None,
                    sender=partner,
                    message_type=COSIGNATURE_TYPE,
                    outcome="reported by partner",
                    reason=reason,
                )
            ]
        )
        if self._metrics is not None:
            self._metrics.audit_history_inconsistent.labels(partner, "ours").inc()
        log.error("audit.history_inconsistent_reported", partner=partner, reason=reason)

    async def idle(self) -> None:
        """Wait until no inbound witnessing message is being handled (tests, demo)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def offer_checkpoints(config: GatewayConfig, store: Store) -> list[OutboundRecord]:
    """``audit checkpoint --send``: sign a checkpoint and queue it for every witnessing
    partner in the (open) store; the serving gateway's dispatcher delivers the rows."""
    service = WitnessingService(
        config=config,
        store=store,
        clock=SystemClock(),
        registry=SchemaRegistry.load_builtin(),
        signing_keys=load_own_signing_keys(config),
    )
    return await service.send_checkpoints(force=True)


def attach_witnessing(
    gateway: Gateway, *, wake: Callable[[], None] | None = None
) -> WitnessingService:
    """Add mutual witnessing to ``gateway``: its periodic checkpoint offers and the bus
    subscriber answering partners' checkpoints and storing their cosignatures."""
    service = WitnessingService(
        config=gateway.config,
        store=gateway.store,
        clock=gateway.clock,
        registry=gateway.registry,
        signing_keys=gateway.signing_keys,
        metrics=gateway.metrics,
        wake=wake,
    )
    gateway.bus.subscribe(service.on_inbound)
    gateway.add_inbound_check(WITNESSING_TYPES, service.check_inbound)
    gateway.add_service(service)
    return service
