"""The relay and the outbound dispatcher outlive a failure that is nobody's outage (a bug in
the bus, say): the round is logged with its traceback and counted, and the
loop goes on, and the message then delivered on a later round. Before, only a
``GatewayError`` (the relay) or ``Unavailable`` (the dispatcher) was caught, and anything else
ended the loop's task: delivery stopped, unseen, until the next restart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from https_env import make_message, post, running_gateway, wait_delivered
from outbound_env import (
    row_until,
    start_sending_to_stub,
    submit_to,
)

from gateway.errors import Unavailable
from gateway.store.base import InboundRecord, OutboundRecord, OutboundState

MX = "MX-ANAM"


async def test_a_round_that_raises_is_counted_and_the_relay_goes_on(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        bus = env.gateway.bus
        publish = bus.publish_inbound_many
        calls: list[int] = []

        async def broken_once(records: Sequence[InboundRecord]) -> list[InboundRecord]:
            calls.append(len(records))
            if len(calls) == 1:
                raise RuntimeError("a bug in the bus")
            return await publish(records)

        bus.publish_inbound_many = broken_once  # type: ignore[method-assign]
        message_id, body = make_message(env)
        assert (await post(env, body)).status == 202
        await wait_delivered(env, 1)
        assert [record.message_id for record in env.delivered] == [message_id]
        assert len(calls) >= 2
        failures = env.gateway.metrics.registry.get_sample_value("c2c_relay_failures_total")
        assert failures == 1
        relay_task = env.gateway.relay._task
        assert relay_task is not None
        assert not relay_task.done()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("a bug in a claim"), "internal_error"),
        (Unavailable("the store is down"), "store_unavailable"),
    ],
)
async def test_a_dispatcher_round_that_raises_does_not_stop_sending(
    tmp_path: Path, error: Exception, reason: str
) -> None:
    """The same for the outbound dispatcher: a claim that raises, a bug or an outage, is
    logged and counted by its reason, and the next round sends the message."""
    stub, running = await start_sending_to_stub(tmp_path)
    try:
        store = running.gateway.store
        claim = store.claim_outbound
        calls: list[str] = []

        async def broken_once(*args: Any, **kwargs: Any) -> list[OutboundRecord]:
            calls.append("claim")
            if len(calls) == 1:
                raise error
            return await claim(*args, **kwargs)

        store.claim_outbound = broken_once  # type: ignore[method-assign]
        record = await submit_to(running, MX)
        await row_until(store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED)
        assert len(stub.seen) == 1
        assert len(calls) >= 2
        registry = running.gateway.metrics.registry
        assert registry.get_sample_value("c2c_dispatcher_failures_total", {"reason": reason}) == 1
        assert (
            registry.get_sample_value(
                "c2c_outbound_attempts_total", {"partner": MX, "result": "acknowledged"}
            )
            == 1
        )
    finally:
        await running.gateway.stop()
        await stub.stop()
