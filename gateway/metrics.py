"""Prometheus metrics, one registry per runtime (several gateways can share one process).

Label values are bounded: partner labels are configured partner ids or ``-`` (no partner could
be tied), codes are PROTOCOL.md NACK codes, so an attacker cannot grow the series count.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

NO_PARTNER = "-"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.tls_reloads = Counter(
            "c2c_tls_reloads_total",
            "Reloads of our own TLS certificate and key, by outcome (tls_reloaded, "
            "tls_reload_refused).",
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
        self.outbox_depth = Gauge(
            "c2c_outbox_depth",
            "Outbound messages by state.",
            ["state"],
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

    def partner_label(self, partner: str | None) -> str:
        return partner if partner is not None and partner in self._partners else NO_PARTNER

    def render(self) -> bytes:
        return generate_latest(self.registry)
