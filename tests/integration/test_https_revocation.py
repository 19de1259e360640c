"""Partners' client certificates checked against the partner CAs' CRLs (T04, T05).

Real TLS on loopback: a revoked certificate, or any certificate while its CA's CRL is past
nextUpdate, is refused at the handshake (fail closed, like an expired certificate). CRL files
are re-read while serving; a bad or older file leaves the CRL in force.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from crl_file import NOW, write_crl
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from https_env import (
    CA,
    MX,
    Env,
    kept_alive,
    running_gateway,
    status_of,
    wait_delivered,
    write_environment,
)

from gateway.config import load_config
from gateway.crypto.pki import init_dev_pki
from gateway.errors import ConfigError
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter

TLS = 'crls = ["pki/ca.crl"]\ncrl_check_interval_s = 3600\n'


@pytest.fixture
async def revoked_mx(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(
        tmp_path, tls=TLS, prepare=lambda root: write_crl(root, [MX])
    ) as env:
        yield env


async def test_revoked_certificate_is_refused_at_the_handshake(revoked_mx: Env) -> None:
    assert await status_of(revoked_mx, MX) is None
    assert await status_of(revoked_mx, CA) == 202
    store = revoked_mx.gateway.store
    for _ in range(100):  # the refusal's entry is appended in the background
        if await store.audit_size() == 2:
            break
        await asyncio.sleep(0.02)
    rows = await store.audit_entries(AuditFilter())
    entries = [json.loads(row.entry) for row in rows]
    # CA-CBSA's accepted message, and MX-ANAM's revoked certificate knocking (T04: audit leaf).
    assert sorted((e["event"], e["outcome"]) for e in entries) == [
        ("accepted", "ACK"),
        ("tls_refused", "revoked"),
    ]
    refusal = next(e for e in entries if e["event"] == "tls_refused")
    assert refusal["reason"].startswith("certificate revoked (verify error 23); from 127.0.0.1:")


async def revoke_mx_by_a_new_crl(env: Env) -> None:
    """A newer CRL revoking MX-ANAM put in place and taken in: MX-ANAM is refused from then
    on, CA-CBSA is not."""
    write_crl(env.root, [MX], this_update=NOW)
    watcher = env.gateway.crl_watcher
    assert watcher is not None
    with structlog.testing.capture_logs() as logs:
        watcher.check()
    assert [e["event"] for e in logs] == ["crl_reloaded"]
    assert await status_of(env, MX) is None
    assert await status_of(env, CA) == 202


async def test_a_fresh_crl_is_taken_in_while_serving(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, tls=TLS, prepare=lambda root: write_crl(root)) as env:
        assert await status_of(env, MX) == 202
        await revoke_mx_by_a_new_crl(env)


async def test_each_partner_cas_crl_shows_when_it_goes_stale(tmp_path: Path) -> None:
    """``c2c_tls_crl_next_update_timestamp_seconds``: the CRL in force's nextUpdate, by the
    CA's CN, set at start and moved by a newer CRL taken in."""
    first = (NOW + dt.timedelta(hours=5)).replace(microsecond=0)  # CRL times are whole seconds

    def prepare(root: Path) -> None:
        write_crl(root, next_update=first)

    async with running_gateway(tmp_path, tls=TLS, prepare=prepare) as env:
        issuer = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.pem").read_bytes())
        cn = issuer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        registry = env.gateway.metrics.registry

        def next_update() -> float | None:
            return registry.get_sample_value(
                "c2c_tls_crl_next_update_timestamp_seconds", {"issuer": str(cn)}
            )

        assert next_update() == first.timestamp()
        later = (NOW + dt.timedelta(days=3)).replace(microsecond=0)
        write_crl(tmp_path, this_update=NOW, next_update=later)
        watcher = env.gateway.crl_watcher
        assert watcher is not None
        watcher.check()
        assert next_update() == later.timestamp()


async def test_a_crl_after_a_refused_pair_is_taken_in_with_the_pair_in_force(
    tmp_path: Path,
) -> None:
    """A new CRL makes a new endpoint context: with our pair in force, not the files as they
    are, which hold a pair a reload refused (here an encrypted key). Before, the CRL itself was
    refused (the context could not be made) and the revoked certificate kept getting in."""
    async with running_gateway(tmp_path, tls=TLS, prepare=lambda root: write_crl(root)) as env:
        tls = env.gateway.config.tls
        key = serialization.load_pem_private_key(tls.key.read_bytes(), None)
        in_force = tls.key.read_bytes()
        tls.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        assert await env.gateway.tls_identity.reload(actor="signal:SIGHUP") is None
        await revoke_mx_by_a_new_crl(env)
        tls.key.write_bytes(in_force)


async def test_a_connection_kept_alive_from_before_a_revoking_crl_is_closed(
    tmp_path: Path,
) -> None:
    """MX-ANAM's certificate is revoked by a CRL taken in while its connection is kept
    alive: that connection takes no further request, and the next one is refused at its
    handshake. CA-CBSA's kept-alive connection carries on."""
    async with (
        running_gateway(tmp_path, tls=TLS, prepare=lambda root: write_crl(root)) as env,
        kept_alive(env, MX) as send_mx,
        kept_alive(env, CA) as send_ca,
    ):
        assert await send_mx() == 202
        assert await send_ca() == 202
        write_crl(tmp_path, [MX], this_update=NOW)
        watcher = env.gateway.crl_watcher
        assert watcher is not None
        with structlog.testing.capture_logs() as logs:
            watcher.check()
        assert [(e["event"], e.get("connections")) for e in logs] == [
            ("partner_connections_revoked", 1),
            ("crl_reloaded", None),
        ]
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await send_mx()
        assert await send_ca() == 202
        await wait_delivered(env, 3)
        assert sorted(r.sender for r in env.delivered) == [CA, CA, MX]


