"""``c2c-gateway serve``: run the gateway from its configuration until SIGTERM or SIGINT.

Shutdown is graceful: the partner endpoint stops accepting, in-flight requests finish (an
acknowledged message is always committed), services stop, then the store closes.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click
import structlog
import uvloop

from gateway import crashpoints
from gateway.api.server import ApiServer
from gateway.audit.witnessing import attach_witnessing
from gateway.cli.params import config_option
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, Unavailable
from gateway.logging import configure_logging
from gateway.outbound.service import attach_outbound
from gateway.outbound.transport import OutboundTransport
from gateway.runtime import Gateway
from gateway.selfcheck import SelfCheckError, run_selfcheck


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def build_gateway(config_path: Path) -> tuple[Gateway, ApiServer]:
    """Gateway with its outbound dispatcher, internal API and mutual audit witnessing attached
    (and, when amqp.url is configured, the AMQP transport for outbound messages and the broker
    in ``/readyz``)."""
    config = load_config(config_path)
    run_selfcheck(config)
    gateway = Gateway(config)
    extra: dict[str, OutboundTransport] = {}
    if gateway.amqp is not None:
        extra["amqp"] = gateway.amqp.outbound_transport
    dispatcher, api = attach_outbound(
        gateway,
        extra_transports=extra,
        broker_ping=gateway.broker.ping if gateway.broker is not None else None,
    )
    gateway.on_submitted = dispatcher.dispatcher.wake
    attach_witnessing(gateway, wake=dispatcher.dispatcher.wake)
    assert api is not None
    return gateway, api


async def run_until_signalled(gateway: Gateway, on_ready: Callable[[], None]) -> None:
    """Start, report readiness, wait for SIGTERM/SIGINT, stop gracefully. SIGHUP takes in our
    TLS certificate and partners' signing keys again."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_signal(signum: signal.Signals) -> None:
        if not stop.is_set():
            # said at once: a graceful stop can take tens of seconds (a partner that took a
            # message and has not answered is waited for up to outbound send_timeout_s)
            structlog.get_logger("gateway.serve").info(
                "gateway_stopping",
                signal=signum.name,
                detail="answering the requests in flight and finishing outbound sends and "
                "deliveries in hand; a second signal stops at once",
            )
            stop.set()
            return
        # asked again while stopping gracefully (a request in flight waited for, a host going
        # down): now. Nothing acknowledged is lost: every answer follows its commit.
        structlog.get_logger("gateway.serve").warning(
            "stop_forced", reason="second SIGTERM or SIGINT while stopping"
        )
        os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_signal, signum)
    reloads: set[asyncio.Task[object]] = set()

    def reload() -> None:
        # our TLS certificate and key (transports/tls_identity) and partners' signing keys
        # (partner_keys), as they are on disk now
        task = asyncio.ensure_future(gateway.reload(actor="signal:SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await gateway.start()
        freeze_startup_objects()
        try:
            on_ready()
            await stop.wait()
        finally:
            await gateway.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def freeze_startup_objects() -> None:
    """What starting built (modules, schemas, keys, configuration: tens of thousands of
    objects) lives as long as the process. Moved out of the collector's generations, it is
    no longer scanned by every full collection (tens of milliseconds each, a latency spike
    for the requests waiting behind it); only what requests leave behind is."""
    gc.collect()
    gc.freeze()


#: what opening a listener fails with when its address is wrong, taken or forbidden
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _listen_refused(config: GatewayConfig) -> ConfigError | None:
    """The first listener whose address cannot be opened now, named by its gateway.toml key;
    asked after a start failed on an address, which the error itself does not say."""
    for name, listen in (
        ("partner_listen", config.partner_listen),
        ("api_listen", config.api_listen),
    ):
        where = f"cannot listen on {listen.host!r} port {listen.port}"
        try:
            addresses = socket.getaddrinfo(
                listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            return ConfigError(str(config.source), f"{name}.host", f"{where}: {exc.strerror}")
        for family, kind, proto, _, address in addresses:
            try:
                # as asyncio opens a listener
                with socket.socket(family, kind, proto) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
            except OSError as exc:
                key = "host" if exc.errno == errno.EADDRNOTAVAIL else "port"
                return ConfigError(
                    str(config.source), f"{name}.{key}", f"{where}: {exc.strerror or exc}"
                )
    return None


def run(build: Callable[[], tuple[Gateway, Callable[[], None]]]) -> None:
    """Build the gateway (and its readiness report) and serve it on uvloop until signalled;
    operator errors exit 2 with one clear line, never a traceback."""

    async def serve_it() -> None:
        gateway, on_ready = build()
        try:
            await run_until_signalled(gateway, on_ready)
        except OSError as exc:
            if not isinstance(exc, socket.gaierror) and exc.errno not in _LISTEN_ERRNOS:
                raise
            refused = _listen_refused(gateway.config)
            if refused is None:
                raise
            raise refused from None

    try:
        point = crashpoints.arm_from_env()
        if point is not None:
            structlog.get_logger("gateway.serve").warning(
                "crash_point_armed",
                setting=point,
                detail=f"this process kills itself at {point} ({crashpoints.ENV_VAR}: tests only)",
            )
        uvloop.run(serve_it())
    except (ConfigError, SelfCheckError) as exc:
        fail(str(exc))
    except OSError as exc:
        click.echo(f"error: cannot serve: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except Unavailable as exc:
        # the store or the broker refused at start (unreachable, wrong credentials, no space)
        click.echo(f"error: cannot serve: {exc.reason}", err=True)
        sys.exit(1)


@click.command("serve")
@config_option
def serve(config_path: Path) -> None:
    """Serve the partner endpoint, the internal API and the dispatcher until SIGTERM."""
    configure_logging()
    log = structlog.get_logger("gateway.serve")

    def build() -> tuple[Gateway, Callable[[], None]]:
        gateway, api = build_gateway(config_path)

        def ready() -> None:
            log.info(
                "serving",
                party=gateway.config.party,
                partner_url=gateway.partner_url,
                api_url=api.url,
            )

        return gateway, ready

    run(build)
