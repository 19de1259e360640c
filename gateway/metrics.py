"""Prometheus metrics, one registry per runtime (several gateways can share one process).

Label values are bounded: partner labels are configured partner ids or ``-`` (no partner could
be tied), codes are PROTOCOL.md NACK codes, so an attacker cannot grow the series count.

Every labelled counter an alert rule (deploy/prometheus) reads is exported at 0 for each label
value known in advance, from the start: a series that first appears at 1 has no earlier sample,
so ``increase()`` sees no rise and the first clock step, refused reload or revoked certificate
would never alert (Prometheus's instrumentation practices: "avoid missing metrics").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from gateway import partner_keys
from gateway.errors import NackCode
from gateway.store.base import PartnerBacklog
from gateway.transports import tls_accept, tls_identity

NO_PARTNER = "-"
#: the label values the code uses, where it writes them as literals
TRANSPORTS = ("https", "amqp")
CLOCK_DIRECTIONS = ("forward", "back")
HISTORY_WHOSE = ("ours", "partner")
DISPATCHER_FAILURES = ("store_unavailable", "internal_error")
#: ``c2c_outbound_attempts_total``'s results (gateway/outbound/dispatcher.py)
OUTBOUND_RESULTS = ("acknowledged", "rejected", "retry", "dead", "handed")

#: from an outbound message's creation to the partner's ACK: a second on a good day, hours
#: while a partner is down (its messages live 24 h by default)
_DELIVERY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
    86400.0,
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WatchedBroker(Protocol):
    """What ``Metrics.watch_broker`` reads of the RabbitMQ connection (``AmqpBroker``)."""

    @property
    def connected(self) -> bool: ...

    def on_connection_lost(self, callback: Callable[[], None]) -> None: ...


#: why an internal API request was refused for its token (``gateway.api.auth``)
API_AUTH_REASONS = ("missing", "malformed", "expired", "not_yet_valid", "invalid", "scope")


class Metrics:
    """The gateway's metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(self, partners: Collection[str] = ()) -> None:
        self._partners = frozenset(partners)
        self.registry = CollectorRegistry(auto_describe=True)
        self.inbound_received = Counter(
            "c2c_inbound_received_total",
            "Inbound messages received, before any check.",
            ["partner", "transport"],
            registry=self.registry,
        )
        self.inbound_accepted = Counter(
            "c2c_inbound_accepted_total",
            "Inbound messages accepted (ACK after commit).",
            ["partner", "message_type"],
            registry=self.registry,
        )
        self.inbound_duplicates = Counter(
            "c2c_inbound_duplicates_total",
            "Exact re-sends answered with the original receipt.",
            ["partner"],
            registry=self.registry,
        )
        self.inbound_rejected = Counter(
            "c2c_inbound_rejected_total",
            "Inbound messages rejected, by NACK code.",
            ["partner", "code"],
            registry=self.registry,
        )
        self.tls_refused = Counter(
            "c2c_tls_handshakes_refused_total",
            "Partner-endpoint TLS handshakes refused, by reason (no_cert, expired, revoked ...).",
            ["reason"],
            registry=self.registry,
        )
        self.api_auth_refused = Counter(
            "c2c_api_auth_refused_total",
            "Internal API requests refused for their bearer token (401) or its scope (403), by"
            " reason (missing, malformed, expired, not_yet_valid, invalid, scope).",
            ["reason"],
            registry=self.registry,
        )
        self.outbound_tls_refused = Counter(
            "c2c_outbound_tls_refused_total",
            "Connections to partners refused for the partner's server certificate, by reason "
            "(revoked, revocation_unknown, expired, untrusted ...): nothing was sent on them.",
            ["reason"],
            registry=self.registry,
        )
        self.https_connections_capped = Counter(
            "c2c_https_connections_refused_total",
            "Partner-endpoint connections closed at accept, before any TLS work, by the cap "
            "they were over (total, per_source).",
            ["limit"],
            registry=self.registry,
        )
        self.https_connections_closed = Counter(
            "c2c_https_connections_closed_total",
            "Partner-endpoint connections closed before their first request: at "
            "header_timeout_s from accept, by where they were (handshake_wait: waiting for a "
            "turn to handshake; handshake; request_head: handshaken, no complete request head), "
            "or to make room for another at the total cap (evicted).",
            ["stage"],
            registry=self.registry,
        )
        self.tls_certificate_expiry = Gauge(
            "c2c_tls_certificate_expiry_timestamp_seconds",
            "When our own TLS certificate in force expires (Unix time).",
            registry=self.registry,
        )
        self.crl_next_update = Gauge(
            "c2c_tls_crl_next_update_timestamp_seconds",
            "When the CRL in force of each partner CA (by its certificate's CN) passes its "
            "nextUpdate (Unix time): from then on the CA's certificates are refused at the "
            "handshake until a fresh CRL is installed. Only with [tls] crls.",
            ["issuer"],
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "c2c_tls_reloads_total",
            "Reloads of our own TLS certificate and key, by outcome (tls_reloaded, "
            "tls_reload_refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.partner_key_reloads = Counter(
            "c2c_partner_key_reloads_total",
            "Reloads of partners' signing keys (SIGHUP) that changed them or were refused, by "
            "outcome (partner_keys_reloaded, partner_keys_reload_refused: the keys in force "
            "stay, a revoked key among them).",
            ["outcome"],
            registry=self.registry,
        )
        self.inbound_latency = Histogram(
            "c2c_inbound_latency_seconds",
            "Time from receiving a body to having the answer ready (after commit).",
            ["transport", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.relay_published = Counter(
            "c2c_relay_published_total",
            "Inbound records handed to the internal bus (at least once).",
            registry=self.registry,
        )
        self.relay_failures = Counter(
            "c2c_relay_failures_total",
            "Relay rounds that failed (store or bus unavailable, or a bug).",
            registry=self.registry,
        )
        self.outcomes_published = Counter(
            "c2c_outcomes_published_total",
            "Outcomes of outbound messages (final states) handed to the internal bus"
            " (at least once).",
            registry=self.registry,
        )
        self.outcome_failures = Counter(
            "c2c_outcome_failures_total",
            "Outcome relay rounds in which the bus did not take every outcome (an outage,"
            " an outcome returned as unroutable: no queue bound to its key), or that failed.",
            registry=self.registry,
        )
        self.outbound_attempts = Counter(
            "c2c_outbound_attempts_total",
            "Sends to partners by how they ended: acknowledged, rejected (a NACK that is"
            " final), retry (a transport error or a NACK for later), dead (an answer that"
            " allows no retry), handed (taken by an asynchronous transport).",
            ["partner", "result"],
            registry=self.registry,
        )
        self.dispatcher_failures = Counter(
            "c2c_dispatcher_failures_total",
            "Dispatcher rounds that failed: store_unavailable (an outage, waited out) or"
            " internal_error (a bug, logged with its traceback).",
            ["reason"],
            registry=self.registry,
        )
        self.audit_witnessed = Counter(
            "c2c_audit_checkpoints_witnessed_total",
            "Partners' checkpoints we answered, by status (cosigned, stale, inconsistent).",
            ["partner", "status"],
            registry=self.registry,
        )
        self.audit_cosignatures = Counter(
            "c2c_audit_cosignatures_received_total",
            "Partners' cosignatures of our checkpoints, verified and stored.",
            ["partner"],
            registry=self.registry,
        )
        self.audit_history_inconsistent = Counter(
            "c2c_audit_history_inconsistent_total",
            "Alerts: a partner's log contradicts a checkpoint we witnessed, or a partner "
            "reports that ours does.",
            ["partner", "whose"],
            registry=self.registry,
        )
        self.outbound_breaker_open = Gauge(
            "c2c_outbound_breaker_open",
            "1 while this gateway's circuit breaker for the partner is not closed (open, or"
            " half-open until a probe succeeds): its last attempts failed. 0 once one succeeds.",
            ["partner"],
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "c2c_outbox_depth",
            "Outbound messages by state.",
            ["state"],
            registry=self.registry,
        )
        # Per partner, read from the store at scrape (``show_backlog``).
        self.outbound_pending = Gauge(
            "c2c_outbound_pending",
            "Outbound messages to the partner still at work: queued, or sent and waiting for"
            " its receipt.",
            ["partner"],
            registry=self.registry,
        )
        self.outbound_oldest_pending_age = Gauge(
            "c2c_outbound_oldest_pending_age_seconds",
            "Seconds since the creation of the oldest outbound message to the partner still"
            " at work; 0 when none is.",
            ["partner"],
            registry=self.registry,
        )
        self.outbound_delivery = Histogram(
            "c2c_outbound_delivery_seconds",
            "From an outbound message's creation to the partner's ACK receipt for it, retries"
            " and waits included.",
            ["partner"],
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )
        # What holds memory while a backlog drains (RELIABILITY-SECURITY T55); read at scrape.
        self.relay_handover_records = Gauge(
            "c2c_relay_handover_records",
            "Committed inbound records held in memory for the relay's next publish.",
            registry=self.registry,
        )
        self.relay_handover_bytes = Gauge(
            "c2c_relay_handover_bytes",
            "Bytes (bodies and receipts) those records hold.",
            registry=self.registry,
        )
        self.amqp_in_flight = Gauge(
            "c2c_amqp_deliveries_in_flight",
            "AMQP deliveries being handled and not yet settled, all consumed queues.",
            registry=self.registry,
        )
        self.amqp_processing_failures = Counter(
            "c2c_amqp_processing_failures_total",
            "Partner deliveries that failed in processing and went back to their queue "
            "(counted toward the delivery limit).",
            ["partner"],
            registry=self.registry,
        )
        self.amqp_dead_lettered = Counter(
            "c2c_amqp_dead_lettered_total",
            "Partner deliveries that failed on their last allowed attempt: dead-lettered to "
            "the partner's .in.dead queue (audited as poison).",
            ["partner"],
            registry=self.registry,
        )
        # Registered by watch_broker, so a gateway without RabbitMQ exports neither.
        self.amqp_connected = Gauge(
            "c2c_amqp_connected",
            "1 while the RabbitMQ connection is open and answering; 0 while it is lost and"
            " reconnecting, or a readiness round trip goes unanswered (a silent path).",
            registry=None,
        )
        self.amqp_connection_losses = Counter(
            "c2c_amqp_connection_losses",
            "Times the open RabbitMQ connection was lost (one per outage, however many"
            " reconnect attempts fail).",
            registry=None,
        )
        self._broker: WatchedBroker | None = None
        self.event_loop_tasks = Gauge(
            "c2c_event_loop_tasks",
            "asyncio tasks alive on the gateway's event loop.",
            registry=self.registry,
        )
        self.clock_steps = Counter(
            "c2c_clock_steps_total",
            "Steps of the wall clock against the monotonic clock, by direction (forward, back).",
            ["direction"],
            registry=self.registry,
        )
        # process_resident_memory_bytes, process_open_fds, CPU seconds (Linux /proc)
        ProcessCollector(registry=self.registry)
        self._export_zeros()

    def _export_zeros(self) -> None:
        """The counters the alert rules read, at 0 for every label value known in advance."""
        partners = sorted(self._partners)
        codes = [code.value for code in NackCode]
        _zero(self.inbound_received, partner=[*partners, NO_PARTNER], transport=TRANSPORTS)
        _zero(self.inbound_rejected, partner=[*partners, NO_PARTNER], code=codes)
        _zero(self.tls_refused, reason=tls_accept.REASONS)
        _zero(self.api_auth_refused, reason=API_AUTH_REASONS)
        _zero(self.outbound_tls_refused, reason=tls_accept.REASONS)
        _zero(self.tls_reloads, outcome=(tls_identity.RELOADED, tls_identity.REFUSED))
        _zero(self.partner_key_reloads, outcome=(partner_keys.RELOADED, partner_keys.REFUSED))
        _zero(self.dispatcher_failures, reason=DISPATCHER_FAILURES)
        _zero(self.audit_history_inconsistent, partner=partners, whose=HISTORY_WHOSE)
        _zero(self.amqp_dead_lettered, partner=partners)
        _zero(self.clock_steps, direction=CLOCK_DIRECTIONS)
        _zero(self.outbound_attempts, partner=partners, result=OUTBOUND_RESULTS)
        for partner in partners:
            self.outbound_breaker_open.labels(partner).set(0)
            self.outbound_delivery.labels(partner)
        self.show_backlog({}, datetime.now(UTC))

    def show_backlog(self, backlog: Mapping[str, PartnerBacklog], now: datetime) -> None:
        """Set the per-partner backlog gauges from ``Store.outbox_backlog``: every configured
        partner has its series (0 when nothing waits); a recipient no longer configured counts
        under ``-``."""
        pending = dict.fromkeys([*self._partners, NO_PARTNER], 0)
        oldest: dict[str, datetime] = {}
        for recipient, each in backlog.items():
            label = self.partner_label(recipient)
            pending[label] += each.pending
            if label not in oldest or each.oldest_created_at < oldest[label]:
                oldest[label] = each.oldest_created_at
        for label, count in pending.items():
            self.outbound_pending.labels(label).set(count)
            age = (now - oldest[label]).total_seconds() if label in oldest else 0.0
            self.outbound_oldest_pending_age.labels(label).set(max(age, 0.0))

    def observe_delivery(self, partner: str, created_at: datetime, now: datetime) -> None:
        """``c2c_outbound_delivery_seconds``: a message to ``partner`` acknowledged ``now``."""
        seconds = max((now - created_at).total_seconds(), 0.0)
        self.outbound_delivery.labels(self.partner_label(partner)).observe(seconds)

    def watch_broker(self, broker: WatchedBroker) -> None:
        """Export the state of the RabbitMQ connection: ``c2c_amqp_connected``, read at
        scrape time, and ``c2c_amqp_connection_losses_total``. Once per registry."""
        if self._broker is not None:
            return
        self._broker = broker
        self.amqp_connected.set_function(lambda: 1.0 if broker.connected else 0.0)
        self.registry.register(self.amqp_connected)
        self.registry.register(self.amqp_connection_losses)
        broker.on_connection_lost(self.amqp_connection_losses.inc)

    def partner_label(self, partner: str | None) -> str:
        return partner if partner is not None and partner in self._partners else NO_PARTNER

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _zero(counter: Counter, **values: Iterable[str]) -> None:
    """Create ``counter``'s series for every combination of ``values`` (a label's values by
    its name); a new series starts at 0."""
    names = list(values)
    for combination in itertools.product(*values.values()):
        counter.labels(**dict(zip(names, combination, strict=True)))
