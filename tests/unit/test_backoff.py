"""Exponential backoff with full jitter, capped, with Retry-After as a floor (itself capped)."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from gateway.outbound.backoff import BackoffPolicy
from gateway.transports.https_client import parse_retry_after


def test_ceiling_doubles_from_base_and_stops_at_cap() -> None:
    policy = BackoffPolicy(base_s=2.0, cap_s=900.0)
    assert [policy.ceiling(n) for n in range(1, 12)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 900.0, 900.0,
    ]  # fmt: skip
    assert policy.ceiling(10_000) == 900.0


def test_full_jitter_draws_across_the_whole_range() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=60.0)
    rng = random.Random(7)
    draws = [policy.delay(4, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    # Full jitter, not "equal jitter": the lower half of the range is used as much as the upper.
    assert min(draws) < 0.1
    assert max(draws) > 7.9
    low = sum(1 for d in draws if d < 4.0)
    assert 800 < low < 1200


def test_retry_after_is_a_floor() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=4.0)
    rng = random.Random(1)
    assert all(policy.delay(3, rng=rng, retry_after_s=120.0) == 120.0 for _ in range(100))
    # A short Retry-After never shortens the jittered backoff below what the draw gave.
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert policy.delay(3, rng=rng_a, retry_after_s=0.0) == policy.delay(3, rng=rng_b)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (5.0, 1.0)])
def test_bad_policy_is_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        BackoffPolicy(base_s=base, cap_s=cap)


def test_attempts_are_one_based() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        BackoffPolicy(base_s=1.0, cap_s=2.0).ceiling(0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("99999999999", 7 * 86_400),
        ("Sat, 05 Dec 2026 12:02:00 GMT", 120.0),
        ("Sat, 05 Dec 2026 11:00:00 GMT", 0.0),
        # an HTTP-date far ahead holds our retries no longer than delta-seconds can
        ("Fri, 05 Dec 2036 12:00:00 GMT", 7 * 86_400),
        ("soon", None),
        ("-5", None),
        # digits to str.isdigit() but not delta-seconds (RFC 9110: 1*DIGIT, ASCII)
        ("\u00b2", None),
        ("\u0661", None),
        (None, None),
    ],
)
def test_a_partners_retry_after_is_read_in_both_forms_and_capped(
    value: str | None, seconds: float | None
) -> None:
    now = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after(value, now=now) == seconds
