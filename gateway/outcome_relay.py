"""Outcomes -> internal bus relay (transactional outbox of ``c2c.outcomes``).

The store writes an outcome row in the transaction that gives an outbound message a final
state (gateway/store/outcomes.py); this relay claims such rows with a lease, publishes them
and forgets them only after the bus confirmed them. A crash between the confirm and the mark
publishes them again on restart (or on a replica once the lease ends): at least once, each
with its stable ``outcome_id`` for consumers to deduplicate by. Replicas on one PostgreSQL
store share the rows through the lease, as the inbox relay does (gateway/relay.py).

An outcome the bus refuses (RabbitMQ returned it: no queue bound to its key) waits out its
lease in the store, skipped by the claims meanwhile, and is tried again once per lease. An
outage (the bus took nothing, and not because it refused) lets the batch's leases go, so that
it is retried in order after the round's backoff. Nothing hands the relay new rows: it polls,
one cheap claim per ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio

import structlog

from gateway.clock import Clock
from gateway.crashpoints import crash_point
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.relay import default_owner, finish, run_rounds, woken
from gateway.store.base import Store
from gateway.store.outcomes import OutcomeRecord
from gateway.transports.amqp import Refused
from gateway.transports.bus import Bus

log = structlog.get_logger(__name__)


class OutcomeRelay:
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
        self._lease_s = lease_s
        self._owner = f"{owner or default_owner()}:outcomes"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="outcome-relay")

    async def stop(self) -> None:
        """Stop after the round in progress (its confirmed outcomes are marked first), then
        give up this relay's leases, so the next relay takes those rows at once."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        await finish(task, self._stop_timeout_s)
        await self._release()

    async def relay_once(self) -> int:
        """Claim and publish one batch; returns how many outcomes the bus confirmed."""
        outcomes = await self._store.claim_outcomes(
            self._owner, self._clock.now(), self._batch, self._lease_s
        )
        if not outcomes:
            return 0
        taken: list[OutcomeRecord] = []
        try:
            taken = await self._bus.publish_outcomes(outcomes)
        except Refused as exc:
            # the bus took none, and refused (not failed) the first: they wait out their lease
            log.warning("outcome_relay_refused", outcomes=len(outcomes), reason=exc.reason)
        except BaseException:
            # an outage: let the batch go, to be retried in order after the backoff
            await self._release()
            raise
        if taken:
            crash_point(
                "S10-outcome-after-confirm-before-mark",
                message_ids=" ".join(outcome.message_id for outcome in taken),
            )
            await self._store.mark_outcomes_published([outcome.seq for outcome in taken])
            self._metrics.outcomes_published.inc(len(taken))
        if len(taken) < len(outcomes):
            self._metrics.outcome_failures.inc()
        return len(taken)

    async def _release(self) -> None:
        try:
            await self._store.release_outcomes(self._owner)
        except GatewayError as exc:
            log.warning("outcome_relay_release_failed", code=exc.code.value, reason=exc.reason)

    async def _run(self) -> None:
        await run_rounds(
            self.relay_once,
            stopping=lambda: self._stopping,
            sleep=self._sleep,
            failed=self._metrics.outcome_failures.inc,
            events="outcome_relay",
            batch=self._batch,
            poll_interval_s=self._poll_interval_s,
            max_backoff_s=self._max_backoff_s,
        )

    async def _sleep(self, seconds: float) -> None:
        await woken(self._wake, seconds)
