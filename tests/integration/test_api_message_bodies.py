"""The exact stored bytes of a message and of its receipt, over the internal API (real TLS).

A detached JWS covers the exact bytes on the wire (PROTOCOL.md section 3): a partner that
sent pretty-printed JSON signed those bytes, so the parsed ``envelope`` of
``GET /api/v1/messages/{id}``, serialised again, does not verify. ``.../body`` and
``.../receipt/body`` give the bytes as stored with the JWS in ``C2C-Signature``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from https_env import wait_relayed
from inbound_records import sample_record
from outbound_env import (
    RETRYING_OUTBOX,
    Running,
    auth,
    client_ssl,
    example,
    free_port,
    gateway_config,
    partner_signature,
    post_as_partner,
    row_until,
    start_gateway,
    token,
)
from partner_stub import PartnerStub
from serve_proc import run_cli

from gateway.crypto.jws import sign_detached, verify_detached
from gateway.crypto.keys import KeyRing, load_signing_key, load_verification_key
from gateway.envelope import encode_envelope, new_message_id
from gateway.errors import SignatureInvalid
from gateway.model import Header
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import AuditFilter, OutboundState

US, MX = "US-CBP", "MX-ANAM"
SEND, RECEIVE, ADMIN = ("c2c:send",), ("c2c:receive",), ("admin",)


@dataclasses.dataclass
class Raw:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


async def get(running: Running, path: str, scopes: tuple[str, ...] = ADMIN) -> Raw:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            running.api_url + path,
            headers=auth(token(running.config, scopes)),
            ssl=client_ssl(running.config),
        ) as response,
    ):
        return Raw(response.status, await response.read(), dict(response.headers))


def pretty(document: Any) -> bytes:
    """JSON as a partner's library may write it: indented, with a newline at the end."""
    return json.dumps(document, indent=2).encode() + b"\n"


def keyring(root: Path, party: str) -> KeyRing:
    return KeyRing(
        [load_verification_key(root / "pki" / party / "sign.pub", party=party, alg="EdDSA")]
    )


def verifies(jws: str, body: bytes, root: Path, party: str) -> bool:
    try:
        verify_detached(jws, body, keyring=keyring(root, party), party=party, at=None)
    except SignatureInvalid:
        return False
    return True


def mx_message() -> tuple[str, bytes]:
    """An MX-ANAM shipment.status to US-CBP, pretty-printed as its sender wrote it."""
    message_id = new_message_id()
    now = datetime.now(UTC)
    header = Header(
        message_id=message_id,
        message_type="shipment.status",
        schema_version="1.0",
        sender=MX,
        recipient=US,
        created_at=now,
        expires_at=now + timedelta(days=1),
    )
    payload = SchemaRegistry.load_builtin().examples("shipment.status", "1.0")[0]
    return message_id, pretty(json.loads(encode_envelope(header, payload)))


async def post_as_mx(running: Running, root: Path, body: bytes) -> Raw:
    return Raw(*await post_as_partner(running, root, body))


class PrettyReceipts(PartnerStub):
    """MX-ANAM's endpoint answering with its receipts pretty-printed, signed as written."""

    def _receipt(self, body: bytes, **kwargs: Any) -> web.Response:
        plain = super()._receipt(body, **kwargs)
        assert isinstance(plain.body, bytes)
        written = pretty(json.loads(plain.body))
        key = load_signing_key(self.pki / self.party / "sign.key", party=self.party, alg="EdDSA")
        return web.Response(
            status=plain.status,
            body=written,
            content_type="application/json",
            headers={"C2C-Signature": sign_detached(written, key)},
        )


@pytest.fixture
async def sending(tmp_path: Path) -> AsyncIterator[tuple[Running, PrettyReceipts]]:
    """US-CBP sending to MX-ANAM's ``PrettyReceipts`` endpoint."""
    port = free_port()
    config = gateway_config(
        tmp_path, US, peers={MX: f"https://127.0.0.1:{port}"}, outbox=RETRYING_OUTBOX
    )
    stub = PrettyReceipts(pki=tmp_path / "pki")
    await stub.start(port)
    running = await start_gateway(config)
    try:
        yield running, stub
    finally:
        await running.gateway.stop()
        await stub.stop()


async def submit(running: Running, scopes: tuple[str, ...] = SEND) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            running.api_url + "/api/v1/messages",
            json={
                "recipient": MX,
                "message_type": "shipment.status",
                "payload": example(running.gateway, "shipment.status"),
            },
            headers=auth(token(running.config, scopes)),
            ssl=client_ssl(running.config),
        ) as response,
    ):
        assert response.status == 202, await response.text()
        message_id: str = (await response.json())["message_id"]
        return message_id


