"""Helpers for the internal API and dispatcher tests: real gateways on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from partner_stub import PartnerStub

from gateway.api.auth import ALL_SCOPES
from gateway.api.server import ApiServer
from gateway.clock import Clock
from gateway.config import GatewayConfig, OutboxConfig, load_config
from gateway.crypto.jws import DEFAULT_TYP, sign_detached
from gateway.crypto.keys import load_signing_key
from gateway.crypto.tokens import issue_token
from gateway.devenv import prepare_dev_environment
from gateway.model import Priority
from gateway.outbound.dispatcher import Dispatcher
from gateway.outbound.service import attach_outbound
from gateway.outbound.submission import Submission, submit
from gateway.runtime import Gateway
from gateway.store.base import InboundRecord, OutboundRecord, Store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_config(
    root: Path,
    party: str,
    *,
    peers: Mapping[str, str] | None = None,
    outbox: OutboxConfig | None = None,
    partner_port: int = 0,
) -> GatewayConfig:
    path = prepare_dev_environment(
        root / party, party=party, pki_dir=root / "pki", peers=peers, partner_port=partner_port
    )
    config = load_config(path)
    if outbox is not None:
        config = dataclasses.replace(config, outbox=outbox)
    return config


@dataclass
class Running:
    gateway: Gateway
    dispatcher: Dispatcher
    api: ApiServer

    @property
    def api_url(self) -> str:
        return self.api.url

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config


async def start_gateway(config: GatewayConfig, *, clock: Clock | None = None) -> Running:
    gateway = Gateway(config, clock=clock)
    service, api = attach_outbound(gateway)
    await gateway.start()
    assert api is not None
    return Running(gateway=gateway, dispatcher=service.dispatcher, api=api)


def token(
    config: GatewayConfig,
    scopes: Iterable[str] = ALL_SCOPES,
    *,
    subject: str = "test-client",
    now: datetime | None = None,
    ttl_s: int = 600,
    audience: str | None = None,
) -> str:
    assert config.api_auth.signing_key is not None
    key = load_signing_key(config.api_auth.signing_key, party="api", alg="EdDSA")
    return issue_token(
        key,
        issuer=config.api_auth.issuer,
        audience=audience or config.api_auth.audience,
        subject=subject,
        scopes=scopes,
        ttl_s=ttl_s,
        now=now or datetime.now(UTC),
    )


def auth(bearer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}"}


def client_ssl(config: GatewayConfig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(config.tls.ca))


def partner_signature(
    root: Path, body: bytes, party: str = "MX-ANAM", *, typ: str = DEFAULT_TYP
) -> str:
    """``party``'s detached JWS over ``body``, with its development key under ``root/pki``."""
    key = load_signing_key(root / "pki" / party / "sign.key", party=party, alg="EdDSA")
    return sign_detached(body, key, typ=typ)


async def post_as_partner(
    running: Running,
    root: Path,
    body: bytes,
    *,
    party: str = "MX-ANAM",
    content_type: str = "application/json",
    typ: str = DEFAULT_TYP,
) -> tuple[int, bytes, dict[str, str]]:
    """``body`` POSTed to ``running``'s partner endpoint as ``party`` over mutual TLS (its
    development certificate under ``root/pki``), signed with its key (``typ``, the JWS
    header's, for a native format): the answer's status, body and headers."""
    context = client_ssl(running.config)
    pki = root / "pki" / party
    context.load_cert_chain(str(pki / "tls.pem"), str(pki / "tls.key"))
    headers = {
        "Content-Type": content_type,
        "C2C-Signature": partner_signature(root, body, party, typ=typ),
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            running.gateway.partner_url + "/c2c/v1/messages", data=body, headers=headers
        ) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


def example(gateway: Gateway, message_type: str) -> dict[str, Any]:
    return gateway.registry.examples(message_type, "1.0")[0]


def answer_shipment_lookups(mx: Running) -> None:
    """MX-ANAM's back office: answers shipment lookups (and nothing else) with a
    ``query.response`` that names the query and echoes its ``query_ref``."""
    gateway = mx.gateway
    services = gateway.submission_services()

    async def on_inbound(record: InboundRecord) -> None:
        if record.message_type != "query.shipment_lookup":
            return
        assert record.body is not None
        query = json.loads(record.body)["payload"]
        await submit(
            services,
            Submission(
                recipient=record.sender,
                message_type="query.response",
                payload=gateway.registry.answer_example("query.response", "1.0", query),
                in_reply_to=record.message_id,
                actor="test:mx-back-office",
            ),
        )
        mx.dispatcher.wake()

    gateway.bus.subscribe(on_inbound)


#: retries every few tenths of a second, for long, the breaker never opening
RETRYING_OUTBOX = OutboxConfig(
    max_attempts=50,
    base_delay_s=0.1,
    max_delay_s=0.3,
    default_ttl_s=3600,
    send_timeout_s=2.0,
    breaker_failures=1000,
    breaker_reset_s=1.0,
    poll_interval_s=0.05,
)


def outbound_refused(running: Running, reason: str) -> float:
    """``c2c_outbound_tls_refused_total{reason}``: connections to partners refused for the
    server's certificate (0 when never counted)."""
    value = running.gateway.metrics.registry.get_sample_value(
        "c2c_outbound_tls_refused_total", {"reason": reason}
    )
    return value or 0.0


async def row_until(
    store: Store, message_id: str, done: Callable[[OutboundRecord], bool], within_s: float = 15.0
) -> OutboundRecord:
    async with asyncio.timeout(within_s):
        while True:
            record = await store.get_outbound(message_id)
            if record is not None and done(record):
                return record
            await asyncio.sleep(0.05)


async def submit_to(
    running: Running, recipient: str, *, priority: Priority = Priority.ROUTINE
) -> OutboundRecord:
    """Submit a ``shipment.status`` to ``recipient`` and wake the dispatcher."""
    gateway = running.gateway
    record = await submit(
        gateway.submission_services(),
        Submission(
            recipient=recipient,
            message_type="shipment.status",
            payload=gateway.registry.examples("shipment.status", "1.0")[0],
            actor="test",
            priority=priority,
        ),
    )
    running.dispatcher.wake()
    return record


async def start_sending_to_stub(
    tmp_path: Path, tls: Callable[[], Mapping[str, Any]] = dict
) -> tuple[PartnerStub, Running]:
    """US-CBP's gateway, retrying quickly (``RETRYING_OUTBOX``), and MX-ANAM's endpoint it
    sends to, a ``PartnerStub``; both started. ``tls()``, called once the dev PKI is made,
    gives fields of the gateway's ``[tls]`` to replace."""
    port = free_port()
    config = gateway_config(
        tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{port}"}, outbox=RETRYING_OUTBOX
    )
    config = dataclasses.replace(config, tls=dataclasses.replace(config.tls, **tls()))
    stub = PartnerStub(pki=tmp_path / "pki")
    await stub.start(port)
    return stub, await start_gateway(config)
