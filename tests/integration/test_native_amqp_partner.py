"""A native-format partner over AMQP (docs/adapters.md) against the real broker: MX-ANAM
speaks XML (tests/fixtures/xml_partner/adapter.py) on its ``.in`` and ``.out`` queues, and our
receipts reach it in its format, with its media type, signed with its ``typ``."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from amqp_env import AMQP_PARTNER, GATEWAY, write_config
from amqp_peer import Peer, Sink, bind_sink
from rabbit import RabbitVhost

from gateway.adapters.registry import Adapter
from gateway.config import load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import KeyRing, SigningKey, load_signing_key
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.model import Header
from gateway.receipts import Receipt, verify_receipt
from gateway.runtime import Gateway

pytestmark = pytest.mark.rabbitmq

XML_TYP = "c2c+xml"
#: MX-ANAM's own media type, listed first in its adapter (``application/xml`` after it)
VND_XML = "application/vnd.mx-anam.c2c+xml"
ADAPTER = Path(__file__).parents[1] / "fixtures" / "xml_partner" / "adapter.py"


def jws_typ(signature: str) -> str:
    protected = signature.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
    return str(header["typ"])


class NativeAmqp:
    def __init__(self, root: Path, gateway: Gateway, peer: Peer, sink: Sink) -> None:
        self.gateway = gateway
        self.peer = peer
        self.sink = sink
        self.adapter: Adapter = gateway.adapters[AMQP_PARTNER]
        self.key: SigningKey = load_signing_key(
            root / "certs" / AMQP_PARTNER / "sign.key", party=AMQP_PARTNER, alg="EdDSA"
        )
        self.our_keys = KeyRing(key.verification_key() for key in gateway.signing_keys)

    def message(self, payload: dict[str, object] | None = None) -> tuple[str, bytes]:
        """An XML ``shipment.advance_data`` of MX-ANAM's: its id and wire bytes."""
        if payload is None:
            payload = self.gateway.registry.examples("shipment.advance_data", "1.0")[0]
        now = dt.datetime.now(dt.UTC)
        header = Header(
            message_id=new_message_id(),
            message_type="shipment.advance_data",
            schema_version="1.0",
            sender=AMQP_PARTNER,
            recipient=GATEWAY,
            created_at=now,
            expires_at=now + dt.timedelta(days=7),
            correlation_id=new_message_id(),
        )
        canonical = encode_envelope(header, payload)
        return header.message_id, self.adapter.from_canonical(canonical)

    async def send(self, message_id: str, body: bytes) -> None:
        await self.peer.send(
            body,
            signature=sign_detached(body, self.key, typ=XML_TYP),
            message_id=message_id,
            content_type="application/xml",
        )

    def receipt(self, out: AbstractIncomingMessage, *, message_id: str, body: bytes) -> Receipt:
        """Check a receipt on ``.out``: MX-ANAM's format and media type, signed c2c+xml, with
        the PROTOCOL section 5 properties."""
        signature = out.headers["c2c-signature"]
        assert isinstance(signature, str)
        assert jws_typ(signature) == XML_TYP
        assert out.content_type == VND_XML
        assert out.body.startswith(b"<c2c>")
        receipt = verify_receipt(
            out.body,
            signature,
            self.our_keys,
            GATEWAY,
            message_id,
            body_digest(body),
            typ=XML_TYP,
            adapter=self.adapter,
        )
        header = receipt.envelope.header
        assert out.type == "receipt"
        assert out.app_id == GATEWAY
        assert out.message_id == header.message_id
        assert out.correlation_id == header.correlation_id
        assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        return receipt


@asynccontextmanager
async def native_amqp_gateway(root: Path, vhost: RabbitVhost) -> AsyncIterator[NativeAmqp]:
    """The AMQP test gateway (amqp_env) with MX-ANAM configured as an XML partner."""
    path = write_config(root, amqp_url=vhost.url())
    folder = root / "partners" / AMQP_PARTNER
    adapter = folder / "adapter.py"
    shutil.copyfile(ADAPTER, adapter)
    listed = 'content_types = ["application/xml"]'
    source = adapter.read_text(encoding="utf-8")
    assert listed in source
    adapter.write_text(
        source.replace(listed, f'content_types = ["{VND_XML}", "application/xml"]'),
        encoding="utf-8",
    )
    toml = folder / "partner.toml"
    text = toml.read_text(encoding="utf-8")
    named = f'name = "{AMQP_PARTNER} test partner"\n'
    assert named in text
    toml.write_text(
        text.replace(named, f'{named}adapter = "adapter.py"\ntyp = "{XML_TYP}"\n'),
        encoding="utf-8",
    )
    gateway = Gateway(load_config(path))
    connection = await aio_pika.connect(vhost.url())
    try:
        channel = await connection.channel()
        sink_queue = await bind_sink(channel)
        sink = Sink()
        await sink_queue.consume(sink.on_message)
        await gateway.start()
        peer = Peer(connection)
        await peer.open()
        try:
            yield NativeAmqp(root, gateway, peer, sink)
        finally:
            await gateway.stop()
    finally:
        await connection.close()


async def test_a_native_partner_over_amqp_gets_its_receipts_in_its_format(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with native_amqp_gateway(tmp_path, rabbit_vhost) as env:
        message_id, body = env.message()
        await env.send(message_id, body)
        first = await env.peer.next_out()
        ack = env.receipt(first, message_id=message_id, body=body)
        assert ack.status == "ACK"
        assert ack.envelope.header.recipient == AMQP_PARTNER
        stored = await env.gateway.store.get_inbound(AMQP_PARTNER, message_id)
        assert stored is not None
        assert stored.body == body  # its wire bytes, read through its adapter
        assert stored.transport == "amqp"
        assert stored.receipt_body == first.body
        await env.sink.wait_for(1)

        # an exact re-send: the original receipt, byte for byte
        await env.send(message_id, body)
        again = await env.peer.next_out()
        assert again.body == first.body
        assert again.headers["c2c-signature"] == first.headers["c2c-signature"]
        assert again.content_type == VND_XML
        assert again.message_id == first.message_id

        # a signed NACK, in its format too
        refused_id, refused = env.message(payload={})
        await env.send(refused_id, refused)
        nack = env.receipt(await env.peer.next_out(), message_id=refused_id, body=refused)
        assert nack.status == "NACK"
        assert nack.code is not None
        assert nack.code.value == "SCHEMA_INVALID"
        assert await env.gateway.store.get_inbound(AMQP_PARTNER, refused_id) is None
