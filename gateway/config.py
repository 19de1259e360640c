"""Configuration: gateway.toml plus partners/<id>/partner.toml, loaded into frozen typed objects.

Paths inside a file are resolved relative to that file's folder. A bad file fails at start
with ConfigError(file, key, reason), never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from gateway.crypto.keys import VerificationKey, load_verification_key
from gateway.crypto.x509 import ca_identity, directly_issued
from gateway.errors import ConfigError
from gateway.model import is_party_id
from gateway.netpolicy import Network, is_ip_literal, parse_network, refusal
from gateway.schemas.registry import SchemaRegistry
from gateway.store.url import SQLITE_PREFIX, InvalidStoreUrl, SqliteUrl, parse_store_url
from gateway.urls import NO_HOST, UrlInvalid, split_server_url

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
    #: PEM CRLs of the partner CAs; when set, partners' client certificates are checked
    #: against them at the handshake (every partner CA needs one)
    crls: tuple[Path, ...] = ()
    #: how often the CRL files are checked for a new version, and for staleness
    crl_check_interval_s: float = 60.0
    #: how often our own certificate and key files are checked for a new version
    cert_check_interval_s: float = 60.0
    #: check partners' client certificates by OCSP after the handshake (fail closed)
    ocsp: bool = False
    #: the responder asked for every partner CA; None: each certificate's AIA OCSP URL
    ocsp_url: str | None = None
    ocsp_timeout_s: float = 5.0
    #: the longest an OCSP answer is kept (shorter when its nextUpdate comes first)
    ocsp_max_age_s: float = 3600.0
    #: non-public networks the responder may be on (as a partner's allowed_networks)
    ocsp_allowed_networks: tuple[Network, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_body_bytes: int = 1_048_576
    replay_window_s: int = 900
    max_skew_s: int = 120
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    #: connections one source address may hold at once (in their handshake or served)
    max_connections_per_source: int = 64
    #: TLS handshakes the partner endpoint starts per second (a quarter second's worth at
    #: once); new connections beyond that wait their turn, round robin by source address
    handshakes_per_second: float = 50.0
    #: an IPv6 peer's connections count, for the two caps above and the handshake turns,
    #: under its network of this many bits (an IPv4 peer's under its address): a /64 is what
    #: one subscriber or one host is usually given, and each of its 2**64 addresses alone
    #: would be no limit at all
    ipv6_source_prefix: int = 64
    #: how long one store operation may take before it counts as an outage: PostgreSQL's
    #: connect and command timeout (SQLite's writer is local and has none)
    store_timeout_s: float = 30.0


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

    #: may hold a password: kept out of repr so it is never printed or logged
    url: str | None = field(default=None, repr=False)
    prefetch: int = 50
    delivery_limit: int = 5
    publish_timeout_s: float = 10.0
    #: publish the final states of our messages to ``c2c.outcomes`` (docs/integration.md):
    #: opt-in, as an outcome no queue takes waits in the store, retried, until one is bound
    outcomes: bool = False


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    #: a cap on attempts, after which a message is dead before its expiry; None (the default):
    #: no cap, a message is sent until the partner ACKs or NACKs it or it expires
    max_attempts: int | None = None
    base_delay_s: float = 2.0
    max_delay_s: float = 900.0
    default_ttl_s: int = 86_400
    send_timeout_s: float = 30.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    poll_interval_s: float = 0.5


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """The inbox relay, which publishes stored inbound messages to the internal bus."""

    #: how long the inbox rows a relay claimed are its own: the rows a crashed node held wait
    #: this long for another relay (or its own restart); a publish outlasting it (a stalled
    #: broker) only publishes again (at least once)
    lease_s: float = 10.0


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
    #: Non-public networks the URL may lead to (a VPN, loopback in development); any other
    #: loopback, private or link-local address is refused (gateway/netpolicy.py, T63).
    allowed_networks: tuple[Network, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PartnerAmqp:
    enabled: bool = False
    #: The partner's RabbitMQ user; a set AMQP ``user_id`` property must equal it.
    broker_user: str | None = None


@dataclass(frozen=True, kw_only=True)
class PartnerAudit:
    """The partner's audit log, for witnessing: its checkpoint key and origin line."""

    #: Ed25519 public key (SubjectPublicKeyInfo PEM) signing the partner's checkpoints and
    #: its cosignatures of ours
    public_key: Path
    #: the partner's checkpoint origin line (the key name of its note signatures)
    origin: str


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
    #: the algorithm of our key that signs everything we send this partner (receipts and
    #: messages); None: our current key, whatever its algorithm
    sign_with: Alg | None = None
    #: reference of the agreement messages must name in header.legal_basis (None: optional)
    legal_basis: str | None = None
    #: the partner's audit log (None: no mutual witnessing with this partner)
    audit: PartnerAudit | None = None

    def load_key(self, key: KeyConfig) -> VerificationKey:
        """One of its ``keys``, loaded as every message's signature is verified with it;
        ConfigError naming the file when it does not load."""
        return load_verification_key(
            key.path,
            party=self.id,
            alg=key.alg,
            not_before=key.not_before,
            not_after=key.not_after,
        )


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    source: Path
    party: str
    partner_listen: ListenConfig
    api_listen: ListenConfig
    tls: TlsConfig
    signing_keys: tuple[KeyConfig, ...]
    #: may hold a password: kept out of repr so it is never printed or logged
    store_url: str = field(repr=False)
    amqp: AmqpConfig
    api_auth: ApiAuthConfig
    audit: AuditConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    partners_dir: Path = Path("partners")
    partners: Mapping[str, PartnerConfig] = field(default_factory=dict)

    @property
    def largest_body_bytes(self) -> int:
        """The largest body any partner takes (its ``max_body_bytes``), or ``[limits]``'s if
        larger: what the partner endpoint and an internal system's submission are read up to.
        Each message is then held to its own partner's limit."""
        return max(
            [self.limits.max_body_bytes] + [p.max_body_bytes for p in self.partners.values()]
        )


