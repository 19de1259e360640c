"""Partners' client certificates checked by OCSP after the handshake (T04, T05).

Real TLS on loopback, and a real OCSP responder over HTTP on loopback, answering with
responses built and signed by ``cryptography``'s OCSP builder as a CA's responder would. A good
status is served and kept until its nextUpdate; a revoked certificate, a status the responder
does not know, an answer not signed by the CA or its delegated responder, an answer past its
nextUpdate and an unreachable responder all refuse the connection before any request is read,
counted and audited as a refused handshake (fail closed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from cryptography.x509 import ocsp
from https_env import (
    CA,
    MX,
    Env,
    held_per_source_becomes,
    kept_alive,
    running_gateway,
    status_of,
    wait_delivered,
    write_environment,
)
from ocsp_responder import NOW, Responder, delegate, serving

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.store.base import AuditFilter


@pytest.fixture
async def responder(tmp_path: Path) -> AsyncIterator[Responder]:
    async with serving(tmp_path, (MX, CA)) as server:
        yield server


def ocsp_tls(responder: Responder, extra: str = "") -> str:
    return (
        f'ocsp = true\nocsp_url = "{responder.url}"\n'
        f'ocsp_allowed_networks = ["127.0.0.1/32"]\n{extra}'
    )


async def refusals(env: Env, count: int) -> list[dict[str, Any]]:
    """The ``tls_refused`` audit entries, once ``count`` of them are there (appended in the
    background)."""
    store = env.gateway.store
    for _ in range(200):
        rows = await store.audit_entries(AuditFilter(event="tls_refused"))
        if len(rows) >= count:
            break
        await asyncio.sleep(0.02)
    return [json.loads(row.entry) for row in rows]


def refused_count(env: Env, reason: str) -> float | None:
    return env.gateway.metrics.registry.get_sample_value(
        "c2c_tls_handshakes_refused_total", {"reason": reason}
    )


async def test_a_good_status_is_served_and_kept_until_its_next_update(
    tmp_path: Path, responder: Responder
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        for _ in range(3):
            assert await status_of(env, MX) == 202
        assert await status_of(env, CA) == 202
        # one question per certificate: the answer is kept, not asked per connection
        assert responder.asked == {MX: 1, CA: 1}
        assert await refusals(env, 0) == []


async def test_a_revoked_certificate_is_refused_before_any_request_and_audited(
    tmp_path: Path, responder: Responder
) -> None:
    responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        assert await status_of(env, MX) is None
        assert await status_of(env, MX) is None  # the revocation is kept too
        assert await status_of(env, CA) == 202
        assert responder.asked[MX] == 1
        [entry] = await refusals(env, 1)
        assert entry["outcome"] == "revoked"
        serial = f"{responder.serial(MX):x}"
        assert entry["reason"].startswith(f"certificate serial {serial} revoked at ")
        assert f"(OCSP, {responder.url}); from 127.0.0.1:" in entry["reason"]
        assert refused_count(env, "revoked") == 2
        # nothing of MX-ANAM's was taken in
        await wait_delivered(env, 1)
        assert [r.sender for r in env.delivered] == [CA]
        # the connections held for the check, refused or served, gave their slots back
        await held_per_source_becomes(env, {})


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ("down", "HTTP 503"),
        ("unknown", "status of serial"),
        ("stale", "past its nextUpdate"),
        ("foreign signer", "not signed by the issuing CA or its responder"),
        ("delegate without OCSP signing", "not signed by the issuing CA or its responder"),
    ],
)
async def test_no_trustworthy_good_status_fails_closed(
    tmp_path: Path, responder: Responder, fault: str, detail: str
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        if fault == "down":
            responder.down = True
        elif fault == "unknown":
            responder.status[MX] = ocsp.OCSPCertStatus.UNKNOWN
        elif fault == "stale":
            responder.this_update = NOW - dt.timedelta(days=2)
            responder.next_update = NOW - dt.timedelta(days=1)
        elif fault == "foreign signer":
            responder.signer = delegate(tmp_path, impostor=True)
        else:
            responder.signer = delegate(tmp_path, ocsp_signing=False)
        assert await status_of(env, MX) is None
        [entry] = await refusals(env, 1)
        assert entry["outcome"] == "revocation_unknown"
        assert detail in entry["reason"], entry["reason"]
        assert refused_count(env, "revocation_unknown") == 1
        assert env.delivered == []


async def test_an_answer_from_the_ca_s_delegated_responder_is_accepted(
    tmp_path: Path, responder: Responder
) -> None:
    async with running_gateway(tmp_path, tls=ocsp_tls(responder)) as env:
        responder.signer = delegate(tmp_path)
        assert await status_of(env, MX) == 202
        responder.status[CA] = ocsp.OCSPCertStatus.REVOKED
        assert await status_of(env, CA) is None


async def test_a_kept_answer_outlives_a_responder_outage_until_it_expires(
    tmp_path: Path, responder: Responder
) -> None:
    tls = ocsp_tls(responder, "ocsp_max_age_s = 1\n")
    async with running_gateway(tmp_path, tls=tls) as env:
        assert await status_of(env, MX) == 202
        responder.down = True
        assert await status_of(env, MX) == 202  # the kept answer
        await asyncio.sleep(1.1)
        assert await status_of(env, MX) is None  # expired, and the responder is down
        responder.down = False
        assert await status_of(env, MX) == 202
        assert responder.asked[MX] == 3


async def test_a_kept_alive_connection_takes_no_request_past_its_status_answer(
    tmp_path: Path, responder: Responder
) -> None:
    """MX-ANAM's certificate is revoked while its connection is kept alive: the connection
    takes requests while the good answer it was checked with holds, then is closed; the next
    request needs a new connection, checked anew, and is refused."""
    tls = ocsp_tls(responder, "ocsp_max_age_s = 2\n")
    async with running_gateway(tmp_path, tls=tls) as env:
        async with kept_alive(env) as send:
            assert await send() == 202
            responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
            assert await send() == 202  # the same connection, within its answer's 2 s
            assert responder.asked[MX] == 1
            await asyncio.sleep(2.5)  # past the answer, within aiohttp's 75 s keep-alive
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                await send()
        assert responder.asked[MX] == 2
        [entry] = await refusals(env, 1)
        assert entry["outcome"] == "revoked"
        await wait_delivered(env, 2)
        assert [r.sender for r in env.delivered] == [MX, MX]
        await held_per_source_becomes(env, {})


async def test_a_request_under_way_when_its_answer_ends_is_answered_first(
    tmp_path: Path, responder: Responder
) -> None:
    """The answer ends while a message is coming in on the connection: that message is
    taken and answered, and the connection closes after it."""
    tls = ocsp_tls(responder, "ocsp_max_age_s = 2\n")
    async with running_gateway(tmp_path, tls=tls) as env:
        async with kept_alive(env) as send:
            sending = asyncio.create_task(send(pause_s=2.5))
            for _ in range(100):  # its connection checked, half its body sent
                if responder.asked[MX]:
                    break
                await asyncio.sleep(0.02)
            responder.status[MX] = ocsp.OCSPCertStatus.REVOKED
            assert await sending == 202
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                await send()
        assert responder.asked[MX] == 2
        await wait_delivered(env, 1)
        assert [r.sender for r in env.delivered] == [MX]


async def test_a_responder_on_a_private_address_needs_allowed_networks(
    tmp_path: Path, responder: Responder
) -> None:
    tls = f'ocsp = true\nocsp_url = "{responder.url}"\n'
    async with running_gateway(tmp_path, tls=tls) as env:
        assert await status_of(env, MX) is None
        [entry] = await refusals(env, 1)
        assert "ocsp_allowed_networks" in entry["reason"], entry["reason"]
        assert sum(responder.asked.values()) == 0


def test_served_and_refused_on_uvloop(tmp_path: Path) -> None:
    """``serve`` runs on uvloop: the held connection is handed over on its transports too."""

    async def scenario() -> None:
        async with serving(tmp_path, (MX, CA)) as server:
            server.status[CA] = ocsp.OCSPCertStatus.REVOKED
            async with running_gateway(tmp_path, tls=ocsp_tls(server)) as env:
                assert "uvloop" in type(asyncio.get_running_loop()).__module__
                assert await status_of(env, MX) == 202
                assert await status_of(env, CA) is None

    uvloop.run(scenario())


def test_an_ocsp_url_without_ocsp_is_a_configuration_error(tmp_path: Path) -> None:
    write_environment(tmp_path, tls='ocsp_url = "http://ocsp.example/"\n')
    with pytest.raises(ConfigError, match="set without ocsp = true"):
        load_config(tmp_path / "gateway.toml")
    write_environment(tmp_path / "ftp", tls='ocsp = true\nocsp_url = "ftp://ocsp.example/"\n')
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        load_config(tmp_path / "ftp" / "gateway.toml")
