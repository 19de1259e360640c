"""Body retention: a periodic purge of message bodies older than ``retention.body_retention_days``.

Only bodies go (``Store.purge_bodies``): digests, metadata, receipts and the audit log stay, so
what was exchanged, when and by whom remains provable. Inbound bodies not yet handed to the
internal bus and outbound ones still being delivered are kept by the store whatever their age.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog

from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.store.base import Store

log = structlog.get_logger(__name__)


class RetentionService:
    """Purges once at start, then every ``interval_s``; a store outage is retried next round."""

    def __init__(
        self, *, store: Store, clock: Clock, retention_days: int, interval_s: float = 3600.0
    ) -> None:
        self._store = store
        self._clock = clock
        self._retention = timedelta(days=retention_days)
        self._interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def purge_once(self) -> int:
        cutoff = self._clock.now() - self._retention
        purged = await self._store.purge_bodies(cutoff)
        if purged:
            log.info("bodies_purged", count=purged, older_than=cutoff.isoformat())
        return purged

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="body-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.purge_once()
            except GatewayError as exc:
                log.warning("retention_purge_failed", code=exc.code.value, reason=exc.reason)
            except Exception as exc:
                # A bug, not an outage: say so with the traceback and try again next round,
                # rather than end the task unseen (and fail the gateway's stop with it).
                log.exception("retention_purge_failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)
