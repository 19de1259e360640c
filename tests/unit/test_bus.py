"""The in-process bus: a batch goes to the subscribers in order; a record a subscriber failed on
is left out of what was taken (it stays pending for the relay), and the records behind it are
taken all the same."""

from __future__ import annotations

import pytest
import structlog
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
    assert await bus.publish_inbound_many(records) == records
    assert seen == [r.message_id for r in records]
    assert await bus.publish_inbound_many([]) == []


async def test_a_record_a_subscriber_failed_on_does_not_hold_back_the_others() -> None:
    bus = MemoryBus()
    records = [_record(i) for i in range(5)]
    failing = {records[0].message_id, records[2].message_id}
    seen: list[str] = []

    async def subscriber(record: InboundRecord) -> None:
        if record.message_id in failing:
            raise RuntimeError("consumer bug")
        seen.append(record.message_id)

    bus.subscribe(subscriber)
    taken = [records[1], records[3], records[4]]
    with structlog.testing.capture_logs() as logs:
        assert await bus.publish_inbound_many(records) == taken
    assert seen == [r.message_id for r in taken]
    # each record left out is named, since the caller learns only what was taken
    assert [
        (entry["message_id"], entry["taken"], entry["of"])
        for entry in logs
        if entry["event"] == "bus_publish_failed"
    ] == [(records[0].message_id, 3, 5), (records[2].message_id, 3, 5)]

    # nothing taken: the first failure is raised, as for a single publish
    with pytest.raises(Unavailable, match=f"subscriber failed on MX-ANAM/{records[2].message_id}"):
        await bus.publish_inbound_many([records[2], records[0]])

    await bus.close()
    with pytest.raises(Unavailable, match="closed"):
        await bus.publish_inbound_many(records)
