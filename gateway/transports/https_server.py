"""The partner-facing HTTPS endpoint (PROTOCOL.md section 5): mutual TLS, aiohttp.

This module knows HTTP and TLS and nothing about signatures or schemas: it ties the verified
client certificate to a partner, reads the body within its limits and deadlines, hands an
``InboundRequest`` to the pipeline and writes the ``InboundResult`` back. Hardening: the C HTTP
parser is required, no static/websocket/multipart routes, no decompression, explicit body
limit, a deadline from accept to the first request (TLS handshake and headers included), a
body deadline, and a connection cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import structlog
from aiohttp import http, web, web_protocol
from aiohttp.http_parser import HttpRequestParserPy

from gateway.adapters.registry import content_type_of, is_canonical
from gateway.audit.events import AuditEvent, EventKind
from gateway.config import LimitsConfig
from gateway.crashpoints import armed, crash_point
from gateway.errors import GatewayError, SenderMismatch, TooLarge, Unavailable
from gateway.inbound.context import InboundRequest, InboundResult
from gateway.inbound.pipeline import InboundPipeline
from gateway.logging import quiet_bad_requests
from gateway.netpolicy import origin
from gateway.schemas.registry import SchemaRegistry
from gateway.transports.tls import PartnerIdentifier
from gateway.transports.tls_accept import (
    HandshakeRefusal,
    HandshakeTurns,
    PeerCheck,
    RefusalWindow,
    TlsAcceptor,
)

log = structlog.get_logger(__name__)

MESSAGES_PATH = "/c2c/v1/messages"
SIGNATURE_HEADER = "C2C-Signature"
PROBLEM_JSON = "application/problem+json"
#: the media type of our receipts to a canonical partner
RECEIPT_JSON = "application/json"

_PARTNER = web.RequestKey("partner", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def assert_c_parser() -> None:
    """Refuse to serve with aiohttp's pure-Python HTTP parser (several smuggling CVEs hit it)."""
    if http.HttpRequestParser is HttpRequestParserPy:
        raise RuntimeError(
            "aiohttp's C HTTP parser is not loaded (AIOHTTP_NO_EXTENSIONS set, or no wheel for"
            " this platform); the partner endpoint will not start without it"
        )


def _problem(status: int, title: str, detail: str, code: str | None = None) -> web.Response:
    document: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if code is not None:
        document["code"] = code
    return web.Response(status=status, body=orjson.dumps(document), content_type=PROBLEM_JSON)


_ROUTER_DETAIL = {
    404: "no such resource: messages are posted to /c2c/v1/messages; /c2c/v1/schemas and "
    "/c2c/v1/keys are read with GET",
    405: "method not allowed on this resource (see the Allow header)",
}


def _json(document: Any) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")


def result_response(result: InboundResult, receipt_type: str = RECEIPT_JSON) -> web.Response:
    """The wire form of a pipeline result: the signed receipt, sent as ``receipt_type`` (the
    media type of the partner it answers: our receipts are in its format), or a problem
    document."""
    headers: dict[str, str] = {}
    if result.retry_after_s is not None:
        headers["Retry-After"] = str(result.retry_after_s)
    if result.receipt_body is not None and result.receipt_signature is not None:
        headers[SIGNATURE_HEADER] = result.receipt_signature
        return web.Response(
            status=result.http_status,
            body=result.receipt_body,
            content_type=receipt_type,
            headers=headers,
        )
    if result.problem is not None:
        return web.Response(
            status=result.http_status,
            body=orjson.dumps(result.problem),
            content_type=PROBLEM_JSON,
            headers=headers,
        )
    return web.Response(status=result.http_status, headers=headers)


#: at the total cap, a new connection takes the place of an unserved one from an address
#: holding at least this many times what the new one's address would hold with it
EVICT_FROM_SHARE = 2


