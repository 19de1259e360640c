"""Audit completeness through a real US-CBP / MX-ANAM gateway pair over mutual TLS.

The test keeps its own oracle: the (event, message_id, outcome) entries it expects, written
down from what it did (each POST, each answer it scripted, each operator call), never read
from the gateway's code. It then asserts that each gateway's log holds exactly that multiset
with gap-free seqs, that every NACK left exactly one entry with its exact reason while the
partner got only the code and a minimal detail, and that no entry holds bodies, signatures or
keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from outbound_env import (
    Running,
    answer_shipment_lookups,
    auth,
    client_ssl,
    free_port,
    gateway_config,
    start_gateway,
    token,
)
from partner_stub import PartnerStub

from gateway.config import GatewayConfig, OutboxConfig, RateLimit
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import KeyRing, SigningKey, load_signing_key
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import NackCode
from gateway.model import Header
from gateway.receipts import verify_receipt
from gateway.store.base import AuditFilter

US, MX, CA = "US-CBP", "MX-ANAM", "CA-CBSA"
FAST = OutboxConfig(base_delay_s=0.1, max_delay_s=0.5, poll_interval_s=0.05, send_timeout_s=5.0)
#: a type MX-ANAM's partner folder allows, taken away for the NOT_AUTHORIZED case
FORBIDDEN_TYPE = "enforcement.seizure_report"
CA_MAX_BODY = 4096
ENTRY_FIELDS = frozenset(
    {
        "event",
        "at",
        "message_id",
        "sender",
        "recipient",
        "message_type",
        "correlation_id",
        "body_digest",
        "outcome",
        "reason",
        "actor",
        "transport",
    }
)
RETRY_AT = re.compile(r"^retry at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

Key = tuple[str, str | None, str]


@dataclass
class Oracle:
    """What each gateway's log must hold, from what the test did."""

    expected: dict[str, Counter[Key]] = field(default_factory=dict)

    def expect(self, party: str, event: str, message_id: str | None, outcome: str) -> None:
        self.expected.setdefault(party, Counter())[(event, message_id, outcome)] += 1

    def sent_and_acknowledged(self, party: str, message_id: str, attempt: int = 1) -> None:
        self.expect(party, "sent", message_id, f"attempt {attempt}")
        self.expect(party, "receipt_received", message_id, "ACK")
        self.expect(party, "acknowledged", message_id, "ACK")

    def accepted_and_delivered(self, party: str, message_id: str) -> None:
        self.expect(party, "accepted", message_id, "ACK")
        self.expect(party, "delivered", message_id, "delivered")


@dataclass
class Nack:
    """A refusal as the partner saw it."""

    code: NackCode
    message_id: str | None
    partner_saw: str
    #: what the test knows about the cause, which the exact reason must name
    cause: str


@dataclass
class World:
    root: Path
    us: Running
    mx: Running
    stub: PartnerStub
    keys: dict[str, SigningKey]
    oracle: Oracle = field(default_factory=Oracle)
    nacks: list[Nack] = field(default_factory=list)
    #: everything signed or sent in this test that no audit entry may contain
    secrets: list[str] = field(default_factory=list)


