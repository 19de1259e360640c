"""The internal bus: how accepted inbound messages reach CBP systems.

``publish_inbound`` returns only once the bus has taken responsibility for the record (for
RabbitMQ: a publisher confirm; in process: every subscriber has handled it). The relay marks a
record relayed only after that, so delivery is at least once and each delivery carries the
record's ``message_id``. ``publish_inbound_many`` does the same for a batch with the confirms
in flight together, and says which records were taken.

A record that fails does not hold back the others of its batch: on RabbitMQ the records behind
it are routed and confirmed whatever happens to it, so counting only those in front of it would
make the relay publish them again, round after round while it keeps failing (an unroutable
routing key, a purged body). The taken records keep their order; a record retried later comes
after them, as any at-least-once redelivery may, and consumers order the versions of a document
by ``c2c-document-version`` (highest version wins), not by arrival.

``publish_outcomes`` hands over the outcomes of our outbound messages (their final states) the
same way, for the outcome relay.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from gateway.errors import Unavailable
from gateway.store.base import InboundRecord
from gateway.store.outcomes import OutcomeRecord

InboundHandler = Callable[[InboundRecord], Awaitable[None]]

log = structlog.get_logger(__name__)


class Bus(Protocol):
    async def publish_inbound(self, record: InboundRecord) -> None:
        """Hand one accepted record over; raises ``Unavailable`` when not confirmed."""
        ...

    async def publish_inbound_many(self, records: Sequence[InboundRecord]) -> list[InboundRecord]:
        """Hand records over, confirms awaited together; returns the records taken, in their
        order (all of them when nothing failed), and in-process subscribers see them in that
        order. A record that was not taken is left out and logged (``bus_publish_failed``);
        the others are taken all the same. Raises the first record's failure when none was
        taken."""
        ...

    async def publish_outcomes(self, outcomes: Sequence[OutcomeRecord]) -> list[OutcomeRecord]:
        """Hand outcomes of our outbound messages over (gateway/store/outcomes.py), confirms
        awaited together; returns those taken, in order, as ``publish_inbound_many`` does
        (logged ``outcome_publish_failed``); raises the first failure when none was taken."""
        ...

    def subscribe(self, handler: InboundHandler) -> None:
        """Register an internal consumer of accepted inbound records."""
        ...

    async def close(self) -> None: ...


async def notify_in_order(
    handlers: list[InboundHandler],
    records: Sequence[InboundRecord],
    failures: list[BaseException | None],
) -> list[InboundRecord]:
    """Hand in-process subscribers, in order, every record the bus took (``failures[i] is
    None``); one a subscriber refused counts as failed. Returns the taken records as
    ``taken_records`` does."""
    for index, record in enumerate(records):
        if failures[index] is not None:
            continue
        try:
            await notify_subscribers(handlers, record)
        except Unavailable as exc:
            failures[index] = exc
    return taken_records(records, failures)


def taken_records(
    records: Sequence[InboundRecord], failures: Sequence[BaseException | None]
) -> list[InboundRecord]:
    """The records with no failure, in order. Raises the first failure when no record was
    taken (an outage, or a batch of one bad record); else logs each failure, as the caller
    learns only what was taken."""
    taken = [record for record, failure in zip(records, failures, strict=True) if failure is None]
    if records and not taken:
        raise next(failure for failure in failures if failure is not None)
    for record, failure in zip(records, failures, strict=True):
        if failure is not None:
            log.warning(
                "bus_publish_failed",
                sender=record.sender,
                message_id=record.message_id,
                taken=len(taken),
                of=len(records),
                error=failure.reason
                if isinstance(failure, Unavailable)
                else type(failure).__name__,
            )
    return taken


def taken_outcomes(
    outcomes: Sequence[OutcomeRecord], failures: Sequence[BaseException | None]
) -> list[OutcomeRecord]:
    """The outcomes with no failure, in order; raises the first failure when none was taken,
    else logs each failure."""
    taken = [o for o, failure in zip(outcomes, failures, strict=True) if failure is None]
    if outcomes and not taken:
        raise next(failure for failure in failures if failure is not None)
    for outcome, failure in zip(outcomes, failures, strict=True):
        if failure is not None:
            log.warning(
                "outcome_publish_failed",
                outcome_id=outcome.outcome_id,
                taken=len(taken),
                of=len(outcomes),
                error=failure.reason
                if isinstance(failure, Unavailable)
                else type(failure).__name__,
            )
    return taken


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

    async def publish_inbound_many(self, records: Sequence[InboundRecord]) -> list[InboundRecord]:
        if self._closed:
            raise Unavailable("in-process bus is closed")
        return await notify_in_order(self._handlers, records, [None] * len(records))

    async def publish_outcomes(self, outcomes: Sequence[OutcomeRecord]) -> list[OutcomeRecord]:
        # No system outside this process can consume an in-process bus, and nothing in it
        # consumes outcomes: they are taken and dropped (the API has every message's state),
        # so that none waits in the store to flood a bus configured later.
        if self._closed:
            raise Unavailable("in-process bus is closed")
        return list(outcomes)

    async def close(self) -> None:
        self._closed = True