class SourceSlots:
    """Connections held per source (``tls_accept.source_of``: an IPv4 address, an IPv6
    network), from accept until closed (T37: one source cannot take every connection the
    endpoint allows).

    Each connection is taken for its handler (``take``) and given back once (``release``,
    idempotent): by the handler's end, or by the acceptor when the connection never reached
    the handler.
    """

    __slots__ = ("_counts", "_owners", "per_source")

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._counts: dict[str, int] = {}
        self._owners: dict[object, str] = {}

    def take(self, owner: object, source: str) -> bool:
        count = self._counts.get(source, 0)
        if count >= self.per_source:
            return False
        self._counts[source] = count + 1
        self._owners[owner] = source
        return True

    def release(self, owner: object) -> None:
        source = self._owners.pop(owner, None)
        if source is None:
            return
        count = self._counts[source] - 1
        if count:
            self._counts[source] = count
        else:
            del self._counts[source]

    def __len__(self) -> int:
        return len(self._owners)

    def count(self, source: str) -> int:
        return self._counts.get(source, 0)

    def held(self) -> dict[str, int]:
        """Connections held now, per source."""
        return dict(self._counts)


class _GuardedSite(web.BaseSite):
    """A TCP site with a connection cap and a deadline from accept to the first request.

    aiohttp has no header-read deadline of its own: a peer that opens a connection and then
    trickles (or never sends) its request line would hold a slot forever.
    """

    __slots__ = (
        "_awaiting",
        "_bound_port",
        "_check_peer",
        "_deadline_s",
        "_handshakes",
        "_host",
        "_ipv6_prefix",
        "_max_connections",
        "_on_capped",
        "_on_deadline",
        "_on_refused",
        "_port",
        "_retired",
        "_retiring",
        "_turns",
        "_unserved",
        "sources",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        deadline_s: float,
        max_connections: int,
        max_connections_per_source: int,
        handshakes_per_second: float,
        ipv6_prefix: int,
        on_refused: Callable[[HandshakeRefusal], None],
        on_capped: Callable[[str, int, str], None],
        on_deadline: Callable[[str, str], None],
        check_peer: PeerCheck | None,
    ) -> None:
        """``on_capped(limit, cap, source)``: a connection closed at accept, over the cap named
        (``total`` or ``per_source``). ``on_deadline(source, stage)``: a connection closed at
        its deadline (``handshake_wait``, ``handshake``, ``request_head``)."""
        super().__init__(runner, ssl_context=ssl_context, backlog=min(max_connections, 1024))
        self.sources = SourceSlots(max_connections_per_source)
        self._on_capped = on_capped
        self._on_deadline = on_deadline
        self._check_peer = check_peer
        self._host = host
        self._port = port
        self._bound_port = port
        self._deadline_s = deadline_s
        self._max_connections = max_connections
        #: connections not yet past their first request head, in the order accepted
        self._awaiting: dict[web_protocol.RequestHandler, TlsAcceptor] = {}
        #: those holding a source slot, per source address, in the order accepted
        self._unserved: dict[str, dict[web_protocol.RequestHandler, None]] = {}
        self._on_refused = on_refused
        # Handshakes under way, ended when the site stops.
        self._handshakes: set[asyncio.Task[None]] = set()
        self._turns = HandshakeTurns(handshakes_per_second)
        self._ipv6_prefix = ipv6_prefix
        #: when each served connection stops taking requests: its client certificate's
        #: notAfter, or the end of the status answer it was checked with (OCSP)
        self._retiring: dict[web_protocol.RequestHandler, asyncio.TimerHandle] = {}
        #: served connections whose answer ended during a request: they close after its answer
        self._retired: set[web_protocol.RequestHandler] = set()

    @property
    def name(self) -> str:
        return origin("https", self._host, self._bound_port)

    @property
    def port(self) -> int:
        return self._bound_port

    def request_started(self, handler: web_protocol.RequestHandler) -> None:
        """A request head has come on this connection: it is served, no longer under the
        deadline nor evictable."""
        self._forget(handler)

    def _forget(self, handler: web_protocol.RequestHandler) -> TlsAcceptor | None:
        """Take ``handler`` off the unserved connections; its acceptor if it was one."""
        acceptor = self._awaiting.pop(handler, None)
        if acceptor is not None:
            unserved = self._unserved.get(acceptor.source)
            if unserved is not None:
                unserved.pop(handler, None)
                if not unserved:
                    del self._unserved[acceptor.source]
        return acceptor

    def _enforce_deadline(self, handler: web_protocol.RequestHandler) -> None:
        acceptor = self._forget(handler)
        if acceptor is not None and handler.transport is not None:
            handler.transport.abort()
            self._on_deadline(acceptor.source, "request_head")

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        handler = server()
        assert self._ssl_context is not None
        # The handshake runs in our hands, so a refused one is counted and audited.
        acceptor = TlsAcceptor(
            handler=handler,
            context=self._ssl_context,
            handshake_timeout_s=self._deadline_s,
            on_refused=self._on_refused,
            pending=self._handshakes,
            check_peer=self._check_peer,
            admit=functools.partial(self._admit, handler),
            unserved=functools.partial(self._ended, handler),
            turns=self._turns,
            on_deadline=self._on_deadline,
            ipv6_prefix=self._ipv6_prefix,
            serve_for=functools.partial(self._serve_for, handler),
        )
        self._awaiting[handler] = acceptor
        return acceptor

    def _make_room(self, source: str) -> bool:
        """At the total cap, close one unserved connection (in its handshake or before its
        first request head) for a new connection from ``source``: the oldest of the source
        holding the most connections among those that have one. Only if that source holds
        at least ``EVICT_FROM_SHARE`` times what ``source`` would; else the new connection is
        the one refused (sources holding about as many do not take each other's places,
        which would only churn). Whether one was closed.

        The cap is filled most cheaply by connections that never finish their handshake or
        request head (slowloris). Taking room from whoever holds the most (longest queue
        drop) lets a partner's new connection in while an attack holds the cap, and leaves the
        attacker's own new connections refused, not churning. Served connections are kept.
        """
        if not self._unserved:
            return False
        # one pass over the sources that have an unserved connection
        holder = max(self._unserved, key=self.sources.count)
        if self.sources.count(holder) < EVICT_FROM_SHARE * (self.sources.count(source) + 1):
            return False
        self._evict(next(iter(self._unserved[holder])), holder)
        return True

    def _evict(self, handler: web_protocol.RequestHandler, source: str) -> None:
        acceptor = self._forget(handler)
        if handler.transport is not None:
            # Aborted, not closed: a polite TLS close waits up to 30 s for the peer's answer,
            # which a client that never reads never sends, and its slot stays taken meanwhile.
            # It has sent no request, so no answer of ours is cut short.
            handler.transport.abort()
        elif acceptor is not None:
            acceptor.abandon()
        self._on_deadline(source, "evicted")

    def _ended(self, handler: web_protocol.RequestHandler) -> None:
        self.sources.release(handler)
        self._forget(handler)
        self._retired.discard(handler)
        self._unschedule(handler)

    def _unschedule(self, handler: web_protocol.RequestHandler) -> None:
        timer = self._retiring.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _serve_for(self, handler: web_protocol.RequestHandler, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._retiring[handler] = loop.call_later(seconds, self._retire, handler)

    def _retire(self, handler: web_protocol.RequestHandler) -> None:
        """The peer's certificate has expired, or been revoked, or the status answer it was
        checked with has ended: its connection takes no further request. It closes now when
        idle, or once the request under way is answered (``retired``); the peer connects again
        and is checked anew. (aiohttp's private ``_request_in_progress`` tells which; its
        ``close`` would not do for either: it leaves an idle connection open and deaf, and
        stops reading the body of the request under way.)"""
        self._unschedule(handler)  # retired before its time too (``retire_where``)
        if handler._request_in_progress:
            self._retired.add(handler)
        else:
            handler.force_close()

    def retire_where(self, refused: Callable[[bytes], bool]) -> int:
        """Retire every served connection whose client certificate (DER) ``refused`` says
        may no longer be used; how many."""
        server = self._runner.server
        count = 0
        for handler in server.connections if server is not None else ():
            transport = handler.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der and refused(der):
                self._retire(handler)
                count += 1
        return count

    def retired(self, handler: web_protocol.RequestHandler) -> bool:
        """Whether the connection must close once the request under way is answered."""
        return handler in self._retired

    def _admit(self, handler: web_protocol.RequestHandler, source: str) -> bool:
        # Every connection holds its source slot from accept until it ends, so connections
        # still in their handshake count too: slow handshakes cannot go round the caps.
        if len(self.sources) >= self._max_connections and not self._make_room(source):
            self._awaiting.pop(handler, None)
            self._on_capped("total", self._max_connections, source)
            return False
        if not self.sources.take(handler, source):
            self._awaiting.pop(handler, None)
            self._on_capped("per_source", self.sources.per_source, source)
            return False
        self._unserved.setdefault(source, {})[handler] = None
        asyncio.get_running_loop().call_later(self._deadline_s, self._enforce_deadline, handler)
        return True

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        # aiohttp's server hears of every served connection's end: its source slot goes back
        # then (a connection that never reached its handler is given back by the acceptor).
        handler_lost = server.connection_lost
        ended = self._ended

        def connection_lost(
            handler: web_protocol.RequestHandler, exc: BaseException | None = None
        ) -> None:
            ended(handler)
            handler_lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]

    def set_ssl_context(self, context: ssl.SSLContext) -> None:
        self._ssl_context = context

    async def stop(self) -> None:
        await super().stop()
        # A connection still in its handshake is not served: stopping accepts no new one.
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)