async def test_a_pretty_printed_inbound_message_verifies_from_its_stored_bytes(
    us: Running, tmp_path: Path
) -> None:
    message_id, sent = mx_message()
    assert b"\n  " in sent
    assert sent.endswith(b"}\n")
    answer = await post_as_mx(us, tmp_path, sent)
    assert answer.status == 202, answer.body
    jws = partner_signature(tmp_path, sent)  # Ed25519 signatures are deterministic

    got = await get(us, f"/api/v1/messages/{message_id}/body", RECEIVE)
    assert got.status == 200, got.body
    assert got.body == sent
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["C2C-Signature"] == jws
    assert got.headers["Cache-Control"] == "no-store"
    assert verifies(got.headers["C2C-Signature"], got.body, tmp_path, MX)

    # the parsed envelope is not what was signed: serialised again, it does not verify
    view = (await get(us, f"/api/v1/messages/{message_id}", RECEIVE)).json()
    assert view["signature"] == jws
    for again in (
        json.dumps(view["envelope"]).encode(),
        json.dumps(view["envelope"], separators=(",", ":")).encode(),
    ):
        assert not verifies(view["signature"], again, tmp_path, MX)

    # the receipt we answered with, exactly as MX-ANAM got it
    receipt = await get(us, f"/api/v1/messages/{message_id}/receipt/body", RECEIVE)
    assert receipt.status == 200, receipt.body
    assert receipt.body == answer.body
    assert receipt.headers["C2C-Signature"] == answer.headers["C2C-Signature"]
    assert receipt.headers["Content-Type"] == "application/json"
    assert receipt.headers["Cache-Control"] == "no-store"
    assert verifies(receipt.headers["C2C-Signature"], receipt.body, tmp_path, US)


async def test_the_sig_verify_command_takes_the_stored_bytes_not_the_envelope(
    us: Running, tmp_path: Path
) -> None:
    """The reviewer's own check: ``c2c-gateway sig verify`` on what the API gives."""
    message_id, sent = mx_message()
    assert (await post_as_mx(us, tmp_path, sent)).status == 202
    got = await get(us, f"/api/v1/messages/{message_id}/body", RECEIVE)
    view = (await get(us, f"/api/v1/messages/{message_id}", RECEIVE)).json()
    key = str(tmp_path / "pki" / MX / "sign.pub")
    stored, parsed = tmp_path / "stored.json", tmp_path / "parsed.json"
    stored.write_bytes(got.body)
    parsed.write_bytes(json.dumps(view["envelope"]).encode())
    jws = got.headers["C2C-Signature"]
    code, out, err = await run_cli(
        "sig", "verify", "--key", key, "--body", str(stored), "--jws", jws
    )
    assert (code, out.startswith("OK kid=")) == (0, True), err
    code, _, err = await run_cli("sig", "verify", "--key", key, "--body", str(parsed), "--jws", jws)
    assert code == 1
    assert err.startswith("SIGNATURE_INVALID")


async def test_an_outbound_message_and_its_pretty_printed_receipt_verify(
    sending: tuple[Running, PrettyReceipts], tmp_path: Path
) -> None:
    running, stub = sending
    message_id = await submit(running)
    running.dispatcher.wake()
    record = await row_until(
        running.gateway.store, message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
    )
    assert record.receipt_body is not None
    assert record.receipt_body.endswith(b"}\n")

    got = await get(running, f"/api/v1/messages/{message_id}/body", SEND)
    assert got.status == 200, got.body
    assert got.body == stub.seen[0].body
    assert got.headers["C2C-Signature"] == stub.seen[0].signature
    assert got.headers["Content-Type"] == "application/json"
    assert verifies(got.headers["C2C-Signature"], got.body, tmp_path, US)

    receipt = await get(running, f"/api/v1/messages/{message_id}/receipt/body", SEND)
    assert receipt.status == 200, receipt.body
    assert receipt.body == record.receipt_body
    assert receipt.headers["C2C-Signature"] == record.receipt_signature
    assert receipt.headers["Content-Type"] == "application/json"
    assert receipt.headers["Cache-Control"] == "no-store"
    assert verifies(receipt.headers["C2C-Signature"], receipt.body, tmp_path, MX)
    view = (await get(running, f"/api/v1/messages/{message_id}", SEND)).json()
    again = json.dumps(view["receipt"]["envelope"]).encode()
    assert not verifies(view["receipt"]["signature"], again, tmp_path, MX)


async def test_a_body_removed_by_retention_is_gone_and_its_receipt_is_kept(
    sending: tuple[Running, PrettyReceipts], tmp_path: Path
) -> None:
    running, _ = sending
    store = running.gateway.store
    ours = await submit(running)
    running.dispatcher.wake()
    await row_until(store, ours, lambda r: r.state is OutboundState.ACKNOWLEDGED)
    theirs, sent = mx_message()
    assert (await post_as_mx(running, tmp_path, sent)).status == 202
    await wait_relayed(store)
    assert await store.purge_bodies(datetime.now(UTC) + timedelta(days=1)) == 2

    for message_id in (ours, theirs):
        view = (await get(running, f"/api/v1/messages/{message_id}")).json()
        assert view["envelope"] is None
        gone = await get(running, f"/api/v1/messages/{message_id}/body")
        assert gone.status == 410, gone.body
        assert gone.headers["Content-Type"] == "application/problem+json"
        assert gone.headers["Cache-Control"] == "no-store"
        assert gone.json() == {
            "type": "about:blank",
            "title": "Gone",
            "status": 410,
            "detail": f"the body of message {message_id} was removed after the retention"
            " period ([retention] body_retention_days): its digest (body_digest) and signature"
            " are kept with the message, and the digest in the audit log",
            "body_digest": view["body_digest"],
        }
        entries = await store.audit_entries(AuditFilter(message_id=message_id))
        assert view["body_digest"] in {json.loads(e.entry).get("body_digest") for e in entries}
        # receipts are never purged
        receipt = await get(running, f"/api/v1/messages/{message_id}/receipt/body")
        assert receipt.status == 200, receipt.body
        assert verifies(
            receipt.headers["C2C-Signature"],
            receipt.body,
            tmp_path,
            MX if message_id == ours else US,
        )


