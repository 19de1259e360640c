"""Native-format partners (docs/adapters.md): US-CBP and MX-ANAM speak XML to each other
through ``partners/<id>/adapter.py`` (tests/fixtures/xml_partner/adapter.py), two real
gateways on loopback over mTLS."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage
from outbound_env import (
    RETRYING_OUTBOX,
    Running,
    auth,
    client_ssl,
    free_port,
    post_as_partner,
    row_until,
    start_gateway,
    submit_to,
    token,
)
from rabbit import RabbitVhost

from gateway.config import GatewayConfig, load_config
from gateway.crypto.jws import sign_detached, verify_detached
from gateway.crypto.keys import KeyRing, SigningKey, load_signing_key, load_verification_key
from gateway.devenv import prepare_dev_environment
from gateway.envelope import encode_envelope, new_message_id
from gateway.errors import ConfigError
from gateway.model import Header
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter, OutboundState

US, MX = "US-CBP", "MX-ANAM"
XML_TYP = "c2c+xml"
ADAPTER = Path(__file__).parents[1] / "fixtures" / "xml_partner" / "adapter.py"


def native_config(root: Path, party: str, peer: str, peer_port: int, port: int) -> GatewayConfig:
    """``party``'s dev environment with ``peer`` configured as an XML partner in its
    partner.toml (``adapter = "adapter.py"``, ``typ = "c2c+xml"``)."""
    path = prepare_dev_environment(
        root / party,
        party=party,
        pki_dir=root / "pki",
        peers={peer: f"https://127.0.0.1:{peer_port}"},
        partner_port=port,
    )
    folder = path.parent / "partners" / peer
    shutil.copyfile(ADAPTER, folder / "adapter.py")
    toml = folder / "partner.toml"
    text = toml.read_text(encoding="utf-8")
    assert 'adapter = "canonical"' in text
    assert 'typ = "c2c+json"' in text
    text = text.replace('adapter = "canonical"', 'adapter = "adapter.py"')
    toml.write_text(text.replace('typ = "c2c+json"', f'typ = "{XML_TYP}"'), encoding="utf-8")
    config = load_config(path)
    assert config.partners[peer].adapter == "adapter.py"
    return dataclasses.replace(config, outbox=RETRYING_OUTBOX)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Running, Running]]:
    ports = {US: free_port(), MX: free_port()}
    nodes: list[Running] = []
    try:
        for party, peer in ((US, MX), (MX, US)):
            config = native_config(tmp_path, party, peer, ports[peer], ports[party])
            nodes.append(await start_gateway(config))
        yield nodes[0], nodes[1]
    finally:
        for node in reversed(nodes):
            await node.gateway.stop()


@pytest.fixture
async def us(tmp_path: Path) -> AsyncIterator[Running]:
    """US-CBP alone: MX-ANAM (XML) is configured but its endpoint is down."""
    running = await start_gateway(native_config(tmp_path, US, MX, free_port(), free_port()))
    try:
        yield running
    finally:
        await running.gateway.stop()


def xml_module(running: Running, peer: str) -> Any:
    return running.gateway.adapters[peer].module  # type: ignore[attr-defined]


def mx_message(us: Running, message_type: str = "shipment.advance_data") -> tuple[str, bytes]:
    """A canonical MX-ANAM message to US-CBP: its id and bytes."""
    registry = us.gateway.registry
    partner = us.config.partners[MX]
    message_id = new_message_id()
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version="1.0",
        sender=MX,
        recipient=US,
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        legal_basis=partner.legal_basis,
    )
    return message_id, encode_envelope(header, registry.examples(message_type, "1.0")[0])


async def post_as_mx(us: Running, root: Path, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    """POST ``body`` to US-CBP's partner endpoint as MX-ANAM (mTLS), signed c2c+xml."""
    return await post_as_partner(us, root, body, content_type="application/xml", typ=XML_TYP)


async def malformed_entries(us: Running) -> list[dict[str, Any]]:
    rows = await us.gateway.store.audit_entries(AuditFilter(event="rejected", outcome="MALFORMED"))
    return [json.loads(row.entry) for row in rows]


def jws_typ(signature: str) -> str:
    protected = signature.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    return str(header["typ"])


