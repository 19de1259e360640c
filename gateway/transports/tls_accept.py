"""Server-side TLS handshakes run by the gateway, so that a refused handshake is seen.

asyncio's own accept path (``create_server(ssl=...)``) drops a failed handshake without a
word to the application: a revoked, expired or unknown client certificate would knock
unnoticed (RELIABILITY-SECURITY T01-T05 ask for a counter and a rate-limited audit entry).
Here the listening socket is plain TCP; each accepted connection's handshake runs in a task
(``TlsAcceptor``). A refusal is classified and handed, with the peer's address, to
``on_refused``. A completed handshake hands the TLS transport to the aiohttp handler as
``create_server(ssl=...)`` would have.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from gateway.config import LimitsConfig

log = structlog.get_logger(__name__)

#: OpenSSL X509_V_ERR_* codes, by what they mean for a partner's client certificate
_VERIFY_REASONS: dict[int, str] = {
    9: "not_yet_valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    23: "revoked",  # CERT_REVOKED
    3: "revocation_unknown",  # UNABLE_TO_GET_CRL
    11: "revocation_unknown",  # CRL_NOT_YET_VALID
    12: "revocation_unknown",  # CRL_HAS_EXPIRED
    2: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT
    18: "untrusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "untrusted",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
#: every reason a refusal can carry (the metric's label values)
REASONS = (
    "no_cert",
    "expired",
    "not_yet_valid",
    "revoked",
    "revocation_unknown",
    "untrusted",
    "bad_certificate",
    "protocol",
)
MAX_DETAIL = 200


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    #: the peer's IP address (no port), or "unknown"
    host: str
    port: int | None
    #: what the peer's connections are counted under (``source_of``)
    source: str
    #: one of ``REASONS``
    reason: str
    #: OpenSSL's words for it
    detail: str


class PeerRefused(Exception):
    """A check after the handshake refuses the peer's certificate (``reason`` one of
    ``REASONS``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: a check of the peer's certificate (DER) after the handshake: the seconds its good status
#: holds (the connection takes no request after that), or ``PeerRefused``
PeerCheck = Callable[[bytes], Awaitable[float]]


class _Gate(asyncio.Protocol):
    """Holds a handshaken connection, reading nothing, while its peer is checked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)  # what was already decrypted when reading paused

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self, handler: asyncio.Protocol) -> None:
        """Give the connection to ``handler`` as if it had been its own from the start."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(handler)
        handler.connection_made(transport)
        for chunk in self.early:
            handler.data_received(chunk)
        if self.eof and not handler.eof_received():
            transport.close()
        transport.resume_reading()


def classify(exc: ssl.SSLError) -> tuple[str, str]:
    """(reason, detail) of a failed handshake, by what was wrong with the peer's certificate
    (our server's view of a client's, or our client's of a server's)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = int(exc.verify_code or 0)
        message = exc.verify_message or "certificate verify failed"
        return _VERIFY_REASONS.get(code, "bad_certificate"), f"{message} (verify error {code})"
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_cert", "the client presented no certificate"
    return "protocol", (reason or str(exc))[:MAX_DETAIL]


IPV6_SOURCE_PREFIX = LimitsConfig.ipv6_source_prefix


def source_of(host: str, ipv6_prefix: int = IPV6_SOURCE_PREFIX) -> str:
    """What a peer's connections are counted under (caps, handshake turns, vouching, log and
    audit throttles): an IPv4 address itself, an IPv6 address's network of ``ipv6_prefix``
    bits (``2001:db8:1:2::/64``; the address itself at 128), an IPv4-mapped IPv6 address as
    the IPv4 address. Anything else (``unknown``) as it is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if ipv6_prefix >= 128:
        return str(address)
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


class TurnExpired(TimeoutError):
    """A connection's deadline came while it waited for its turn to handshake."""


#: while both lanes have connections waiting, the vouched-for lane's turns in a row before
#: one goes to the other lane
VOUCHED_RUN = 3

#: per source, its connections waiting for a handshake turn, oldest first
_Waiting = OrderedDict[str, deque[asyncio.Future[None]]]


