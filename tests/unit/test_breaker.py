"""Per-partner circuit breaker on a monotonic clock: closed, open, half-open."""

from __future__ import annotations

import asyncio

from gateway.outbound.breaker import BreakerBoard, BreakerState, CircuitBreaker


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(threshold: int = 3, reset: float = 30.0) -> tuple[CircuitBreaker, Mono]:
    mono = Mono()
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset, monotonic=mono), mono


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make()
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.try_acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    assert breaker.seconds_until_probe() == 30.0


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 29.9
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    mono.t += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.seconds_until_probe() == 0.0
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    assert breaker.state is BreakerState.HALF_OPEN


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 30
    assert breaker.try_acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    mono.t += 29
    assert not breaker.try_acquire()
    mono.t += 1
    assert breaker.try_acquire()


def test_successful_probe_closes() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 30
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    # Closed again: it takes the full threshold to open once more.
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_released_probe_counts_as_healthy() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 30
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.state is BreakerState.CLOSED


def test_board_keeps_partners_apart() -> None:
    mono = Mono()
    board = BreakerBoard(failure_threshold=1, reset_timeout_s=5.0, monotonic=mono)
    board.for_partner("MX-ANAM").record_failure()
    assert board.for_partner("MX-ANAM").state is BreakerState.OPEN
    assert board.for_partner("CA-CBSA").state is BreakerState.CLOSED
    assert board.for_partner("MX-ANAM") is board.for_partner("MX-ANAM")
    assert board.states() == {"MX-ANAM": BreakerState.OPEN, "CA-CBSA": BreakerState.CLOSED}


async def test_attempts_waiting_on_a_probe_go_ahead_once_it_succeeds() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 30
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    waiting = asyncio.create_task(breaker.probe_settled(10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    breaker.record_success()
    assert await waiting
    assert breaker.try_acquire()


async def test_probe_wait_is_bounded_and_a_failed_probe_keeps_others_out() -> None:
    breaker, mono = make()
    for _ in range(3):
        breaker.record_failure()
    mono.t += 30
    assert breaker.try_acquire()
    assert not await breaker.probe_settled(0.01)
    waiting = asyncio.create_task(breaker.probe_settled(10.0))
    await asyncio.sleep(0)
    breaker.record_failure()
    assert await waiting
    assert not breaker.try_acquire()
    assert breaker.seconds_until_probe() == 30.0
