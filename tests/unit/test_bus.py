"""The in-process bus: a batch goes to the subscribers in order and the count stops at the first
record a subscriber failed on (that record and the rest stay pending for the relay)."""

from __future__ import annotations

import pytest
from inbound_records import sample_record

from gateway.errors import Unavailable
from gateway.store.base import InboundRecord
from gateway.transports.bus import MemoryBus


def _record(index: int) -> InboundRecord:
    return sample_record(index)


async def test_a_batch_reaches_the_subscribers_in_order() -> None:
    bus = MemoryBus()
    seen: list[str] = []

    async def subscriber(record: InboundRecord) -> None:
        seen.append(record.message_id)

    bus.subscribe(subscriber)
    records = [_record(i) for i in range(5)]
    assert await bus.publish_inbound_many(records) == 5
    assert seen == [r.message_id for r in records]
    assert await bus.publish_inbound_many([]) == 0


async def test_the_count_stops_at_the_first_record_a_subscriber_failed_on() -> None:
    bus = MemoryBus()
    records = [_record(i) for i in range(5)]
    failing = {records[2].message_id}
    seen: list[str] = []

    async def subscriber(record: InboundRecord) -> None:
        if record.message_id in failing:
            raise RuntimeError("consumer bug")
        seen.append(record.message_id)

    bus.subscribe(subscriber)
    assert await bus.publish_inbound_many(records) == 2
    assert seen == [r.message_id for r in records[:2]]

    failing.add(records[0].message_id)
    with pytest.raises(Unavailable, match="subscriber failed"):
        await bus.publish_inbound_many(records)

    await bus.close()
    with pytest.raises(Unavailable, match="closed"):
        await bus.publish_inbound_many(records)
