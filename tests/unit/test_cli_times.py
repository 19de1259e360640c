"""Times given to the CLI that RFC 3339's grammar takes but no datetime holds (the leap second
after the last second of 9999): an ``error:`` line and exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli

BEYOND = "9999-12-31T23:59:60Z"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["messages", "list", "--config", "{config}", "--since", BEYOND],
            f"error: --since: {BEYOND!r} is not an RFC 3339 UTC time\n",
        ),
        (
            ["keys", "rotate", "--config", "{config}", "--not-before", BEYOND],
            f"error: --not-before: {BEYOND!r} is not an RFC 3339 UTC time\n",
        ),
    ],
    ids=["messages list", "keys rotate"],
)
def test_a_time_beyond_9999_is_an_error_line(tree: Path, args: list[str], error: str) -> None:
    config = tree / "gateway.toml"
    before = config.read_bytes()
    argv = [arg.format(config=config) for arg in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", error)
    assert config.read_bytes() == before
