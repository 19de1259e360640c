"""Shared partner buckets spent locally a batch at a time; the store's side is tested on a real
PostgreSQL in tests/integration (test_store, test_rate_limit_replicas)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from gateway.clock import ManualClock
from gateway.config import RateLimit
from gateway.errors import Unavailable
from gateway.inbound.ratelimit import RateLimiters

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


class Pool:
    """A shared bucket with no refill, counting the calls made to it."""

    def __init__(self, tokens: float, *, fail: bool = False, shared: bool = True) -> None:
        self.tokens = tokens
        self.calls: list[float] = []
        self.fail = fail
        self.shared = shared

    async def take(
        self, partner: str, want: float, per_second: float, burst: float
    ) -> float | None:
        self.calls.append(want)
        await asyncio.sleep(0)  # a round trip: other requests run meanwhile
        if self.fail:
            raise Unavailable("postgresql: connection refused")
        if not self.shared:
            return None
        granted = min(want, self.tokens)
        self.tokens -= granted
        return granted


def limiters(pool: Pool, limit: RateLimit) -> RateLimiters:
    return RateLimiters({"MX-ANAM": limit}, ManualClock(NOW), source=pool.take)


async def test_tokens_are_fetched_a_batch_at_a_time() -> None:
    pool = Pool(100)
    limits = limiters(pool, RateLimit(per_second=50.0, burst=100))  # batch: 5 tokens
    assert [await limits.retry_after("MX-ANAM") for _ in range(10)] == [None] * 10
    assert pool.calls == [5.0, 5.0]


async def test_concurrent_requests_fetch_one_batch_not_one_each() -> None:
    pool = Pool(100)
    limits = limiters(pool, RateLimit(per_second=50.0, burst=100))
    results = await asyncio.gather(*(limits.retry_after("MX-ANAM") for _ in range(20)))
    assert results == [None] * 20
    assert pool.calls == [5.0] * 4


async def test_an_empty_shared_bucket_answers_with_the_wait() -> None:
    pool = Pool(3)
    limits = limiters(pool, RateLimit(per_second=0.5, burst=3))  # batch: one token
    assert [await limits.retry_after("MX-ANAM") for _ in range(4)] == [None, None, None, 2]
    assert await limits.retry_after("CA-CBSA") is None  # no limit configured


@pytest.mark.parametrize("pool", [Pool(0, fail=True), Pool(0, shared=False)])
async def test_without_a_shared_bucket_the_local_one_applies(pool: Pool) -> None:
    limits = limiters(pool, RateLimit(per_second=1.0, burst=2))
    assert [await limits.retry_after("MX-ANAM") for _ in range(3)] == [None, None, 1]
