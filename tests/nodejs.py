"""Running the audit console's JavaScript (gateway/api/console) under Node.js in tests.

The console's verification and API client are plain ES modules with no DOM, so Node.js (18+,
for Web Crypto Ed25519 and fetch) runs the very files the browser loads.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

SCRIPTS = Path(__file__).parent / "console"


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("the console tests need Node.js 18 or newer on PATH (`node`)")
    return path


async def run_script(
    script: str, *args: str, extra_env: dict[str, str] | None = None, timeout_s: float = 120
) -> Any:
    """Run ``tests/console/<script>`` and return the JSON it prints; fail with its stderr."""
    env = {**os.environ, **(extra_env or {})}
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(SCRIPTS / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    if proc.returncode != 0:
        pytest.fail(f"node {script} exited {proc.returncode}: {err.decode(errors='replace')}")
    return orjson.loads(out)
