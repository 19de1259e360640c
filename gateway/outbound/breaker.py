"""Per-partner circuit breaker: stop hammering a partner that keeps failing.

closed: attempts flow; ``failure_threshold`` consecutive failures open it.
open: no attempt until ``reset_timeout_s`` has passed on the monotonic clock.
half-open: exactly one probe attempt is let through; its success closes the breaker,
its failure opens it again for another full timeout. Attempts that find the probe in flight
may wait for its verdict (``probe_settled``), so a recovered partner is reached at once.

Each attempt carries the ``Attempt`` that ``try_acquire`` gave it, and its verdict is told
with it. Up to a window of attempts may be in flight when the breaker opens; one begun
before then that fails later is news of the outage already counted, not of the probe: it
neither ends the probe (letting a second one through beside it) nor opens the breaker
again for another full timeout. A success, whoever reports it, is the partner answering
now, and closes the breaker.

Time is monotonic so a wall-clock jump neither stalls nor floods a partner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, eq=False, slots=True)
class Attempt:
    """Leave to try a partner, from ``try_acquire``; compared by identity."""

    #: the breaker's epoch when it was given: the epoch moves on each open and each close
    epoch: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        monotonic: Callable[[], float],
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("breaker needs failure_threshold >= 1 and reset_timeout_s > 0")
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._monotonic = monotonic
        self._failures = 0
        self._opened_at: float | None = None
        self._epoch = 0
        self._probe: Attempt | None = None
        self._probe_done: asyncio.Event | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probe is not None or self._monotonic() - self._opened_at >= self._reset_timeout_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def seconds_until_probe(self) -> float:
        """How long until an attempt may be made (0 when one may be made now)."""
        if self._opened_at is None:
            return 0.0
        if self._probe is not None:
            return self._reset_timeout_s
        return max(0.0, self._opened_at + self._reset_timeout_s - self._monotonic())

    def try_acquire(self) -> Attempt | None:
        """May an attempt start now? In half-open state only the first caller gets leave,
        as the probe. The verdict on the attempt is told with what this returned."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Attempt(epoch=self._epoch, probe=False)
        if state is BreakerState.HALF_OPEN and self._probe is None:
            self._probe = Attempt(epoch=self._epoch, probe=True)
            self._probe_done = asyncio.Event()
            return self._probe
        return None

    async def probe_settled(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the probe in flight to end; True when none is left
        in flight (``try_acquire`` then says whether the partner may be tried)."""
        done = self._probe_done
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout_s)
        return self._probe is None

    def _end_probe(self) -> None:
        self._probe = None
        done, self._probe_done = self._probe_done, None
        if done is not None:
            done.set()

    def _open(self) -> None:
        self._opened_at = self._monotonic()
        self._epoch += 1

    def record_success(self, attempt: Attempt) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            self._epoch += 1
        # closed now: whoever waits on a probe may go ahead, and the probe's own verdict,
        # should it come later, counts as any other attempt's of an earlier epoch
        self._end_probe()

    def record_failure(self, attempt: Attempt) -> None:
        if attempt is self._probe:
            self._open()
            self._end_probe()
        elif attempt.epoch == self._epoch and self._opened_at is None:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()
        # else: begun before the breaker last opened or closed; its failure is not news

    def release(self, attempt: Attempt) -> None:
        """An acquired attempt ended with no verdict on the partner's health (e.g. a NACK):
        the partner answered, so a probe's release closes the breaker."""
        if attempt is self._probe:
            self.record_success(attempt)


class BreakerBoard:
    """One breaker per partner, created on first use."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        monotonic: Callable[[], float],
    ) -> None:
        self._failure_threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._monotonic = monotonic
        self._breakers: dict[str, CircuitBreaker] = {}

    def for_partner(self, partner: str) -> CircuitBreaker:
        breaker = self._breakers.get(partner)
        if breaker is None:
            breaker = CircuitBreaker(
                failure_threshold=self._failure_threshold,
                reset_timeout_s=self._reset_timeout_s,
                monotonic=self._monotonic,
            )
            self._breakers[partner] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        return {partner: breaker.state for partner, breaker in self._breakers.items()}
