"""The internal bus: how accepted inbound messages reach CBP systems.

``publish_inbound`` returns only once the bus has taken responsibility for the record (for
RabbitMQ: a publisher confirm; in process: every subscriber has handled it). The relay marks a
record relayed only after that, so delivery is at least once and each delivery carries the
record's ``message_id``. ``publish_inbound_many`` does the same for a batch with the confirms
in flight together, and says how many leading records were taken.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from gateway.errors import Unavailable
from gateway.store.base import InboundRecord

InboundHandler = Callable[[InboundRecord], Awaitable[None]]

log = structlog.get_logger(__name__)


class Bus(Protocol):
    async def publish_inbound(self, record: InboundRecord) -> None:
        """Hand one accepted record over; raises ``Unavailable`` when not confirmed."""
        ...

    async def publish_inbound_many(self, records: Sequence[InboundRecord]) -> int:
        """Hand records over, confirms awaited together; returns how many leading records were
        taken (``len(records)`` when all were): record ``i`` counts only if every record before
        it was taken too, and in-process subscribers see the taken records in order. Raises the
        ``Unavailable`` of the first record when even that one was not taken; a later failure
        ends the count and is logged (``bus_publish_failed``)."""
        ...

    def subscribe(self, handler: InboundHandler) -> None:
        """Register an internal consumer of accepted inbound records."""
        ...

    async def close(self) -> None: ...


async def notify_in_order(
    handlers: list[InboundHandler],
    records: Sequence[InboundRecord],
    failures: list[BaseException | None],
) -> int:
    """Hand in-process subscribers the records the bus took (``failures[i] is None``), in
    order, up to the first that failed or that a subscriber refused; returns the taken
    prefix as ``taken_prefix`` does."""
    for index, record in enumerate(records):
        if failures[index] is not None:
            break
        try:
            await notify_subscribers(handlers, record)
        except Unavailable as exc:
            failures[index] = exc
            break
    return taken_prefix(records, failures)


def taken_prefix(records: Sequence[InboundRecord], failures: Sequence[BaseException | None]) -> int:
    """How many leading records have no failure; raises the first record's own failure, logs
    the one that ends a non-empty prefix (the caller learns only the count)."""
    for index, (record, failure) in enumerate(zip(records, failures, strict=True)):
        if failure is None:
            continue
        if index == 0:
            raise failure
        log.warning(
            "bus_publish_failed",
            sender=record.sender,
            message_id=record.message_id,
            taken=index,
            of=len(records),
            error=failure.reason if isinstance(failure, Unavailable) else type(failure).__name__,
        )
        return index
    return len(records)


async def notify_subscribers(handlers: list[InboundHandler], record: InboundRecord) -> None:
    """Hand a record to every in-process subscriber; the first failure fails the publish.

    A consumer's bug must not stop the relay: the record stays pending and is offered again,
    which is exactly what at-least-once promises (subscribers deduplicate by message_id).
    """
    for handler in tuple(handlers):
        try:
            await handler(record)
        except Exception as exc:
            log.warning(
                "bus_subscriber_failed",
                sender=record.sender,
                message_id=record.message_id,
                error=type(exc).__name__,
            )
            raise Unavailable(
                f"subscriber failed on {record.sender}/{record.message_id}: {type(exc).__name__}"
            ) from exc


class MemoryBus:
    """In-process bus for a single node: a publish is confirmed when every subscriber returned.

    A subscriber that raises makes the publish fail, so the relay re-publishes the record later:
    subscribers must be idempotent on ``(sender, message_id)``, as with any at-least-once bus.
    """

    def __init__(self) -> None:
        self._handlers: list[InboundHandler] = []
        self._closed = False

    def subscribe(self, handler: InboundHandler) -> None:
        self._handlers.append(handler)

    async def publish_inbound(self, record: InboundRecord) -> None:
        if self._closed:
            raise Unavailable("in-process bus is closed")
        await notify_subscribers(self._handlers, record)

    async def publish_inbound_many(self, records: Sequence[InboundRecord]) -> int:
        if self._closed:
            raise Unavailable("in-process bus is closed")
        return await notify_in_order(self._handlers, records, [None] * len(records))

    async def close(self) -> None:
        self._closed = True
