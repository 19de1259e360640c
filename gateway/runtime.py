"""The running gateway: one object that loads everything from config and starts/stops it.

``Gateway(config)`` loads keys (partners' and ours), the schema catalogue, adapters, rate
limiters and metrics, and builds the store, the bus, the inbound pipeline, the inbox and
outcome relays and the partner HTTPS server; nothing is opened until ``start()``. Further
services (the internal API, the outbound dispatcher, AMQP consumers) are added with
``add_service`` and started after the store is open, stopped before it closes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import structlog
from cryptography import x509

from gateway import partner_keys
from gateway.adapters.registry import Adapter, adapter_for, partner_media_type
from gateway.audit.events import AuditEvent, EventKind, record_or_log
from gateway.clock import Clock, SystemClock
from gateway.clockwatch import ClockWatch
from gateway.config import PARTNER_FILE, GatewayConfig, load_config, open_private_key_files
from gateway.crypto.keys import (
    KeyRing,
    SigningKey,
    load_signing_key,
    public_jwk,
)
from gateway.errors import ConfigError
from gateway.inbound.context import InboundCheck, InboundEnv, OnReceipt, ReceivedReceipt
from gateway.inbound.pipeline import InboundPipeline
from gateway.inbound.ratelimit import RateLimiters
from gateway.metrics import Metrics
from gateway.outbound.submission import SubmissionServices
from gateway.outcome_relay import OutcomeRelay
from gateway.receipts import ReceiptSigner
from gateway.relay import InboxRelay
from gateway.retention import RetentionService
from gateway.schemas.registry import SchemaRegistry
from gateway.store import InvalidStoreUrl, open_store
from gateway.store.base import Store
from gateway.transports.amqp import AmqpBroker
from gateway.transports.amqp_bus import RabbitBus
from gateway.transports.amqp_service import AmqpService
from gateway.transports.bus import Bus, MemoryBus
from gateway.transports.https_server import PartnerHttpsServer
from gateway.transports.ocsp import OcspChecker
from gateway.transports.revocation import (
    CrlWatcher,
    enable_revocation,
    next_updates,
    read_anchors,
    revoked_in,
)
from gateway.transports.tls import PartnerIdentifier, partner_trust_anchors, server_context
from gateway.transports.tls_identity import TlsIdentity

log = structlog.get_logger(__name__)


class Service(Protocol):
    """Anything the gateway starts after the store is open and stops before it closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def load_partner_keys(config: GatewayConfig) -> KeyRing:
    return KeyRing(
        partner.load_key(key) for partner in config.partners.values() for key in partner.keys
    )


def load_own_signing_keys(config: GatewayConfig) -> tuple[SigningKey, ...]:
    if not config.signing_keys:
        raise ConfigError(str(config.source), "signing_keys", "at least one signing key is needed")
    return tuple(
        load_signing_key(
            key.path,
            party=config.party,
            alg=key.alg,
            not_before=key.not_before,
            not_after=key.not_after,
        )
        for key in config.signing_keys
    )


def warn_open_key_files(config: GatewayConfig) -> None:
    """Say which of our private key files its group or others may read (or write): the
    operator's files, theirs to change, as the store file (``store_file_open_to_others``)."""
    for key, path, mode in open_private_key_files(config):
        log.warning("key_file_open_to_others", key=key, file=str(path), mode=f"{mode:04o}")