class HandshakeTurns:
    """The pace at which one listener starts TLS handshakes: ``rate`` a second, after a burst
    of a quarter second's worth; the connections kept waiting take their turns by source
    (``source_of``), round robin, those of vouched-for sources first.

    A handshake is the costly part of a new connection (key exchange, signatures, the client's
    chain), and it runs on the event loop. Hundreds of connections arriving at once (a flood,
    or every slowloris connection coming back after its deadline) would otherwise put
    hundreds of handshakes ahead of the requests of connections already served. Round robin
    keeps one source with many connections waiting from delaying another source's one.
    A connection that runs out of time waiting is closed (``TurnExpired``).

    A source is vouched for (``vouch``) for ``vouched_s`` after a connection from it
    completed a handshake as a partner. Its waiting connections go before the others: a flood
    of connections from many addresses that never complete one (the garbage of a connection
    flood) cannot put a partner's new connection behind hundreds of turns. Not all the turns,
    though: while both lanes wait, every ``VOUCHED_RUN + 1``-th turn goes to the others, so
    vouched-for sources that keep connecting at the full pace (a partner's runaway client, or
    a stolen partner certificate's) cannot keep everyone else out. At most ``max_vouched``
    sources are remembered, the least recently vouched for forgotten first.
    """

    def __init__(self, rate: float, *, vouched_s: float = 600.0, max_vouched: int = 4096) -> None:
        self._rate = rate
        self._burst = max(1.0, rate / 4)
        self._tokens = self._burst
        self._stamp: float | None = None
        #: the waiting connections: vouched-for addresses' lane, then everyone else's
        self._lanes: tuple[_Waiting, _Waiting] = (OrderedDict(), OrderedDict())
        #: turns given to the vouched-for lane since the last one given to the other
        self._vouched_run = 0
        self._timer: asyncio.TimerHandle | None = None
        self._vouched_s = vouched_s
        self._max_vouched = max_vouched
        #: source -> loop time it was last vouched for, least recent first
        self._vouched: OrderedDict[str, float] = OrderedDict()

    def vouch(self, source: str) -> None:
        """A connection from ``source`` completed its handshake as a partner."""
        self._vouched[source] = asyncio.get_running_loop().time()
        self._vouched.move_to_end(source)
        while len(self._vouched) > self._max_vouched:
            self._vouched.popitem(last=False)

    def _lane(self, source: str, now: float) -> _Waiting:
        since = self._vouched.get(source)
        if since is not None and now - since < self._vouched_s:
            return self._lanes[0]
        return self._lanes[1]

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _any_waiting(self) -> bool:
        return bool(self._lanes[0] or self._lanes[1])

    async def take(self, source: str, deadline: float) -> None:
        """Return when this connection may start its handshake; ``TurnExpired`` at
        ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._refill(now)
        if not self._any_waiting() and self._tokens >= 1:
            self._tokens -= 1
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._lane(source, now).setdefault(source, deque()).append(turn)
        self._schedule(loop)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except TimeoutError:
            raise TurnExpired from None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._any_waiting():
            delay = max(0.0, (1 - self._tokens) / self._rate)
            self._timer = loop.call_later(delay, self._dispatch, loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._refill(loop.time())
        while self._tokens >= 1 and (waiting := self._next_lane()):
            source, queue = next(iter(waiting.items()))
            turn = queue.popleft()
            if queue:
                waiting.move_to_end(source)
            else:
                del waiting[source]
            if turn.done():
                continue  # ran out of time waiting, or its connection was cancelled
            turn.set_result(None)
            self._tokens -= 1
            self._vouched_run = self._vouched_run + 1 if waiting is self._lanes[0] else 0
        self._schedule(loop)

    def _next_lane(self) -> _Waiting | None:
        vouched, others = self._lanes
        if vouched and (not others or self._vouched_run < VOUCHED_RUN):
            return vouched
        return others or None


class TlsAcceptor(asyncio.Protocol):
    """Takes an accepted TCP connection over and runs its TLS handshake.

    The connection's socket is duplicated and the plain transport dropped before it reads a
    byte; ``loop.connect_accepted_socket`` then runs the server side of the handshake on the
    duplicate, so the handler gets its TLS transport exactly as from ``create_server(ssl=)``
    (on asyncio and on uvloop alike), and a failure raises here, where the peer is known.
    """

    def __init__(
        self,
        *,
        handler: asyncio.Protocol,
        context: ssl.SSLContext,
        handshake_timeout_s: float,
        on_refused: Callable[[HandshakeRefusal], None],
        pending: set[asyncio.Task[None]],
        check_peer: PeerCheck | None = None,
        admit: Callable[[str], bool] | None = None,
        unserved: Callable[[], None] | None = None,
        turns: HandshakeTurns | None = None,
        on_deadline: Callable[[str, str], None] | None = None,
        ipv6_prefix: int = IPV6_SOURCE_PREFIX,
        serve_for: Callable[[float], None] | None = None,
    ) -> None:
        """``admit``: asked with the peer's source (``source_of`` its address, with
        ``ipv6_prefix``) before any TLS work; False closes the
        connection at once. ``unserved``: called once when a connection ends without having
        been handed to ``handler`` (refused, abandoned, cancelled). ``turns``: the listener's
        pace of handshake starts; a connection waiting for its turn is not read (its
        ClientHello stays in the kernel), and ``handshake_timeout_s`` runs from accept, the
        wait included; turns are taken and vouched for by source. ``on_deadline(source,
        stage)``: a connection closed at that deadline,
        still waiting for its turn (``handshake_wait``) or in its handshake (``handshake``).
        ``serve_for(seconds)``: the connection, handed over, may take requests for that long
        (while the peer's certificate is valid and ``check_peer``'s good answer holds)."""
        self._pending = pending
        self._turns = turns
        self._on_deadline = on_deadline
        #: the peer's address, once accepted
        self.host = "unknown"
        #: what the peer's connection is counted under, once accepted
        self.source = "unknown"
        self._ipv6_prefix = ipv6_prefix
        self._task: asyncio.Task[None] | None = None
        self._admit = admit
        self._unserved = unserved
        self._handler = handler
        self._context = context
        self._timeout_s = handshake_timeout_s
        self._on_refused = on_refused
        self._check_peer = check_peer
        self._serve_for = serve_for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        transport = cast(asyncio.Transport, transport)
        host, port = peer_of(transport.get_extra_info("peername"))
        self.host = host
        self.source = source_of(host, self._ipv6_prefix)
        if self._admit is not None and not self._admit(self.source):
            transport.abort()
            return
        plain = transport.get_extra_info("socket")
        try:
            duplicate = socket.socket(fileno=os.dup(plain.fileno()))
        except (OSError, AttributeError) as exc:
            log.warning("tls_accept_failed", error=str(exc))
            transport.abort()
            self._ended_unserved()
            return
        # Closing this descriptor leaves the connection open on the duplicate; the transport
        # never starts reading.
        transport.abort()
        task = asyncio.get_running_loop().create_task(self._handshake(duplicate, port))
        self._task = task
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def abandon(self) -> None:
        """End this connection if it has not been handed over yet (its handshake, its wait
        for a turn, or its peer check is under way)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _deadline(self, stage: str) -> None:
        if self._on_deadline is not None:
            self._on_deadline(self.source, stage)

    def _refused(self, port: int | None, reason: str, detail: str) -> None:
        self._on_refused(
            HandshakeRefusal(
                host=self.host, port=port, source=self.source, reason=reason, detail=detail
            )
        )

    def _ended_unserved(self) -> None:
        if self._unserved is not None:
            self._unserved()

    async def _handshake(self, duplicate: socket.socket, port: int | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        gate = _Gate()
        served = False
        loop_owns_socket = False
        try:
            if self._turns is not None:
                await self._turns.take(self.source, deadline)
            loop_owns_socket = True
            transport, _ = await loop.connect_accepted_socket(
                lambda: gate,
                sock=duplicate,
                ssl=self._context,
                ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
            )
            served = await self._checked(gate, transport, port)
            if served and self._turns is not None:
                self._turns.vouch(self.source)
        except ssl.SSLError as exc:
            duplicate.close()
            reason, detail = classify(exc)
            self._refused(port, reason, detail)
        except (OSError, TimeoutError) as exc:
            # The peer left or was too slow (asyncio's and uvloop's handshake timeouts raise
            # ConnectionAbortedError: the clock tells).
            duplicate.close()
            log.debug("tls_handshake_abandoned", error=type(exc).__name__)
            if isinstance(exc, TurnExpired):
                self._deadline("handshake_wait")
            elif loop.time() >= deadline - 0.05:
                self._deadline("handshake")
        except asyncio.CancelledError:
            # Abandoned (evicted, or the site stopping). Once the loop has the socket, the
            # loop closes it with the transport it made.
            if not loop_owns_socket:
                duplicate.close()
            raise
        except Exception:
            # Not the peer's doing: say so, and keep serving the others.
            duplicate.close()
            log.exception("tls_handshake_failed", peer=self.host)
        finally:
            # The handler, once it has the connection, reports its end itself.
            if not served:
                self._ended_unserved()

    async def _checked(
        self, gate: _Gate, transport: asyncio.BaseTransport, port: int | None
    ) -> bool:
        """Hand the connection to the handler once its peer passed the checks after the
        handshake (the certificate's validity, and ``check_peer``), to be served while both
        hold; whether it was handed over."""
        tls = cast(asyncio.Transport, transport)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            if not der:
                raise PeerRefused("no_cert", "the client presented no certificate")
            # Served no longer than its certificate is valid, nor than its status answer holds
            # (and a resumed session, which skips OpenSSL's check, refused if it has expired).
            holds_s = check_still_valid(ssl_object.getpeercert(), time.time())
            if self._check_peer is not None:
                holds_s = min(holds_s, await self._check_peer(der))
        except PeerRefused as exc:
            tls.abort()
            self._refused(port, exc.reason, exc.detail)
            return False
        except BaseException:
            tls.abort()
            raise
        if gate.lost:
            return False
        gate.hand_over(self._handler)
        if self._serve_for is not None:
            self._serve_for(holds_s)
        return True


def check_still_valid(cert: dict[str, Any], now: float) -> float:
    """The seconds the client certificate remains valid. A resumed TLS 1.2 session skips
    the certificate's verification (the server issues no tickets, but Python's ssl cannot
    turn off OpenSSL's session cache): its certificate must still be within its validity
    period (``PeerRefused`` else; a full handshake's was checked by OpenSSL)."""
    if "notBefore" not in cert or "notAfter" not in cert:
        raise PeerRefused("bad_certificate", "a resumed session without a verified certificate")
    not_before = ssl.cert_time_to_seconds(cert["notBefore"])
    not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    if now > not_after:
        raise PeerRefused(
            "expired", f"certificate has expired ({cert['notAfter']}; a resumed session)"
        )
    if now < not_before:
        raise PeerRefused(
            "not_yet_valid",
            f"certificate is not yet valid ({cert['notBefore']}; a resumed session)",
        )
    return not_after - now


def peer_of(peername: Any) -> tuple[str, int | None]:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), int(peername[1])
    return "unknown", None