async def test_no_such_message_and_no_receipt_yet_are_404(us: Running) -> None:
    missing = "01890000-0000-7000-8000-000000000000"
    for path in (f"/api/v1/messages/{missing}/body", f"/api/v1/messages/{missing}/receipt/body"):
        got = await get(us, path)
        assert (got.status, got.headers["Content-Type"]) == (404, "application/problem+json")
        assert got.json()["detail"] == f"no message with message_id {missing}"
        assert got.headers["Cache-Control"] == "no-store"
    queued = await submit(us)  # MX-ANAM's port is closed: it stays queued, unanswered
    got = await get(us, f"/api/v1/messages/{queued}/body")
    assert got.status == 200
    got = await get(us, f"/api/v1/messages/{queued}/receipt/body")
    assert (got.status, got.headers["Content-Type"]) == (404, "application/problem+json")
    assert got.json()["detail"] == (
        f"message {queued} to MX-ANAM has no receipt: it is queued, no receipt has come"
    )
    got = await get(us, "/api/v1/messages/not-a-uuid/body")
    assert (got.status, got.json()["detail"]) == (400, "message_id must be a lowercase UUID")
    got = await get(us, f"/api/v1/messages/{queued}/body?colour=red")
    assert got.status == 400


async def test_a_reader_of_one_direction_gets_no_bytes_of_the_other(us: Running) -> None:
    ours = await submit(us)
    record = sample_record(sender=MX)
    await us.gateway.store.store_inbound(record, [])
    theirs = record.message_id
    needs_receive = "this operation needs one of the scopes admin c2c:receive"
    needs_outbound = "this operation needs one of the scopes admin c2c:query c2c:send"
    for scopes, mine, other, refused, needs in (
        (SEND, ours, theirs, "inbound", needs_receive),
        (("c2c:query",), ours, theirs, "inbound", needs_receive),
        (RECEIVE, theirs, ours, "outbound", needs_outbound),
    ):
        for tail in ("/body", "/receipt/body"):
            got = await get(us, f"/api/v1/messages/{other}{tail}", scopes)
            assert (got.status, got.json()["detail"]) == (
                404,
                f"no message with message_id {other}",
            ), (scopes, tail)
            got = await get(us, f"/api/v1/messages/{other}{tail}?direction={refused}", scopes)
            assert (got.status, got.json()["detail"]) == (403, needs), (scopes, tail)
        got = await get(us, f"/api/v1/messages/{mine}/body", scopes)
        assert got.status == 200, (scopes, got.body)
    got = await get(us, f"/api/v1/messages/{ours}/body", ("audit:read",))
    assert got.status == 403
    for message_id in (ours, theirs):
        assert (await get(us, f"/api/v1/messages/{message_id}/body", ADMIN)).status == 200
    got = await get(us, f"/api/v1/messages/{theirs}/body", RECEIVE)
    assert (got.body, got.headers["C2C-Signature"]) == (record.body, record.signature)


async def test_an_id_of_several_messages_is_named_for_the_bytes_too(us: Running) -> None:
    ours = await submit(us)
    twin = dataclasses.replace(sample_record(sender=MX), message_id=ours)
    await us.gateway.store.store_inbound(twin, [])
    for tail in ("/body", "/receipt/body"):
        got = await get(us, f"/api/v1/messages/{ours}{tail}")
        assert got.status == 409, got.body
        assert got.json()["detail"] == (
            f"message_id {ours} names 2 messages (outbound to MX-ANAM, inbound from MX-ANAM):"
            " give direction and partner"
        )
    got = await get(us, f"/api/v1/messages/{ours}/body?direction=inbound&partner={MX}")
    assert (got.status, got.body) == (200, twin.body)
    got = await get(us, f"/api/v1/messages/{ours}/receipt/body?direction=inbound")
    assert (got.status, got.body) == (200, twin.receipt_body)
    assert got.headers["C2C-Signature"] == twin.receipt_signature
    got = await get(us, f"/api/v1/messages/{ours}/body?direction=outbound")
    assert got.status == 200
    stored = await us.gateway.store.get_outbound(ours)
    assert stored is not None
    assert (got.body, got.headers["C2C-Signature"]) == (stored.body, stored.signature)
