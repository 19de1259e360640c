"""Outbound connections check the partner's server certificate against ``[tls] crls``: a
gateway with CRLs sends nothing to a partner whose certificate its CA revoked, over real
mutual TLS on loopback, and sends again once a newer CRL lifts the revocation. A connection
kept alive is not reused past its server certificate's notAfter."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from crl_file import write_crl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from https_env import retirements
from outbound_env import (
    Running,
    outbound_refused,
    row_until,
    start_sending_to_stub,
    submit_to,
)
from partner_stub import PartnerStub

from gateway.crypto.pki import CA_KEY
from gateway.store.base import OutboundState

MX = "MX-ANAM"


async def _running(tmp_path: Path, make_crl: Callable[[], Path]) -> tuple[PartnerStub, Running]:
    """A gateway with ``[tls] crls`` (the file ``make_crl`` writes once the PKI is made), and
    the partner it sends to."""
    return await start_sending_to_stub(
        tmp_path, lambda: {"crls": (make_crl(),), "crl_check_interval_s": 3600}
    )


async def test_a_revoked_partner_server_gets_nothing_until_a_newer_crl(tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    stub, running = await _running(tmp_path, lambda: write_crl(tmp_path, [MX], this_update=start))
    gateway = running.gateway
    try:
        record = await submit_to(running, MX)
        refused = await row_until(gateway.store, record.message_id, lambda r: r.attempts >= 2)
        assert refused.state is OutboundState.QUEUED
        assert refused.last_error is not None
        assert "TLS certificate" in refused.last_error
        assert "revoked" in refused.last_error
        assert outbound_refused(running, "revoked") >= 2
        # Refused in the handshake: not a byte of the message reached the partner.
        assert stub.seen == []

        # The CA lifts the revocation: the next connections take the newer CRL.
        write_crl(tmp_path, [], this_update=start + dt.timedelta(minutes=1))
        assert gateway.crl_watcher is not None
        gateway.crl_watcher.check()
        delivered = await row_until(
            gateway.store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
        )
        assert len(stub.seen) == 1
        assert delivered.attempts >= 3
    finally:
        await gateway.stop()
        await stub.stop()


async def test_a_crl_past_its_next_update_fails_closed_outbound(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    stub, running = await _running(
        tmp_path,
        lambda: write_crl(
            tmp_path,
            [],
            this_update=now - dt.timedelta(days=2),
            next_update=now - dt.timedelta(days=1),
        ),
    )
    try:
        record = await submit_to(running, MX)
        refused = await row_until(
            running.gateway.store, record.message_id, lambda r: r.attempts >= 1
        )
        assert refused.last_error is not None
        assert "CRL has expired" in refused.last_error
        assert outbound_refused(running, "revocation_unknown") >= 1
        assert stub.seen == []
    finally:
        await running.gateway.stop()
        await stub.stop()


def reissue_until(pki: Path, party: str, not_after: dt.datetime) -> None:
    """``party``'s TLS certificate issued again by the dev CA, the same but valid only until
    ``not_after``."""
    path = pki / party / "tls.pem"
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ca_key = serialization.load_pem_private_key((pki / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(not_after)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


async def test_a_kept_alive_connection_is_not_reused_past_the_server_certificate(
    tmp_path: Path,
) -> None:
    """The partner's server certificate expires while a connection to it is kept alive: the
    connection carries messages until then and none after; the next connection's handshake
    fails on the expired certificate, and the message stays queued."""
    stub, running = await start_sending_to_stub(tmp_path)
    store = running.gateway.store
    try:
        await stub.stop()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        reissue_until(tmp_path / "pki", MX, expires)
        await stub.start(stub.port)
        sent = []
        for _ in range(2):
            record = await submit_to(running, MX)
            sent.append(
                await row_until(
                    store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED
                )
            )
        await asyncio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 1.5)
        record = await submit_to(running, MX)
        refused = await row_until(store, record.message_id, lambda r: r.attempts >= 1)
        assert refused.state is OutboundState.QUEUED
        assert "certificate has expired" in (refused.last_error or "")
        assert outbound_refused(running, "expired") >= 1
        assert [seen.body for seen in stub.seen] == [row.body for row in sent]
    finally:
        await running.gateway.stop()
        await stub.stop()


async def test_a_closed_connection_leaves_no_timer_behind(tmp_path: Path) -> None:
    """Each connection's end of use is a timer, as far off as its certificate's notAfter (a
    year for the dev PKI's): one that closes before then takes its timer with it, so
    connections coming and going over months do not pile timers up."""
    stub, running = await start_sending_to_stub(tmp_path)
    store = running.gateway.store
    try:
        assert retirements() == 0
        record = await submit_to(running, MX)
        await row_until(store, record.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED)
        assert retirements() == 1
        await stub.stop()  # the partner closes the kept-alive connection
        for _ in range(100):
            if retirements() == 0:
                break
            await asyncio.sleep(0.02)
        assert retirements() == 0
    finally:
        await running.gateway.stop()
        await stub.stop()


async def test_an_answer_under_way_when_the_server_certificate_expires_is_read_first(
    tmp_path: Path,
) -> None:
    """The partner's certificate expires while it is answering a message: that answer is
    read and the message acknowledged on its first attempt; the next message needs a new
    connection, whose handshake fails on the expired certificate."""
    stub, running = await start_sending_to_stub(tmp_path)
    store = running.gateway.store
    try:
        await stub.stop()
        # a whole second, as X.509 times have no fraction
        expires = dt.datetime.fromtimestamp(int(time.time()) + 3, dt.UTC)
        reissue_until(tmp_path / "pki", MX, expires)
        stub.behaviours, stub.slow_s = ["ack", "slow", "ack"], 1.5
        await stub.start(stub.port)
        first = await submit_to(running, MX)
        await row_until(store, first.message_id, lambda r: r.state is OutboundState.ACKNOWLEDGED)
        await asyncio.sleep(expires.timestamp() - time.time() - 0.75)
        second = await submit_to(running, MX)  # answered 1.5 s later, across the expiry
        answered = await row_until(
            store, second.message_id, lambda r: r.state is not OutboundState.QUEUED
        )
        assert (answered.state, answered.attempts) == (OutboundState.ACKNOWLEDGED, 1)
        third = await submit_to(running, MX)
        refused = await row_until(store, third.message_id, lambda r: r.attempts >= 1)
        assert "certificate has expired" in (refused.last_error or "")
        assert len(stub.seen) == 2
    finally:
        await running.gateway.stop()
        await stub.stop()
