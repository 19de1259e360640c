"""``c2c-gateway query`` against a running US-CBP gateway whose partner MX-ANAM answers."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from outbound_env import (
    Running,
    answer_shipment_lookups,
    free_port,
    gateway_config,
    start_gateway,
    token,
)

from gateway.config import OutboxConfig

FAST = OutboxConfig(base_delay_s=0.1, max_delay_s=0.5, poll_interval_s=0.05, send_timeout_s=5.0)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Running, Running]]:
    ports = {"US-CBP": free_port(), "MX-ANAM": free_port()}
    nodes: list[Running] = []
    try:
        for party, peer in (("US-CBP", "MX-ANAM"), ("MX-ANAM", "US-CBP")):
            config = gateway_config(
                tmp_path,
                party,
                peers={peer: f"https://127.0.0.1:{ports[peer]}"},
                outbox=FAST,
                partner_port=ports[party],
            )
            nodes.append(await start_gateway(config))
        us, mx = nodes
        answer_shipment_lookups(mx)
        yield us, mx
    finally:
        for node in reversed(nodes):
            await node.gateway.stop()


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str


async def run(*args: str | Path) -> Result:
    """The installed CLI in its own process: the in-process gateways' logs stay out of it."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "c2c-gateway"),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, stdout.decode(), stderr.decode())


async def query(us: Running, tmp_path: Path, message_type: str, *extra: str) -> Result:
    token_file = tmp_path / "token"
    token_file.write_text(token(us.config, scopes=["c2c:query"]), encoding="utf-8")
    params = tmp_path / f"{message_type}.json"
    params.write_text(json.dumps(us.gateway.registry.examples(message_type, "1.0")[0]))
    return await run(
        "query", "--api-url", us.api_url, "--token", token_file, "--ca", us.config.tls.ca,
        "--partner", "MX-ANAM", "--type", message_type, "--params", params, *extra,
    )  # fmt: skip


async def test_query_prints_the_partners_response(
    pair: tuple[Running, Running], tmp_path: Path
) -> None:
    us, _ = pair
    result = await query(us, tmp_path, "query.shipment_lookup", "--timeout", "20")
    assert result.exit_code == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["message_type"] == "query.response"
    assert response["partner"] == "MX-ANAM"
    asked = await us.gateway.store.get_outbound(response["in_reply_to"])
    assert asked is not None
    assert asked.message_type == "query.shipment_lookup"


async def test_no_answer_in_time_prints_the_query_id(
    pair: tuple[Running, Running], tmp_path: Path
) -> None:
    us, _ = pair
    result = await query(us, tmp_path, "query.trader_lookup", "--timeout", "0.3")
    assert result.exit_code == 3, result.stderr
    label, query_id = result.stdout.split()
    assert label == "query_id:"
    assert "no answer within 0.3 s" in result.stderr
    assert f"GET /api/v1/queries/{query_id}" in result.stderr
    asked = await us.gateway.store.get_outbound(query_id)
    assert asked is not None
    assert asked.message_type == "query.trader_lookup"


async def test_a_refused_query_names_the_reason(
    pair: tuple[Running, Running], tmp_path: Path
) -> None:
    us, _ = pair
    token_file = tmp_path / "token"
    token_file.write_text(token(us.config, scopes=["c2c:query"]), encoding="utf-8")
    params = tmp_path / "params.json"
    params.write_text('{"nonsense": true}', encoding="utf-8")
    result = await run(
        "query", "--api-url", us.api_url, "--token", token_file, "--ca", us.config.tls.ca,
        "--partner", "MX-ANAM", "--type", "query.shipment_lookup", "--params", params,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith("error: SCHEMA_INVALID (pointer ")
    not_a_query = await run(
        "query", "--api-url", us.api_url, "--token", token_file, "--ca", us.config.tls.ca,
        "--partner", "MX-ANAM", "--type", "shipment.status", "--params", params,
    )  # fmt: skip
    assert not_a_query.exit_code == 1
    assert "must be a query type" in not_a_query.stderr


@pytest.mark.parametrize("not_a_number", ["nan", "NaN", "-nan"])
async def test_a_timeout_that_is_not_a_number_is_a_usage_error(
    tmp_path: Path, not_a_number: str
) -> None:
    # NaN passes click's FloatRange (it compares false with both bounds) and reached
    # socket.settimeout, a traceback; it is refused as the options are read, before any call
    token_file = tmp_path / "token"
    token_file.write_text("a.b.c\n", encoding="utf-8")
    params = tmp_path / "params.json"
    params.write_text("{}", encoding="utf-8")
    result = await run(
        "query", "--api-url", "https://127.0.0.1:9", "--token", token_file,
        "--partner", "MX-ANAM", "--type", "query.shipment_lookup", "--params", params,
        "--timeout", not_a_number,
    )  # fmt: skip
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.endswith(
        f"Error: Invalid value for '--timeout': {not_a_number!r} is not a finite number.\n"
    )
    assert "Traceback" not in result.stderr
