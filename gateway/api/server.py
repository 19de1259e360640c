"""Serving the internal API: HTTPS with our server certificate (clients use bearer tokens)."""

from __future__ import annotations

import ssl

import structlog
from aiohttp import web

from gateway.config import TlsConfig
from gateway.logging import quiet_bad_requests
from gateway.netpolicy import origin
from gateway.transports.tls_identity import load_own_pair

log = structlog.get_logger(__name__)


def api_server_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ with our certificate; internal clients authenticate with JWTs, not certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    load_own_pair(context, tls)
    return context


class ApiServer:
    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        shutdown_timeout_s: float = 30.0,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def app(self) -> web.Application:
        return self._app

    @property
    def url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the internal API server is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return origin(scheme, self._host, self._bound_port)

    async def start(self) -> None:
        quiet_bad_requests()
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            # bodies are read as sent: a Content-Encoding is refused (requests.read_body), not
            # inflated (a small gzip body could otherwise stand for a very large one)
            auto_decompress=False,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl_context)
        await site.start()
        # The port actually bound (port 0 asks the OS for a free one).
        self._bound_port = int(runner.addresses[0][1])
        self._runner = runner
        log.info("internal_api_listening", url=self.url, audit_console=f"{self.url}/console/")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