# --------------------------------------------------------------------------------------------
# Loading

#: PROTOCOL.md section 6: the message types every gateway knows by name, whatever the
#: schema catalogue of this build holds.
PROTOCOL_MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        "shipment.advance_data",
        "shipment.manifest",
        "shipment.export_declaration",
        "shipment.status",
        "enforcement.risk_alert",
        "enforcement.seizure_report",
        "enforcement.assistance_request",
        "enforcement.assistance_response",
        "query.shipment_lookup",
        "query.trader_lookup",
        "query.response",
        "audit.checkpoint",
        "audit.cosignature",
        "receipt",
    }
)

GATEWAY_FILE = "gateway.toml"
PARTNER_FILE = "partner.toml"
_ALGS: tuple[Alg, ...] = ("EdDSA", "ES256")
_TYP_RE = re.compile(r"^c2c\+[a-z0-9][a-z0-9.-]{0,31}$")
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
#: A replay window (plus skew) longer than a day would accept week-old captures as fresh.
_MAX_FRESHNESS_S = 86_400
#: Shorter, and a relay's own rows could run out between its claim and its publish.
_MIN_RELAY_LEASE_S = 1.0
#: The longest a message may live (30 days): the internal API's bound on a request's
#: ``ttl_s``, and so on ``[outbox] default_ttl_s``, which stands in for it.
MAX_TTL_S = 30 * 86_400
#: A hundred years; longer is keeping bodies for good, which leaving the setting out says
#: (and the purge's cutoff, now minus this, must still be a date).
MAX_BODY_RETENTION_DAYS = 36_500
#: Durations added to the current time (leases, retry delays, answer lifetimes): a date past
#: year 9999 is no date, and no such setting is sensible beyond a message's longest life.
_MAX_DURATION_S = MAX_TTL_S
#: A request's or a store command's deadline: a day is already no deadline, and PostgreSQL's
#: lock_timeout (3/4 of the store's, in ms) must stay within its 32-bit range.
_MAX_WAIT_S = 86_400
#: ``basic.qos`` prefetch_count is an AMQP short (16-bit unsigned) field.
_MAX_AMQP_SHORT = 65_535
#: Bounds (both included) of settings a typo could turn into a fault: below the floor a loop
#: wakes so often it spins a core, or a deadline cuts off every client; past the ceiling a
#: deadline is none (``header_timeout_s`` is the endpoint's guard against slow clients) or a
#: check never comes.
#: The wait between two rounds of the audit checkpoint and of the outbox dispatcher.
_CHECKPOINT_INTERVAL_S = (0.1, 86_400)
_POLL_INTERVAL_S = (0.05, 60)
#: How often files (our certificate and key, the CRLs) are looked at for a new version.
_FILE_CHECK_INTERVAL_S = (1, 86_400)
#: OpenSSL's trusted certificate form (openssl x509 -trustout)
_TRUSTED_BLOCK = b"-----BEGIN TRUSTED CERTIFICATE-----"
#: Waits on a peer: a client's request head, an OCSP responder, the broker's confirm.
_PEER_TIMEOUT_S = (0.5, 300)
_REQUEST_TIMEOUT_S = (0.5, _MAX_WAIT_S)
_BREAKER_RESET_S = (0.1, 86_400)
_HANDSHAKES_PER_SECOND = (0.1, 1_000_000)
#: A partner's messages per second: one in about 17 minutes up to no limit at all.
_RATE_PER_SECOND = (0.001, 1_000_000)
#: A message body's cap. PROTOCOL.md's default is 1 MiB, and a body is held in memory whole
#: (read, parsed, stored, relayed): 64 MiB is far more than any message needs.
MAX_BODY_BYTES = 64 * 1_048_576
#: TOML integers are 64-bit signed; tomllib reads longer ones, which nothing here can use
#: (an AMQP table takes at most 64 bits, a float at most about 1.8e308).
_MAX_TOML_INT = 2**63 - 1

_TOML_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "a table",
    datetime: "a date-time",
    date: "a date",
    time: "a time",
}


def _type_name(value: object) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


