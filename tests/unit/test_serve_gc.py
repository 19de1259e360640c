"""``serve`` moves what starting built out of the garbage collector's generations."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any, cast

from gateway.cli.serve import run_until_signalled
from gateway.runtime import Gateway


class _Started:
    """Stands in for a Gateway: only start and stop are called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


async def test_objects_built_at_start_are_frozen_before_ready() -> None:
    gateway = _Started()
    built_at_start: list[Any] = [{"schema": i} for i in range(100)]
    frozen_when_ready: list[int] = []

    def ready() -> None:
        frozen_when_ready.append(gc.get_freeze_count())
        os.kill(os.getpid(), signal.SIGTERM)

    gc.unfreeze()
    try:
        await run_until_signalled(cast(Gateway, gateway), ready)
        assert gateway.calls == ["start", "stop"]
        assert frozen_when_ready[0] >= len(built_at_start)
        # frozen objects are invisible to the collector's generations
        assert not any(obj is built_at_start for obj in gc.get_objects())
    finally:
        gc.unfreeze()