async def test_newer_crls_replace_the_ones_before(tmp_path: Path) -> None:
    start = NOW - dt.timedelta(hours=10)
    async with running_gateway(
        tmp_path, tls=TLS, prepare=lambda root: write_crl(root, this_update=start)
    ) as env:
        watcher = env.gateway.crl_watcher
        assert watcher is not None
        for hours in (1, 2, 3):
            write_crl(tmp_path, [MX], this_update=start + dt.timedelta(hours=hours))
            watcher.check()
        # The next handshakes use a context holding the CRL in force only: superseded CRLs
        # do not pile up in a long-running process.
        context = env.gateway.partner_server.ssl_context
        assert context.cert_store_stats()["crl"] == 1
        assert context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
        assert await status_of(env, MX) is None
        write_crl(tmp_path, [], this_update=start + dt.timedelta(hours=4))
        watcher.check()
        assert env.gateway.partner_server.ssl_context.cert_store_stats()["crl"] == 1
        assert await status_of(env, MX) == 202


async def test_an_older_or_broken_crl_file_leaves_the_crl_in_force(revoked_mx: Env) -> None:
    watcher = revoked_mx.gateway.crl_watcher
    assert watcher is not None
    # a replay of an earlier CRL that did not yet revoke MX-ANAM
    write_crl(revoked_mx.root, [], this_update=NOW - dt.timedelta(days=1))
    with structlog.testing.capture_logs() as logs:
        watcher.check()
        watcher.check()  # said once per file version
    assert [e["event"] for e in logs] == ["crl_reload_refused"]
    assert "is not later than the CRL in force" in logs[0]["reason"]
    assert await status_of(revoked_mx, MX) is None
    (revoked_mx.root / "pki" / "ca.crl").write_text("not a CRL\n")
    with structlog.testing.capture_logs() as logs:
        watcher.check()
    assert [e["event"] for e in logs] == ["crl_reload_refused"]
    assert "not a PEM CRL" in logs[0]["reason"]
    assert await status_of(revoked_mx, MX) is None
    assert await status_of(revoked_mx, CA) == 202


async def test_crl_past_next_update_refuses_every_certificate_of_its_ca(tmp_path: Path) -> None:
    def stale(root: Path) -> None:
        write_crl(
            root,
            this_update=NOW - dt.timedelta(days=2),
            next_update=NOW - dt.timedelta(days=1),
        )

    with structlog.testing.capture_logs() as logs:
        async with running_gateway(tmp_path, tls=TLS, prepare=stale) as env:
            assert await status_of(env, MX) is None
            assert await status_of(env, CA) is None
            watcher = env.gateway.crl_watcher
            assert watcher is not None
            watcher.check()
            # reported at start, not again for the same CRL
            stale_reports = [e for e in logs if e["event"] == "crl_stale"]
            assert len(stale_reports) == 1
            assert "refused at the handshake" in stale_reports[0]["effect"]
            # Two refusals from one address for one reason: counted twice, logged once.
            refused = [e for e in logs if e["event"] == "tls_handshake_refused"]
            assert [e["reason"] for e in refused] == ["revocation_unknown"]
            assert refused[0]["detail"] == "CRL has expired (verify error 12)"
            samples = env.gateway.metrics.registry.get_sample_value(
                "c2c_tls_handshakes_refused_total", {"reason": "revocation_unknown"}
            )
            assert samples == 2
            write_crl(tmp_path, this_update=NOW)  # a current one arrives
            watcher.check()
            assert await status_of(env, MX) == 202


def test_crl_of_another_ca_or_no_crl_file_is_a_configuration_error(tmp_path: Path) -> None:
    write_environment(tmp_path, tls=TLS)
    init_dev_pki(tmp_path / "other", ["XX-OTHER"])
    write_crl(tmp_path, issuer_dir="other")
    config = load_config(tmp_path / "gateway.toml")
    with pytest.raises(ConfigError, match="which is not a partner CA") as info:
        Gateway(config)
    assert info.value.key == "tls.crls"
    (tmp_path / "pki" / "ca.crl").write_bytes(b"\x30\x82")
    with pytest.raises(ConfigError, match="not a PEM CRL"):
        Gateway(load_config(tmp_path / "gateway.toml"))
    pem = write_crl(tmp_path).read_bytes()
    (tmp_path / "pki" / "ca.crl").write_bytes(pem + pem)
    with pytest.raises(ConfigError, match="holds more than one CRL"):
        Gateway(load_config(tmp_path / "gateway.toml"))


def test_every_partner_ca_needs_a_crl(tmp_path: Path) -> None:
    write_environment(tmp_path, tls=TLS)
    init_dev_pki(tmp_path / "other", ["XX-OTHER"])
    gb = tmp_path / "partners" / "GB-HMRC" / "partner.toml"
    gb.write_text(gb.read_text().replace('ca = "../../pki/ca.pem"', 'ca = "../../other/ca.pem"'))
    write_crl(tmp_path)  # from the CA of MX-ANAM and CA-CBSA only
    with pytest.raises(ConfigError, match=r"no CRL in tls\.crls is from this partner CA") as info:
        Gateway(load_config(tmp_path / "gateway.toml"))
    assert info.value.file == str((tmp_path / "other" / "ca.pem").resolve())
