"""Per-partner circuit breaker on a monotonic clock: closed, open, half-open."""

from __future__ import annotations

import asyncio

from gateway.outbound.breaker import Attempt, BreakerBoard, BreakerState, CircuitBreaker


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(threshold: int = 3, reset: float = 30.0) -> tuple[CircuitBreaker, Mono]:
    mono = Mono()
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset, monotonic=mono), mono


def leave(breaker: CircuitBreaker) -> Attempt:
    attempt = breaker.try_acquire()
    assert attempt is not None
    return attempt


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(leave(breaker))


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make()
    fail(breaker, 2)
    breaker.record_success(leave(breaker))
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    assert breaker.seconds_until_probe() == 30.0


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 29.9
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    mono.t += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.seconds_until_probe() == 0.0
    probe = breaker.try_acquire()
    assert probe is not None
    assert probe.probe
    assert breaker.try_acquire() is None
    assert breaker.state is BreakerState.HALF_OPEN


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 30
    breaker.record_failure(leave(breaker))
    assert breaker.state is BreakerState.OPEN
    mono.t += 29
    assert breaker.try_acquire() is None
    mono.t += 1
    assert breaker.try_acquire() is not None


def test_successful_probe_closes() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 30
    breaker.record_success(leave(breaker))
    assert breaker.state is BreakerState.CLOSED
    # Closed again: it takes the full threshold to open once more.
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_released_probe_counts_as_healthy() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 30
    breaker.release(leave(breaker))
    assert breaker.state is BreakerState.CLOSED


def test_board_keeps_partners_apart() -> None:
    mono = Mono()
    board = BreakerBoard(failure_threshold=1, reset_timeout_s=5.0, monotonic=mono)
    fail(board.for_partner("MX-ANAM"))
    assert board.for_partner("MX-ANAM").state is BreakerState.OPEN
    assert board.for_partner("CA-CBSA").state is BreakerState.CLOSED
    assert board.for_partner("MX-ANAM") is board.for_partner("MX-ANAM")
    assert board.states() == {"MX-ANAM": BreakerState.OPEN, "CA-CBSA": BreakerState.CLOSED}


async def test_attempts_waiting_on_a_probe_go_ahead_once_it_succeeds() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 30
    probe = leave(breaker)
    assert breaker.try_acquire() is None
    waiting = asyncio.create_task(breaker.probe_settled(10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    breaker.record_success(probe)
    assert await waiting
    assert breaker.try_acquire() is not None


async def test_probe_wait_is_bounded_and_a_failed_probe_keeps_others_out() -> None:
    breaker, mono = make()
    fail(breaker, 3)
    mono.t += 30
    probe = leave(breaker)
    assert not await breaker.probe_settled(0.01)
    waiting = asyncio.create_task(breaker.probe_settled(10.0))
    await asyncio.sleep(0)
    breaker.record_failure(probe)
    assert await waiting
    assert breaker.try_acquire() is None
    assert breaker.seconds_until_probe() == 30.0


# Up to a window of attempts are in flight when a partner goes down: those begun before the
# breaker opened end later, one by one, and must not be taken for the probe's verdict.


def opened_by(breaker: CircuitBreaker, in_flight: int) -> list[Attempt]:
    """Three attempts fail and open ``breaker`` while ``in_flight`` more, begun with them,
    have not ended yet: those are returned."""
    older = [leave(breaker) for _ in range(3 + in_flight)]
    for attempt in older[:3]:
        breaker.record_failure(attempt)
    assert breaker.state is BreakerState.OPEN
    return older[3:]


async def test_an_older_attempt_failing_neither_ends_the_probe_nor_lets_a_second_through() -> None:
    breaker, mono = make()
    [older] = opened_by(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    mono.t += 30
    probe = leave(breaker)
    breaker.record_failure(older)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire() is None
    assert not await breaker.probe_settled(0.01)
    # the probe's own verdict still decides
    breaker.record_success(probe)
    assert breaker.state is BreakerState.CLOSED


def test_an_older_attempt_failing_while_open_does_not_extend_the_timeout() -> None:
    breaker, mono = make()
    [older] = opened_by(breaker, 1)
    mono.t += 20
    breaker.record_failure(older)
    mono.t += 10
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire() is not None


def test_an_older_attempt_failing_after_a_close_does_not_count_against_the_new_run() -> None:
    breaker, mono = make()
    older = opened_by(breaker, 2)
    mono.t += 30
    breaker.record_success(leave(breaker))
    for attempt in older:
        breaker.record_failure(attempt)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


async def test_any_success_closes_and_the_probe_failing_later_does_not_reopen() -> None:
    breaker, mono = make()
    [older] = opened_by(breaker, 1)
    mono.t += 30
    probe = leave(breaker)
    waiting = asyncio.create_task(breaker.probe_settled(10.0))
    await asyncio.sleep(0)
    # the partner answered an attempt sent before it opened: it is back
    breaker.record_success(older)
    assert await waiting
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(probe)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.try_acquire() is not None


def test_only_the_probe_released_closes() -> None:
    breaker, mono = make()
    [older] = opened_by(breaker, 1)
    mono.t += 30
    probe = leave(breaker)
    breaker.release(older)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire() is None
    breaker.release(probe)
    assert breaker.state is BreakerState.CLOSED