class PartnerHttpsServer:
    """Partner endpoint: ``POST /c2c/v1/messages``, schemas and keys (PROTOCOL.md section 5)."""

    def __init__(
        self,
        *,
        pipeline: InboundPipeline,
        registry: SchemaRegistry,
        jwks: Mapping[str, Any],
        identifier: PartnerIdentifier,
        ssl_context: ssl.SSLContext,
        limits: LimitsConfig,
        max_body_bytes: int,
        host: str,
        port: int,
        shutdown_timeout_s: float = 30.0,
        check_peer: PeerCheck | None = None,
    ) -> None:
        """``check_peer``: a check of each client certificate after its handshake (OCSP)."""
        assert_c_parser()
        self._check_peer = check_peer
        self._pipeline = pipeline
        # Our receipt always answers the authenticated peer, in its format: the media type of
        # each native-format partner's (docs/adapters.md); every other partner's is JSON.
        self._receipt_types = {
            partner: content_type_of(adapter)
            for partner, adapter in pipeline.env.adapters.items()
            if not is_canonical(adapter)
        }
        self._registry = registry
        self._jwks = dict(jwks)
        self._identifier = identifier
        self._identify = functools.lru_cache(maxsize=256)(identifier.identify)
        # Partners identified per TLS connection (see _partner_of); entries go with the connection.
        self._peers: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        self._ssl_context = ssl_context
        self._limits = limits
        self._max_body_bytes = max_body_bytes
        self._host = host
        self._port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._site: _GuardedSite | None = None
        self._refusals = RefusalWindow()
        self._capped_logs = RefusalWindow()
        self._deadline_logs = RefusalWindow()
        self._audit_tasks: set[asyncio.Task[None]] = set()
        # Requests whose handler runs (a body may still be arriving); set when none does.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def port(self) -> int:
        if self._site is None:
            raise RuntimeError("the partner HTTPS server is not started")
        return self._site.port

    @property
    def url(self) -> str:
        return origin("https", self._host, self.port)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context the next handshakes use."""
        return self._ssl_context

    def set_ssl_context(self, context: ssl.SSLContext) -> None:
        """Use ``context`` for the handshakes from now on (connections made keep theirs)."""
        self._ssl_context = context
        if self._site is not None:
            self._site.set_ssl_context(context)

    def retire_where(self, refused: Callable[[bytes], bool]) -> int:
        """Connections whose client certificate (DER) ``refused`` says may no longer be used
        take no further request (one under way is answered first) and close; the partner's
        next connection is checked at its handshake. How many."""
        return self._site.retire_where(refused) if self._site is not None else 0

    def make_app(self) -> web.Application:
        # One byte over the largest partner limit, so the pipeline's per-partner check is the
        # one that answers; anything beyond is cut off by aiohttp while reading.
        middlewares = [self._close_retired, self._require_partner]
        if armed() == "S7-after-response":
            # outermost, so that the answer it writes is the final one
            middlewares.insert(0, _answer_then_crash)
        app = web.Application(client_max_size=self._max_body_bytes + 1, middlewares=middlewares)
        app.router.add_post(MESSAGES_PATH, self._post_message)
        app.router.add_get("/c2c/v1/schemas", self._schema_index, allow_head=False)
        app.router.add_get(
            "/c2c/v1/schemas/{message_type}/{schema_version}", self._schema, allow_head=False
        )
        app.router.add_get("/c2c/v1/keys", self._keys, allow_head=False)
        return app

    async def start(self) -> None:
        quiet_bad_requests()
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=self._limits.header_timeout_s * 3,
            max_headers=64,
            max_line_size=8190,
            max_field_size=8190,
            # After refusing a body mid-way, drain what still comes only briefly.
            lingering_time=2.0,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        site = _GuardedSite(
            runner,
            host=self._host,
            port=self._port,
            ssl_context=self._ssl_context,
            deadline_s=self._limits.header_timeout_s,
            max_connections=self._limits.max_connections,
            max_connections_per_source=self._limits.max_connections_per_source,
            handshakes_per_second=self._limits.handshakes_per_second,
            ipv6_prefix=self._limits.ipv6_source_prefix,
            on_refused=self._tls_refused,
            on_capped=self._capped,
            on_deadline=self._closed_early,
            check_peer=self._check_peer,
        )
        await site.start()
        self._runner, self._site = runner, site
        log.info("partner_https_listening", url=self.url)

    @property
    def requests_in_flight(self) -> int:
        return self._in_flight

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (their commits and answers), close.

        aiohttp's own shutdown marks every connection closing first, and a connection marked
        so drops the bytes that still arrive: a body on its way would never be read and its
        request would end at its deadline. So the listener closes first, each request under
        way (body included) is waited for, up to the shutdown timeout, and only then are the
        connections closed. Requests that start meanwhile are answered with
        ``Connection: close``.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            self._draining = True
            if self._site is not None:
                await self._site.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._shutdown_timeout_s):
                    await self._idle.wait()
            await runner.cleanup()
            log.info("partner_https_stopped")
        if self._audit_tasks:
            await asyncio.gather(*self._audit_tasks, return_exceptions=True)

    def _capped(self, limit: str, cap: int, source: str) -> None:
        """Count every connection closed at accept over a cap; log the first per source and
        cap in a minute (a flood of connections is not a flood of log lines)."""
        env = self._pipeline.env
        env.metrics.https_connections_capped.labels(limit).inc()
        unlogged = self._capped_logs.admit((source, limit), env.clock.monotonic())
        if unlogged is not None:
            log.warning(
                "https_connection_cap", limit=limit, cap=cap, peer=source, unlogged_since=unlogged
            )

    def _closed_early(self, source: str, stage: str) -> None:
        """Count every connection closed before its first request, at its deadline or to make
        room (``evicted``); log the first per source and stage in a minute (slowloris
        connections are not a flood of log lines)."""
        env = self._pipeline.env
        env.metrics.https_connections_closed.labels(stage).inc()
        unlogged = self._deadline_logs.admit((source, stage), env.clock.monotonic())
        if unlogged is not None:
            log.info(
                "https_connection_evicted" if stage == "evicted" else "https_connection_deadline",
                stage=stage,
                deadline_s=self._limits.header_timeout_s,
                peer=source,
                unlogged_since=unlogged,
            )

    @property
    def held_per_source(self) -> dict[str, int]:
        """Connections held now (in their handshake or served), per source address."""
        return self._site.sources.held() if self._site is not None else {}

    def _tls_refused(self, refusal: HandshakeRefusal) -> None:
        """Count every refused handshake; log and audit the first per address and reason
        in a minute, at most 60 a minute per reason (T01: one rate-limited audit event)."""
        env = self._pipeline.env
        env.metrics.tls_refused.labels(refusal.reason).inc()
        unrecorded = self._refusals.admit((refusal.source, refusal.reason), env.clock.monotonic())
        if unrecorded is None:
            return
        where = refusal.host if refusal.port is None else f"{refusal.host}:{refusal.port}"
        reason = f"{refusal.detail}; from {where}"
        if unrecorded:
            reason += f"; {unrecorded} more from this address not recorded since the last entry"
        log.warning(
            "tls_handshake_refused", peer=where, reason=refusal.reason, detail=refusal.detail
        )
        event = AuditEvent(
            event=EventKind.TLS_REFUSED,
            at=env.clock.now(),
            outcome=refusal.reason,
            reason=reason,
            transport="https",
        )
        task = asyncio.get_running_loop().create_task(self._audit_refusal(event))
        self._audit_tasks.add(task)
        task.add_done_callback(self._audit_tasks.discard)

    async def _audit_refusal(self, event: AuditEvent) -> None:
        try:
            await self._pipeline.env.store.append_audit([event])
        except Unavailable as exc:
            log.warning("tls_refusal_not_audited", reason=exc.reason)

    @web.middleware
    async def _require_partner(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A request has started on this connection: its header deadline no longer applies.
        if self._site is not None:
            self._site.request_started(request.protocol)
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        partner = self._partner_of(ssl_object) if ssl_object is not None else None
        if partner is None:
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            log.warning("https_unknown_client_certificate", path=request.path)
            result = await self._pipeline.refuse_unread(
                peer=None, transport="https", error=SenderMismatch(self._identifier.explain(der))
            )
            return result_response(result)
        request[_PARTNER] = partner
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            # the router's own answers, as RFC 9457 problems like every other refusal here
            # (aiohttp's are text/plain); a 405 keeps its Allow header
            answer = _problem(exc.status, exc.reason, _ROUTER_DETAIL[exc.status])
            if "Allow" in exc.headers:
                answer.headers["Allow"] = exc.headers["Allow"]
            return answer

    @web.middleware
    async def _close_retired(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A connection retired while its request was under way, or any connection once the
        server is stopping, closes once that request is answered, whatever the answer; the
        requests under way are counted for ``stop``. (No ``HTTPException`` reaches here: the
        handlers raise none, and ``_require_partner`` answers the router's 404 and 405.)"""
        self._in_flight += 1
        self._idle.clear()
        try:
            response = await handler(request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        if self._draining or (self._site is not None and self._site.retired(request.protocol)):
            response.force_close()
        return response

    def _partner_of(self, ssl_object: ssl.SSLObject) -> str | None:
        """The partner the connection's client certificate identifies, or None.

        Remembered for the connection when its certificate cannot change: renegotiation is
        off in the server context, or the connection is TLS 1.3 (no renegotiation, and this
        server never asks for post-handshake authentication).
        """
        partner = self._peers.get(ssl_object)
        if partner is None:
            der = ssl_object.getpeercert(binary_form=True)
            partner = self._identify(der) if der else None
            if partner is not None and (
                ssl_object.context.options & ssl.OP_NO_RENEGOTIATION
                or ssl_object.version() == "TLSv1.3"
            ):
                self._peers[ssl_object] = partner
        return partner

    async def _read_body(self, request: web.Request) -> bytes:
        content = request.content
        if content.is_eof():
            # The whole body has arrived already: nothing to wait for, no deadline to arm.
            body = content.read_nowait()
            if len(body) > self._max_body_bytes + 1:
                raise self._too_large()
            return body
        try:
            async with asyncio.timeout(self._limits.request_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None

    def _answer(self, result: InboundResult, partner: str) -> web.Response:
        """``result`` as answered to ``partner``, the authenticated peer."""
        return result_response(result, self._receipt_types.get(partner, RECEIPT_JSON))

    def _too_large(self) -> TooLarge:
        return TooLarge(
            f"body over the endpoint limit of {self._max_body_bytes} bytes (cut off while reading)"
        )

    async def _post_message(self, request: web.Request) -> web.StreamResponse:
        partner = request[_PARTNER]
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes + 1:
            # Refused from its head: reading it would only be work (and bytes to decrypt) for
            # a body that is refused whatever it holds. Its bytes are never read, so the
            # connection cannot be reused.
            result = await self._pipeline.refuse_unread(
                peer=partner,
                transport="https",
                error=TooLarge(
                    f"declared Content-Length {declared} over the endpoint limit of"
                    f" {self._max_body_bytes} bytes (not read)"
                ),
            )
            response = self._answer(result, partner)
            response.force_close()
            return response
        try:
            body = await self._read_body(request)
        except TimeoutError:
            log.info("https_body_timeout", peer=partner)
            response = _problem(
                408, "Request Timeout", "the body did not arrive within the deadline", None
            )
            # The rest of the body may still come: the connection cannot be reused.
            response.force_close()
            return response
        except GatewayError as exc:
            result = await self._pipeline.refuse_unread(peer=partner, transport="https", error=exc)
            return self._answer(result, partner)
        result = await self._pipeline.handle(
            InboundRequest(
                body=body,
                signature=request.headers.get(SIGNATURE_HEADER),
                transport="https",
                peer=partner,
                content_type=request.headers.get("Content-Type"),
                content_encoding=request.headers.get("Content-Encoding"),
            )
        )
        return self._answer(result, partner)

    async def _schema_index(self, request: web.Request) -> web.StreamResponse:
        return _json({"schemas": self._registry.index()})

    async def _schema(self, request: web.Request) -> web.StreamResponse:
        message_type = request.match_info["message_type"]
        version = request.match_info["schema_version"]
        if not self._registry.is_known(message_type, version):
            return _problem(404, "Not Found", "no such message_type/schema_version", None)
        return web.Response(
            body=orjson.dumps(self._registry.schema(message_type, version)),
            content_type="application/schema+json",
        )

    async def _keys(self, request: web.Request) -> web.StreamResponse:
        return _json(self._jwks)


@web.middleware
async def _answer_then_crash(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Only with ``GW_CRASH_AT=S7-after-response``: an ACK's answer is written to the
    connection here rather than by aiohttp after the handler, and then the point is reached."""
    response = await handler(request)
    if request.path == MESSAGES_PATH and response.status == 202:
        await response.prepare(request)
        await response.write_eof()
        crash_point("S7-after-response", message_id=_receipted_id(response))
    return response


def _receipted_id(response: web.StreamResponse) -> str:
    """The message an ACK answers (for the crash line; empty for a native partner's ACK)."""
    body = response.body if isinstance(response, web.Response) else None
    if not isinstance(body, bytes) or response.content_type != RECEIPT_JSON:
        return ""
    return str(orjson.loads(body)["payload"]["ref_message_id"])


def jwks_of(keys: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """A JWKS document from public JWKs (each with kid/alg/use already set)."""
    return {"keys": [dict(key) for key in keys]}