class RefusalWindow:
    """Which refusals to record: the first per (address, reason) in each window, and at most
    ``budget`` per reason per window, so a flood cannot grow the audit log, nor a flood of
    one kind (garbage from many addresses) hide another (a revoked certificate); the rest are
    counted.

    ``admit`` returns None to stay quiet, else how many refusals of that key went unrecorded
    since the last one recorded.
    """

    def __init__(self, *, window_s: float = 60.0, budget: int = 60, max_keys: int = 4096) -> None:
        self._window_s = window_s
        self._budget = budget
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        #: per reason: when its window began, how many were recorded in it
        self._spent: dict[str, tuple[float, int]] = {}

    def admit(self, key: tuple[str, str], now: float) -> int | None:
        since, quiet = self._seen.get(key, (float("-inf"), 0))
        if now - since < self._window_s:
            self._seen[key] = (since, quiet + 1)
            return None
        reason = key[1]
        began, spent = self._spent.get(reason, (float("-inf"), 0))
        if now - began >= self._window_s:
            began, spent = now, 0
        if spent >= self._budget:
            self._seen[key] = (since, quiet + 1)
            self._seen.move_to_end(key)
            self._trim()
            return None
        self._spent[reason] = (began, spent + 1)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        self._trim()
        return quiet

    def _trim(self) -> None:
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
