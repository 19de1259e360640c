"""``c2c-gateway messages list`` filters: what the API refuses (400), the CLI refuses too (exit 2),
rather than listing an empty table for a mistyped filter."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from inbound_records import sample_record

from gateway.api.messages import LIST_STATES
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.store import open_store

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
            "Invalid value for '--state': 'bogus' is not one of 'acknowledged', 'closed', 'dead',"
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


def _store_twins(config: Path) -> str:
    """One id used by our outbound message and by two partners' inbound ones: a partner's ids
    are unique per sender only (PROTOCOL.md section 2)."""
    mx, ca = sample_record(sender="MX-ANAM"), sample_record(sender="CA-CBSA")
    ca = dataclasses.replace(ca, message_id=mx.message_id)

    async def store() -> None:
        db = open_store(load_config(config).store_url, clock=SystemClock())
        await db.open()
        try:
            await db.store_inbound(mx, [])
            await db.store_inbound(ca, [])
        finally:
            await db.close()

    asyncio.run(store())
    return mx.message_id


def _show(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["messages", "show", "--config", str(config), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stdout, result.stderr


def test_show_names_every_message_an_id_could_mean(config: Path) -> None:
    message_id = _store_twins(config)
    code, out, err = _show(config, message_id)
    assert (code, out) == (2, "")
    assert err == (
        f"error: message_id {message_id} names 2 messages (inbound from CA-CBSA, inbound from"
        " MX-ANAM): give --direction and --partner\n"
    )
    code, out, err = _show(config, "--partner", "MX-ANAM", message_id)
    assert (code, err) == (0, "")
    assert json.loads(out)["partner"] == "MX-ANAM"
    code, out, _ = _show(config, "--direction", "outbound", message_id)
    assert (code, out) == (2, "")