def _us_config(root: Path, peers: dict[str, str], partner_port: int) -> GatewayConfig:
    config = gateway_config(root, US, peers=peers, outbox=FAST, partner_port=partner_port)
    partners = dict(config.partners)
    mx = partners[MX]
    partners[MX] = dataclasses.replace(mx, inbound_types=mx.inbound_types - {FORBIDDEN_TYPE})
    # CA-CBSA: one request per ~forever and small bodies, for TOO_LARGE then RATE_LIMITED
    partners[CA] = dataclasses.replace(
        partners[CA], rate=RateLimit(per_second=0.0001, burst=1), max_body_bytes=CA_MAX_BODY
    )
    return dataclasses.replace(config, partners=partners)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ports = {US: free_port(), MX: free_port(), CA: free_port()}
    # The pki (with CA-CBSA's keys and certificate) exists once the first config is made.
    mx_config = gateway_config(
        tmp_path, MX, peers={US: f"https://127.0.0.1:{ports[US]}"}, outbox=FAST,
        partner_port=ports[MX],
    )  # fmt: skip
    stub = PartnerStub(pki=tmp_path / "pki", party=CA, behaviours=["503", "ack", "400", "ack"])
    await stub.start(ports[CA])
    nodes: list[Running] = []
    try:
        peers = {MX: f"https://127.0.0.1:{ports[MX]}", CA: f"https://127.0.0.1:{ports[CA]}"}
        us = await start_gateway(_us_config(tmp_path, peers, ports[US]))
        nodes.append(us)
        mx = await start_gateway(mx_config)
        nodes.append(mx)
        answer_shipment_lookups(mx)
        keys = {
            party: load_signing_key(tmp_path / "pki" / party / "sign.key", party=party, alg="EdDSA")
            for party in (MX, CA)
        }
        yield World(root=tmp_path, us=us, mx=mx, stub=stub, keys=keys)
    finally:
        for node in reversed(nodes):
            await node.gateway.stop()
        await stub.stop()


# --- the partner side: signed messages over mutual TLS -------------------------------------


def envelope(
    world: World,
    *,
    sender: str = MX,
    message_type: str = "shipment.advance_data",
    schema_version: str = "1.0",
    message_id: str | None = None,
    created_at: dt.datetime | None = None,
    payload: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    message_id = message_id or new_message_id()
    created_at = created_at or dt.datetime.now(dt.UTC)
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version=schema_version,
        sender=sender,
        recipient=US,
        created_at=created_at,
        expires_at=created_at + dt.timedelta(days=7),
    )
    if payload is None:
        payload = world.us.gateway.registry.examples(message_type, "1.0")[0]
    return message_id, encode_envelope(header, payload)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


async def post(
    world: World,
    body: bytes,
    *,
    party: str = MX,
    signer: str | None = None,
    signature: str | None = None,
) -> Answer:
    """POST as ``party`` (its client certificate), signed by ``signer`` (default: ``party``)
    unless a ``signature`` is given."""
    signature = signature or sign_detached(body, world.keys[signer or party])
    world.secrets.append(signature)
    headers = {"Content-Type": "application/json", "C2C-Signature": signature}
    context = client_ssl(world.us.config)
    pki = world.root / "pki" / party
    context.load_cert_chain(str(pki / "tls.pem"), str(pki / "tls.key"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            world.us.gateway.partner_url + "/c2c/v1/messages", data=body, headers=headers
        ) as response,
    ):
        answer = Answer(response.status, await response.read(), dict(response.headers))
    if "C2C-Signature" in answer.headers:
        world.secrets.append(answer.headers["C2C-Signature"])
    return answer


async def nack(
    world: World,
    body: bytes,
    code: NackCode,
    message_id: str | None,
    cause: str,
    *,
    party: str = MX,
    signer: str | None = None,
    signature: str | None = None,
) -> None:
    """Send a message the gateway must refuse with ``code``; check the partner's view."""
    answer = await post(world, body, party=party, signer=signer, signature=signature)
    assert answer.status >= 400, answer.body
    if message_id is None:
        problem = orjson.loads(answer.body)
        assert problem["code"] == code.value
        seen = f"{problem['detail']}"
    else:
        keys = KeyRing(key.verification_key() for key in world.us.gateway.signing_keys)
        receipt = verify_receipt(
            answer.body, answer.headers["C2C-Signature"], keys, US, message_id, body_digest(body)
        )
        assert (receipt.status, receipt.code) == ("NACK", code)
        seen = f"{receipt.detail}"
    # everything the partner got: status line aside, the headers and the body
    partner_saw = answer.body.decode() + "\n" + "\n".join(answer.headers.values())
    world.nacks.append(Nack(code, message_id, partner_saw, cause))
    assert seen, "the partner gets a minimal detail"
    world.oracle.expect(US, "rejected", message_id, code.value)


