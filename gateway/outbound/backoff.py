"""When to try a failed outbound message again: exponential backoff with full jitter.

Full jitter (a uniform draw between zero and the exponential ceiling) spreads the retries
of many messages that failed together, so a partner coming back is not hit by a wave.
A partner's ``Retry-After`` is a floor: no attempt is made before it has passed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BackoffPolicy:
    base_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got {self.base_s}, {self.cap_s}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after the ``attempt``-th failed attempt (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        # Exponent bounded so the float never overflows however many attempts were made.
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 64))

    def delay(
        self, attempt: int, *, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        """Seconds to wait before the next attempt; at least ``retry_after_s`` when given."""
        jittered = rng.uniform(0.0, self.ceiling(attempt))
        if retry_after_s is not None:
            return max(jittered, retry_after_s)
        return jittered
