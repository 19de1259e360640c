"""Where the gateway sends a partner's messages, against a real partner endpoint on loopback.

RELIABILITY-SECURITY T63: only to public addresses, or in networks the partner's
``[https] allowed_networks`` lists, checked on every connection on the addresses a host name
resolved to. T09: only to a server whose certificate chains to that partner's CA and names
the URL's host; otherwise not a byte of the message leaves."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from outbound_env import gateway_config
from partner_stub import PartnerStub

from gateway.config import PartnerConfig
from gateway.crypto.pki import init_dev_pki
from gateway.envelope import new_message_id
from gateway.netpolicy import parse_network
from gateway.outbound.transport import Delivery, PartnerReply, TransportError
from gateway.transports.https_client import AddressRefused, HttpsTransport, PolicyResolver

LOOPBACK = (parse_network("127.0.0.0/8"), parse_network("::1/128"))


@dataclasses.dataclass
class World:
    partner: PartnerConfig
    stub: PartnerStub
    transport: HttpsTransport


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    stub = PartnerStub(pki=tmp_path / "pki")
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    base = await stub.start()
    partner = config.partners["MX-ANAM"]
    # devenv allowed the peer's own loopback address: the URL as the development setup has it
    assert partner.https.allowed_networks == (parse_network("127.0.0.1/32"),)
    partner = dataclasses.replace(
        partner, https=dataclasses.replace(partner.https, url=base + "/c2c/v1/messages")
    )
    transport = HttpsTransport(config.tls, timeout_s=5.0)
    try:
        yield World(partner, stub, transport)
    finally:
        await transport.aclose()
        await stub.stop()


def to(partner: PartnerConfig, url: str, networks: tuple[object, ...]) -> PartnerConfig:
    https = dataclasses.replace(partner.https, url=url, allowed_networks=networks)
    return dataclasses.replace(partner, https=https)


def delivery(partner: PartnerConfig) -> Delivery:
    message_id = new_message_id()
    body = orjson.dumps({"header": {"sender": "US-CBP", "message_id": message_id}})
    return Delivery(
        partner=partner,
        sender="US-CBP",
        message_id=message_id,
        message_type="shipment.status",
        body=body,
        signature="eyJhbGciOiJFZERTQSJ9..c2ln",
    )


async def test_an_allowed_network_is_reached(world: World) -> None:
    reply = await world.transport.send(delivery(world.partner))
    assert isinstance(reply, PartnerReply)
    assert reply.status == 202
    assert len(world.stub.seen) == 1


async def test_a_loopback_literal_is_not_connected_to(world: World) -> None:
    url = f"https://127.0.0.1:{world.stub.port}/c2c/v1/messages"
    with pytest.raises(TransportError) as refused:
        await world.transport.send(delivery(to(world.partner, url, ())))
    assert refused.value.reason == f"not connecting to {url}: 127.0.0.1 is a loopback address"
    assert refused.value.may_have_arrived is False
    assert world.stub.seen == []


async def test_a_name_resolving_to_loopback_is_not_connected_to(world: World) -> None:
    # "localhost" is a name: the check runs on what it resolved to, at connect time.
    url = f"https://localhost:{world.stub.port}/c2c/v1/messages"
    with pytest.raises(TransportError) as refused:
        await world.transport.send(delivery(to(world.partner, url, ())))
    assert refused.value.reason.startswith(
        f"not connecting to {url}: localhost resolves only to addresses the gateway does not"
        " connect to ("
    )
    assert "127.0.0.1 is a loopback address" in refused.value.reason
    assert world.stub.seen == []
    # Listed, the same name is reached (the dev certificate names localhost too).
    reply = await world.transport.send(delivery(to(world.partner, url, LOOPBACK)))
    assert isinstance(reply, PartnerReply)
    assert reply.status == 202
    assert len(world.stub.seen) == 1


async def test_a_server_certificate_of_another_ca_gets_nothing(
    world: World, tmp_path: Path
) -> None:
    init_dev_pki(tmp_path / "other", ["MX-ANAM"])
    https = dataclasses.replace(world.partner.https, ca=tmp_path / "other" / "ca.pem")
    with pytest.raises(TransportError) as refused:
        await world.transport.send(delivery(dataclasses.replace(world.partner, https=https)))
    assert refused.value.reason.startswith(f"TLS certificate of {world.partner.https.url}")
    assert "certificate verify failed" in refused.value.reason
    assert refused.value.may_have_arrived is False
    assert world.stub.seen == []


async def test_a_server_certificate_for_another_host_gets_nothing(tmp_path: Path) -> None:
    # The partner's own CA, but its certificate names 127.0.0.1 and localhost, not 127.0.0.2.
    stub = PartnerStub(pki=tmp_path / "pki")
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    base = await stub.start(host="127.0.0.2")
    partner = to(config.partners["MX-ANAM"], base + "/c2c/v1/messages", LOOPBACK)
    transport = HttpsTransport(config.tls, timeout_s=5.0)
    try:
        with pytest.raises(TransportError) as refused:
            await transport.send(delivery(partner))
    finally:
        await transport.aclose()
        await stub.stop()
    assert "certificate verify failed: IP address mismatch" in refused.value.reason
    assert refused.value.may_have_arrived is False
    assert stub.seen == []


class Answers(AbstractResolver):
    """A DNS answer as a rebinding attacker would give it (a fault real DNS here cannot make)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_only_allowed_addresses_of_an_answer_are_kept() -> None:
    resolver = PolicyResolver(
        Answers("192.0.2.10", "93.184.215.14", "169.254.169.254", "::ffff:127.0.0.1", "10.1.1.1")
    )
    resolver.allow("partner.example", (parse_network("10.1.0.0/16"),))
    kept = await resolver.resolve("partner.example", 443)
    assert [r["host"] for r in kept] == ["93.184.215.14", "10.1.1.1"]
    rebound = PolicyResolver(Answers("169.254.169.254", "::ffff:127.0.0.1", "10.1.1.1"))
    with pytest.raises(AddressRefused) as refused:
        await rebound.resolve("partner.example", 443)
    assert "169.254.169.254 is a link-local address" in str(refused.value)
    assert "127.0.0.1 is a loopback address" in str(refused.value)
    assert "10.1.1.1 is a private address" in str(refused.value)
