"""Steps of the wall clock, seen against the monotonic clock (RELIABILITY-SECURITY T71).

Timeouts, backoff sleeps, rate limits and the breaker run on the monotonic clock, which no
one can set. What the store keeps for other processes and for later (when an outbound message
is due again, until when a lease holds) is wall time, and a step of the wall clock moves all
of it at once. Every second the watch compares wall time with monotonic time; a difference
that changed by a second or more is a step (NTP slews far slower than that):

- it is logged (``clock_stepped``), counted (``c2c_clock_steps_total{direction}``) and
  audited (``operator_action``, outcome ``clock_stepped``, actor ``watch:clock``), so an
  auditor reading entry times knows where they jump;
- back: what was scheduled by the clock before the step is moved back with it
  (``Store.move_back_schedules``), so no retry waits the size of the step;
- forward: nothing is moved. Retries come due early and leases end early; a message sent
  again is absorbed by its ``message_id`` at the partner, as any resend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from gateway.audit.events import AuditEvent, EventKind, record_or_log
from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.periodic import Periodic
from gateway.store.base import Store

log = structlog.get_logger(__name__)

ACTOR = "watch:clock"
STEPPED = "clock_stepped"


class ClockWatch:
    def __init__(
        self,
        *,
        clock: Clock,
        store: Store,
        metrics: Metrics,
        audit: Callable[[AuditEvent], Awaitable[object]],
        interval_s: float = 1.0,
        threshold_s: float = 1.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self._metrics = metrics
        self._audit = audit
        self._threshold_s = threshold_s
        self._offset: float | None = None
        self._periodic = Periodic("clock-watch", interval_s, self._tick)

    def _read(self) -> float:
        return self._clock.now().timestamp() - self._clock.monotonic()

    async def start(self) -> None:
        self._offset = self._read()
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _tick(self) -> None:
        try:
            await self.check()
        except Exception as exc:  # keep watching: one failed look must not end the watch
            log.error("clock_watch_failed", error=f"{type(exc).__name__}: {exc}")

    async def check(self) -> float | None:
        """Look once; returns the step in seconds (negative: back), or None."""
        offset = self._read()
        previous, self._offset = self._offset, offset
        if previous is None or abs(offset - previous) < self._threshold_s:
            return None
        step_s = offset - previous
        direction = "forward" if step_s > 0 else "back"
        self._metrics.clock_steps.labels(direction=direction).inc()
        now = self._clock.now()
        reason = f"the wall clock stepped {direction} {abs(step_s):.3f} s (monotonic time did not)"
        if step_s < 0:
            try:
                rows, leases = await self._store.move_back_schedules(
                    now, timedelta(seconds=-step_s)
                )
            except GatewayError as exc:
                reason += f"; schedules not moved: {exc.reason}"
            else:
                reason += f"; {rows} outbound schedules and {leases} leases moved back with it"
        log.warning(STEPPED, step_s=round(step_s, 3), reason=reason)
        event = AuditEvent(
            event=EventKind.OPERATOR_ACTION, at=now, outcome=STEPPED, actor=ACTOR, reason=reason
        )
        await record_or_log(self._audit, event)
        return step_s
