"""A task that runs a check every few seconds between ``start`` and ``stop`` (file watchers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


class Periodic:
    """Calls ``tick`` every ``interval_s`` seconds, the first time one interval after start.
    A round that raises is logged (``periodic_round_failed``) and the next one still comes: a
    watcher that stopped on one unforeseen fault would leave a CRL or certificate unchecked."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], Awaitable[object]]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._tick()
            except Exception:
                log.exception("periodic_round_failed", task=self._name)
