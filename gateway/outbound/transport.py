"""The seam between the dispatcher and the wire: one async ``send`` plus ``aclose``.

Like httpx's transports, an implementation turns its library's exceptions into the
gateway's own ``TransportError`` at this one place, so the dispatcher never sees aiohttp
or aio-pika. HTTPS answers synchronously with the partner's receipt (``PartnerReply``);
AMQP only hands the message to the broker (``Handed``) and the receipt arrives later on
the inbound side, where ``apply_partner_receipt`` picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import PartnerConfig


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One attempt's input: the stored signed bytes, identical on every retry."""

    partner: PartnerConfig
    sender: str
    message_id: str
    message_type: str
    body: bytes = field(repr=False)
    signature: str = field(repr=False)
    content_type: str = "application/json"


@dataclass(frozen=True, kw_only=True)
class PartnerReply:
    """What the partner answered on a synchronous transport."""

    status: int
    body: bytes = field(repr=False)
    #: the receipt's detached JWS (``C2C-Signature``), if the partner sent one
    signature: str | None = field(default=None, repr=False)
    #: ``Retry-After`` in seconds, when present and well-formed
    retry_after_s: float | None = None
    #: ``Location`` of a redirect, reported, never followed
    location: str | None = None


@dataclass(frozen=True, kw_only=True)
class Handed:
    """An asynchronous transport took the message; the receipt will come in later."""


class TransportError(Exception):
    """An attempt failed below the protocol (connection, TLS, timeout, broker).

    ``may_have_arrived`` is False when the failure happened before any byte of the
    message could reach the partner (refused connection, TLS handshake, DNS).
    """

    def __init__(self, reason: str, *, may_have_arrived: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.may_have_arrived = may_have_arrived


class OutboundTransport(Protocol):
    name: str

    async def send(self, delivery: Delivery) -> PartnerReply | Handed:
        """Deliver once; raise ``TransportError`` for failures below the protocol."""
        ...

    async def aclose(self) -> None: ...
