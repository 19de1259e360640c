"""``c2c-gateway messages list`` filters: what the API refuses (400), the CLI refuses too (exit 2),
rather than listing an empty table for a mistyped filter."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.api.messages import LIST_STATES
from gateway.cli.main import cli

REPO = Path(__file__).resolve().parents[2]
HEADING = "AT                       DIR      PARTNER    TYPE"


@pytest.fixture
def config(tree: Path) -> Path:
    return tree / "gateway.toml"


def _list(config: Path, *filters: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["messages", "list", "--config", str(config), *filters])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("state", sorted(LIST_STATES))
def test_every_state_the_api_takes_is_taken(config: Path, state: str) -> None:
    code, out, err = _list(config, "--state", state)
    assert (code, err) == (0, "")
    assert out.startswith(HEADING)


def test_a_known_partner_and_type_are_taken(config: Path) -> None:
    code, out, err = _list(config, "--partner", "MX-ANAM", "--type", "shipment.manifest")
    assert (code, err) == (0, "")
    assert out.startswith(HEADING)


@pytest.mark.parametrize(
    ("filters", "reason"),
    [
        (
            ("--state", "bogus"),
            "Invalid value for '--state': 'bogus' is not one of 'acknowledged', 'dead',"
            " 'delivered', 'queued', 'received', 'rejected', 'sent'.",
        ),
        (("--state", ""), "Invalid value for '--state': '' is not one of 'acknowledged',"),
        (("--partner", "mx-anam"), "Invalid value for '--partner': 'mx-anam' is not a party id"),
        (("--partner", ""), "Invalid value for '--partner': '' is not a party id (CC-AGENCY)"),
        (
            ("--type", "shipment.manifesto"),
            "Invalid value for '--type': 'shipment.manifesto' is not a message type this"
            " gateway knows (e.g. shipment.manifest)",
        ),
        (("--type", ""), "Invalid value for '--type': '' is not a message type"),
    ],
)
def test_a_filter_the_api_would_refuse_is_a_usage_error(
    config: Path, filters: tuple[str, ...], reason: str
) -> None:
    code, out, err = _list(config, *filters)
    assert (code, out) == (2, "")
    assert f"Error: {reason}" in err