async def test_xml_partners_exchange_messages_both_ways_and_settle_on_their_receipts(
    pair: tuple[Running, Running],
) -> None:
    us, mx = pair
    for sender, recipient, peer in ((us, mx, MX), (mx, us, US)):
        sent = await submit_to(sender, peer)
        assert sent.body is not None
        assert sent.body.startswith(b"<c2c><envelope>")
        assert jws_typ(sent.signature) == XML_TYP
        done = await row_until(
            sender.gateway.store,
            sent.message_id,
            lambda row: (
                row.state is not OutboundState.QUEUED and row.state is not OutboundState.SENT
            ),
        )
        assert done.state is OutboundState.ACKNOWLEDGED, done.last_error
        # the partner's receipt, archived as it came: XML, signed c2c+xml
        assert done.receipt_body is not None
        assert done.receipt_body.startswith(b"<c2c>")
        assert done.receipt_signature is not None
        assert jws_typ(done.receipt_signature) == XML_TYP
        stored = await recipient.gateway.store.get_inbound(sender.config.party, sent.message_id)
        assert stored is not None
        assert stored.body == sent.body
        # the receipt kept with the inbound row is the one re-sent to an exact re-send
        assert stored.receipt_body == done.receipt_body


async def test_an_exact_resend_gets_the_original_native_receipt(
    us: Running, tmp_path: Path
) -> None:
    adapter = us.gateway.adapters[MX]
    _, canonical = mx_message(us)
    body = adapter.from_canonical(canonical)
    first = await post_as_mx(us, tmp_path, body)
    assert first[0] == 202, first[1]
    assert first[1].startswith(b"<c2c>")
    assert first[2]["C2C-Signature"]
    assert jws_typ(first[2]["C2C-Signature"]) == XML_TYP
    again = await post_as_mx(us, tmp_path, body)
    assert again[0] == 200
    assert again[1] == first[1]
    assert again[2]["C2C-Signature"] == first[2]["C2C-Signature"]


def mx_signing_key(root: Path) -> SigningKey:
    return load_signing_key(root / "pki" / MX / "sign.key", party=MX, alg="EdDSA")


async def test_the_internal_api_gives_native_bytes_with_the_partners_media_type(
    us: Running, tmp_path: Path
) -> None:
    """``GET /api/v1/messages/{id}/body`` and ``.../receipt/body``: the XML as signed, typed
    with the media type of MX-ANAM's adapter (the store keeps the bytes, not a media type)."""
    message_id, canonical = mx_message(us)
    body = us.gateway.adapters[MX].from_canonical(canonical)
    status, receipt, headers = await post_as_mx(us, tmp_path, body)
    assert status == 202, receipt
    mx_key = load_verification_key(tmp_path / "pki" / MX / "sign.pub", party=MX, alg="EdDSA")
    us_keys = KeyRing(key.verification_key() for key in us.gateway.signing_keys)
    signed = sign_detached(body, mx_signing_key(tmp_path), typ=XML_TYP)  # Ed25519: deterministic
    for tail, sent, signature, keys in (
        ("body", body, signed, KeyRing([mx_key])),
        ("receipt/body", receipt, headers["C2C-Signature"], us_keys),
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{us.api_url}/api/v1/messages/{message_id}/{tail}",
                headers=auth(token(us.config, ("c2c:receive",))),
                ssl=client_ssl(us.config),
            ) as response,
        ):
            got = await response.read()
        assert response.status == 200, got
        assert response.headers["Content-Type"] == "application/xml"
        assert got == sent
        assert response.headers["C2C-Signature"] == signature
        verify_detached(signature, got, keyring=keys, party=None, at=None, accepted_typs=(XML_TYP,))


