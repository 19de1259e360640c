"""Each log line reaches stderr whole: one write per line, so that what another thread or
process writes to the same stderr meanwhile never lands inside a line (log collectors read
one JSON object per line)."""

from __future__ import annotations

import json
import subprocess
import sys

WRITER = """
import os, sys, threading
import structlog
from gateway.logging import configure_logging

configure_logging(json=True)
log = structlog.get_logger("lines")
done = threading.Event()

def other() -> None:  # as the crash points write their line, or a child sharing stderr
    while not done.is_set():
        os.write(2, b'{"event": "other"}\\n')

thread = threading.Thread(target=other)
thread.start()
for n in range(20000):
    log.info("ours", n=n)
done.set()
thread.join()
"""


def test_lines_written_beside_ours_never_land_inside_one() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WRITER], capture_output=True, timeout=120, check=True
    )
    lines = done.stderr.decode().splitlines()
    ours = [json.loads(line) for line in lines if json.loads(line)["event"] == "ours"]
    assert [entry["n"] for entry in ours] == list(range(20000))
