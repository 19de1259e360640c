"""RELIABILITY-SECURITY T47: amendment v2 of a declaration arrives before v1, over real mTLS.

Both are stored, receipted and audited; the internal bus delivers both with their document
and version, so a consumer applying highest-version-wins keeps v2; the internal API's
document view has v2 as current and lists v1 before it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from https_env import wait_relayed
from outbound_env import (
    Running,
    auth,
    client_ssl,
    example,
    gateway_config,
    post_as_partner,
    start_gateway,
    token,
)
from serve_proc import run_cli

from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.store.base import AuditFilter, InboundRecord
from gateway.transports.amqp_bus import bus_message

MX = "MX-ANAM"
TYPE = "shipment.advance_data"


@pytest.fixture
async def us(tmp_path: Path) -> AsyncIterator[tuple[Running, list[InboundRecord]]]:
    running = await start_gateway(
        gateway_config(tmp_path, "US-CBP", peers={MX: "https://127.0.0.1:9"})
    )
    delivered: list[InboundRecord] = []

    async def consume(record: InboundRecord) -> None:
        delivered.append(record)

    running.gateway.bus.subscribe(consume)
    try:
        yield running, delivered
    finally:
        await running.gateway.stop()


def version_of(payload: dict[str, Any], function: str, created_at: datetime) -> tuple[str, bytes]:
    message_id = new_message_id()
    header = Header(
        message_id=message_id,
        message_type=TYPE,
        schema_version="1.0",
        sender=MX,
        recipient="US-CBP",
        created_at=created_at,
        expires_at=created_at + timedelta(days=7),
    )
    return message_id, encode_envelope(header, {**payload, "message_function": function})


async def post_as_mx(running: Running, root: Path, body: bytes) -> int:
    status, _, _ = await post_as_partner(running, root, body)
    return status


async def get_document(running: Running, **query: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            running.api_url + "/api/v1/documents",
            params=query,
            headers=auth(token(running.config, ("c2c:receive",))),
            ssl=client_ssl(running.config),
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def cli_versions(running: Running, ref: str) -> tuple[int, str, str]:
    """``c2c-gateway messages versions``, the real command, on the running gateway's store."""
    config = str(running.config.source)
    return await run_cli(
        "messages", "versions", "--config", config, "--partner", MX, "--type", TYPE, "--ref", ref
    )


async def test_a_late_original_never_replaces_the_amendment_that_came_first(
    us: tuple[Running, list[InboundRecord]], tmp_path: Path
) -> None:
    running, delivered = us
    payload = example(running.gateway, TYPE)
    ref = payload["advance_data_ref"]
    now = datetime.now(UTC)
    v1_id, v1 = version_of(payload, "9", now - timedelta(seconds=20))
    v2_id, v2 = version_of(payload, "4", now - timedelta(seconds=10))

    assert await post_as_mx(running, tmp_path, v2) == 202
    assert await post_as_mx(running, tmp_path, v1) == 202  # the original, late
    await wait_relayed(running.gateway.store)  # marked after the bus (its subscriber) took it
    # both stored and audited as accepted
    for message_id in (v1_id, v2_id):
        assert await running.gateway.store.get_inbound(MX, message_id) is not None
        entries = await running.gateway.store.audit_entries(AuditFilter(message_id=message_id))
        assert [json.loads(e.entry)["event"] for e in entries][:1] == ["accepted"]

    # the bus carries each version; highest-version-wins keeps v2 whatever the order
    by_id = {record.message_id: record for record in delivered}
    assert [record.message_id for record in delivered] == [v2_id, v1_id]
    headers = {mid: bus_message(by_id[mid]).headers for mid in (v1_id, v2_id)}
    assert headers[v1_id]["c2c-document-ref"] == headers[v2_id]["c2c-document-ref"] == ref
    assert headers[v1_id]["c2c-message-function"] == "9"
    assert headers[v2_id]["c2c-message-function"] == "4"
    assert headers[v2_id]["c2c-document-version"] > headers[v1_id]["c2c-document-version"]
    held: dict[str, str] = {}
    for record in delivered:  # a consumer applying the documented rule
        version = str(bus_message(record).headers["c2c-document-version"])
        if version > held.get("version", ""):
            held = {"version": version, "message_id": record.message_id}
    assert held["message_id"] == v2_id

    status, document = await get_document(running, partner=MX, type=TYPE, ref=ref)
    assert status == 200
    assert document["current"]["message_id"] == v2_id
    assert document["current"]["message_function"] == "4"
    assert document["cancelled"] is False
    assert [v["message_id"] for v in document["versions"]] == [v1_id, v2_id]
    assert [v["state"] for v in document["versions"]] == ["delivered", "delivered"]

    # a cancellation created later ends the document; a stale amendment after it does not
    v3_id, v3 = version_of(payload, "1", now - timedelta(seconds=5))
    stale_id, stale = version_of(payload, "4", now - timedelta(seconds=15))
    assert await post_as_mx(running, tmp_path, v3) == 202
    assert await post_as_mx(running, tmp_path, stale) == 202
    status, document = await get_document(running, partner=MX, type=TYPE, ref=ref)
    assert document["current"]["message_id"] == v3_id
    assert document["cancelled"] is True
    assert [v["message_id"] for v in document["versions"]] == [v1_id, stale_id, v2_id, v3_id]

    # the operator's view: the real CLI on the running gateway's store
    code, out, err = await cli_versions(running, ref)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("VERSION")
    assert [line.split()[-1] for line in lines[1:-1]] == [v1_id, stale_id, v2_id, v3_id]
    assert [line.split()[1] for line in lines[1:-1]] == ["9", "4", "4", "1"]
    assert lines[-1] == f"current: {v3_id} (cancelled)"
    code, out, err = await cli_versions(running, "NO-SUCH-REF")
    assert (code, out) == (2, "")
    assert err == (
        f"error: no {TYPE} from {MX} with reference NO-SUCH-REF ({TYPE} is named by its"
        " payload's advance_data_ref)\n"
    )


@pytest.mark.parametrize(
    ("query", "status", "detail_part"),
    [
        (
            {"partner": MX, "type": TYPE, "ref": "NO-SUCH-REF"},
            404,
            f"no {TYPE} from {MX} with reference NO-SUCH-REF ({TYPE} is named by its payload's"
            " advance_data_ref)",
        ),
        # the reference is not always one field: the form is named
        (
            {"partner": MX, "type": "enforcement.seizure_report", "ref": "MX-ANAM-SZ-1"},
            404,
            "(enforcement.seizure_report is named by its payload's case_ref/event_type)",
        ),
        (
            {"partner": MX, "type": "shipment.export_declaration", "ref": "MX-1"},
            404,
            "named by its payload's export_ref.scheme:export_ref.value)",
        ),
        ({"partner": "mx", "type": TYPE, "ref": "x"}, 400, "party id"),
        ({"partner": MX, "type": "shipment.status", "ref": "x"}, 400, "has no versions"),
        ({"partner": MX, "type": TYPE}, 400, "ref is required"),
        ({"partner": MX, "type": TYPE, "ref": "x", "page": "2"}, 400, "unknown query"),
    ],
)
async def test_document_lookups_that_cannot_be_answered_say_why(
    us: tuple[Running, list[InboundRecord]], query: dict[str, str], status: int, detail_part: str
) -> None:
    running, _ = us
    got, problem = await get_document(running, **query)
    assert got == status
    assert detail_part in problem["detail"]
