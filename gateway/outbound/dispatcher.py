"""The dispatcher: drains the outbox, one leased row at a time, until each message ends.

Every attempt sends the stored signed bytes unchanged (same id, same bytes, same signature)
and is judged by the partner's signed receipt, verified against the partner's keys and the
SHA-256 digest of exactly those bytes:

- ACK -> acknowledged; NACK -> rejected (except RATE_LIMITED / UNAVAILABLE: retried);
- NACK STALE for bytes signed more than a minute ago, before the message's ``expires_at``:
  the partner was unreachable past its replay window (PROTOCOL.md section 2), and a partner
  that had accepted these bytes would have answered their ACK (section 4). The same message
  (same id, payload and ``expires_at``) is signed again with a new ``created_at`` and sent
  at once; the new bytes replace the old in the outbox, audited as ``resigned``. A STALE for
  bytes just signed is a clock disagreement: rejected, as signing again would not help;
- retryable failure (connection, TLS, timeout, 408/429/5xx, a 2xx without a valid receipt)
  -> backoff with full jitter, floored by ``Retry-After``; at ``expires_at`` (or after
  ``[outbox] max_attempts`` when set, AMQP publishes unanswered included) -> dead;
- non-retryable (a redirect, or another 4xx without a valid receipt) -> dead with the reason.

A per-partner circuit breaker keeps a failing partner from being hammered. Each result and
its audit events are written in one store transaction by ``finish_attempt``, which also
releases the lease; a crash before that leaves the lease to run out and the row is sent
again later (the partner deduplicates by message_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Literal

import structlog

from gateway.adapters.registry import Adapter, adapter_for, content_type_of, is_canonical
from gateway.audit.events import AuditEvent, EventKind, record_or_log
from gateway.clock import Clock, format_rfc3339
from gateway.config import GatewayConfig, PartnerConfig
from gateway.crashpoints import crash_point
from gateway.crypto.jws import DEFAULT_TYP, sign_detached
from gateway.crypto.keys import KeyRing, SigningKey
from gateway.envelope import body_digest, encode_envelope, parse_envelope
from gateway.errors import GatewayError, NackCode, Unavailable
from gateway.inbound.context import ReceivedReceipt
from gateway.metrics import Metrics
from gateway.outbound.backoff import BackoffPolicy
from gateway.outbound.breaker import Attempt, BreakerBoard, BreakerState, CircuitBreaker
from gateway.outbound.submission import current_signing_key
from gateway.outbound.transport import (
    Delivery,
    Handed,
    OutboundTransport,
    PartnerReply,
    TransportError,
)
from gateway.receipts import Receipt, verify_receipt
from gateway.store.base import (
    GIVEN_UP_STATES,
    AttemptUpdate,
    InvalidTransition,
    LeaseLost,
    OutboundRecord,
    OutboundState,
    Resigned,
    Store,
)

log = structlog.get_logger(__name__)

#: NACK codes that say "not now" rather than "no": the message is sent again later.
RETRYABLE_NACKS = frozenset({NackCode.RATE_LIMITED, NackCode.UNAVAILABLE})
#: HTTP statuses that, without a valid receipt, are worth another attempt.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: A STALE answer to bytes signed less than this long ago is not about their age.
RESIGN_AFTER = timedelta(minutes=1)
#: Attempts one dispatcher has in flight at once (``batch_size``), to all partners together.
#: The HTTPS client's pool takes as many connections per partner
#: (``https_client.CONNECTIONS_PER_PARTNER``), so no attempt waits for a connection of ours
#: inside its send deadline.
MAX_IN_FLIGHT = 32
#: Of those, at most this many to one partner: the rest stay for the others, so a partner that
#: holds its requests (up to ``send_timeout_s`` each) with a backlog behind them cannot take
#: every slot.
MAX_IN_FLIGHT_PER_PARTNER = MAX_IN_FLIGHT // 2
#: While the store is down, ``dispatcher_store_unavailable`` is logged at most this often: a
#: round fails every ``poll_interval_s``, and a line for each buried everything else.
STORE_OUTAGE_LOG_EVERY_S = 60.0


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """How one attempt ended, before it is turned into a state and audit events."""

    kind: Literal["acknowledged", "rejected", "retry", "dead"]
    reason: str | None = None
    retry_after_s: float | None = None
    receipt: Receipt | None = None
    #: the verified receipt's exact bytes and JWS, archived with the outbox row
    receipt_body: bytes | None = None
    receipt_signature: str | None = None
    #: the partner got the bytes (or may have): the row moves from queued to sent
    reached_partner: bool = True
    #: the partner answered like a healthy endpoint (the breaker closes)
    partner_healthy: bool = False


def judge_reply(
    reply: PartnerReply,
    *,
    keyring: KeyRing,
    partner: str,
    record: OutboundRecord,
    typ: str = DEFAULT_TYP,
    adapter: Adapter | None = None,
) -> Verdict:
    """Classify a synchronous answer; its receipt decides whenever it verifies. A native-format
    partner's receipt is signed with its ``typ`` and read through its ``adapter``."""
    receipt_error: str
    if reply.signature is not None and reply.body:
        try:
            receipt = verify_receipt(
                reply.body,
                reply.signature,
                keyring,
                partner,
                record.message_id,
                record.body_digest,
                typ=typ,
                adapter=adapter,
            )
        except GatewayError as exc:
            receipt_error = f"invalid receipt ({exc.code}): {exc.reason}"
        else:
            return _judge_receipt(
                receipt,
                body=reply.body,
                signature=reply.signature,
                status=reply.status,
                retry_after_s=reply.retry_after_s,
            )
    else:
        receipt_error = "no signed receipt in the answer"
    status = reply.status
    if 300 <= status < 400:
        return Verdict(
            kind="dead",
            reason=f"HTTP {status} redirect to {reply.location or '(no Location)'} not followed;"
            " check the partner's configured URL",
        )
    if status >= 500 or status in RETRYABLE_STATUSES:
        return Verdict(
            kind="retry",
            reason=f"HTTP {status}; {receipt_error}",
            retry_after_s=reply.retry_after_s,
        )
    if 200 <= status < 300:
        return Verdict(kind="retry", reason=f"HTTP {status} but {receipt_error}")
    return Verdict(kind="dead", reason=f"HTTP {status} without a valid receipt: {receipt_error}")


