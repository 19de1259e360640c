"""Outbound connections check the partner's server certificate against ``[tls] crls``: a
gateway with CRLs sends nothing to a partner whose certificate its CA revoked, over real
mutual TLS on loopback, and sends again once a newer CRL lifts the revocation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from crl_file import write_crl
from outbound_env import (
    Running,
    outbound_refused,
    row_until,
    start_sending_to_stub,
    submit_to,
)
from partner_stub import PartnerStub

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
