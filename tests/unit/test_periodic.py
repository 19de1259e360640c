"""A file watcher's round that fails is logged and the next round still comes."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from gateway.periodic import Periodic


async def test_a_failing_round_is_logged_and_the_watch_goes_on() -> None:
    rounds: list[int] = []
    third = asyncio.Event()

    async def tick() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 3:
            third.set()
        if len(rounds) == 1:
            raise OSError(5, "Input/output error")

    periodic = Periodic("crl-watcher", 0.01, tick)
    with capture_logs() as logs:
        periodic.start()
        try:
            await asyncio.wait_for(third.wait(), 5)
        finally:
            await periodic.stop()
    assert len(rounds) >= 3
    failed = [e for e in logs if e["event"] == "periodic_round_failed"]
    assert len(failed) == 1
    assert failed[0]["task"] == "crl-watcher"
    assert failed[0]["log_level"] == "error"


async def test_stop_cancels_a_round_under_way() -> None:
    started = asyncio.Event()

    async def tick() -> None:
        started.set()
        await asyncio.sleep(3600)

    periodic = Periodic("tls-identity-watch", 0.01, tick)
    periodic.start()
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(periodic.stop(), 5)
