"""``c2c-gateway send``: straight into the store, and through a running gateway's API."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from outbound_env import Running, gateway_config, start_gateway, token

from gateway.audit.events import EventKind
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import GatewayConfig
from gateway.crypto.jws import verify_detached
from gateway.crypto.keys import KeyRing, load_verification_key
from gateway.schemas.registry import SchemaRegistry
from gateway.store import open_store
from gateway.store.base import AuditFilter, MessageFilter, OutboundRecord

ACTOR = f"cli:{getpass.getuser()}"


def payload_file(tmp_path: Path, message_type: str, **changes: Any) -> Path:
    payload = dict(SchemaRegistry.load_builtin().examples(message_type, "1.0")[0])
    payload.update(changes)
    path = tmp_path / f"{message_type}.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


async def arun(*args: str | Path) -> Result:
    """The CLI runs its own event loop (and blocks on HTTP): keep it off the test's loop."""
    return await asyncio.to_thread(run, *args)


@dataclass(frozen=True)
class ProcResult:
    exit_code: int
    stdout: str
    stderr: str


async def run_process(*args: str | Path) -> ProcResult:
    """The installed CLI in its own process: the in-process gateway's logs stay out of it."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "c2c-gateway"),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return ProcResult(proc.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def config(tmp_path: Path) -> GatewayConfig:
    return gateway_config(tmp_path, "US-CBP")


async def outbound(config: GatewayConfig, message_id: str) -> OutboundRecord | None:
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        return await store.get_outbound(message_id)
    finally:
        await store.close()


async def audit_entries(config: GatewayConfig) -> list[dict[str, Any]]:
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        entries = await store.audit_entries(AuditFilter(), limit=100, after_seq=-1)
        return [json.loads(row.entry) for row in entries]
    finally:
        await store.close()


async def test_send_stores_a_signed_message_audited_as_the_cli_user(
    config: GatewayConfig, tmp_path: Path
) -> None:
    payload = payload_file(tmp_path, "shipment.status")
    correlation = "0192f4d6-7c1e-7a3b-9d2e-5b8f1c3a9e11"
    result = await arun(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload, "--correlation-id", correlation, "--priority", "urgent",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    message_id, state = result.stdout.split()
    assert state == "queued"
    record = await outbound(config, message_id)
    assert record is not None
    assert (record.recipient, record.message_type, record.submitted_by) == (
        "MX-ANAM",
        "shipment.status",
        ACTOR,
    )
    assert record.correlation_id == correlation
    assert record.priority.value == "urgent"
    assert record.body is not None
    body = json.loads(record.body)
    assert body["payload"] == json.loads(payload.read_text())
    own = load_verification_key(
        config.signing_keys[0].path.with_suffix(".pub"), party="US-CBP", alg="EdDSA"
    )
    signer = verify_detached(
        record.signature, record.body, keyring=KeyRing([own]), party="US-CBP", at=None
    )
    assert signer.kid == record.kid
    submitted = [e for e in await audit_entries(config) if e["event"] == EventKind.SUBMITTED]
    assert [(e["message_id"], e["actor"]) for e in submitted] == [(message_id, ACTOR)]


async def test_a_payload_is_read_up_to_what_the_recipient_takes(
    config: GatewayConfig, tmp_path: Path
) -> None:
    """MX-ANAM takes 2 MiB (manifests): a payload file over [limits]' 1 MiB default is not
    refused before the message built from it is held to MX-ANAM's limit."""
    assert config.partners["MX-ANAM"].max_body_bytes > 1_500_000 > config.limits.max_body_bytes
    compact = payload_file(tmp_path, "shipment.status").read_bytes()
    padded = tmp_path / "padded.json"
    padded.write_bytes(b"{" + b" " * 1_500_000 + compact[1:])  # the message built is small
    result = await arun(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", padded,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    message_id, state = result.stdout.split()
    assert state == "queued"
    assert await outbound(config, message_id) is not None


async def test_a_query_sent_with_the_cli_is_audited_as_a_query(
    config: GatewayConfig, tmp_path: Path
) -> None:
    """As through the internal API: auditors find who asked a partner what by the event."""
    payload = payload_file(tmp_path, "query.trader_lookup")
    result = await arun(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "query.trader_lookup",
        "--payload", payload,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    message_id, _ = result.stdout.split()
    entries = await audit_entries(config)
    assert [(e["event"], e["actor"]) for e in entries if e.get("message_id") == message_id] == [
        (EventKind.QUERY, ACTOR)
    ]


async def test_schema_error_prints_the_pointer_exits_1_and_stores_nothing(
    config: GatewayConfig, tmp_path: Path
) -> None:
    payload = payload_file(tmp_path, "shipment.status", status=7)
    result = await arun(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: SCHEMA_INVALID (pointer '/status'): /status: must be of type string\n"
    )
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        page = await store.list_messages(MessageFilter(), limit=10, after=None)
    finally:
        await store.close()
    assert page.items == []
    refused = [e for e in await audit_entries(config) if e["event"] == EventKind.SUBMIT_REJECTED]
    assert [(e["outcome"], e["actor"]) for e in refused] == [("SCHEMA_INVALID", ACTOR)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "invalid JSON: Expecting property name"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"a": 1, "a": 2}', "duplicate"),
    ],
)
def test_unreadable_payload_is_refused_with_the_file_name(
    config: GatewayConfig, tmp_path: Path, content: bytes, message: str
) -> None:
    payload = tmp_path / "payload.json"
    payload.write_bytes(content)
    result = run(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --payload: {payload}: ")
    assert message in result.stderr


def test_refusals_name_the_reason(config: GatewayConfig, tmp_path: Path) -> None:
    payload = payload_file(tmp_path, "shipment.status")
    unknown = run(
        "send", "--config", config.source, "--to", "ZZ-NOBODY", "--type", "shipment.status",
        "--payload", payload,
    )  # fmt: skip
    assert unknown.exit_code == 1
    assert (
        unknown.stderr == "error: NOT_AUTHORIZED: recipient ZZ-NOBODY is not a configured partner\n"
    )
    bad_id = run(
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload, "--in-reply-to", "not-a-uuid",
    )  # fmt: skip
    assert bad_id.exit_code == 2
    assert "'not-a-uuid' is not a lowercase UUID" in bad_id.stderr


def test_bad_config_exits_2_with_file_and_key(tmp_path: Path) -> None:
    payload = payload_file(tmp_path, "shipment.status")
    missing = tmp_path / "missing.toml"
    result = run(
        "send", "--config", missing, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == f"error: {missing}: (file): file not found\n"
    broken = tmp_path / "gateway.toml"
    broken.write_text('party = "nope"\n', encoding="utf-8")
    result = run(
        "send", "--config", broken, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {broken}: party: ")


@pytest.fixture
async def running(config: GatewayConfig) -> AsyncIterator[Running]:
    node = await start_gateway(config)
    try:
        yield node
    finally:
        await node.gateway.stop()


async def test_send_through_the_api_of_a_running_gateway(running: Running, tmp_path: Path) -> None:
    config = running.config
    token_file = tmp_path / "token"
    token_file.write_text(token(config, subject="ops-desk") + "\n", encoding="utf-8")
    api = ("--api-url", running.api_url, "--token", token_file, "--ca", config.tls.ca)
    payload = payload_file(tmp_path, "enforcement.risk_alert")
    result = await run_process(
        "send", "--to", "MX-ANAM", "--type", "enforcement.risk_alert",
        "--payload", payload, *api,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    message_id, state = result.stdout.split()
    assert state == "queued"
    record = await running.gateway.store.get_outbound(message_id)
    assert record is not None
    assert record.submitted_by == "api:ops-desk"

    bad = payload_file(tmp_path, "shipment.status", status=7)
    refused = await run_process(
        "send", "--to", "MX-ANAM", "--type", "shipment.status", "--payload", bad, *api
    )
    assert refused.exit_code == 1
    assert refused.stderr == (
        "error: SCHEMA_INVALID (pointer '/status'): /status: must be of type string\n"
    )

    token_file.write_text(token(config, audience="urn:someone-else") + "\n", encoding="utf-8")
    unauthorized = await run_process(
        "send", "--to", "MX-ANAM", "--type", "shipment.status", "--payload", payload, *api
    )
    assert unauthorized.exit_code == 2
    assert unauthorized.stderr.startswith("error: HTTP 401: ")
    assert token_file.read_text().strip() not in unauthorized.stderr


def test_api_url_needs_https_and_a_token(tmp_path: Path) -> None:
    payload = payload_file(tmp_path, "shipment.status")
    args = ("send", "--to", "MX-ANAM", "--type", "shipment.status", "--payload", payload)
    no_token = run(*args, "--api-url", "https://127.0.0.1:1")
    assert (no_token.exit_code, no_token.stderr) == (
        2,
        "error: --token FILE is required with --api-url\n",
    )
    token_file = tmp_path / "token"
    token_file.write_text("a.b.c\n", encoding="utf-8")
    plain = run(*args, "--api-url", "http://api.example:8080", "--token", token_file)
    assert plain.exit_code == 2
    assert "a bearer token is only sent over https" in plain.stderr
    closed = run(*args, "--api-url", "https://127.0.0.1:1", "--token", token_file)
    assert closed.exit_code == 2
    assert closed.stderr.startswith("error: https://127.0.0.1:1: cannot reach the internal API: ")


async def test_send_again_with_the_same_idempotency_key_sends_nothing_new(
    config: GatewayConfig, tmp_path: Path
) -> None:
    payload = payload_file(tmp_path, "shipment.status")
    args = (
        "send", "--config", config.source, "--to", "MX-ANAM", "--type", "shipment.status",
        "--payload", payload, "--idempotency-key", "ops-2026-12-04-1",
    )  # fmt: skip
    first = await arun(*args)
    assert first.exit_code == 0, first.output
    assert first.stderr == ""
    again = await arun(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    assert "was already used for this message; nothing new was sent" in again.stderr
    submitted = [e for e in await audit_entries(config) if e["event"] == EventKind.SUBMITTED]
    assert len(submitted) == 1

    changed = await arun(*args, "--priority", "urgent")
    assert changed.exit_code == 1
    assert changed.stderr.startswith("error: DUPLICATE_CONFLICT: Idempotency-Key ")


async def test_send_through_the_api_with_an_idempotency_key(
    running: Running, tmp_path: Path
) -> None:
    config = running.config
    token_file = tmp_path / "token"
    token_file.write_text(token(config, subject="ops-desk") + "\n", encoding="utf-8")
    payload = payload_file(tmp_path, "shipment.status")
    args = (
        "send", "--to", "MX-ANAM", "--type", "shipment.status", "--payload", payload,
        "--api-url", running.api_url, "--token", token_file, "--ca", config.tls.ca,
        "--idempotency-key", "desk-7",
    )  # fmt: skip
    first = await run_process(*args)
    assert first.exit_code == 0, first.stderr
    again = await run_process(*args)
    assert again.exit_code == 0, again.stderr
    assert again.stdout == first.stdout
    assert "nothing new was sent" in again.stderr
    message_id = first.stdout.split()[0]
    record = await running.gateway.store.get_outbound(message_id)
    assert record is not None
    assert (record.submitted_by, record.idempotency_key) == ("api:ops-desk", "desk-7")
    assert sum((await running.gateway.store.outbox_depth()).values()) == 1