def jwks(keys: tuple[SigningKey, ...]) -> dict[str, Any]:
    """Our public signing keys as a JWKS (RFC 7517), with kid, alg and use."""
    return {
        "keys": [{**public_jwk(key), "kid": key.kid, "alg": key.alg, "use": "sig"} for key in keys]
    }


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.keyring = load_partner_keys(config)
        self.signing_keys = load_own_signing_keys(config)
        warn_open_key_files(config)
        self.registry = SchemaRegistry.load_builtin()
        self.metrics = Metrics(config.partners.keys())
        self.adapters: Mapping[str, Adapter] = {
            pid: adapter_for(partner) for pid, partner in config.partners.items()
        }
        self.signer = ReceiptSigner(party=config.party, keys=self.signing_keys, clock=self.clock)
        if store is None:
            try:
                store = open_store(
                    config.store_url, clock=self.clock, timeout_s=config.limits.store_timeout_s
                )
            except InvalidStoreUrl as exc:
                raise ConfigError(str(config.source), "store_url", str(exc)) from None
        self.store = store
        self.limiters = RateLimiters(
            {pid: partner.rate for pid, partner in config.partners.items()},
            self.clock,
            source=self._take_rate_tokens,
        )
        #: the RabbitMQ side (partner queues, c2c.submit, c2c.inbound) when amqp.url is set
        self.broker: AmqpBroker | None = None
        if bus is None and config.amqp.url is not None:
            self.broker = AmqpBroker(config.amqp)
            bus = RabbitBus(
                self.broker,
                media_type=functools.partial(partner_media_type, config.partners),
                party=config.party,
                outcomes=config.amqp.outcomes,
            )
        self.bus: Bus = bus if bus is not None else MemoryBus()
        #: called when an internal system submitted over AMQP (the dispatcher's wake-up)
        self.on_submitted: Callable[[], None] | None = None
        self.relay = InboxRelay(
            store=self.store,
            bus=self.bus,
            clock=self.clock,
            metrics=self.metrics,
            lease_s=config.relay.lease_s,
        )
        #: publishes the final states of our outbound messages (``c2c.outcomes``)
        self.outcome_relay = OutcomeRelay(
            store=self.store,
            bus=self.bus,
            clock=self.clock,
            metrics=self.metrics,
            lease_s=config.relay.lease_s,
            owner=self.relay.owner,
        )
        self.metrics.relay_handover_records.set_function(lambda: self.relay.handed_records)
        self.metrics.relay_handover_bytes.set_function(lambda: self.relay.handed_bytes)
        if self.broker is not None:
            broker = self.broker
            self.metrics.amqp_in_flight.set_function(lambda: broker.in_flight)
            self.metrics.watch_broker(broker)
        self._receipt_handler: OnReceipt | None = None
        self._inbound_checks: dict[str, InboundCheck] = {}
        self.pipeline = InboundPipeline(
            InboundEnv(
                config=config,
                keyring=self.keyring,
                registry=self.registry,
                store=self.store,
                signer=self.signer,
                clock=self.clock,
                limiters=self.limiters,
                adapters=self.adapters,
                metrics=self.metrics,
                on_receipt=self._on_receipt,
                checks=self._inbound_checks,
                relay=self.relay,
            )
        )
        #: our certificate and key; the API and outbound clients add their contexts
        self.tls_identity = TlsIdentity(
            config.tls,
            clock=self.clock,
            audit=lambda event: self.store.append_audit([event]),
            on_identity=lambda identity: self.metrics.tls_certificate_expiry.set(
                identity.not_after.timestamp()
            ),
            on_outcome=lambda outcome: self.metrics.tls_reloads.labels(outcome=outcome).inc(),
        )
        partners = list(config.partners.values())
        self.crl_watcher: CrlWatcher | None = None
        if config.tls.crls:
            # a new CRL makes a new context: with the pair in force, not the files as they are
            partner_context, self.crl_watcher = enable_revocation(
                lambda: server_context(config.tls, partners, load_pair=self.tls_identity.load_into),
                config.tls,
                partners,
                self.clock,
                publish=lambda context: self.partner_server.set_ssl_context(context),
            )
        else:
            partner_context = server_context(config.tls, partners)
        self.ocsp: OcspChecker | None = None
        if config.tls.ocsp:
            self.ocsp = OcspChecker(
                config.tls,
                [cert for _, cert in read_anchors(partner_trust_anchors(config.tls, partners))],
                clock=self.clock,
            )
        self.partner_server = PartnerHttpsServer(
            pipeline=self.pipeline,
            registry=self.registry,
            jwks=jwks(self.signing_keys),
            identifier=PartnerIdentifier(config.tls, config.partners),
            ssl_context=partner_context,
            limits=config.limits,
            max_body_bytes=config.largest_body_bytes,
            host=config.partner_listen.host,
            port=config.partner_listen.port,
            check_peer=self.ocsp.check if self.ocsp is not None else None,
        )
        self._services: list[Service] = []
        if self.ocsp is not None:
            self._services.append(self.ocsp)
        if self.crl_watcher is not None:
            self._services.append(self.crl_watcher)
            self.crl_watcher.subscribe(self._retire_revoked)
            self.crl_watcher.subscribe(self._show_crls)
            self._show_crls()
        self.tls_identity.track(lambda: [self.partner_server.ssl_context])
        self._services.append(self.tls_identity)
        self.clock_watch = ClockWatch(
            clock=self.clock,
            store=self.store,
            metrics=self.metrics,
            audit=lambda event: self.store.append_audit([event]),
        )
        self._services.append(self.clock_watch)
        self._started = False
        self.amqp: AmqpService | None = None
        if self.broker is not None:
            self.amqp = AmqpService(
                broker=self.broker,
                pipeline=self.pipeline,
                submission=self.submission_services(),
                on_submitted=self._submitted,
            )
            # First service: the broker is connected before anything publishes to it.
            self.add_service(self.amqp)
        #: the periodic body purge, when ``retention.body_retention_days`` is set
        self.retention: RetentionService | None = None
        if config.retention.body_retention_days is not None:
            self.retention = RetentionService(
                store=self.store,
                clock=self.clock,
                retention_days=config.retention.body_retention_days,
            )
            self.add_service(self.retention)

    async def _take_rate_tokens(
        self, partner: str, want: float, per_second: float, burst: float
    ) -> float | None:
        return await self.store.take_rate_tokens(partner, want, per_second=per_second, burst=burst)

    def _submitted(self) -> None:
        if self.on_submitted is not None:
            self.on_submitted()

    async def reload(self, *, actor: str) -> None:
        """What SIGHUP takes in again: partners' signing keys, and our TLS certificate and key."""
        await self.reload_partner_keys(actor=actor)
        await self.tls_identity.reload(actor=actor)
        # a renewed key file is a new file, made with whatever umask the renewal ran under
        warn_open_key_files(self.config)

    async def reload_partner_keys(self, *, actor: str) -> bool:
        """Swap in the partners' keys as configured now (gateway/partner_keys.py); False if
        the configuration does not load, and the keys in force stay."""
        try:
            fresh = load_config(self.config.source)
            keys = partner_keys.served_keys(self.config, load_partner_keys(fresh))
        except ConfigError as exc:
            log.error("partner_keys_reload_refused", reason=str(exc), actor=actor)
            self.metrics.partner_key_reloads.labels(outcome=partner_keys.REFUSED).inc()
            await self._audit_key_change(partner_keys.REFUSED, actor, str(exc))
            return False
        waiting = partner_keys.other_changes(self.config, fresh)
        if waiting:
            log.warning("partner_changes_need_restart", partners=waiting, actor=actor)
        settings = partner_keys.gateway_changes(self.config, fresh)
        if settings:
            log.warning(
                "gateway_changes_need_restart",
                file=str(self.config.source),
                settings=settings,
                actor=actor,
            )
        changes = partner_keys.key_changes(self.keyring, keys)
        if not changes:
            log.info("partner_keys_unchanged", actor=actor)
            return True
        self.keyring.replace(keys)
        log.info("partner_keys_reloaded", changes=changes, actor=actor)
        self.metrics.partner_key_reloads.labels(outcome=partner_keys.RELOADED).inc()
        await self._audit_key_change(partner_keys.RELOADED, actor, "; ".join(changes))
        return True

    async def _audit_key_change(self, outcome: str, actor: str, reason: str) -> None:
        event = AuditEvent(
            event=EventKind.KEY_CHANGE,
            at=self.clock.now(),
            outcome=outcome,
            actor=actor,
            reason=reason,
        )
        await record_or_log(lambda entry: self.store.append_audit([entry]), event)

    def submission_services(self) -> SubmissionServices:
        """What submitting an outbound message as this gateway needs (``outbound.submit``)."""
        return SubmissionServices(
            config=self.config,
            registry=self.registry,
            signing_keys=self.signing_keys,
            store=self.store,
            clock=self.clock,
        )

    def set_receipt_handler(self, handler: OnReceipt) -> None:
        """Where partners' receipts for our messages go (the outbound dispatcher)."""
        self._receipt_handler = handler

    def add_inbound_check(self, message_types: Iterable[str], check: InboundCheck) -> None:
        """Have ``check`` pass each inbound message of these types before its commit: what
        it refuses is NACKed, not ACKed (a service's own rules, such as witnessing's)."""
        if self._started:
            raise RuntimeError("add inbound checks before start()")
        for message_type in message_types:
            if message_type in self._inbound_checks:
                raise RuntimeError(f"{message_type} already has an inbound check")
            self._inbound_checks[message_type] = check

    def add_service(self, service: Service) -> None:
        if self._started:
            raise RuntimeError("add services before start()")
        self._services.append(service)

    async def _on_receipt(self, receipt: ReceivedReceipt) -> None:
        if self._receipt_handler is None:
            log.warning(
                "receipt_without_dispatcher",
                peer=receipt.peer,
                in_reply_to=receipt.envelope.header.in_reply_to,
            )
            return
        await self._receipt_handler(receipt)

    @property
    def partner_url(self) -> str:
        return self.partner_server.url

    def _retire_revoked(self) -> None:
        """A newer CRL is in force: partners' connections made before it, with a certificate
        it revokes, take no further request (their next handshake is refused)."""
        assert self.crl_watcher is not None
        files = self.crl_watcher.files

        def revoked(der: bytes) -> bool:
            return revoked_in(files, x509.load_der_x509_certificate(der)) is not None

        count = self.partner_server.retire_where(revoked)
        if count:
            log.warning("partner_connections_revoked", connections=count, by="a newer CRL")

    def _show_crls(self) -> None:
        """``c2c_tls_crl_next_update_timestamp_seconds``: when each partner CA's CRL in force
        goes stale, so an alert can fire while a fresh one can still be installed."""
        assert self.crl_watcher is not None
        for issuer, moment in next_updates(self.crl_watcher.files).items():
            self.metrics.crl_next_update.labels(issuer=issuer).set(moment.timestamp())

    def check_signing_keys(self) -> None:
        """ConfigError unless a key of ours is valid now, and one of each partner's
        ``sign_with``: checked before the store opens (and by ``check``)."""
        try:
            self.signer.current_key()
        except RuntimeError as exc:
            raise ConfigError(str(self.config.source), "signing_keys", str(exc)) from None
        for partner in self.config.partners.values():
            try:
                self.signer.current_key(partner.sign_with)
            except RuntimeError as exc:
                raise ConfigError(
                    str(partner.directory / PARTNER_FILE), "sign_with", str(exc)
                ) from None

    async def start(self) -> None:
        """Open the store, start the services (broker first), the relay, then take messages."""
        self.check_signing_keys()
        await self.store.open()
        loop = asyncio.get_running_loop()
        self.metrics.event_loop_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        started: list[Service] = []
        try:
            for service in self._services:
                await service.start()
                started.append(service)
            self.relay.start()
            self.outcome_relay.start()
            await self.partner_server.start()
        except BaseException:
            await self.outcome_relay.stop()
            await self.relay.stop()
            for service in reversed(started):
                await service.stop()
            await self.store.close()
            raise
        self._started = True
        log.info("gateway_started", party=self.config.party, partner_url=self.partner_url)

    async def stop(self) -> None:
        """Graceful: stop taking messages and let in-flight ones commit and be answered, stop
        the relay (after its round in progress) and the services, then close the store."""
        if not self._started:
            return
        self._started = False
        await self.partner_server.stop()
        await self.relay.stop()
        await self.outcome_relay.stop()
        for service in reversed(self._services):
            try:
                await service.stop()
            except Exception:
                # one service's fault must not leave the others, the bus and the store open
                log.exception("service_stop_failed", service=type(service).__name__)
        await self.bus.close()
        await self.store.close()
        log.info("gateway_stopped", party=self.config.party)
