"""Outbound HTTPS: POST the stored signed bytes to a partner over mutual TLS.

The client verifies the partner's server certificate against that partner's trust anchor
(and the CRLs in force) and presents our certificate; with a ``check_server`` (OCSP, ``[tls]
ocsp``), each new connection's server certificate passes it after the handshake, before a byte
of a request is written. A connection is reused only while its server certificate is valid
(and its status answer holds). Redirects are never followed (the body and our certificate
must not go to another host), proxies from the environment are ignored, no cookies are
kept, and every aiohttp failure becomes a ``TransportError`` here, at this one seam.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.resolver import DefaultResolver
from aiohttp.tracing import Trace

from gateway.config import PartnerConfig, TlsConfig
from gateway.netpolicy import Network, is_ip_literal, refusal
from gateway.outbound.transport import Delivery, Handed, PartnerReply, TransportError
from gateway.transports.revocation import CrlFile, apply_crls
from gateway.transports.tls import LoadPair, client_context
from gateway.transports.tls_accept import PeerRefused, classify

MESSAGES_PATH = "/c2c/v1/messages"
#: A receipt is well under 2 KiB; anything far bigger is not one and is not read further.
DEFAULT_MAX_REPLY_BYTES = 64 * 1024
#: Connections open to one partner at once (its host and port), at most. At least as many as
#: the dispatcher has attempts in flight to one partner (``dispatcher.MAX_IN_FLIGHT_PER_PARTNER``;
#: as many as it has to all, ``MAX_IN_FLIGHT``, for the other senders), so a request never waits
#: for one of our own pooled connections: ``send_timeout_s`` runs from the request's start and
#: would count that wait against the partner (a partner answering within it "timed out",
#: was sent the message twice and had its breaker opened). The pool still bounds the
#: connections; the dispatcher's bound is what keeps them from queueing.
CONNECTIONS_PER_PARTNER = 32


class AddressRefused(OSError):
    """A partner host resolved only to addresses the gateway does not connect to (T63)."""


#: a server certificate's DER -> the seconds its good status holds (asked again for a request
#: after that), or ``PeerRefused`` saying why it may not be used
ServerCheck = Callable[[bytes], Awaitable[float]]


class ServerRefused(aiohttp.ClientConnectionError):
    """A new connection's server certificate failed ``check_server``; nothing was sent."""

    def __init__(self, refused: PeerRefused) -> None:
        super().__init__(f"{refused.reason}: {refused.detail}")
        self.refused = refused


class _CheckedConnector(aiohttp.TCPConnector):
    """A connector whose new TLS connections are handed out only once their server
    certificate passed ``check`` (if any), and reused only while that certificate is valid
    and that answer holds.

    aiohttp has no public hook between a connection's handshake and its first request, so this
    wraps the connector's ``_create_connection`` (private, the same from aiohttp 3.8 through
    the pinned version): a refused connection is closed before any request is written on it.
    When the certificate's notAfter comes, or the answer ends, the connection takes no further
    request: an idle one is closed, a busy one closes once its answer is read
    (``ResponseHandler.force_close``), and the next request opens a new connection, verified
    and checked anew.
    """

    def __init__(
        self,
        check: ServerCheck | None,
        *,
        limit_per_host: int,
        resolver: AbstractResolver,
    ) -> None:
        super().__init__(limit_per_host=limit_per_host, resolver=resolver)
        self._check = check

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's own signature)
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        transport = protocol.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return protocol  # plain http:// is never used for partners (send refuses it)
        try:
            der = ssl_object.getpeercert(binary_form=True)
            if not der:
                raise PeerRefused("bad_certificate", "the server presented no certificate")
            # verified in the handshake, so its fields are there
            holds_s = ssl.cert_time_to_seconds(ssl_object.getpeercert()["notAfter"]) - time.time()
            if self._check is not None:
                holds_s = min(holds_s, await self._check(der))
        except PeerRefused as exc:
            protocol.close()
            raise ServerRefused(exc) from None
        except BaseException:
            protocol.close()
            raise
        timer = self._loop.call_later(holds_s, self._retire, protocol)
        # a connection that closes before then is not kept, nor its timer, for that long
        closed = protocol.closed
        if closed is None:
            timer.cancel()
        else:
            closed.add_done_callback(functools.partial(_cancel, timer))
        return protocol

    def _retire(self, protocol: ResponseHandler) -> None:
        """The server certificate, or the status it was checked with, has ended."""
        protocol.force_close()
        # ``_acquired``: the connector's own set of connections in use (private, as above)
        if protocol not in self._acquired:
            protocol.close()


