"""What the inbound pipeline takes, carries between stages, and gives back to a transport.

Transports build an ``InboundRequest`` (they know HTTP or AMQP, nothing about signatures or
schemas) and turn the ``InboundResult`` into their own response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from gateway.adapters.registry import Adapter
from gateway.clock import Clock
from gateway.config import GatewayConfig, PartnerConfig
from gateway.crypto.keys import KeyRing, VerificationKey
from gateway.errors import NackCode
from gateway.inbound.ratelimit import RateLimiters
from gateway.metrics import Metrics
from gateway.model import Envelope
from gateway.receipts import ReceiptSigner
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import InboundRecord, RelayLease, Store

Transport = Literal["https", "amqp"]


@dataclass(frozen=True, kw_only=True)
class InboundRequest:
    body: bytes
    #: the detached JWS (HTTPS ``C2C-Signature`` / AMQP ``c2c-signature``)
    signature: str | None
    transport: Transport
    #: partner id authenticated by the transport (mTLS certificate, or the AMQP queue)
    peer: str | None
    #: AMQP ``user_id`` property, when the publisher set one
    broker_user: str | None = None
    content_type: str | None = None
    #: HTTP ``Content-Encoding``; anything but identity is refused (the signature covers
    #: the exact bytes, and decompressing hostile input is a bomb waiting to go off)
    content_encoding: str | None = None
    #: the message id the transport carries beside the body (AMQP ``message_id``, which
    #: PROTOCOL section 5 sets to header.message_id): what a NACK of a body that names none,
    #: or may not be read (unparseable, over the limit), refers to
    transport_message_id: str | None = None
    #: whether a refusal as ``UNAVAILABLE`` is answered: over AMQP the delivery goes back to
    #: its queue instead, so no NACK is signed for it (signing one per attempt of a poison
    #: message or per retry of a held delivery was work thrown away)
    unavailable_answered: bool = True
    #: the transport already took this message's token from the partner's rate limiter
    #: (AMQP paces deliveries to the rate, the queue being the buffer): not taken again
    rate_taken: bool = False
    #: why the transport passes no signature though the message carried something in its
    #: place (an AMQP ``c2c-signature`` header of another type): the partner's detail
    signature_problem: str | None = None


@dataclass(frozen=True, kw_only=True)
class InboundResult:
    http_status: int
    #: None for an ACK (or an inbound receipt handed over)
    code: NackCode | None
    #: our signed receipt (ACK or NACK), exact bytes and detached JWS
    receipt_body: bytes | None
    receipt_signature: str | None
    #: RFC 9457 problem document when no receipt could be tied to a sender and message id
    problem: dict[str, Any] | None
    retry_after_s: int | None
    #: the stored inbox row (new or, for an exact re-send, the original)
    record: InboundRecord | None
    #: an UNAVAILABLE whose cause fails every message alike for now (``Unavailable.outage``)
    outage: bool = False
    #: a refusal whose audit entry was written: the store answered while it was refused
    audited: bool = False

    @property
    def accepted(self) -> bool:
        return self.code is None


@dataclass(frozen=True, kw_only=True)
class ReceivedReceipt:
    """A partner's signed receipt for one of our messages, verified and authorized."""

    envelope: Envelope
    body: bytes
    signature: str
    kid: str
    peer: str
    transport: Transport
    received_at: datetime


OnReceipt = Callable[[ReceivedReceipt], Awaitable[None]]
#: a service's own check of one message type before the commit: ``(sender, envelope)``,
#: raising the GatewayError that refuses it (witnessing's on its messages)
InboundCheck = Callable[[str, Envelope], Awaitable[None]]


class RelayHandoff(Protocol):
    """Where accepted records go after their commit (``gateway.relay.InboxRelay``)."""

    def lease(self, record: InboundRecord) -> RelayLease | None:
        """The relay lease to store the new row ``record`` under (None: store it unleased)."""
        ...

    def stored(self, record: InboundRecord) -> None:
        """The row stored under ``lease()`` is committed: publish it to the internal bus."""
        ...


@dataclass(frozen=True, kw_only=True)
class InboundEnv:
    """Everything the stages use; built once by the runtime."""

    config: GatewayConfig
    keyring: KeyRing
    registry: SchemaRegistry
    store: Store
    signer: ReceiptSigner
    clock: Clock
    limiters: RateLimiters
    adapters: Mapping[str, Adapter]
    metrics: Metrics
    on_receipt: OnReceipt | None = None
    #: by message type: checks attached services make before the commit (``check_with_service``)
    checks: Mapping[str, InboundCheck] = field(default_factory=dict)
    #: takes each committed record, so the relay publishes it without a claim or a re-read
    relay: RelayHandoff | None = None


@dataclass(kw_only=True)
class InboundContext:
    """One message on its way through the stages; each stage fills in what it learned."""

    request: InboundRequest
    env: InboundEnv
    received_at: datetime
    #: ``sha-256:<b64url>`` of the exact body; None when the transport could not read it all
    digest: str | None
    partner: PartnerConfig | None = None
    adapter: Adapter | None = None
    key: VerificationKey | None = None
    canonical: bytes | None = None
    envelope: Envelope | None = None
    #: set by a stage that completes the exchange early (duplicate, receipt, stored)
    result: InboundResult | None = None
