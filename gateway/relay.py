"""Inbox -> internal bus relay (transactional outbox).

The inbox row is the source of truth: a record is marked relayed only after the bus confirmed
it. A crash between the confirm and the mark re-publishes it on restart, so internal consumers
see every accepted message at least once, always with its ``message_id``.

Replicas on one database share the inbox: each round claims a batch with a lease
(``claim_relay``), so two healthy relays never publish the same row; a crashed relay's rows go
to another one when its lease ends. The mark names the lease holder, so a relay whose lease ran
out (and was taken over) does not audit ``delivered`` a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket

import structlog

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store.base import InboundRecord, Store
from gateway.transports.bus import Bus

log = structlog.get_logger(__name__)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:relay:{random.getrandbits(32):08x}"


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
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def owner(self) -> str:
        return self._owner

    def notify(self) -> None:
        """A commit happened: publish now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="inbox-relay")

    async def stop(self) -> None:
        """Stop after the round in progress (its confirmed records are marked first)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self._stop_timeout_s)
        except TimeoutError:
            # A publish hung (broker gone): what it held stays pending and goes out next start.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def relay_once(self) -> int:
        """Publish one claimed batch; returns how many records the bus confirmed."""
        pending = await self._store.claim_relay(
            self._owner, self._clock.now(), self._batch, self._lease_s
        )
        confirmed: list[InboundRecord] = []
        try:
            for record in pending:
                await self._bus.publish_inbound(record)
                confirmed.append(record)
        finally:
            # Mark what the bus confirmed even when a later publish failed, so a bad record or
            # a bus outage midway does not make the good ones go out again.
            if confirmed:
                marked = await self._store.mark_relayed(
                    [record.key for record in confirmed],
                    [self._delivered(record) for record in confirmed],
                    owner=self._owner,
                )
                self._metrics.relay_published.inc(len(confirmed))
                if len(marked) < len(confirmed):
                    log.warning("relay_lease_lost", published=len(confirmed), marked=len(marked))
        return len(confirmed)

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
        backoff = self._poll_interval_s
        while not self._stopping:
            try:
                count = await self.relay_once()
            except GatewayError as exc:
                self._metrics.relay_failures.inc()
                log.warning("relay_failed", code=exc.code.value, reason=exc.reason)
                backoff = min(self._max_backoff_s, backoff * 2)
                await self._sleep(backoff)
                continue
            backoff = self._poll_interval_s
            if count < self._batch:
                await self._sleep(self._poll_interval_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            return
        finally:
            self._wake.clear()
        if not self._stopping and self._coalesce_s > 0:
            await asyncio.sleep(self._coalesce_s)