def _cancel(timer: asyncio.TimerHandle, closed: asyncio.Future[None]) -> None:
    timer.cancel()
    if not closed.cancelled():
        closed.exception()  # how it closed is aiohttp's to report; seen here, not logged


class PolicyResolver(AbstractResolver):
    """Resolves partner hosts and keeps only the addresses ``netpolicy`` allows for them.

    aiohttp connects to exactly the addresses returned here, so a host name that resolves (or
    is rebound) to a loopback, private or metadata address reaches nothing.
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()
        self._allowed: dict[str, frozenset[Network]] = {}

    def allow(self, host: str, networks: tuple[Network, ...]) -> None:
        key = host.lower()
        self._allowed[key] = self._allowed.get(key, frozenset()) | frozenset(networks)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = self._allowed.get(host.lower(), frozenset())
        refused = {r["host"]: refusal(r["host"], allowed) for r in results}
        kept = [r for r in results if refused[r["host"]] is None]
        if not kept:
            reasons = "; ".join(sorted(reason for reason in refused.values() if reason))
            raise AddressRefused(
                f"{host} resolves only to addresses the gateway does not connect to ({reasons});"
                " list the network in the partner's [https] allowed_networks if it is meant"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


def message_endpoint(base_url: str) -> str:
    """The partner's message endpoint: the configured URL, or its base with PROTOCOL's path."""
    trimmed = base_url.rstrip("/")
    return trimmed if trimmed.endswith(MESSAGES_PATH) else trimmed + MESSAGES_PATH


#: the longest wait a partner's ``Retry-After`` can impose on our retries
RETRY_AFTER_MAX_S = 7 * 86_400


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now`` (RFC 9110 10.2.3: delta-seconds or HTTP-date),
    at most a week in either form."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(min(int(text), RETRY_AFTER_MAX_S))
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max(0.0, (moment - now).total_seconds()), RETRY_AFTER_MAX_S)


class HttpsTransport:
    name = "https"

    def __init__(
        self,
        tls: TlsConfig,
        *,
        timeout_s: float,
        connect_timeout_s: float = 10.0,
        limit_per_host: int = CONNECTIONS_PER_PARTNER,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        crls: Callable[[], Sequence[CrlFile]] | None = None,
        check_server: ServerCheck | None = None,
        on_certificate_refused: Callable[[str], None] | None = None,
        load_pair: LoadPair | None = None,
    ) -> None:
        """``load_pair``: loads our certificate and key into each partner's client context,
        made at its first send (``TlsIdentity.load_into``, the pair in force); without it,
        the files as they are. ``crls``: the CRLs in force (``[tls] crls``), checked against
        each partner's server certificate; call ``forget_contexts`` when they change.
        ``check_server``: asked about each new connection's server certificate after the
        handshake (OCSP); a refusal closes the connection before a request is written on it,
        and a connection takes no request after its answer ends.
        ``on_certificate_refused(reason)``: a connection was refused for the server's
        certificate (``tls_accept.REASONS``), in the handshake or by ``check_server``.
        ``limit_per_host``: at least as many as the caller has sends in flight, or a send
        waits for a connection inside ``timeout_s`` (see ``CONNECTIONS_PER_PARTNER``)."""
        self._tls = tls
        self._load_pair = load_pair
        self._crls = crls
        self._check_server = check_server
        self._on_certificate_refused = on_certificate_refused
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s)
        )
        self._limit_per_host = limit_per_host
        self._max_reply_bytes = max_reply_bytes
        self._now = now
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PolicyResolver | None = None

    def _context_for(self, partner: PartnerConfig) -> ssl.SSLContext:
        context = self._contexts.get(partner.id)
        if context is None:
            context = client_context(self._tls, partner.https.ca, load_pair=self._load_pair)
            if self._crls is not None:
                apply_crls(context, self._crls())
            self._contexts[partner.id] = context
        return context

    def forget_contexts(self) -> None:
        """Build each partner's client context afresh for the next connections (new CRLs).

        A kept-alive connection belongs to the context it was made with, so none is reused:
        the old ones are closed once idle (aiohttp's keep-alive timeout, 15 s).
        """
        self._contexts.clear()

    def contexts(self) -> list[ssl.SSLContext]:
        """The client contexts made so far (they present our certificate)."""
        return list(self._contexts.values())

    def _session_now(self) -> aiohttp.ClientSession:
        # Created on first use so it belongs to the running event loop.
        if self._session is None:
            self._resolver = PolicyResolver()
            connector = _CheckedConnector(
                self._check_server, limit_per_host=self._limit_per_host, resolver=self._resolver
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def send(self, delivery: Delivery) -> PartnerReply | Handed:
        url = delivery.partner.https.url
        if url is None or urlsplit(url).scheme != "https":
            raise TransportError(
                f"partner {delivery.partner.id} has no https:// URL configured",
                may_have_arrived=False,
            )
        endpoint = message_endpoint(url)
        session = self._session_now()
        assert self._resolver is not None
        host = urlsplit(url).hostname or ""
        allowed = delivery.partner.https.allowed_networks
        if is_ip_literal(host):
            refused = refusal(host, allowed)
            if refused is not None:
                raise TransportError(
                    f"not connecting to {endpoint}: {refused}", may_have_arrived=False
                )
        else:
            self._resolver.allow(host, allowed)
        headers = {
            "Content-Type": delivery.content_type,
            "C2C-Signature": delivery.signature,
            "Accept": "application/json",
        }
        try:
            async with session.post(
                endpoint,
                data=delivery.body,
                headers=headers,
                ssl=self._context_for(delivery.partner),
                allow_redirects=False,
            ) as response:
                body = await self._read_limited(response)
                return PartnerReply(
                    status=response.status,
                    body=body,
                    signature=response.headers.get("C2C-Signature"),
                    retry_after_s=parse_retry_after(
                        response.headers.get("Retry-After"), now=self._now()
                    ),
                    location=response.headers.get("Location"),
                )
        except ServerRefused as exc:
            self._certificate_refused(exc.refused.reason)
            raise TransportError(
                f"TLS certificate of {endpoint} refused: {exc}", may_have_arrived=False
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            error = exc.certificate_error
            reason = classify(error)[0] if isinstance(error, ssl.SSLError) else "bad_certificate"
            self._certificate_refused(reason)
            raise TransportError(
                f"TLS certificate of {endpoint} refused: {exc.certificate_error}",
                may_have_arrived=False,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise TransportError(
                    f"not connecting to {endpoint}: {exc.os_error}", may_have_arrived=False
                ) from None
            raise TransportError(
                f"cannot connect to {endpoint}: {exc.os_error.strerror or exc.os_error}",
                may_have_arrived=False,
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise TransportError(
                f"connecting to {endpoint} timed out", may_have_arrived=False
            ) from None
        except TimeoutError:
            raise TransportError(
                f"no complete answer from {endpoint} within {self._timeout.total} s",
                may_have_arrived=True,
            ) from None
        except aiohttp.ClientError as exc:
            raise TransportError(
                f"HTTPS exchange with {endpoint} failed: {type(exc).__name__}: {exc}",
                may_have_arrived=True,
            ) from None

    def _certificate_refused(self, reason: str) -> None:
        if self._on_certificate_refused is not None:
            self._on_certificate_refused(reason)

    async def _read_limited(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(16 * 1024):
            size += len(chunk)
            if size > self._max_reply_bytes:
                raise TransportError(
                    f"reply from {response.url} exceeds {self._max_reply_bytes} bytes",
                    may_have_arrived=True,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None