def _judge_receipt(
    receipt: Receipt,
    *,
    body: bytes,
    signature: str,
    status: int | None,
    retry_after_s: float | None,
) -> Verdict:
    http = f"HTTP {status}, " if status is not None else ""
    detail = f": {receipt.detail}" if receipt.detail else ""
    kind: Literal["acknowledged", "rejected", "retry"]
    if receipt.status == "ACK":
        kind, reason = "acknowledged", None
    elif receipt.code in RETRYABLE_NACKS:
        kind, reason = "retry", f"{http}NACK {receipt.code}{detail}"
    else:
        kind, reason = "rejected", f"{http}NACK {receipt.code}{detail}"
    return Verdict(
        kind=kind,
        reason=reason,
        retry_after_s=retry_after_s if kind == "retry" else None,
        receipt=receipt,
        receipt_body=body,
        receipt_signature=signature,
        partner_healthy=kind != "retry",
    )


#: ``c2c_outbound_attempts_total``'s result by the state an attempt left its row in; any other
#: state is a retry (queued again, or sent and waiting for another attempt)
_RESULTS = {
    OutboundState.ACKNOWLEDGED: "acknowledged",
    OutboundState.REJECTED: "rejected",
    OutboundState.DEAD: "dead",
}


def _not_after_expiry(record: OutboundRecord, next_at: datetime) -> datetime:
    """``next_at``, or the row's ``expires_at`` when that comes first: a row waiting (for a
    backoff, or an open breaker's next probe) comes back at expiry to be closed as dead rather
    than stay queued past it."""
    if record.expires_at is not None and next_at > record.expires_at:
        return record.expires_at
    return next_at


@dataclass(kw_only=True)
class _OpenBreaker:
    """A partner whose breaker this dispatcher saw open, until it closes again."""

    since: datetime
    since_monotonic: float
    #: the last failed attempt to the partner: what opened it, then each failed probe
    last_error: str | None


class _StoreOutage:
    """The log of store outages: the first failure at once, then at most one line every
    ``every_s`` with the failures since the line before, and a line when a round succeeds
    again. Failures are still counted one by one by ``c2c_dispatcher_failures_total``.

    The limit spans outages: a store that fails again within ``every_s`` of the last line (a
    flapping one) is counted into the next line, and its recovery logged only if its outage
    was, or each blip would be two lines."""

    def __init__(self, monotonic: Callable[[], float], *, every_s: float) -> None:
        self._monotonic = monotonic
        self._every_s = every_s
        #: when the outage began; None while the store answers
        self._since: float | None = None
        self._last_line: float | None = None
        self._unlogged = 0
        self._failures = 0
        self._logged = False

    def failed(self, reason: str, **fields: object) -> None:
        now = self._monotonic()
        if self._since is None:
            self._since, self._failures, self._logged = now, 0, False
        self._failures += 1
        self._unlogged += 1
        if self._last_line is not None and now - self._last_line < self._every_s:
            return
        log.warning(
            "dispatcher_store_unavailable",
            reason=reason,
            failed_rounds=self._unlogged,
            down_s=round(now - self._since, 1),
            **fields,
        )
        self._last_line, self._unlogged, self._logged = now, 0, True

    def succeeded(self) -> None:
        if self._since is None:
            return
        if self._logged:
            log.info(
                "dispatcher_store_recovered",
                down_s=round(self._monotonic() - self._since, 1),
                failed_rounds_total=self._failures,
            )
        self._since = None


