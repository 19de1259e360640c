"""``GW_CRASH_AT``: which settings arm which point, and that only the armed hit kills."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import crashpoints
from gateway.errors import ConfigError


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    crashpoints.disarm()
    yield
    crashpoints.disarm()


def test_unset_or_empty_arms_nothing() -> None:
    assert crashpoints.arm_from_env({}) is None
    assert crashpoints.arm_from_env({"GW_CRASH_AT": "  "}) is None
    assert crashpoints.armed() is None


def test_a_point_is_armed_with_its_hit() -> None:
    assert crashpoints.arm_from_env({"GW_CRASH_AT": "S6-before-commit:4"}) == "S6-before-commit:4"
    assert crashpoints.armed() == "S6-before-commit"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("S6", "'S6' is not a crash point (known: S2, S3"),
        ("s2", "'s2' is not a crash point"),
        ("S2:0", "the hit after ':' must be a whole number ≥ 1"),
        ("S2:two", "the hit after ':' must be a whole number ≥ 1"),
    ],
)
def test_a_wrong_setting_is_a_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="GW_CRASH_AT") as caught:
        crashpoints.arm_from_env({"GW_CRASH_AT": value})
    assert message in str(caught.value)
    assert crashpoints.armed() is None


def test_other_points_and_earlier_hits_pass() -> None:
    crashpoints.arm("S3", 3)
    crashpoints.crash_point("S2")
    crashpoints.crash_point("S3")
    crashpoints.crash_point("S3")  # still alive: the third hit is the armed one


def test_the_armed_hit_kills_the_process_after_its_line() -> None:
    code = (
        "from gateway import crashpoints\n"
        "crashpoints.arm('S8-before-confirm', 2)\n"
        "for _ in range(3):\n"
        "    crashpoints.crash_point('S8-before-confirm', message_id='m-1')\n"
        "print('survived')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == b""
    assert json.loads(done.stderr) == {
        "event": "crash_point",
        "level": "critical",
        "point": "S8-before-confirm",
        "hit": 2,
        "message_id": "m-1",
    }


def test_serve_refuses_an_unknown_point_before_anything_else(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "c2c-gateway"
    done = subprocess.run(
        [str(cli), "serve", "--config", str(tmp_path / "absent.toml")],
        capture_output=True,
        timeout=60,
        check=False,
        env={"GW_CRASH_AT": "S6-before-comit", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert done.stderr.decode().startswith(
        "error: environment: GW_CRASH_AT: 'S6-before-comit' is not a crash point"
    )