async def test_an_asynchronous_xml_receipt_settles_our_message(us: Running, tmp_path: Path) -> None:
    sent = await submit_to(us, MX)  # MX-ANAM's endpoint is down: the row waits
    mx_adapter = xml_module(us, MX)
    receipt_canonical = {
        "status": "ACK",
        "ref_message_id": sent.message_id,
        "ref_digest": sent.body_digest,
        "received_at": "2026-01-01T00:00:00Z",
        "code": None,
        "detail": None,
    }
    header = Header(
        message_id=new_message_id(),
        message_type="receipt",
        schema_version="1.0",
        sender=MX,
        recipient=US,
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        in_reply_to=sent.message_id,
    )
    body = mx_adapter.from_canonical(encode_envelope(header, receipt_canonical))
    status, answer, _ = await post_as_mx(us, tmp_path, body)
    assert status == 202, answer
    done = await row_until(
        us.gateway.store, sent.message_id, lambda row: row.state is OutboundState.ACKNOWLEDGED
    )
    assert done.receipt_body == body


@pytest.mark.parametrize(
    ("mode", "cause", "logged"),
    [
        ("raise", "raised KeyError", ("adapter_failed", None)),
        ("value", "raised ValueError", ("adapter_refused", "ValueError: ")),
        ("str", "returned str, not bytes", None),
    ],
)
async def test_an_adapter_failure_is_malformed_and_audited(
    us: Running,
    tmp_path: Path,
    mode: str,
    cause: str,
    logged: tuple[str, str | None] | None,
) -> None:
    module = xml_module(us, MX)
    _, canonical = mx_message(us)
    body = module.wrap(canonical, mode)
    # what the ValueError quotes: the start of the body's content, a stand-in for a payload
    # value the adapter could not read (a trader's name where a date belongs)
    quoted = body.split(b"<envelope>")[1][:24].decode()
    with structlog.testing.capture_logs() as logs:
        status, answer, headers = await post_as_mx(us, tmp_path, body)
    assert status == 400, answer
    # nothing in the native body could be read, so no message id: the problem document
    assert headers["Content-Type"].startswith("application/problem+json")
    problem = json.loads(answer)
    assert problem["code"] == "MALFORMED"
    assert problem["detail"] == "native format unparseable"
    entries = await malformed_entries(us)
    assert len(entries) == 1, entries
    if logged is None:
        assert entries[0]["reason"] == f"adapter {MX}/adapter.py to_canonical {cause}"
        return
    # the exception's text, which may quote payload values, is in the operator's log alone
    assert entries[0]["reason"] == (
        f"adapter {MX}/adapter.py to_canonical {cause} (its text is in the log,"
        " adapter_refused or adapter_failed)"
    )
    assert quoted not in json.dumps(entries[0])
    assert quoted.encode() not in answer
    event, error = logged
    lines = [line for line in logs if line["event"] == event]
    assert len(lines) == 1, logs
    if error is not None:
        assert lines[0]["error"] == f"{error}{f'Invalid isoformat string: {quoted!r}'!r}"
    for line in logs:
        if line["event"] != event:
            assert quoted not in repr(line), line


async def test_a_slow_adapter_does_not_stall_the_gateway(us: Running, tmp_path: Path) -> None:
    module = xml_module(us, MX)
    module.entered.clear()
    module.released.clear()
    module.waited.clear()
    message_id, canonical = mx_message(us)
    posting = asyncio.create_task(post_as_mx(us, tmp_path, module.wrap(canonical, "wait")))
    try:
        assert await asyncio.to_thread(module.entered.wait, 10)
        # the adapter holds its message; the API still answers meanwhile
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_ssl(us.config))
            ) as session,
            session.get(us.api_url + "/healthz") as response,
        ):
            assert response.status == 200
    finally:
        module.released.set()
    status, answer, _ = await posting
    assert status == 202, answer
    # released by this test, after /healthz answered: not timed out with the event loop held
    assert module.waited == [True]
    assert await us.gateway.store.get_inbound(MX, message_id) is not None


async def test_an_adapter_that_does_not_load_is_refused_at_start(tmp_path: Path) -> None:
    config = native_config(tmp_path, US, MX, free_port(), free_port())
    adapter = config.partners[MX].directory / "adapter.py"
    adapter.write_text("content_types = ['application/xml']\nraise RuntimeError('broken')\n")
    with pytest.raises(ConfigError) as refused:
        Gateway(config)
    assert str(adapter.resolve()) in str(refused.value)
    assert "RuntimeError: broken" in str(refused.value)


