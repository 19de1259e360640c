"""Outbound connections check the partner's server certificate by OCSP when ``[tls] ocsp``
is on, as inbound ones check its client certificate: over real mutual TLS on loopback, with a
real OCSP responder of the dev CA, a gateway sends nothing to a partner whose server
certificate is revoked, nor while no trustworthy status can be had (fail closed), and sends
once the responder answers good."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from cryptography.x509 import ocsp
from ocsp_responder import Responder, serving
from outbound_env import (
    Running,
    outbound_refused,
    row_until,
    start_sending_to_stub,
    submit_to,
)
from partner_stub import PartnerStub

from gateway.netpolicy import parse_network
from gateway.store.base import OutboundState

MX = "MX-ANAM"


@pytest.fixture
async def responder(tmp_path: Path) -> AsyncIterator[Responder]:
    async with serving(tmp_path, (MX,)) as server:
        yield server


@pytest.fixture
async def sending(
    tmp_path: Path, responder: Responder
) -> AsyncIterator[tuple[PartnerStub, Running]]:
    async with _sending(tmp_path, responder) as running:
        yield running


@contextlib.asynccontextmanager
async def _sending(
    tmp_path: Path, responder: Responder, *, max_age_s: float = 3600.0
) -> AsyncIterator[tuple[PartnerStub, Running]]:
    """US-CBP's gateway with ``[tls] ocsp`` asking ``responder``, and MX-ANAM's endpoint."""
    stub, running = await start_sending_to_stub(
        tmp_path,
        lambda: {
            "ocsp": True,
            "ocsp_url": responder.url,
            "ocsp_allowed_networks": (parse_network("127.0.0.1/32"),),
            "ocsp_max_age_s": max_age_s,
        },
    )
    try:
        yield stub, running
    finally:
        await running.gateway.stop()
        await stub.stop()


async def test_a_good_status_is_asked_once_and_the_messages_go(
    sending: tuple[PartnerStub, Running], responder: Responder
) -> None:
    stub, running = sending
    for _ in range(3):
        record = await submit_to(running, MX)
        await row_until(
            running.gateway.store,
            record.message_id,
            lambda r: r.state is OutboundState.ACKNOWLEDGED,
        )
    assert len(stub.seen) == 3
    # kept until its nextUpdate: not asked again for the next messages
    assert responder.asked[MX] == 1


async def test_a_revoked_server_certificate_gets_nothing(
    sending: tuple[PartnerStub, Running], responder: Responder
) -> None:
    stub, running = sending
    responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
    record = await submit_to(running, MX)
    refused = await row_until(running.gateway.store, record.message_id, lambda r: r.attempts >= 2)
    assert refused.state is OutboundState.QUEUED
    assert refused.last_error is not None
    assert "TLS certificate of https://127.0.0.1:" in refused.last_error
    assert f"revoked: certificate serial {responder.serial(MX):x} revoked" in refused.last_error
    assert "(OCSP, http://127.0.0.1:" in refused.last_error
    assert outbound_refused(running, "revoked") >= 2
    # refused after the handshake, before the request: not a byte of it reached the partner
    assert stub.seen == []


async def test_no_status_fails_closed_until_the_responder_answers(
    sending: tuple[PartnerStub, Running], responder: Responder
) -> None:
    stub, running = sending
    responder.down = True
    record = await submit_to(running, MX)
    refused = await row_until(running.gateway.store, record.message_id, lambda r: r.attempts >= 2)
    assert refused.state is OutboundState.QUEUED
    assert refused.last_error is not None
    assert "revocation_unknown" in refused.last_error
    assert "HTTP 503" in refused.last_error
    assert outbound_refused(running, "revocation_unknown") >= 2
    assert stub.seen == []
    # the responder is back with a good status: the message goes
    responder.down = False
    delivered = await row_until(
        running.gateway.store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
    )
    assert delivered.attempts >= 3
    assert len(stub.seen) == 1


async def test_a_kept_alive_connection_is_not_reused_past_its_status_answer(
    tmp_path: Path, responder: Responder
) -> None:
    """The partner's server certificate is revoked while a connection to it is kept alive:
    the connection carries messages while the good answer it was checked with holds, and
    none after. The next message needs a new connection, checked anew, and gets nothing."""
    async with _sending(tmp_path, responder, max_age_s=2.0) as (stub, running):
        store = running.gateway.store
        first = await submit_to(running, MX)
        one = await row_until(
            store, first.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
        )
        assert responder.asked[MX] == 1
        responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
        # within the answer's two seconds: the kept-alive connection still carries it
        second = await submit_to(running, MX)
        two = await row_until(
            store, second.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
        )
        assert responder.asked[MX] == 1
        await asyncio.sleep(2.5)  # past the answer, well within aiohttp's 15 s keep-alive
        third = await submit_to(running, MX)
        refused = await row_until(store, third.message_id, lambda r: r.attempts >= 1)
        assert refused.state is OutboundState.QUEUED
        assert "revoked: certificate serial" in (refused.last_error or "")
        assert responder.asked[MX] == 2
        assert [seen.body for seen in stub.seen] == [one.body, two.body]


def test_refused_on_uvloop(tmp_path: Path) -> None:
    """``serve`` runs on uvloop: the server certificate is read off its TLS transports too."""

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        async with (
            serving(tmp_path, (MX,)) as responder,
            _sending(tmp_path, responder) as (stub, running),
        ):
            responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
            record = await submit_to(running, MX)
            refused = await row_until(
                running.gateway.store, record.message_id, lambda r: r.attempts >= 1
            )
            assert "revoked" in (refused.last_error or "")
            assert stub.seen == []

    uvloop.run(scenario())
