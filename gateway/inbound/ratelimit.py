"""Per-partner token buckets: one partner's flood never eats another's capacity.

On a store shared by several gateway processes (PostgreSQL), a partner's rate holds across
all of them: each process takes tokens from the partner's bucket in the store in small
batches (``BATCH_S`` seconds of the rate) and spends them locally, so the store is asked about
once a batch, not once a message. Tokens a process holds unspent are at most one batch. If
the store cannot be asked, the process falls back to its own bucket (the partner is not
refused for the gateway's outage; storing the message will answer that).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

import structlog

from gateway.clock import Clock
from gateway.config import RateLimit
from gateway.errors import Unavailable

log = structlog.get_logger(__name__)

#: a batch of shared tokens is this many seconds of the partner's rate (at least one token)
BATCH_S = 0.1

#: take up to ``want`` tokens of a partner's shared bucket: (partner, want, per_second, burst)
#: -> tokens granted, or None when the store keeps no shared buckets
TokenSource = Callable[[str, float, float, float], Awaitable[float | None]]


class TokenBucket:
    """``per_second`` tokens a second, at most ``burst`` saved up; monotonic time only."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._rate = limit.per_second
        self._burst = float(limit.burst)
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock.monotonic()

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return self.wait_for(1.0 - self._tokens)

    def wait_for(self, missing: float) -> float:
        return math.inf if self._rate <= 0 else missing / self._rate


class SharedBucket:
    """A partner's bucket in the store, spent locally a batch at a time."""

    def __init__(self, partner: str, limit: RateLimit, clock: Clock, source: TokenSource) -> None:
        self._partner = partner
        self._limit = limit
        self._source: TokenSource | None = source
        self._batch = max(1.0, min(float(limit.burst), limit.per_second * BATCH_S))
        self._held = 0.0
        self._lock = asyncio.Lock()
        self._outage = False
        #: used while the store cannot be asked, and for ``wait_for``
        self._fallback = TokenBucket(limit, clock)

    async def take(self) -> float:
        if self._held >= 1.0:
            self._held -= 1.0
            return 0.0
        if self._source is None:
            return self._fallback.take()
        async with self._lock:
            # Another request may have fetched a batch while this one waited for the lock.
            if self._held < 1.0:
                if self._source is None:  # learnt while this request waited for the lock
                    return self._fallback.take()
                try:
                    granted = await self._source(
                        self._partner, self._batch, self._limit.per_second, self._limit.burst
                    )
                except Unavailable as exc:
                    if not self._outage:  # once an outage, not once a message
                        self._outage = True
                        log.warning(
                            "rate_bucket_unavailable", partner=self._partner, reason=exc.reason
                        )
                    return self._fallback.take()
                if granted is None:  # the store keeps no shared buckets: never ask again
                    self._source = None
                    return self._fallback.take()
                self._outage = False
                self._held += granted
            if self._held >= 1.0:
                self._held -= 1.0
                return 0.0
        return self._fallback.wait_for(1.0)


class RateLimiters:
    def __init__(
        self,
        limits: Mapping[str, RateLimit],
        clock: Clock,
        source: TokenSource | None = None,
    ) -> None:
        self._local = (
            {partner: TokenBucket(limit, clock) for partner, limit in limits.items()}
            if source is None
            else {}
        )
        self._shared = (
            {
                partner: SharedBucket(partner, limit, clock, source)
                for partner, limit in limits.items()
            }
            if source is not None
            else {}
        )

    async def wait_s(self, partner: str) -> float:
        """Take one of the partner's tokens: 0.0 when it may go ahead (the token is taken),
        else the seconds until one is due (nothing taken; infinite for a rate of 0)."""
        shared = self._shared.get(partner)
        if shared is not None:
            return await shared.take()
        bucket = self._local.get(partner)
        return 0.0 if bucket is None else bucket.take()

    async def retry_after(self, partner: str) -> int | None:
        """None when the partner may go ahead, else whole seconds to wait (at least 1)."""
        wait = await self.wait_s(partner)
        if wait == 0.0:
            return None
        return 3600 if math.isinf(wait) else max(1, math.ceil(wait))
