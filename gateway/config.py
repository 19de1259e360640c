"""Configuration: gateway.toml plus partners/<id>/partner.toml, loaded into frozen typed objects.

Paths inside a file are resolved relative to that file's folder. A bad file fails at start
with ConfigError(file, key, reason), never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

Alg = Literal["EdDSA", "ES256"]


@dataclass(frozen=True, kw_only=True)
class KeyConfig:
    """A signing key (private PEM, own keys) or verification key (public PEM, partners' keys)."""

    path: Path
    alg: Alg = "EdDSA"
    not_before: datetime | None = None
    not_after: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8443


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Own TLS identity (server and client use) and the CA that signed partners' certificates."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_body_bytes: int = 1_048_576
    replay_window_s: int = 900
    max_skew_s: int = 120
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int = 1024


@dataclass(frozen=True, kw_only=True)
class ApiAuthConfig:
    """JWT bearer tokens for the internal API."""

    issuer: str
    audience: str
    algorithms: tuple[Alg, ...] = ("EdDSA",)
    public_keys: tuple[Path, ...] = ()
    #: Development only: the private key ``token issue`` signs with.
    signing_key: Path | None = None
    leeway_s: int = 30


@dataclass(frozen=True, kw_only=True)
class AmqpConfig:
    """RabbitMQ; ``url`` None means the in-process bus (single node)."""

    url: str | None = None
    prefetch: int = 50
    delivery_limit: int = 5
    publish_timeout_s: float = 10.0


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    max_attempts: int = 20
    base_delay_s: float = 2.0
    max_delay_s: float = 900.0
    default_ttl_s: int = 86_400
    send_timeout_s: float = 30.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    poll_interval_s: float = 0.5


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    key: Path
    origin: str
    checkpoint_interval_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    body_retention_days: int | None = None


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    per_second: float = 100.0
    burst: int = 200


@dataclass(frozen=True, kw_only=True)
class PartnerHttps:
    #: Where we POST outbound messages; None: this partner is not reached over HTTPS.
    url: str | None = None
    #: Trust anchor(s) for the partner's client certificate and its server certificate.
    ca: Path | None = None
    #: SHA-256 fingerprints (lowercase hex, no colons) of accepted client certificates.
    client_cert_fingerprints: tuple[str, ...] = ()
    #: Accepted subject common names of client certificates.
    client_cert_subjects: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PartnerAmqp:
    enabled: bool = False
    #: The partner's RabbitMQ user; a set AMQP ``user_id`` property must equal it.
    broker_user: str | None = None


@dataclass(frozen=True, kw_only=True)
class PartnerConfig:
    id: str
    name: str
    directory: Path
    keys: tuple[KeyConfig, ...]
    #: message types this partner may send us
    inbound_types: frozenset[str]
    #: message types we may send this partner
    outbound_types: frozenset[str]
    max_body_bytes: int = 1_048_576
    rate: RateLimit = field(default_factory=RateLimit)
    https: PartnerHttps = field(default_factory=PartnerHttps)
    amqp: PartnerAmqp = field(default_factory=PartnerAmqp)
    #: adapter name: "canonical" (pass-through) or a module path under the partner folder
    adapter: str = "canonical"
    #: JWS typ this partner uses
    typ: str = "c2c+json"
    #: reference of the agreement messages must name in header.legal_basis (None: optional)
    legal_basis: str | None = None


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    source: Path
    party: str
    partner_listen: ListenConfig
    api_listen: ListenConfig
    tls: TlsConfig
    signing_keys: tuple[KeyConfig, ...]
    store_url: str
    amqp: AmqpConfig
    api_auth: ApiAuthConfig
    audit: AuditConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    partners_dir: Path = Path("partners")
    partners: Mapping[str, PartnerConfig] = field(default_factory=dict)
