"""Inbox -> internal bus relay (transactional outbox).

The inbox row is the source of truth: a record is marked relayed only after the bus confirmed
it. A crash between the confirm and the mark re-publishes it on restart, so internal consumers
see every accepted message at least once, always with its ``message_id``.

Replicas on one database share the inbox: each round claims a batch with a lease
(``claim_relay``), so two healthy relays never publish the same row; a crashed relay's rows go
to another one when its lease ends. The mark names the lease holder, so a relay whose lease ran
out (and was taken over) does not audit ``delivered`` a second time. A relay marks each record
under the lease it holds at the time: a handed-over row whose lease ran out in the queue (the
bus down for longer than the lease) and that its own claim took again is marked as claimed.

The hot path needs no claim: the inbound pipeline stores each new row already leased to this
relay (``lease()``) and hands the committed record over (``stored()``), so a round is the
publishes (confirms pipelined) plus one mark. Claims remain for what no one handed over: rows
of a crashed or stopped relay, and records dropped from a full hand-over queue.

A record the bus refuses (RabbitMQ returned or nacked it) leaves the hand-over queue and waits
out its lease in the database, whoever holds it: the claim skips leased rows, the relay's own
too, so however many refused records wait, the rows behind them are published meanwhile, and
each refused one is tried again once per lease. Only an outage (the bus took nothing, and not
because it refused) puts the handed records back at the front of the queue and lets the
claimed rows go, so that all of them are retried in order after the round's backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import Clock
from gateway.crashpoints import crash_point
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store.base import InboundKey, InboundRecord, RelayLease, Store
from gateway.transports.amqp import Refused
from gateway.transports.bus import Bus

log = structlog.get_logger(__name__)


async def run_rounds(
    relay_once: Callable[[], Awaitable[int]],
    *,
    stopping: Callable[[], bool],
    sleep: Callable[[float], Awaitable[None]],
    failed: Callable[[], None],
    events: str,
    batch: int,
    poll_interval_s: float,
    max_backoff_s: float,
) -> None:
    """A relay's rounds until ``stopping()``: at once after a full batch, else after
    ``poll_interval_s``; after a failure, a backoff doubling up to ``max_backoff_s``, counted
    (``failed``) and logged ``<events>_failed`` (an outage) or ``<events>_round_failed``
    (a bug, with its traceback)."""
    backoff = poll_interval_s
    while not stopping():
        try:
            count = await relay_once()
        except Exception as exc:
            failed()
            if isinstance(exc, GatewayError):
                log.warning(f"{events}_failed", code=exc.code.value, reason=exc.reason)
            else:
                # A bug, not an outage: the round's records are pending as after any failure
                # (given back, or left leased), so say so with the traceback and keep
                # relaying, rather than let internal delivery stop unseen.
                log.exception(f"{events}_round_failed")
            backoff = min(max_backoff_s, backoff * 2)
            await sleep(backoff)
            continue
        backoff = poll_interval_s
        if count < batch:
            await sleep(poll_interval_s)


async def finish(task: asyncio.Task[None], timeout_s: float) -> None:
    """Let a relay's task end its round in progress within ``timeout_s``; past that a publish
    hung (broker gone), and the task is cancelled: what it held stays pending and goes out
    at the next start."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=timeout_s)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def woken(wake: asyncio.Event, seconds: float) -> bool:
    """Wait at most ``seconds`` for ``wake`` (cleared after); whether it was set."""
    try:
        await asyncio.wait_for(wake.wait(), timeout=seconds)
    except TimeoutError:
        return False
    finally:
        wake.clear()
    return True


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:relay:{random.getrandbits(32):08x}"


def _held_bytes(record: InboundRecord) -> int:
    return len(record.body or b"") + len(record.receipt_body)