def sign_again(
    body: bytes,
    *,
    partner: PartnerConfig,
    signing_keys: Sequence[SigningKey],
    now: datetime,
    signed_before: datetime | None = None,
    renew_expiry: bool = False,
) -> Resigned | None:
    """The same message (id, payload) signed again now with the newest valid key:
    ``created_at`` now; with ``renew_expiry``, ``expires_at`` as far from now as it was from
    the ``created_at`` it replaces (else kept). None when its bytes were signed after
    ``signed_before``; GatewayError when they cannot be read or signed."""
    adapter = adapter_for(partner)
    envelope = parse_envelope(adapter.to_canonical(body), max_bytes=len(body) + (1 << 20))
    if signed_before is not None and envelope.header.created_at > signed_before:
        return None
    old = envelope.header
    expires_at = old.expires_at
    if renew_expiry and expires_at is not None:
        expires_at = now + (expires_at - old.created_at)
    header = replace(old, created_at=now, expires_at=expires_at)
    new_body = adapter.from_canonical(encode_envelope(header, envelope.payload))
    key = current_signing_key(signing_keys, now, partner.sign_with)
    return Resigned(
        body=new_body,
        body_digest=body_digest(new_body),
        signature=sign_detached(new_body, key, typ=partner.typ),
        kid=key.kid,
        expires_at=expires_at if renew_expiry else None,
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


class Dispatcher:
    """Claims due outbox rows with a lease and drives each to its next state."""

    def __init__(
        self,
        *,
        store: Store,
        config: GatewayConfig,
        transports: Mapping[str, OutboundTransport],
        partner_keys: KeyRing,
        signing_keys: Sequence[SigningKey],
        clock: Clock,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        batch_size: int = MAX_IN_FLIGHT,
        per_partner: int = MAX_IN_FLIGHT_PER_PARTNER,
        metrics: Metrics | None = None,
    ) -> None:
        outbox = config.outbox
        self._store = store
        self._metrics = metrics
        self._config = config
        self._transports = dict(transports)
        self._keyring = partner_keys
        self._signing_keys = tuple(signing_keys)
        self._clock = clock
        self._worker_id = worker_id or default_worker_id()
        # Jitter only spreads retries over time; it protects no secret.
        self._rng = rng or random.Random()  # noqa: S311
        self._batch_size = batch_size
        self._per_partner = max(1, min(per_partner, batch_size))
        self._backoff = BackoffPolicy(base_s=outbox.base_delay_s, cap_s=outbox.max_delay_s)
        self.breakers = BreakerBoard(
            failure_threshold=outbox.breaker_failures,
            reset_timeout_s=outbox.breaker_reset_s,
            monotonic=clock.monotonic,
        )
        # Long enough for a full send plus the store write; a lease that ran out means the
        # worker died, and the row is sent again (the partner deduplicates by message_id).
        # Short enough that a crashed replica's rows are picked up again soon after.
        self._lease_s = outbox.send_timeout_s + 10.0
        # Waiting for a breaker probe plus a full send must stay within the lease.
        self._probe_wait_s = (self._lease_s - outbox.send_timeout_s) / 2
        self._open_breakers: dict[str, _OpenBreaker] = {}
        self._store_outage = _StoreOutage(clock.monotonic, every_s=STORE_OUTAGE_LOG_EVERY_S)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def worker_id(self) -> str:
        return self._worker_id

    def breaker_states(self) -> dict[str, BreakerState]:
        return self.breakers.states()

    def wake(self) -> None:
        """Look at the outbox now (a message was submitted or retried)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def apply_partner_receipt(self, received: ReceivedReceipt) -> None:
        """The inbound pipeline's ``on_receipt`` hook: a partner's receipt for our message."""
        message_id = received.envelope.header.in_reply_to
        record = await self._store.get_outbound(message_id) if message_id else None
        if record is None or record.recipient != received.peer:
            log.warning("receipt_for_unknown_message", peer=received.peer, in_reply_to=message_id)
            await self._refuse_receipt(
                received,
                NackCode.NOT_AUTHORIZED,
                f"receipt answers {message_id}, which is no message of ours to {received.peer}",
            )
            return
        partner = self._config.partners.get(received.peer)
        adapter = None if partner is None else adapter_for(partner)
        verify = partial(
            verify_receipt,
            received.body,
            received.signature,
            self._keyring,
            received.peer,
            record.message_id,
            record.body_digest,
        )
        try:
            if partner is None or adapter is None or is_canonical(adapter):
                receipt = verify()
            else:
                # a native adapter runs in a worker thread, as inbound (docs/adapters.md)
                receipt = await asyncio.to_thread(verify, typ=partner.typ, adapter=adapter)
        except GatewayError as exc:
            log.warning(
                "receipt_refused", message_id=record.message_id, code=exc.code, reason=exc.reason
            )
            await self._refuse_receipt(
                received, exc.code, f"receipt for {record.message_id} refused: {exc.reason}"
            )
            return
        verdict = _judge_receipt(
            receipt,
            body=received.body,
            signature=received.signature,
            status=None,
            retry_after_s=None,
        )
        # A message given up on (dead, or closed by an operator) is settled by the partner's
        # signed answer all the same: its ACK says the partner holds it. Only a final answer
        # settles it: no STALE re-sign, and a NACK for later (RATE_LIMITED, UNAVAILABLE)
        # leaves it as it is.
        dead = record.state in GIVEN_UP_STATES
        state = record.state.value
        if not dead or verdict.kind != "retry":
            # Written at once, durably and without a lease: a worker still sending the message
            # loses its lease and its own result yields to this one.
            update, events = self._outcome(
                record, verdict, sent_at=self._clock.now(), transport=received.transport, sent=False
            )
            # A final answer settles the row even if it died since it was read above (its
            # expiry, say); a re-sign after STALE only a row still at work.
            final = update.state in (OutboundState.ACKNOWLEDGED, OutboundState.REJECTED)
            try:
                await self._store.record_receipt(record.message_id, update, events, dead_too=final)
            except InvalidTransition as exc:
                state = exc.state
            else:
                log.info("outbound_receipt", message_id=record.message_id, state=update.state.value)
                self._observe_delivery(record, update)
                return
        log.info("receipt_for_finished_message", message_id=record.message_id, state=state)
        answer = receipt.code.value if receipt.code else receipt.status
        await self._refuse_receipt(
            received,
            NackCode.DUPLICATE_CONFLICT,
            f"receipt ({answer}) for {record.message_id}, which is already {state}:"
            " it settles nothing",
        )

    async def _refuse_receipt(self, received: ReceivedReceipt, code: NackCode, reason: str) -> None:
        """Audit a partner's receipt that settles nothing (``rejected``). It is not answered:
        receipts are never answered with receipts, which would loop."""
        header = received.envelope.header
        event = AuditEvent(
            event=EventKind.REJECTED,
            at=received.received_at,
            message_id=header.message_id,
            sender=received.peer,
            recipient=header.recipient,
            message_type=header.message_type,
            correlation_id=header.correlation_id,
            body_digest=body_digest(received.body),
            outcome=code.value,
            reason=reason,
            transport=received.transport,
        )
        await record_or_log(lambda entry: self._store.append_audit([entry]), event)

    async def run(self) -> None:
        """Work until ``stop()``; store outages are waited out, and no failure is fatal.

        Up to ``batch_size`` attempts are in flight at once, each a task of its own, and at
        most ``per_partner`` of them to one partner. Rows are claimed only for free slots, and
        again as soon as an attempt ends, on ``wake()`` and every ``poll_interval_s``: so a
        slow partner's attempts (up to ``send_timeout_s`` each) hold up only their own slots,
        never all of them, and a row due for another partner starts within about
        ``poll_interval_s`` (urgent rows first, as ``claim_outbound`` orders them). A claimed
        row's attempt starts at once, never waiting in this process for a slot: its lease
        (``send_timeout_s`` + 10 s) covers only the attempt itself; a row claimed past its
        partner's share is given back at once, and its partner is left out of the claims
        until one of its attempts ends. On ``stop()`` nothing more is claimed and the
        attempts in flight finish, as before.
        """
        in_flight: set[asyncio.Task[None]] = set()
        per_partner: Counter[str] = Counter()

        def ended(recipient: str) -> Callable[[asyncio.Task[None]], None]:
            def done(task: asyncio.Task[None]) -> None:
                in_flight.discard(task)
                per_partner[recipient] -= 1
                # a freed slot is filled at once
                self._wake.set()

            return done

        try:
            while not self._stopping.is_set():
                # Cleared before the claim: a wake-up (or an attempt ending) during it is not
                # lost, it makes the loop look again at once.
                self._wake.clear()
                free = self._batch_size - len(in_flight)
                if free > 0:
                    full = {p for p, n in per_partner.items() if n >= self._per_partner}
                    try:
                        records = await self._store.claim_outbound(
                            self._worker_id, self._clock.now(), free, self._lease_s, exclude=full
                        )
                    except Unavailable as exc:
                        self._store_unavailable(exc)
                        records = []
                    except Exception:
                        self._count_failure("internal_error")
                        log.exception("dispatcher_round_failed")
                        records = []
                    else:
                        self._store_outage.succeeded()
                    over: list[str] = []
                    for record in records:
                        if per_partner[record.recipient] >= self._per_partner:
                            over.append(record.message_id)
                            continue
                        per_partner[record.recipient] += 1
                        task = asyncio.create_task(
                            self._attempt_in_flight(record), name=f"c2c-send-{record.message_id}"
                        )
                        in_flight.add(task)
                        task.add_done_callback(ended(record.recipient))
                    if over:
                        await self._give_back(over)
                        # claim again at once, that partner left out, for the slots still free
                        self._wake.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._config.outbox.poll_interval_s)
        except asyncio.CancelledError:
            for task in in_flight:
                task.cancel()
            raise
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _give_back(self, message_ids: list[str]) -> None:
        """Leases on rows claimed past their partner's share; a failure only leaves them to
        their lease."""
        try:
            await self._store.release_outbound(self._worker_id, message_ids)
        except Unavailable as exc:
            self._store_unavailable(exc)

    async def _attempt_in_flight(self, record: OutboundRecord) -> None:
        """One claimed row's attempt as a task of ``run``; no failure escapes it."""
        try:
            await self._process(record)
        except Unavailable as exc:
            self._store_unavailable(exc, message_id=record.message_id)
        except Exception:
            # A bug, not an outage: the row keeps its lease and comes back when it ends; say
            # so with the traceback and keep sending, rather than stop unseen.
            self._count_failure("internal_error")
            log.exception("dispatcher_round_failed", message_id=record.message_id)

    def _store_unavailable(self, exc: Unavailable, **fields: object) -> None:
        self._count_failure("store_unavailable")
        self._store_outage.failed(exc.reason, **fields)

    def _count_failure(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.dispatcher_failures.labels(reason).inc()

    def _judge_partner(
        self, partner: str, breaker: CircuitBreaker, attempt: Attempt, verdict: Verdict | None
    ) -> None:
        """Tell ``partner``'s breaker how an acquired attempt ended (None: handed over, which
        says nothing of its health) and show it: the gauge on each verdict, the log only when
        it opens or closes, so a partner down for hours is one warning, not one per attempt."""
        if verdict is not None and verdict.kind == "retry":
            breaker.record_failure(attempt)
        elif verdict is not None and verdict.partner_healthy:
            breaker.record_success(attempt)
        else:
            breaker.release(attempt)
        self._show_breaker(partner, breaker)
        opened = self._open_breakers.get(partner)
        if breaker.state is BreakerState.CLOSED:
            if opened is not None:
                del self._open_breakers[partner]
                log.info(
                    "outbound_breaker_closed",
                    partner=partner,
                    opened_at=format_rfc3339(opened.since),
                    open_s=round(self._clock.monotonic() - opened.since_monotonic, 1),
                )
            return
        error = verdict.reason if verdict is not None and verdict.kind == "retry" else None
        if opened is not None:
            # still open (a failed probe, or an attempt begun before it opened): not news
            opened.last_error = error or opened.last_error
            return
        now = self._clock.now()
        self._open_breakers[partner] = _OpenBreaker(
            since=now, since_monotonic=self._clock.monotonic(), last_error=error
        )
        retry_in_s = breaker.seconds_until_probe()
        log.warning(
            "outbound_breaker_open",
            partner=partner,
            # a closed breaker opens exactly when its consecutive failures reach the threshold
            failures=self._config.outbox.breaker_failures,
            last_error=error,
            retry_at=format_rfc3339(now + timedelta(seconds=retry_in_s)),
            retry_in_s=round(retry_in_s, 1),
        )

    def _show_breaker(self, partner: str, breaker: CircuitBreaker) -> None:
        """``c2c_outbound_breaker_open``: set on each verdict, the only time the breaker
        closes or opens (open and half-open alike are 1: the last attempts failed)."""
        if self._metrics is not None:
            closed = breaker.state is BreakerState.CLOSED
            self._metrics.outbound_breaker_open.labels(self._metrics.partner_label(partner)).set(
                0 if closed else 1
            )

    def _observe_delivery(self, record: OutboundRecord, update: AttemptUpdate) -> None:
        if self._metrics is not None and update.state is OutboundState.ACKNOWLEDGED:
            self._metrics.observe_delivery(record.recipient, record.created_at, self._clock.now())

    def _count_attempt(self, record: OutboundRecord, result: str) -> None:
        if self._metrics is not None:
            partner = self._metrics.partner_label(record.recipient)
            self._metrics.outbound_attempts.labels(partner, result).inc()

    async def run_once(self) -> int:
        """Claim one batch of due rows and finish each; returns how many were claimed.

        A step for tests and tools: ``run`` does not wait for a whole batch like this."""
        records = await self._store.claim_outbound(
            self._worker_id, self._clock.now(), self._batch_size, self._lease_s
        )
        if records:
            await asyncio.gather(*(self._process(record) for record in records))
        return len(records)

    async def _process(self, record: OutboundRecord) -> None:
        try:
            await self._attempt(record)
        except LeaseLost:
            # Another worker took the row after our lease ran out; its result stands.
            log.warning("dispatcher_lease_lost", message_id=record.message_id)

    def _event(
        self,
        kind: EventKind,
        record: OutboundRecord,
        *,
        at: datetime,
        outcome: str | None = None,
        reason: str | None = None,
        transport: str | None = None,
        body_digest: str | None = None,
    ) -> AuditEvent:
        """An entry about ``record``; ``body_digest``: of other bytes than those stored."""
        return AuditEvent(
            event=kind,
            at=at,
            message_id=record.message_id,
            sender=self._config.party,
            recipient=record.recipient,
            message_type=record.message_type,
            correlation_id=record.correlation_id,
            body_digest=body_digest or record.body_digest,
            outcome=outcome,
            reason=reason,
            transport=transport or record.transport,
        )

    async def _finish_dead(
        self, record: OutboundRecord, reason: str, now: datetime, *, failure: str | None = None
    ) -> None:
        """The row ends dead with ``reason``; with ``failure``, after an ``attempt_failed``
        saying what became of its last attempt."""
        events = [self._event(EventKind.DEAD, record, at=now, outcome="dead", reason=reason)]
        if failure is not None:
            events.insert(
                0,
                self._event(
                    EventKind.ATTEMPT_FAILED, record, at=now, outcome="failed", reason=failure
                ),
            )
        await self._store.finish_attempt(
            record.message_id,
            self._worker_id,
            AttemptUpdate(
                state=OutboundState.DEAD,
                attempts=record.attempts,
                next_attempt_at=now,
                last_error=reason,
            ),
            events,
        )
        log.warning("outbound_dead", message_id=record.message_id, reason=reason)

    async def _attempt(self, record: OutboundRecord) -> None:
        now = self._clock.now()
        if record.expires_at is not None and record.expires_at <= now:
            last = f"; last error: {record.last_error}" if record.last_error else ""
            # A row the open breaker held was never tried (or not lately): its own last_error
            # does not say why, the partner's last failure does.
            held = ""
            if (opened := self._open_breakers.get(record.recipient)) is not None:
                held = f"; partner circuit breaker open since {format_rfc3339(opened.since)}"
                # unless it is the row's own last error, said already
                if opened.last_error and opened.last_error != record.last_error:
                    held += f", after: {opened.last_error}"
            await self._finish_dead(
                record,
                f"expired at {format_rfc3339(record.expires_at)} after {record.attempts}"
                f" attempt(s){last}{held}",
                now,
            )
            return
        if not self._attempts_left(record.attempts):
            await self._give_up(record, now)
            return
        partner = self._config.partners.get(record.recipient)
        if partner is None:
            await self._finish_dead(
                record, f"recipient {record.recipient} is no longer a configured partner", now
            )
            return
        transport = self._transports.get(record.transport)
        if transport is None:
            await self._finish_dead(
                record, f"transport {record.transport!r} is not running in this gateway", now
            )
            return
        if record.body is None:
            await self._finish_dead(record, "the message body was purged by retention", now)
            return
        breaker = self.breakers.for_partner(partner.id)
        # A probe of a recovering partner in flight decides for this row too: wait for its
        # verdict rather than park the row for a whole reset timeout after a success.
        attempt = breaker.try_acquire()
        if attempt is None and await breaker.probe_settled(self._probe_wait_s):
            attempt = breaker.try_acquire()
        if attempt is None:
            # Still probing (a slow partner): look again soon; open: at the next probe. Either
            # way no later than the message's expiry, to close it as dead then.
            until_probe = (
                breaker.seconds_until_probe() if breaker.state is BreakerState.OPEN else 0.0
            )
            wait_s = max(until_probe, self._config.outbox.poll_interval_s)
            await self._store.finish_attempt(
                record.message_id,
                self._worker_id,
                AttemptUpdate(
                    state=record.state,
                    attempts=record.attempts,
                    next_attempt_at=_not_after_expiry(record, now + timedelta(seconds=wait_s)),
                    last_error=record.last_error,
                ),
                [],
            )
            return
        delivery = Delivery(
            partner=partner,
            sender=self._config.party,
            message_id=record.message_id,
            message_type=record.message_type,
            body=record.body,
            signature=record.signature,
            content_type=content_type_of(adapter_for(partner)),
        )
        sent_at = self._clock.now()
        verdict: Verdict
        try:
            result = await transport.send(delivery)
        except TransportError as exc:
            verdict = Verdict(kind="retry", reason=exc.reason, reached_partner=exc.may_have_arrived)
        else:
            crash_point("S9-after-send-before-mark", message_id=record.message_id)
            if isinstance(result, Handed):
                self._judge_partner(partner.id, breaker, attempt, None)
                await self._finish_handed(record, sent_at=sent_at)
                return
            adapter = adapter_for(partner)
            judge = partial(
                judge_reply, result, keyring=self._keyring, partner=partner.id, record=record
            )
            if is_canonical(adapter):
                verdict = judge()
            else:
                verdict = await asyncio.to_thread(judge, typ=partner.typ, adapter=adapter)
        self._judge_partner(partner.id, breaker, attempt, verdict)
        await self._finish(record, verdict, sent_at=sent_at, transport=transport.name)

    async def _finish_handed(self, record: OutboundRecord, *, sent_at: datetime) -> None:
        """An asynchronous transport took it: wait for the receipt, resend if none comes."""
        attempts = record.attempts + 1
        next_at = self._next_attempt(record, attempts, retry_after_s=None, now=sent_at)
        await self._store.finish_attempt(
            record.message_id,
            self._worker_id,
            AttemptUpdate(state=OutboundState.SENT, attempts=attempts, next_attempt_at=next_at),
            [self._event(EventKind.SENT, record, at=sent_at, outcome="sent")],
        )
        self._count_attempt(record, "handed")

    def _attempts_left(self, attempts: int) -> bool:
        """Whether another attempt may follow ``attempts``: always, unless ``[outbox]
        max_attempts`` caps them (then the message is dead before its expiry)."""
        cap = self._config.outbox.max_attempts
        return cap is None or attempts < cap

    async def _give_up(self, record: OutboundRecord, now: datetime) -> None:
        """A row due again with no attempt left: an asynchronous transport's last attempt got
        no receipt in its wait (or ``max_attempts`` was lowered since). It ends as a synchronous
        transport's last failed attempt does: ``attempt_failed`` then ``dead``, same reason."""
        failure = record.last_error or (
            f"no receipt for attempt {record.attempts}"
            f", handed over at {format_rfc3339(record.updated_at)}"
        )
        reason = f"gave up after {record.attempts} attempts; last error: {failure}"
        await self._finish_dead(record, reason, now, failure=failure)
        self._count_attempt(record, "dead")

    def _next_attempt(
        self, record: OutboundRecord, attempts: int, *, retry_after_s: float | None, now: datetime
    ) -> datetime:
        delay = self._backoff.delay(attempts, rng=self._rng, retry_after_s=retry_after_s)
        return _not_after_expiry(record, now + timedelta(seconds=delay))

    async def _finish(
        self,
        record: OutboundRecord,
        verdict: Verdict,
        *,
        sent_at: datetime,
        transport: str,
    ) -> None:
        """Write an attempt's verdict and release the lease."""
        update, events = self._outcome(
            record, verdict, sent_at=sent_at, transport=transport, sent=True
        )
        await self._store.finish_attempt(record.message_id, self._worker_id, update, events)
        self._count_attempt(record, _RESULTS.get(update.state, "retry"))
        self._observe_delivery(record, update)
        log.info(
            "outbound_attempt",
            message_id=record.message_id,
            partner=record.recipient,
            attempt=update.attempts,
            result=verdict.kind,
            state=update.state.value,
            # why it did not end acknowledged (refused, timed out, TLS, a 500 ...): on-call
            # reads it here, not only in the message's last_error and the audit log
            error=None if verdict.kind == "acknowledged" else update.last_error,
        )

    def _resign(
        self, record: OutboundRecord, receipt: Receipt | None, *, attempts: int, now: datetime
    ) -> Resigned | None:
        """The message signed again now, when a partner refused it as STALE only for the age
        of its bytes (see the module docstring); None when that would not help."""
        if (
            receipt is None
            or receipt.code is not NackCode.STALE
            # a late receipt for a message given up on settles it as it is
            or record.state in GIVEN_UP_STATES
            or record.body is None
            or (record.expires_at is not None and record.expires_at <= now)
            or not self._attempts_left(attempts)
        ):
            return None
        partner = self._config.partners.get(record.recipient)
        if partner is None:
            return None
        try:
            return sign_again(
                record.body,
                partner=partner,
                signing_keys=self._signing_keys,
                now=now,
                signed_before=now - RESIGN_AFTER,
            )
        except GatewayError as exc:
            log.warning("outbound_not_resigned", message_id=record.message_id, reason=exc.reason)
            return None

    def _outcome(
        self,
        record: OutboundRecord,
        verdict: Verdict,
        *,
        sent_at: datetime,
        transport: str,
        sent: bool,
    ) -> tuple[AttemptUpdate, list[AuditEvent]]:
        """The new row state and its audit events; ``sent=False`` for a receipt that came in
        on its own (no attempt is counted)."""
        now = self._clock.now()
        attempts = record.attempts + 1 if sent else record.attempts
        events = []
        if sent:
            events.append(
                self._event(
                    EventKind.SENT,
                    record,
                    at=sent_at,
                    outcome=f"attempt {attempts}",
                    transport=transport,
                )
            )
        receipt = verdict.receipt
        update: AttemptUpdate
        if receipt is not None:
            events.append(
                self._event(
                    EventKind.RECEIPT_RECEIVED,
                    record,
                    at=now,
                    outcome=receipt.code.value if receipt.code else receipt.status,
                    reason=receipt.detail,
                    transport=transport,
                )
            )
        receipt_body, receipt_signature = verdict.receipt_body, verdict.receipt_signature
        if verdict.kind == "acknowledged":
            events.append(self._event(EventKind.ACKNOWLEDGED, record, at=now, outcome="ACK"))
            update = AttemptUpdate(
                state=OutboundState.ACKNOWLEDGED,
                attempts=attempts,
                next_attempt_at=now,
                receipt_body=receipt_body,
                receipt_signature=receipt_signature,
            )
        elif verdict.kind == "rejected" and (
            resigned := self._resign(record, receipt, attempts=attempts, now=now)
        ):
            events.append(
                self._event(
                    EventKind.RESIGNED,
                    record,
                    at=now,
                    outcome="queued",
                    reason=f"{verdict.reason}; the bytes {record.body_digest} were signed"
                    f" again at {format_rfc3339(now)} (key {resigned.kid})",
                    body_digest=resigned.body_digest,
                )
            )
            update = AttemptUpdate(
                state=OutboundState.QUEUED,
                attempts=attempts,
                next_attempt_at=now,
                last_error=f"{verdict.reason}; signed again",
                resigned=resigned,
            )
        elif verdict.kind == "rejected":
            events.append(
                self._event(
                    EventKind.PARTNER_REJECTED,
                    record,
                    at=now,
                    outcome=receipt.code.value if receipt and receipt.code else "NACK",
                    reason=verdict.reason,
                )
            )
            update = AttemptUpdate(
                state=OutboundState.REJECTED,
                attempts=attempts,
                next_attempt_at=now,
                last_error=verdict.reason,
                receipt_body=receipt_body,
                receipt_signature=receipt_signature,
            )
        elif verdict.kind == "dead" or not self._attempts_left(attempts):
            events.append(
                self._event(
                    EventKind.ATTEMPT_FAILED,
                    record,
                    at=now,
                    outcome="failed",
                    reason=verdict.reason,
                )
            )
            reason = (
                verdict.reason
                if verdict.kind == "dead"
                else f"gave up after {attempts} attempts; last error: {verdict.reason}"
            )
            events.append(
                self._event(EventKind.DEAD, record, at=now, outcome="dead", reason=reason)
            )
            update = AttemptUpdate(
                state=OutboundState.DEAD,
                attempts=attempts,
                next_attempt_at=now,
                last_error=reason,
                receipt_body=receipt_body,
                receipt_signature=receipt_signature,
            )
        else:
            next_at = self._next_attempt(
                record, attempts, retry_after_s=verdict.retry_after_s, now=now
            )
            events.append(
                self._event(
                    EventKind.ATTEMPT_FAILED,
                    record,
                    at=now,
                    outcome=f"retry at {format_rfc3339(next_at)}",
                    reason=verdict.reason,
                )
            )
            reached = verdict.reached_partner or record.state is OutboundState.SENT
            update = AttemptUpdate(
                state=OutboundState.SENT if reached else OutboundState.QUEUED,
                attempts=attempts,
                next_attempt_at=next_at,
                last_error=verdict.reason,
            )
        return update, events
