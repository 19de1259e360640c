"""Injectable clocks: wall time for freshness and receipts, monotonic time for timeouts."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Current wall time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start")
        self._now = start.astimezone(UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, delta: timedelta) -> None:
        self._now += delta
        self._mono += delta.total_seconds()

    def step(self, delta: timedelta) -> None:
        """Set the wall clock ``delta`` away, as an operator or NTP would; monotonic time
        does not move."""
        self._now += delta


def format_rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with millisecond precision (truncated) and a ``Z`` suffix. The year has
    4 digits whatever it is (RFC 3339's date-fullyear; strftime's ``%Y`` does not pad it
    below 1000 on glibc)."""
    utc = moment.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