class InboxRelay:
    def __init__(
        self,
        *,
        store: Store,
        bus: Bus,
        clock: Clock,
        metrics: Metrics,
        batch: int = 100,
        poll_interval_s: float = 0.5,
        max_backoff_s: float = 10.0,
        stop_timeout_s: float = 15.0,
        lease_s: float = 10.0,
        coalesce_s: float = 0.02,
        owner: str | None = None,
        max_handed: int = 5000,
        max_handed_bytes: int = 32 << 20,
    ) -> None:
        self._store = store
        self._bus = bus
        self._clock = clock
        self._metrics = metrics
        self._batch = batch
        self._poll_interval_s = poll_interval_s
        self._max_backoff_s = max_backoff_s
        self._stop_timeout_s = stop_timeout_s
        # Far longer than a confirmed batch takes to publish (well under a second), yet short:
        # the rows a crashed relay held wait this long, even for its own restart. A lease that
        # runs out mid-round (a stalled broker) costs only a duplicate publish (at least once).
        self._lease_s = lease_s
        # After a wake-up, wait this long so that the commits arriving meanwhile go out as one
        # batch: one claim and one mark transaction for many records instead of two per record.
        # It delays internal delivery only; partners' ACKs never wait for the relay.
        self._coalesce_s = coalesce_s
        self._owner = owner or default_owner()
        # Rows handed over are leased under their own name, so that a claim (which re-takes
        # rows leased to ``owner``) never returns a row that is in, or on its way to, the queue.
        self._hand_owner = f"{self._owner}:handed"
        # Committed records handed over by the pipeline, leased to us at insert. Bounded in
        # records and in bytes (they hold the bodies, up to a partner's limit each, and pile up
        # while the bus is down): when full, new rows are stored unleased and a later claim
        # picks them up from the database, a batch of at most as many bytes at a time.
        self._handed: deque[InboundRecord] = deque()
        self._handed_bytes = 0
        self._max_handed = max_handed
        self._max_handed_bytes = max_handed_bytes
        self._lease_delta = timedelta(seconds=lease_s)
        self._last_claim = float("-inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def owner(self) -> str:
        return self._owner

    def notify(self) -> None:
        """A commit happened: publish now instead of at the next poll."""
        self._wake.set()

    @property
    def handed_records(self) -> int:
        """Committed records waiting in memory for their publish."""
        return len(self._handed)

    @property
    def handed_bytes(self) -> int:
        """The bytes those records hold (bodies and receipts)."""
        return self._handed_bytes

    def lease(self, record: InboundRecord) -> RelayLease | None:
        """The lease the new inbox row ``record`` is stored under, or None (not running,
        hand-over queue full): the row is then stored unleased and a claim round takes it."""
        if (
            self._task is None
            or self._stopping
            or len(self._handed) >= self._max_handed
            or self._handed_bytes + _held_bytes(record) > self._max_handed_bytes
        ):
            return None
        return RelayLease(owner=self._hand_owner, until=self._clock.now() + self._lease_delta)

    def stored(self, record: InboundRecord) -> None:
        """A row stored under ``lease()`` was committed: publish it in the next round."""
        self._handed.append(record)
        self._handed_bytes += _held_bytes(record)
        self._wake.set()

    def _give_back(self, records: list[InboundRecord]) -> None:
        """Put records taken from the hand-over queue back at its front, in order."""
        self._handed.extendleft(reversed(records))
        self._handed_bytes += sum(_held_bytes(record) for record in records)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="inbox-relay")

    async def stop(self) -> None:
        """Stop after the round in progress (its confirmed records are marked first), then
        give up the leases of what was handed over and not published, so the next relay (this
        node restarted, or a replica) takes those rows at once instead of after the lease."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        await finish(task, self._stop_timeout_s)
        self._handed.clear()
        self._handed_bytes = 0
        try:
            # the hand-over leases, and those of claimed rows the bus refused (waiting for
            # their lease to run out before they are tried again)
            for owner in (self._hand_owner, self._owner):
                await self._store.release_relay(owner)
        except GatewayError as exc:
            log.warning("relay_release_failed", code=exc.code.value, reason=exc.reason)

    async def relay_once(self) -> int:
        """Publish one batch of at most ``batch`` records (handed-over records, and a claimed
        batch when one is due); returns how many records the bus confirmed."""
        claimed: list[InboundRecord] = []
        loop = asyncio.get_running_loop()
        if not self._handed or loop.time() - self._last_claim >= self._poll_interval_s:
            # claims also run while records are being handed over, so that rows no one handed
            # over (a crashed relay's, an overflow) are not starved: they get at least half
            # of the batch, the handed records the rest
            self._last_claim = loop.time()
            claimed = await self._store.claim_relay(
                self._owner,
                self._clock.now(),
                self._batch - min(len(self._handed), self._batch // 2),
                self._lease_s,
                max_bytes=self._max_handed_bytes,
            )
            self._drop_handed({record.key for record in claimed})
        handed = self._take_handed(self._batch - len(claimed))
        confirmed: list[InboundRecord] = []
        outage = False
        try:
            try:
                await self._publish([*handed, *claimed], confirmed)
            except Refused as exc:
                # the bus took none, and refused (not failed) the first: the round went as one
                # in which the bus refused some and took others, with none taken
                log.warning("relay_refused", records=len(handed) + len(claimed), reason=exc.reason)
            except BaseException:
                outage = True
                raise
            if confirmed:
                crash_point("S8-after-confirm-before-mark")
        finally:
            # Mark what the bus confirmed even when others of the batch failed, so a bad record
            # or a bus outage midway does not make the good ones go out again.
            done = {record.key for record in confirmed}
            if outage:
                # the bus took nothing (an outage): the handed records go back to the front
                # of the queue (still leased to us), and the claimed rows are let go, so that
                # both are retried after the round's backoff, in order
                self._give_back([r for r in handed if r.key not in done])
                if claimed:
                    await self._release()
            elif len(done) < len(handed) + len(claimed):
                # the bus refused some (an unroutable routing key: no queue bound for that
                # sender and type; a queue that is full nacked it), whether or not it took
                # others. Those stay pending, leased (handed over or claimed: they leave the
                # queue), and are claimed again when the lease runs out: retried every lease_s,
                # never in front of the records behind them. Counted as a failure: it is one.
                self._metrics.relay_failures.inc()
            await self._mark([r for r in handed if r.key in done], self._hand_owner)
            await self._mark([r for r in claimed if r.key in done], self._owner)
        return len(confirmed)

    async def _release(self) -> None:
        try:
            await self._store.release_relay(self._owner)
        except GatewayError as exc:
            log.warning("relay_release_failed", code=exc.code.value, reason=exc.reason)

    async def _mark(self, records: list[InboundRecord], owner: str) -> None:
        if not records:
            return
        marked = await self._store.mark_relayed(
            [record.key for record in records],
            [self._delivered(record) for record in records],
            owner=owner,
        )
        self._metrics.relay_published.inc(len(records))
        if len(marked) < len(records):
            log.warning("relay_lease_lost", published=len(records), marked=len(marked))

    def _drop_handed(self, claimed: set[InboundKey]) -> None:
        """Take the rows a claim returned out of the hand-over queue: a handed row whose lease
        ran out while it waited there (the bus down for longer than the lease) comes back in
        our claim, leased to ``owner`` now. Published and marked as claimed, it goes out once
        and is marked under the lease it holds; left queued too, it went out twice, its mark
        under the hand-over lease matching nothing."""
        if not claimed or not self._handed:
            return
        kept: deque[InboundRecord] = deque()
        for record in self._handed:
            if record.key in claimed:
                self._handed_bytes -= _held_bytes(record)
            else:
                kept.append(record)
        self._handed = kept

    def _take_handed(self, limit: int) -> list[InboundRecord]:
        count = min(limit, len(self._handed))
        taken = [self._handed.popleft() for _ in range(count)]
        self._handed_bytes -= sum(_held_bytes(record) for record in taken)
        return taken

    async def _publish(self, records: list[InboundRecord], confirmed: list[InboundRecord]) -> None:
        """Publish the batch with the confirms in flight together; ``confirmed`` gets the
        records the bus took, whichever others failed. Raises when the bus took none of them."""
        if records:
            confirmed.extend(await self._bus.publish_inbound_many(records))

    def _delivered(self, record: InboundRecord) -> AuditEvent:
        return AuditEvent(
            event=EventKind.DELIVERED,
            at=self._clock.now(),
            message_id=record.message_id,
            sender=record.sender,
            recipient=record.recipient,
            message_type=record.message_type,
            correlation_id=record.correlation_id,
            body_digest=record.body_digest,
            outcome="delivered",
        )

    async def _run(self) -> None:
        await run_rounds(
            self.relay_once,
            stopping=lambda: self._stopping,
            sleep=self._sleep,
            failed=self._metrics.relay_failures.inc,
            events="relay",
            batch=self._batch,
            poll_interval_s=self._poll_interval_s,
            max_backoff_s=self._max_backoff_s,
        )

    async def _sleep(self, seconds: float) -> None:
        if await woken(self._wake, seconds) and not self._stopping and self._coalesce_s > 0:
            await asyncio.sleep(self._coalesce_s)