class _Table:
    """One TOML table being read: typed getters that fail with the dotted key, and a final
    check that every key was understood (a typo is an error, not a silently ignored line)."""

    def __init__(self, data: Mapping[str, Any], *, file: Path, prefix: str = "") -> None:
        self._data = data
        self._file = file
        self._prefix = prefix
        self._seen: set[str] = set()

    @property
    def file(self) -> Path:
        return self._file

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(str(self._file), self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, expected: tuple[type, ...], what: str) -> Any:
        self._seen.add(name)
        if name not in self._data:
            return None
        value = self._data[name]
        # bool is an int subclass in Python; TOML keeps them apart and so do we.
        if isinstance(value, bool) and bool not in expected:
            raise self.error(name, f"expected {what}, got a boolean")
        if not isinstance(value, expected):
            raise self.error(name, f"expected {what}, got {_type_name(value)}")
        return value

    def required(self, name: str) -> None:
        if name not in self._data:
            raise self.error(name, "required key is missing")

    def opt_str(self, name: str) -> str | None:
        value: str | None = self._get(name, (str,), "a string")
        if value is not None and not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def req_str(self, name: str) -> str:
        self.required(name)
        value = self.opt_str(name)
        assert value is not None
        return value

    def str_or(self, name: str, default: str) -> str:
        value = self.opt_str(name)
        return default if value is None else value

    def opt_int(self, name: str, *, minimum: int, maximum: int = _MAX_TOML_INT) -> int | None:
        value: int | None = self._get(name, (int,), "an integer")
        if value is None:
            return None
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise self.error(name, f"must be <= {maximum}, got {value}")
        return value

    def int_or(self, name: str, default: int, *, minimum: int, maximum: int = _MAX_TOML_INT) -> int:
        value = self.opt_int(name, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def _finite(self, name: str) -> tuple[int | float, float] | None:
        """The number as written and as a float; None when the key is absent."""
        value: int | float | None = self._get(name, (int, float), "a number")
        if value is None:
            return None
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise self.error(name, "must be a finite number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise self.error(name, "must be a finite number")
        return value, number

    def float_or(
        self, name: str, default: float, *, positive: bool = True, maximum: int | None = None
    ) -> float:
        found = self._finite(name)
        if found is None:
            return default
        value, number = found
        if positive and number <= 0:
            raise self.error(name, f"must be > 0, got {value}")
        if not positive and number < 0:
            raise self.error(name, f"must be >= 0, got {value}")
        if maximum is not None and number > maximum:
            raise self.error(name, f"must be <= {maximum}, got {value}")
        return number

    def bounded_float(self, name: str, default: float, bounds: tuple[float, float]) -> float:
        """A number from ``bounds[0]`` to ``bounds[1]``, both included."""
        found = self._finite(name)
        if found is None:
            return default
        value, number = found
        low, high = bounds
        if not low <= number <= high:
            raise self.error(name, f"must be from {low} to {high}, got {value}")
        return number

    def bool_or(self, name: str, default: bool) -> bool:
        value: bool | None = self._get(name, (bool,), "a boolean")
        return default if value is None else value

    def str_list(self, name: str) -> tuple[str, ...]:
        values: list[Any] | None = self._get(name, (list,), "an array of strings")
        if values is None:
            return ()
        for index, item in enumerate(values):
            if not isinstance(item, str) or not item.strip():
                raise self.error(
                    f"{name}[{index}]", f"expected a non-empty string, got {_type_name(item)}"
                )
        seen: set[str] = set()
        for index, item in enumerate(values):
            if item in seen:
                raise self.error(f"{name}[{index}]", f"duplicate entry {item!r}")
            seen.add(item)
        return tuple(values)

    def opt_datetime(self, name: str) -> datetime | None:
        value: datetime | None = self._get(name, (datetime,), "an offset date-time")
        if value is not None and value.tzinfo is None:
            raise self.error(
                name, "date-time needs a UTC offset, e.g. 2026-01-01T00:00:00Z (got a local time)"
            )
        return value

    def opt_alg(self, name: str) -> Alg | None:
        value = self.opt_str(name)
        if value is None:
            return None
        for alg in _ALGS:
            if value == alg:
                return alg
        raise self.error(name, f"unsupported algorithm {value!r}: only EdDSA or ES256")

    def alg_or(self, name: str, default: Alg) -> Alg:
        value = self.opt_alg(name)
        return default if value is None else value

    def opt_path(self, name: str, *, must_exist: bool = True) -> Path | None:
        value = self.opt_str(name)
        if value is None:
            return None
        path = (self._file.parent / value).resolve()
        if must_exist and not path.is_file():
            raise self.error(name, f"file not found: {path}")
        return path

    def req_path(self, name: str) -> Path:
        self.required(name)
        path = self.opt_path(name)
        assert path is not None
        return path

    def path_list(self, name: str) -> tuple[Path, ...]:
        paths = []
        for index, value in enumerate(self.str_list(name)):
            path = (self._file.parent / value).resolve()
            if not path.is_file():
                raise self.error(f"{name}[{index}]", f"file not found: {path}")
            paths.append(path)
        return tuple(paths)

    def table(self, name: str) -> _Table:
        value: dict[str, Any] | None = self._get(name, (dict,), "a table")
        return _Table(value or {}, file=self._file, prefix=f"{self.key(name)}.")

    def req_table(self, name: str) -> _Table:
        if name not in self._data:
            raise self.error(name, "required table is missing")
        return self.table(name)

    def table_list(self, name: str) -> list[_Table]:
        values: list[Any] | None = self._get(name, (list,), "an array of tables")
        tables = []
        for index, item in enumerate(values or []):
            if not isinstance(item, dict):
                raise self.error(f"{name}[{index}]", f"expected a table, got {_type_name(item)}")
            tables.append(_Table(item, file=self._file, prefix=f"{self.key(name)}[{index}]."))
        return tables

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _read_toml(path: Path) -> _Table:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(path), "(file)", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(toml)", str(exc)) from None
    return _Table(data, file=path)


def known_message_types() -> frozenset[str]:
    """PROTOCOL section 6 names plus whatever the schema catalogue of this build adds."""
    catalogue = {message_type for message_type, _ in SchemaRegistry.load_builtin().types()}
    return PROTOCOL_MESSAGE_TYPES | catalogue


def _party(table: _Table, name: str) -> str:
    value = table.req_str(name)
    if not is_party_id(value):
        raise table.error(name, f"{value!r} is not a party id (^[A-Z]{{2}}-[A-Z0-9]{{2,16}}$)")
    return value


def _key_config(table: _Table) -> KeyConfig:
    key = KeyConfig(
        path=table.req_path("path"),
        alg=table.alg_or("alg", "EdDSA"),
        not_before=table.opt_datetime("not_before"),
        not_after=table.opt_datetime("not_after"),
    )
    if key.not_before and key.not_after and key.not_before > key.not_after:
        raise table.error("not_before", "not_before is after not_after")
    table.finish()
    return key


def _keys(table: _Table, name: str) -> tuple[KeyConfig, ...]:
    table.required(name)
    keys = tuple(_key_config(entry) for entry in table.table_list(name))
    if not keys:
        raise table.error(name, "at least one key is required")
    return keys


def _listen(table: _Table, default_port: int) -> ListenConfig:
    listen = ListenConfig(
        host=table.str_or("host", ListenConfig.host),
        port=table.int_or("port", default_port, minimum=0, maximum=65_535),
    )
    table.finish()
    return listen


def _shared_listen_address(first: str, second: str, port: int) -> str | None:
    """The address listeners on hosts ``first`` and ``second`` would both take on ``port``,
    shown, when that is certain without resolving a name; None otherwise. asyncio binds an
    IPv6 listener to IPv6 alone, so "::" and "0.0.0.0" share nothing; "" is every address."""
    if first.lower() == second.lower():
        return f"{second!r} port {port}"
    one, other = _ip_or_none(first), _ip_or_none(second)
    if one is not None and one == other:
        return f"{second!r} port {port}, which is {first!r}"
    for wide, narrow in ((first, second), (second, first)):
        if wide == "":
            return f"{narrow!r} port {port}, which '' takes too: every address of this host"
        address, within = _ip_or_none(wide), _ip_or_none(narrow)
        if (
            address is not None
            and address.is_unspecified
            and within is not None
            and within.version == address.version
        ):
            return (
                f"{narrow!r} port {port}, which {wide!r} takes too: every IPv{address.version}"
                " address of this host"
            )
    return None


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:  # a name: its addresses are known only once resolved
        return None


def _check_listeners(config: GatewayConfig) -> None:
    """Refused here because serve would bind the second listener where the first listens
    and stop with asyncio's bind error, which names neither key nor file (port 0 is a free
    port of each listener's own, never shared)."""
    partner, api = config.partner_listen, config.api_listen
    if api.port == 0 or api.port != partner.port:
        return
    shared = _shared_listen_address(partner.host, api.host, api.port)
    if shared is not None:
        raise ConfigError(
            str(config.source),
            "api_listen.port",
            f"the same address as partner_listen ({shared}): the internal API and the"
            " partner endpoint cannot both listen there; give api_listen a port of its own"
            " (8080 when it sets none)",
        )


def _check_amqp_url(table: _Table, name: str, value: str) -> None:
    # The URL may carry a password: the reason never repeats it (gateway/urls.py).
    try:
        server = split_server_url(
            value, schemes=("amqp", "amqps"), what="an amqp:// or amqps:// URL"
        )
    except UrlInvalid as exc:
        raise table.error(name, exc.reason) from None
    if not server.addresses:
        raise table.error(name, NO_HOST)


def _secret_url(table: _Table, name: str, environ: Mapping[str, str]) -> str | None:
    """A URL given inline, or by name of the environment variable holding it (``<name>_env``)."""
    env_name = f"{name}_env"
    inline = table.opt_str(name)
    variable = table.opt_str(env_name)
    if inline is not None and variable is not None:
        raise table.error(env_name, f"give {name} or {env_name}, not both")
    if variable is None:
        return inline
    if not _ENV_NAME_RE.fullmatch(variable):
        raise table.error(env_name, f"{variable!r} is not an environment variable name")
    value = environ.get(variable)
    if not value:
        raise table.error(env_name, f"environment variable {variable} is not set")
    return value


def _store_url(table: _Table, environ: Mapping[str, str]) -> str:
    url = _secret_url(table, "store_url", environ) or "sqlite:///var/c2c.db"
    name = "store_url_env" if table.has("store_url_env") else "store_url"
    try:
        parsed = parse_store_url(url)
    except InvalidStoreUrl as exc:
        raise table.error(name, str(exc)) from None
    if isinstance(parsed, SqliteUrl):
        # A relative database path is relative to gateway.toml, like every other path.
        return f"{SQLITE_PREFIX}{table.file.parent.absolute() / parsed.path}"
    return url


def _limits(table: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_body_bytes=table.int_or(
            "max_body_bytes", d.max_body_bytes, minimum=1, maximum=MAX_BODY_BYTES
        ),
        replay_window_s=table.int_or("replay_window_s", d.replay_window_s, minimum=1),
        max_skew_s=table.int_or("max_skew_s", d.max_skew_s, minimum=0),
        request_timeout_s=table.bounded_float(
            "request_timeout_s", d.request_timeout_s, _REQUEST_TIMEOUT_S
        ),
        header_timeout_s=table.bounded_float(
            "header_timeout_s", d.header_timeout_s, _PEER_TIMEOUT_S
        ),
        max_connections=table.int_or("max_connections", d.max_connections, minimum=1),
        max_connections_per_source=table.int_or(
            "max_connections_per_source", d.max_connections_per_source, minimum=1
        ),
        handshakes_per_second=table.bounded_float(
            "handshakes_per_second", d.handshakes_per_second, _HANDSHAKES_PER_SECOND
        ),
        ipv6_source_prefix=table.int_or(
            "ipv6_source_prefix", d.ipv6_source_prefix, minimum=32, maximum=128
        ),
        store_timeout_s=table.float_or("store_timeout_s", d.store_timeout_s, maximum=_MAX_WAIT_S),
    )
    if limits.max_skew_s > limits.replay_window_s:
        raise table.error(
            "max_skew_s",
            f"skew ({limits.max_skew_s} s) larger than the replay window "
            f"({limits.replay_window_s} s)",
        )
    if limits.max_skew_s + limits.replay_window_s > _MAX_FRESHNESS_S:
        raise table.error(
            "replay_window_s",
            f"replay_window_s + max_skew_s = {limits.replay_window_s + limits.max_skew_s} s "
            f"exceeds {_MAX_FRESHNESS_S} s (one day)",
        )
    table.finish()
    return limits


def _amqp(table: _Table, environ: Mapping[str, str]) -> AmqpConfig:
    d = AmqpConfig()
    url = _secret_url(table, "url", environ)
    if url is not None:
        _check_amqp_url(table, "url_env" if table.has("url_env") else "url", url)
    amqp = AmqpConfig(
        url=url,
        prefetch=table.int_or("prefetch", d.prefetch, minimum=1, maximum=_MAX_AMQP_SHORT),
        delivery_limit=table.int_or("delivery_limit", d.delivery_limit, minimum=1),
        publish_timeout_s=table.bounded_float(
            "publish_timeout_s", d.publish_timeout_s, _PEER_TIMEOUT_S
        ),
        outcomes=table.bool_or("outcomes", d.outcomes),
    )
    if amqp.outcomes and url is None:
        # without a broker the outcomes would be dropped in silence
        raise table.error("outcomes", "publishes to RabbitMQ: set url (or url_env) too")
    table.finish()
    return amqp


def _api_auth(table: _Table) -> ApiAuthConfig:
    algorithms = table.str_list("algorithms") or ("EdDSA",)
    checked: list[Alg] = []
    for index, value in enumerate(algorithms):
        alg = next((a for a in _ALGS if a == value), None)
        if alg is None:
            raise table.error(
                f"algorithms[{index}]", f"unsupported algorithm {value!r}: only EdDSA or ES256"
            )
        checked.append(alg)
    table.required("public_keys")
    public_keys = table.path_list("public_keys")
    if not public_keys:
        raise table.error("public_keys", "at least one public key is required to verify tokens")
    auth = ApiAuthConfig(
        issuer=table.req_str("issuer"),
        audience=table.req_str("audience"),
        algorithms=tuple(checked),
        public_keys=public_keys,
        signing_key=table.opt_path("signing_key"),
        leeway_s=table.int_or("leeway_s", ApiAuthConfig.leeway_s, minimum=0, maximum=300),
    )
    table.finish()
    return auth


def _origin(table: _Table) -> str:
    origin = table.req_str("origin")
    if any(ch.isspace() for ch in origin) or not origin.isprintable() or "+" in origin:
        raise table.error("origin", "must be one printable line without spaces or '+'")
    return origin


def _audit(table: _Table) -> AuditConfig:
    origin = _origin(table)
    audit = AuditConfig(
        key=table.req_path("key"),
        origin=origin,
        checkpoint_interval_s=table.bounded_float(
            "checkpoint_interval_s", AuditConfig.checkpoint_interval_s, _CHECKPOINT_INTERVAL_S
        ),
    )
    table.finish()
    return audit


def _outbox(table: _Table) -> OutboxConfig:
    d = OutboxConfig()
    outbox = OutboxConfig(
        max_attempts=table.opt_int("max_attempts", minimum=1),
        base_delay_s=table.float_or("base_delay_s", d.base_delay_s),
        max_delay_s=table.float_or("max_delay_s", d.max_delay_s, maximum=_MAX_DURATION_S),
        default_ttl_s=table.int_or("default_ttl_s", d.default_ttl_s, minimum=1, maximum=MAX_TTL_S),
        send_timeout_s=table.float_or("send_timeout_s", d.send_timeout_s, maximum=_MAX_DURATION_S),
        breaker_failures=table.int_or("breaker_failures", d.breaker_failures, minimum=1),
        breaker_reset_s=table.bounded_float("breaker_reset_s", d.breaker_reset_s, _BREAKER_RESET_S),
        poll_interval_s=table.bounded_float("poll_interval_s", d.poll_interval_s, _POLL_INTERVAL_S),
    )
    if outbox.max_delay_s < outbox.base_delay_s:
        raise table.error("max_delay_s", "must be >= base_delay_s")
    table.finish()
    return outbox


def _relay(table: _Table) -> RelayConfig:
    relay = RelayConfig(
        lease_s=table.float_or("lease_s", RelayConfig.lease_s, maximum=_MAX_DURATION_S)
    )
    if relay.lease_s < _MIN_RELAY_LEASE_S:
        raise table.error("lease_s", f"must be >= {_MIN_RELAY_LEASE_S:g}, got {relay.lease_s:g}")
    table.finish()
    return relay


def _retention(table: _Table) -> RetentionConfig:
    retention = RetentionConfig(
        body_retention_days=table.opt_int(
            "body_retention_days", minimum=1, maximum=MAX_BODY_RETENTION_DAYS
        )
    )
    table.finish()
    return retention


def _refuse_trusted_blocks(table: _Table, name: str, path: Path | None) -> None:
    """A CA file holds no TRUSTED CERTIFICATE block (``openssl x509 -trustout``): OpenSSL
    would trust it in the handshakes, but cryptography, which ties a client certificate to
    its partner and checks revocation, reads only CERTIFICATE blocks and passes over it. A
    file that does not read is left to the loaders, which name what is wrong with it."""
    if path is None:
        return
    try:
        trusted = _TRUSTED_BLOCK in path.read_bytes()
    except OSError:
        return
    if trusted:
        raise table.error(
            name,
            f"{path} holds a TRUSTED CERTIFICATE block (openssl x509 -trustout): the"
            " gateway reads CA certificates from CERTIFICATE blocks only; write each"
            " certificate without -trustout (openssl x509 -in FILE -out NEW.pem)",
        )


def _tls(table: _Table) -> TlsConfig:
    tls = TlsConfig(
        cert=table.req_path("cert"),
        key=table.req_path("key"),
        ca=table.req_path("ca"),
        crls=table.path_list("crls"),
        crl_check_interval_s=table.bounded_float(
            "crl_check_interval_s", TlsConfig.crl_check_interval_s, _FILE_CHECK_INTERVAL_S
        ),
        cert_check_interval_s=table.bounded_float(
            "cert_check_interval_s", TlsConfig.cert_check_interval_s, _FILE_CHECK_INTERVAL_S
        ),
        ocsp=table.bool_or("ocsp", False),
        # OCSP is mostly plain HTTP: its answers are signed
        ocsp_url=_https_url(table, "ocsp_url", ("http", "https")),
        ocsp_timeout_s=table.bounded_float(
            "ocsp_timeout_s", TlsConfig.ocsp_timeout_s, _PEER_TIMEOUT_S
        ),
        ocsp_max_age_s=table.float_or("ocsp_max_age_s", 3600.0, maximum=_MAX_DURATION_S),
        ocsp_allowed_networks=_networks(table, "ocsp_allowed_networks"),
    )
    if tls.ocsp_url is not None and not tls.ocsp:
        raise table.error("ocsp_url", "set without ocsp = true")
    _refuse_trusted_blocks(table, "ca", tls.ca)
    table.finish()
    return tls


def _networks(table: _Table, name: str) -> tuple[Network, ...]:
    networks = []
    for index, value in enumerate(table.str_list(name)):
        try:
            networks.append(parse_network(value))
        except ValueError as exc:
            raise table.error(f"{name}[{index}]", f"{exc}") from None
    return tuple(networks)


def _message_types(table: _Table, name: str, known: frozenset[str]) -> frozenset[str]:
    values = table.str_list(name)
    for index, value in enumerate(values):
        if value not in known:
            raise table.error(f"{name}[{index}]", f"unknown message type {value!r}")
    return frozenset(values)


def _without_credentials(url: str) -> str:
    """``url`` as an error message may show it: everything between its scheme and its last
    ``@`` replaced by ``***`` (a mistyped URL's password may hold ``/``, ``?`` or ``#``)."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, colon, rest = head.partition(":")
    if not colon:
        return f"***@{tail}"
    return f"{scheme}:{'//' if rest.startswith('//') else ''}***@{tail}"


def _https_url(table: _Table, name: str, schemes: tuple[str, ...] = ("https",)) -> str | None:
    value = table.opt_str(name)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- parsing the port is what detects a bad one
    except ValueError:
        raise table.error(name, f"{_without_credentials(value)!r} is not a valid URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        named = " or ".join(f"{scheme}://" for scheme in schemes)
        raise table.error(name, f"{_without_credentials(value)!r} is not an {named} URL")
    if parts.username is not None or parts.password is not None:
        raise table.error(name, "credentials in the URL are not allowed")
    if parts.query or parts.fragment:
        raise table.error(name, "the URL must not have a query or fragment")
    return value


def _partner_https(table: _Table) -> PartnerHttps:
    fingerprints = []
    for index, value in enumerate(table.str_list("client_cert_fingerprints")):
        # Accept what `openssl x509 -fingerprint -sha256` prints (colons, upper case).
        normalised = value.replace(":", "").lower()
        if not _FINGERPRINT_RE.fullmatch(normalised):
            raise table.error(
                f"client_cert_fingerprints[{index}]",
                "expected a SHA-256 fingerprint (64 hex digits)",
            )
        fingerprints.append(normalised)
    https = PartnerHttps(
        url=_https_url(table, "url"),
        ca=table.opt_path("ca"),
        client_cert_fingerprints=tuple(fingerprints),
        client_cert_subjects=table.str_list("client_cert_subjects"),
        allowed_networks=_networks(table, "allowed_networks"),
    )
    host = urlsplit(https.url).hostname if https.url else None
    if host is not None and is_ip_literal(host):
        refused = refusal(host, https.allowed_networks)
        if refused is not None:
            raise table.error(
                "url",
                f"{refused}; a partner URL must lead to a public address unless"
                " allowed_networks lists its network",
            )
    uses_https = https.url or https.client_cert_fingerprints or https.client_cert_subjects
    if uses_https and https.ca is None:
        raise table.error("ca", "required when the partner uses HTTPS (url or client_cert_*)")
    _refuse_trusted_blocks(table, "ca", https.ca)
    table.finish()
    return https


def _partner_audit(table: _Table, *, own_origin: str | None) -> PartnerAudit:
    audit = PartnerAudit(public_key=table.req_path("public_key"), origin=_origin(table))
    if audit.origin == own_origin:
        raise table.error("origin", f"{audit.origin!r} is this gateway's own audit origin")
    table.finish()
    return audit


def _partner_amqp(table: _Table) -> PartnerAmqp:
    amqp = PartnerAmqp(
        enabled=table.bool_or("enabled", False), broker_user=table.opt_str("broker_user")
    )
    table.finish()
    return amqp


def _rate(table: _Table) -> RateLimit:
    d = RateLimit()
    rate = RateLimit(
        per_second=table.bounded_float("per_second", d.per_second, _RATE_PER_SECOND),
        burst=table.int_or("burst", d.burst, minimum=1),
    )
    table.finish()
    return rate


def _adapter(table: _Table, directory: Path) -> str:
    value = table.str_or("adapter", "canonical")
    if value == "canonical":
        return value
    target = (directory / value).resolve()
    if not target.is_relative_to(directory.resolve()) or target.suffix != ".py":
        raise table.error("adapter", "must be 'canonical' or a .py file inside the partner folder")
    if not target.is_file():
        raise table.error("adapter", f"file not found: {directory / value}")
    return value


def load_partner_config(
    directory: Path,
    *,
    own_party: str,
    default_max_body_bytes: int = LimitsConfig.max_body_bytes,
    known_types: frozenset[str] | None = None,
    own_origin: str | None = None,
) -> PartnerConfig:
    """Load ``directory/partner.toml``; the folder's name must be the partner's id."""
    directory = directory.absolute()
    if not is_party_id(directory.name):
        raise ConfigError(
            str(directory), "(folder)", f"folder name {directory.name!r} is not a party id"
        )
    table = _read_toml(directory / PARTNER_FILE)
    partner_id = _party(table, "id")
    if partner_id != directory.name:
        raise table.error("id", f"{partner_id!r} differs from the folder name {directory.name!r}")
    if partner_id == own_party:
        raise table.error("id", f"{partner_id!r} is this gateway's own party")
    known = known_message_types() if known_types is None else known_types
    typ = table.str_or("typ", "c2c+json")
    if not _TYP_RE.fullmatch(typ):
        raise table.error("typ", f"{typ!r} is not a c2c+<format> JWS type")
    partner = PartnerConfig(
        id=partner_id,
        name=table.req_str("name"),
        directory=directory,
        keys=_keys(table, "keys"),
        inbound_types=_message_types(table, "inbound_types", known),
        outbound_types=_message_types(table, "outbound_types", known),
        max_body_bytes=table.int_or(
            "max_body_bytes", default_max_body_bytes, minimum=1, maximum=MAX_BODY_BYTES
        ),
        rate=_rate(table.table("rate")),
        https=_partner_https(table.table("https")),
        amqp=_partner_amqp(table.table("amqp")),
        adapter=_adapter(table, directory),
        typ=typ,
        sign_with=table.opt_alg("sign_with"),
        legal_basis=table.opt_str("legal_basis"),
        audit=(
            _partner_audit(table.table("audit"), own_origin=own_origin)
            if table.has("audit")
            else None
        ),
    )
    if not (partner.https.url or partner.https.ca or partner.amqp.enabled):
        raise table.error("https", "the partner has no transport: configure [https] or [amqp]")
    table.finish()
    return partner


def _partners(
    directory: Path, *, own_party: str, default_max_body_bytes: int, own_origin: str
) -> dict[str, PartnerConfig]:
    known = known_message_types()
    partners: dict[str, PartnerConfig] = {}
    for entry in sorted(directory.iterdir()):
        # Hidden and private folders (.git, __pycache__) and plain files (README) are not partners.
        if entry.name.startswith((".", "_")) or not entry.is_dir():
            continue
        partner = load_partner_config(
            entry,
            own_party=own_party,
            default_max_body_bytes=default_max_body_bytes,
            known_types=known,
            own_origin=own_origin,
        )
        if partner.audit is not None:
            for other in partners.values():
                if other.audit is not None and other.audit.origin == partner.audit.origin:
                    raise ConfigError(
                        str(entry / PARTNER_FILE),
                        "audit.origin",
                        f"{partner.audit.origin!r} is also the audit origin of {other.id}",
                    )
        partners[partner.id] = partner
    _check_client_identities(partners.values())
    return partners


@dataclass(frozen=True)
class _Anchors:
    """A trust-anchor file's CA certificates, each as the CA it stands for (its subject and
    public key: a CA certificate re-issued with both is the same CA), with a name to show."""

    #: every CA of the file: a client certificate one of them issued is this partner's
    every: Mapping[tuple[bytes, bytes], str]
    #: those that issue client certificates: the ones that issued no other certificate of
    #: the file (an intermediate beside its root: the intermediate)
    issuing: frozenset[tuple[bytes, bytes]]


def _anchors(ca: Path) -> _Anchors:
    """A file that does not read is itself one CA (its loader names what is wrong with it),
    as is one holding a name or a key cryptography cannot parse (which OpenSSL may take)."""
    try:
        certificates = x509.load_pem_x509_certificates(ca.read_bytes())
        every = {ca_identity(c): repr(c.subject.rfc4514_string()) for c in certificates}
        issuing = frozenset(
            ca_identity(c)
            for c in certificates
            if not any(directly_issued(other, [c]) for other in certificates)
        )
    except (OSError, ValueError, UnsupportedAlgorithm):
        own = (f"file:{ca}".encode(), b"")
        return _Anchors(every={own: str(ca)}, issuing=frozenset({own}))
    return _Anchors(every=every, issuing=issuing)


def _shared_ca(mine: _Anchors, theirs: _Anchors) -> str | None:
    """The name of a CA that issues one file's client certificates and is an anchor of the
    other (the first such, by identity), or None."""
    shared = (mine.issuing & theirs.every.keys()) | (theirs.issuing & mine.every.keys())
    if not shared:
        return None
    return {**mine.every, **theirs.every}[min(shared)]


def _check_client_identities(partners: Iterable[PartnerConfig]) -> None:
    """No client certificate subject or fingerprint is accepted for two partners when a CA
    that issues one partner's client certificates is a trust anchor of the other: such a
    certificate would identify neither, and the handshake refuses it for both
    (gateway/transports/tls.py). The same name under two unrelated CAs, or under two
    intermediates of one root, is two certificates."""
    anchors: dict[Path, _Anchors] = {}
    # (key, value) -> the partners accepting it: partner, index in its list, its CA file
    claims: dict[tuple[str, str], list[tuple[PartnerConfig, int, Path]]] = {}
    for partner in partners:
        ca = partner.https.ca
        if ca is None:
            continue
        if ca not in anchors:
            anchors[ca] = _anchors(ca)
        for key, values, what in (
            ("client_cert_subjects", partner.https.client_cert_subjects, "subject"),
            ("client_cert_fingerprints", partner.https.client_cert_fingerprints, "fingerprint"),
        ):
            for index, value in enumerate(values):
                for other, other_index, other_ca in claims.get((key, value), []):
                    name = _shared_ca(anchors[ca], anchors[other_ca])
                    if name is None:
                        continue
                    files = str(other_ca) if other_ca == ca else f"{other_ca} and {ca}"
                    raise ConfigError(
                        str(partner.directory / PARTNER_FILE),
                        f"https.{key}[{index}]",
                        f"{value!r} is also accepted for {other.id}"
                        f" ({other.directory / PARTNER_FILE}: https.{key}[{other_index}]),"
                        f" and both trust the CA {name} ({files}): a client"
                        f" certificate it issues with that {what} would identify neither"
                        " partner and be refused for both; accept it for one partner only",
                    )
                claims.setdefault((key, value), []).append((partner, index, ca))


def _toml_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window_missed(key: KeyConfig, now: datetime) -> str:
    """Which end of a key's window ``now`` lies outside of."""
    if key.not_before is not None and now < key.not_before:
        return f"from {_toml_time(key.not_before)}"
    assert key.not_after is not None
    return f"until {_toml_time(key.not_after)}"


def _check_sign_with(config: GatewayConfig, now: datetime) -> None:
    """Every partner's ``sign_with`` names an algorithm of which we hold a key valid now."""
    for partner in config.partners.values():
        alg = partner.sign_with
        if alg is None:
            continue
        held = [(i, key) for i, key in enumerate(config.signing_keys) if key.alg == alg]
        if any(
            (key.not_before is None or key.not_before <= now)
            and (key.not_after is None or now <= key.not_after)
            for _, key in held
        ):
            continue
        where = f"{alg}: {config.source} [[signing_keys]]"
        if not held:
            kind = "a P-256 private key" if alg == "ES256" else "an Ed25519 private key"
            reason = (
                f'{where} holds no {alg} key; add one ({kind}, alg = "{alg}") or remove'
                " sign_with to sign with our current key"
            )
        else:
            windows = ", ".join(
                f"signing_keys[{i}] is valid {_window_missed(key, now)}" for i, key in held
            )
            reason = (
                f"{where} holds no {alg} key valid at {_toml_time(now)} ({windows}); add one"
                " valid now, or remove sign_with to sign with our current key"
            )
        raise ConfigError(str(partner.directory / PARTNER_FILE), "sign_with", reason)


def _check_amqp_partners(config: GatewayConfig) -> None:
    """A partner on AMQP needs the broker: without one, nothing serves its queues."""
    if config.amqp.url is not None:
        return
    for partner in config.partners.values():
        if not partner.amqp.enabled:
            continue
        lost = (
            "what it sends over AMQP would never be read"
            if partner.https.url is not None
            else "a message to it would be dead at once, and what it sends never read"
        )
        raise ConfigError(
            str(partner.directory / PARTNER_FILE),
            "amqp.enabled",
            f"true, but {config.source} has no [amqp] url or url_env: without the broker"
            f" nothing serves this partner's queues ({lost}); set the broker's URL there, or"
            " enabled = false",
        )


def private_key_files(config: GatewayConfig) -> list[tuple[str, Path]]:
    """Our private key files, each with the key naming it in gateway.toml: whoever reads one
    can sign, or take TLS connections, as this gateway."""
    files = [(f"signing_keys[{i}].path", key.path) for i, key in enumerate(config.signing_keys)]
    files += [("tls.key", config.tls.key), ("audit.key", config.audit.key)]
    if config.api_auth.signing_key is not None:
        files.append(("api_auth.signing_key", config.api_auth.signing_key))
    return files


def open_private_key_files(config: GatewayConfig) -> Iterator[tuple[str, Path, int]]:
    """Our private key files that their group or others may read or write, each with its key
    in gateway.toml and its permission bits. A file that cannot be read is left to its
    loader, which names it."""
    for key, path in private_key_files(config):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & 0o066:
            yield key, path, mode


def load_config(
    path: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> GatewayConfig:
    """Load ``gateway.toml`` and every ``partners/<id>/partner.toml`` it points at.

    ``environ`` (default ``os.environ``) supplies secrets named by ``*_env`` keys. A
    partner's ``sign_with`` needs one of our signing keys of that algorithm valid at ``now``
    (default: the current time).
    Raises ConfigError(file, key, reason) on the first problem found.
    """
    source = Path(path).absolute()
    env = os.environ if environ is None else environ
    table = _read_toml(source)
    party = _party(table, "party")
    limits = _limits(table.table("limits"))
    partners_dir = source.parent / table.str_or("partners_dir", "partners")
    if not partners_dir.is_dir():
        raise table.error("partners_dir", f"directory not found: {partners_dir}")
    audit = _audit(table.req_table("audit"))
    config = GatewayConfig(
        source=source,
        party=party,
        partner_listen=_listen(table.table("partner_listen"), ListenConfig.port),
        api_listen=_listen(table.table("api_listen"), 8080),
        tls=_tls(table.req_table("tls")),
        signing_keys=_keys(table, "signing_keys"),
        store_url=_store_url(table, env),
        amqp=_amqp(table.table("amqp"), env),
        api_auth=_api_auth(table.req_table("api_auth")),
        audit=audit,
        limits=limits,
        outbox=_outbox(table.table("outbox")),
        relay=_relay(table.table("relay")),
        retention=_retention(table.table("retention")),
        partners_dir=partners_dir,
        partners=MappingProxyType(
            _partners(
                partners_dir,
                own_party=party,
                default_max_body_bytes=limits.max_body_bytes,
                own_origin=audit.origin,
            )
        ),
    )
    table.finish()
    _check_listeners(config)
    _check_amqp_partners(config)
    _check_sign_with(config, datetime.now(UTC) if now is None else now)
    return config
