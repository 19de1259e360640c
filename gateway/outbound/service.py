"""The dispatcher as a gateway service, its transports, and the internal API next to it.

``attach_outbound(gateway)`` adds both to a ``gateway.runtime.Gateway``: the dispatcher (with
the HTTPS transport, plus any the caller passes, e.g. AMQP) and the internal API server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from gateway.api.app import build_api_app
from gateway.api.auth import load_token_keys
from gateway.api.server import ApiServer, api_server_context
from gateway.api.services import ApiServices
from gateway.outbound.dispatcher import Dispatcher
from gateway.outbound.transport import OutboundTransport
from gateway.transports.https_client import HttpsTransport

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger(__name__)


class DispatcherService:
    """Runs ``Dispatcher.run`` as a task; stopping lets the attempts in flight finish."""

    def __init__(self, dispatcher: Dispatcher, transports: Mapping[str, OutboundTransport]) -> None:
        self.dispatcher = dispatcher
        self._transports = dict(transports)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.dispatcher.run(), name="c2c-dispatcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self.dispatcher.stop()
            await task
        for transport in self._transports.values():
            await transport.aclose()


def attach_outbound(
    gateway: Gateway,
    *,
    extra_transports: Mapping[str, OutboundTransport] | None = None,
    broker_ping: Callable[[], Awaitable[None]] | None = None,
    with_api: bool = True,
) -> tuple[DispatcherService, ApiServer | None]:
    """Add the outbound dispatcher and (unless ``with_api`` is False) the internal API."""
    config = gateway.config
    crl_watcher = gateway.crl_watcher
    refused = gateway.metrics.outbound_tls_refused
    https = HttpsTransport(
        config.tls,
        timeout_s=config.outbox.send_timeout_s,
        now=gateway.clock.now,
        crls=(lambda: crl_watcher.files) if crl_watcher is not None else None,
        check_server=gateway.ocsp.check if gateway.ocsp is not None else None,
        on_certificate_refused=lambda reason: refused.labels(reason).inc(),
        load_pair=gateway.tls_identity.load_into,
    )
    if crl_watcher is not None:
        crl_watcher.subscribe(https.forget_contexts)
    gateway.tls_identity.track(https.contexts)
    transports: dict[str, OutboundTransport] = {"https": https}
    transports.update(extra_transports or {})
    dispatcher = Dispatcher(
        store=gateway.store,
        config=config,
        transports=transports,
        partner_keys=gateway.keyring,
        signing_keys=gateway.signing_keys,
        clock=gateway.clock,
        metrics=gateway.metrics,
    )
    service = DispatcherService(dispatcher, transports)
    gateway.add_service(service)
    gateway.set_receipt_handler(dispatcher.apply_partner_receipt)
    api: ApiServer | None = None
    if with_api:
        services = ApiServices(
            config=config,
            store=gateway.store,
            registry=gateway.registry,
            signing_keys=gateway.signing_keys,
            token_keys=load_token_keys(config.api_auth, source=str(config.source)),
            clock=gateway.clock,
            metrics=gateway.metrics,
            wake_dispatcher=dispatcher.wake,
            broker_ping=broker_ping,
        )
        api_context = api_server_context(config.tls)
        api = ApiServer(
            build_api_app(services),
            host=config.api_listen.host,
            port=config.api_listen.port,
            ssl_context=api_context,
        )
        gateway.tls_identity.track(lambda: [api_context])
        gateway.add_service(api)
    return service, api
