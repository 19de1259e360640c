"""Without ``[amqp] url`` the internal bus is in process: the outcome relay runs all the same,
the in-process bus takes each outcome (nothing in the process consumes them) and the store
forgets it, so that none waits to flood a bus configured later."""

from __future__ import annotations

import asyncio
from pathlib import Path

from outbound_env import row_until, start_sending_to_stub, submit_to

from gateway.store.base import OutboundState
from gateway.transports.bus import MemoryBus


async def test_outcomes_are_taken_by_the_in_process_bus(tmp_path: Path) -> None:
    stub, us = await start_sending_to_stub(tmp_path)
    try:
        assert isinstance(us.gateway.bus, MemoryBus)
        record = await submit_to(us, "MX-ANAM")
        await row_until(
            us.gateway.store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
        )
        metrics = us.gateway.metrics.registry
        async with asyncio.timeout(15):
            while True:
                if metrics.get_sample_value("c2c_outcomes_published_total") == 1:
                    break
                await asyncio.sleep(0.05)
        now = us.gateway.clock.now()
        assert await us.gateway.store.claim_outcomes("test", now, 100, 1) == []
        assert not metrics.get_sample_value("c2c_outcome_failures_total")
    finally:
        await us.gateway.stop()
        await stub.stop()