# --- the internal side: the API of US-CBP -----------------------------------------------


async def api(
    world: World, method: str, path: str, scopes: tuple[str, ...], **kw: Any
) -> tuple[int, bytes]:
    us = world.us
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            us.api_url + path,
            headers=auth(token(us.config, scopes, subject="auditor-7")),
            ssl=client_ssl(us.config),
            **kw,
        ) as response,
    ):
        return response.status, await response.read()


async def send(world: World, recipient: str) -> str:
    payload = world.us.gateway.registry.examples("shipment.status", "1.0")[0]
    document = {"recipient": recipient, "message_type": "shipment.status", "payload": payload}
    status, body = await api(world, "POST", "/api/v1/messages", ("c2c:send",), json=document)
    assert status == 202, body
    message_id: str = orjson.loads(body)["message_id"]
    world.oracle.expect(US, "submitted", message_id, "queued")
    return message_id


async def until_state(world: World, message_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while True:
            record = await world.us.gateway.store.get_outbound(message_id)
            if record is not None and record.state.value == state:
                return
            world.us.dispatcher.wake()
            await asyncio.sleep(0.05)


async def entries(running: Running) -> list[tuple[int, dict[str, Any]]]:
    rows = await running.gateway.store.audit_entries(AuditFilter(), limit=10_000)
    return [(row.seq, orjson.loads(row.entry)) for row in rows]


def observed(log: list[tuple[int, dict[str, Any]]]) -> Counter[Key]:
    found: Counter[Key] = Counter()
    for _, entry in log:
        outcome = entry.get("outcome", "")
        if entry["event"] == "attempt_failed" and RETRY_AT.match(outcome):
            outcome = "retry at <time>"
        found[(entry["event"], entry.get("message_id"), outcome)] += 1
    return found


async def settled(running: Running, expected: Counter[Key]) -> list[tuple[int, dict[str, Any]]]:
    """The log once the background workers (relay, dispatcher) have written what they owe."""
    total = sum(expected.values())
    async with asyncio.timeout(20):
        while True:
            if len(await entries(running)) >= total:
                break
            await asyncio.sleep(0.05)
    # and nothing more arrives after it
    await asyncio.sleep(0.3)
    return await entries(running)


# --- the scenario ------------------------------------------------------------------------


async def inbound_scenario(world: World) -> None:
    oracle = world.oracle
    accepted_id, accepted = envelope(world)
    answer = await post(world, accepted)
    assert answer.status == 202, answer.body
    oracle.accepted_and_delivered(US, accepted_id)
    world.secrets.append(accepted.decode())

    resend = await post(world, accepted)
    assert resend.status == 200
    oracle.expect(US, "duplicate", accepted_id, "ACK")

    _, conflicting = envelope(world, message_id=accepted_id)
    assert conflicting != accepted
    await nack(world, conflicting, NackCode.DUPLICATE_CONFLICT, accepted_id, "digest")

    message_id, body = envelope(world)
    document = orjson.loads(body)
    document["extra"] = 1
    malformed = orjson.dumps(document)
    await nack(world, malformed, NackCode.MALFORMED, message_id, "'extra'")

    payload = world.us.gateway.registry.examples("shipment.advance_data", "1.0")[0]
    missing = sorted(payload)[0]
    del payload[missing]
    message_id, body = envelope(world, payload=payload)
    await nack(world, body, NackCode.SCHEMA_INVALID, message_id, missing)

    message_id, body = envelope(world, schema_version="9.9")
    await nack(world, body, NackCode.UNSUPPORTED_TYPE, message_id, "9.9")

    message_id, body = envelope(world)
    genuine = sign_detached(body, world.keys[MX])
    tampered = body.replace(b'"US-CBP"', b'"US-CBP" ', 1)
    await nack(
        world, tampered, NackCode.SIGNATURE_INVALID, message_id, "signature", signature=genuine
    )

    message_id, body = envelope(world)
    await nack(world, body, NackCode.UNKNOWN_KEY, message_id, world.keys[CA].kid, signer=CA)

    message_id, body = envelope(world, sender=CA)
    await nack(world, body, NackCode.SENDER_MISMATCH, message_id, f"header.sender {CA}")

    message_id, body = envelope(world, message_type=FORBIDDEN_TYPE)
    await nack(world, body, NackCode.NOT_AUTHORIZED, message_id, FORBIDDEN_TYPE)

    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    message_id, body = envelope(world, created_at=old)
    await nack(world, body, NackCode.STALE, message_id, "replay window")

    # CA-CBSA may send one request, of at most CA_MAX_BODY bytes
    _, body = envelope(world, sender=CA)
    padded = body[:-2] + b',"pad":"' + b"x" * CA_MAX_BODY + b'"}}'
    await nack(world, padded, NackCode.TOO_LARGE, None, str(CA_MAX_BODY), party=CA)
    message_id, body = envelope(world, sender=CA)
    await nack(world, body, NackCode.RATE_LIMITED, message_id, "over its rate", party=CA)


async def outbound_scenario(world: World) -> None:
    oracle = world.oracle
    to_mx = await send(world, MX)
    await until_state(world, to_mx, "acknowledged")
    oracle.sent_and_acknowledged(US, to_mx)
    oracle.accepted_and_delivered(MX, to_mx)

    # the CA-CBSA stub answers 503, then ACK
    flaky = await send(world, CA)
    await until_state(world, flaky, "acknowledged")
    oracle.expect(US, "sent", flaky, "attempt 1")
    oracle.expect(US, "attempt_failed", flaky, "retry at <time>")
    oracle.sent_and_acknowledged(US, flaky, attempt=2)

    # then 400 (no retry: dead at once), then ACK to the attempt the operator asks for
    dead = await send(world, CA)
    await until_state(world, dead, "dead")
    oracle.expect(US, "sent", dead, "attempt 1")
    oracle.expect(US, "attempt_failed", dead, "failed")
    oracle.expect(US, "dead", dead, "dead")
    status, body = await api(world, "POST", f"/api/v1/messages/{dead}/retry", ("admin",))
    assert status == 200, body
    oracle.expect(US, "operator_action", dead, "retry")
    await until_state(world, dead, "acknowledged")
    oracle.sent_and_acknowledged(US, dead)
    assert len(world.stub.seen) == 4

    # a refused submission: nothing stored, one entry with the actor
    document = {"recipient": "GB-HMRC", "message_type": "shipment.status", "payload": {}}
    status, body = await api(world, "POST", "/api/v1/messages", ("c2c:send",), json=document)
    assert status == 403, body
    oracle.expect(US, "submit_rejected", None, NackCode.NOT_AUTHORIZED.value)


async def query_scenario(world: World) -> str:
    oracle = world.oracle
    document = {
        "partner": MX,
        "message_type": "query.shipment_lookup",
        "params": world.us.gateway.registry.examples("query.shipment_lookup", "1.0")[0],
        "timeout_s": 20,
    }
    status, body = await api(world, "POST", "/api/v1/queries", ("c2c:query",), json=document)
    assert status == 200, body
    answer = orjson.loads(body)
    query_id: str = answer["query_id"]
    response_id: str = answer["response"]["message_id"]
    oracle.expect(US, "query", query_id, "queued")
    oracle.sent_and_acknowledged(US, query_id)
    oracle.accepted_and_delivered(MX, query_id)
    # MX-ANAM's back office answered: its submission, its delivery to us
    oracle.expect(MX, "submitted", response_id, "queued")
    oracle.sent_and_acknowledged(MX, response_id)
    oracle.accepted_and_delivered(US, response_id)
    return query_id


async def auditor_scenario(world: World) -> None:
    scopes = ("audit:read",)
    status, body = await api(world, "GET", "/api/v1/audit/verify", scopes)
    assert status == 200, body
    assert orjson.loads(body)["ok"] is True
    world.oracle.expect(US, "operator_action", None, "audit_verify")
    status, body = await api(world, "GET", "/api/v1/audit/export", scopes)
    assert status == 200, body
    world.oracle.expect(US, "operator_action", None, "audit_export")


def _strings(value: Any) -> list[str]:
    """The string leaves of a JSON document (field values a leaked body would show)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def _key_material(root: Path) -> list[str]:
    """Every base64 line of every key file of the test PKI (private and public)."""
    lines: list[str] = []
    for path in sorted((root / "pki").rglob("*")):
        if path.suffix not in {".key", ".pub"} or not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line and not line.startswith("-----"):
                lines.append(line)
    return lines


async def test_every_transition_and_action_is_exactly_one_entry(world: World) -> None:
    await inbound_scenario(world)
    await outbound_scenario(world)
    query_id = await query_scenario(world)
    await auditor_scenario(world)

    logs = {
        party: await settled(running, world.oracle.expected[party])
        for party, running in ((US, world.us), (MX, world.mx))
    }
    for party, log in logs.items():
        assert observed(log) == world.oracle.expected[party], party
        assert [seq for seq, _ in log] == list(range(len(log))), f"{party}: seqs have gaps"
        for _, entry in log:
            assert set(entry) <= ENTRY_FIELDS, entry
            assert dt.datetime.fromisoformat(entry["at"]).tzinfo is not None

    us_log = [entry for _, entry in logs[US]]
    # each NACK: exactly one entry, the exact reason there, never in what the partner got
    for refusal in world.nacks:
        (entry,) = [
            e
            for e in us_log
            if e["event"] == "rejected"
            and e.get("message_id") == refusal.message_id
            and e["outcome"] == refusal.code.value
        ]
        reason = entry["reason"]
        assert refusal.cause in reason, (refusal.code, reason)
        if refusal.code is NackCode.SCHEMA_INVALID:
            # PROTOCOL section 4: the detail names the pointer, and here what is wrong there:
            # all a partner needs to fix its payload, and all the reason holds.
            assert f"/payload{reason}" in refusal.partner_saw, reason
        else:
            assert reason not in refusal.partner_saw, (refusal.code, reason)
        assert entry["body_digest"].startswith("sha-256:")
        assert entry["sender"] in {MX, CA}

    # what the entries say about each message, beyond the oracle's key
    for entry in us_log:
        if entry["event"] in {"accepted", "duplicate", "submitted", "query", "sent", "delivered"}:
            assert {"sender", "recipient", "message_type", "body_digest"} <= set(entry), entry
    operator_actions = [e for e in us_log if e["event"] in {"operator_action", "query"}]
    assert {e["actor"] for e in operator_actions} == {"api:auditor-7"}
    (query,) = [e for e in us_log if e["event"] == "query"]
    assert (query["message_id"], query["recipient"]) == (query_id, MX)
    (refused,) = [e for e in us_log if e["event"] == "submit_rejected"]
    assert refused["actor"] == "api:auditor-7"
    assert "GB-HMRC" in refused["reason"]

    # no bodies, signatures or keys in any entry of either log
    leaves = [orjson.dumps(entry).decode() for log in logs.values() for _, entry in log]
    forbidden = world.secrets + _key_material(world.root)
    for seen in world.stub.seen:
        forbidden += [seen.body.decode(), f"{seen.signature}"]
    forbidden += [
        text for text in _strings(orjson.loads(world.stub.seen[0].body)["payload"]) if len(text) > 8
    ]
    for leaf in leaves:
        for secret in forbidden:
            assert secret not in leaf
        assert "-----BEGIN" not in leaf
