"""format_rfc3339: RFC 3339 UTC, millisecond precision, a 4-digit year whatever the year."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.clock import format_rfc3339


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        # RFC 3339 section 5.6: date-fullyear = 4DIGIT (glibc's %Y does not pad below 1000)
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
        (datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC), "0999-12-31T23:59:59.000Z"),
        (datetime(87, 6, 5, 4, 3, 2, 1000, tzinfo=UTC), "0087-06-05T04:03:02.001Z"),
        (datetime(2026, 11, 23, 7, 0, 0, 123999, tzinfo=UTC), "2026-11-23T07:00:00.123Z"),
        (
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            "9999-12-31T23:59:59.999Z",
        ),
        # another offset is written as the same instant in UTC
        (
            datetime(2026, 11, 23, 12, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2026-11-23T07:00:00.000Z",
        ),
    ],
)
def test_format_rfc3339(moment: datetime, text: str) -> None:
    assert format_rfc3339(moment) == text