async def test_an_adapter_without_its_functions_is_refused_at_start(tmp_path: Path) -> None:
    config = native_config(tmp_path, US, MX, free_port(), free_port())
    adapter = config.partners[MX].directory / "adapter.py"
    adapter.write_text("content_types = 'application/xml'\n\ndef to_canonical(body):\n    ...\n")
    with pytest.raises(ConfigError) as refused:
        Gateway(config)
    message = str(refused.value)
    assert "content_types must be a non-empty list of media types" in message
    assert "from_canonical must be a function" in message


#: a media type of MX-ANAM's own, listed before ``application/xml`` in its adapter
VND_XML = "application/vnd.mx-anam.c2c+xml"


@pytest.fixture
async def us_vnd(tmp_path: Path) -> AsyncIterator[Running]:
    """US-CBP with MX-ANAM's adapter listing ``VND_XML`` first, then ``application/xml``."""
    config = native_config(tmp_path, US, MX, free_port(), free_port())
    adapter = config.partners[MX].directory / "adapter.py"
    text = adapter.read_text(encoding="utf-8")
    listed = 'content_types = ["application/xml"]'
    assert listed in text
    adapter.write_text(
        text.replace(listed, f'content_types = ["{VND_XML}", "application/xml"]'),
        encoding="utf-8",
    )
    running = await start_gateway(config)
    try:
        yield running
    finally:
        await running.gateway.stop()


def media_type(headers: dict[str, str]) -> str:
    return headers["Content-Type"].split(";", 1)[0].strip()


async def test_native_receipts_are_sent_with_the_adapters_content_type(
    us_vnd: Running, tmp_path: Path
) -> None:
    adapter = us_vnd.gateway.adapters[MX]
    _, canonical = mx_message(us_vnd)
    body = adapter.from_canonical(canonical)
    # sent as application/xml (any listed type is accepted inbound); answered with the first
    for expected_status in (202, 200):  # the ACK, then the original receipt to the re-send
        status, answer, headers = await post_as_mx(us_vnd, tmp_path, body)
        assert status == expected_status, answer
        assert media_type(headers) == VND_XML
        assert answer.startswith(b"<c2c>")
        assert jws_typ(headers["C2C-Signature"]) == XML_TYP
    # a signed NACK too: a message whose payload the schema refuses
    message_id = new_message_id()
    header = Header(
        message_id=message_id,
        message_type="shipment.advance_data",
        schema_version="1.0",
        sender=MX,
        recipient=US,
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        legal_basis=us_vnd.config.partners[MX].legal_basis,
    )
    status, answer, headers = await post_as_mx(
        us_vnd, tmp_path, adapter.from_canonical(encode_envelope(header, {}))
    )
    assert status == 400, answer
    assert media_type(headers) == VND_XML
    assert jws_typ(headers["C2C-Signature"]) == XML_TYP
    nack = json.loads(adapter.to_canonical(answer))
    assert nack["payload"]["status"] == "NACK"
    assert nack["payload"]["code"] == "SCHEMA_INVALID"
    assert nack["payload"]["ref_message_id"] == message_id


@pytest.mark.rabbitmq
async def test_c2c_inbound_carries_native_bytes_with_the_partners_media_type(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A CBP system consuming c2c.inbound gets MX-ANAM's XML as signed, typed as XML, not
    as the JSON the property said for every partner."""
    config = native_config(tmp_path, US, MX, free_port(), free_port())
    config = dataclasses.replace(
        config, amqp=dataclasses.replace(config.amqp, url=rabbit_vhost.url())
    )
    running = await start_gateway(config)
    try:
        connection = await aio_pika.connect(rabbit_vhost.url())
        async with connection:
            channel = await connection.channel()
            sink = await channel.declare_queue("test.sink", durable=True)
            await sink.bind("c2c.inbound", routing_key="#")
            deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await sink.consume(deliveries.put, no_ack=True)
            message_id, canonical = mx_message(running)
            body = running.gateway.adapters[MX].from_canonical(canonical)
            status, receipt, _ = await post_as_mx(running, tmp_path, body)
            assert status == 202, receipt
            async with asyncio.timeout(15):
                delivery = await deliveries.get()
            assert (delivery.message_id, delivery.content_type) == (message_id, "application/xml")
            assert delivery.body == body
    finally:
        await running.gateway.stop()
