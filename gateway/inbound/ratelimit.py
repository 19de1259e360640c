"""Per-partner token buckets: one partner's flood never eats another's capacity."""

from __future__ import annotations

import math
from collections.abc import Mapping

from gateway.clock import Clock
from gateway.config import RateLimit


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
        if self._rate <= 0:
            return math.inf
        return (1.0 - self._tokens) / self._rate


class RateLimiters:
    def __init__(self, limits: Mapping[str, RateLimit], clock: Clock) -> None:
        self._buckets = {partner: TokenBucket(limit, clock) for partner, limit in limits.items()}

    def retry_after(self, partner: str) -> int | None:
        """None when the partner may go ahead, else whole seconds to wait (at least 1)."""
        bucket = self._buckets.get(partner)
        if bucket is None:
            return None
        wait = bucket.take()
        if wait == 0.0:
            return None
        return 3600 if math.isinf(wait) else max(1, math.ceil(wait))
